// Deliberately broken: loading it is Runtime.UserCodeSyntaxError.
exports.handler = async (event) => {
  return {;
};
