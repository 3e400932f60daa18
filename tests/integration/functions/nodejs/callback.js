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
  setTimeout(() => order.push('timer'), 2000);
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
