// An ES module handler (.mjs), async.
export const handler = async (event) => ({ module: 'esm', name: event.name });
