// A .js file that package.json "type": "module" makes an ES module.
export async function handler(event) {
  return { module: 'type-module', name: event.name };
}
