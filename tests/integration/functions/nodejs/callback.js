// Callback handlers: the result is sent once the event loop is empty, unless the function says not to wait.
'use strict';

exports.waits = (event, context, callback) => {
  const order = [];
  setTimeout(() => order.push('timer'), 50);
  callback(null, order);
  order.push('callback');
};

exports.noWait = (event, context, callback) => {
  context.callbackWaitsForEmptyEventLoop = false;
  const order = [];
  setTimeout(() => order.push('timer'), 30000);
  callback(null, order);
  order.push('callback');
};

exports.fails = (event, context, callback) => {
  callback(new TypeError('callback failure'));
};

exports.succeed = (event, context) => {
  context.succeed({ via: 'context.succeed' });
};

exports.sync = () => 'ignored: a non-async handler answers through its callback';

exports.uncaught = (event, context, callback) => {
  setTimeout(() => {
    throw new RangeError('thrown from a timer');
  }, 10);
};

exports.rejects = async () => {
  Promise.reject(new Error('nobody handles this'));
  await new Promise((resolve) => setTimeout(resolve, 200));
  return 'too late';
};

exports.identity = async (event, context) => ({
  clientContext: context.clientContext ?? null,
  identity: context.identity ?? null,
  trace: process.env._X_AMZN_TRACE_ID ?? null,
});

exports.neverSettles = async () => new Promise(() => {});
