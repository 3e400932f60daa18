// Returns a greeting for event.name (an ES module, async handler).
export const handler = async (event) => {
  const name = event && typeof event === 'object' && event.name ? event.name : 'world';
  console.log(`greeting ${name}`);
  return { message: `Hello, ${name}!` };
};
