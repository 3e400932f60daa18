// lambdalet's Node.js runtime: a Lambda Runtime API client with no dependencies beyond node itself.
//
// Loads the handler named by _HANDLER (`file.export`, CommonJS or ES module) from LAMBDA_TASK_ROOT, then
// loops: GET /next, call the handler, POST /response or /error. Async (Promise) and callback handlers,
// the Node.js context object, and the error shapes of AWS's Node.js runtime interface client
// (`{errorType, errorMessage, trace}`; init errors `Runtime.ImportModuleError`, `Runtime.HandlerNotFound`,
// `Runtime.UserCodeSyntaxError`, `Runtime.MalformedHandlerName`). An init error is reported, then the
// process exits. Response streaming: `awslambda.streamifyResponse(handler)` and
// `awslambda.HttpResponseStream.from(stream, prelude)`, as AWS's client provides them.

import fs from 'node:fs';
import http from 'node:http';
import { createRequire } from 'node:module';
import { Writable } from 'node:stream';
import { finished } from 'node:stream/promises';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import util from 'node:util';

const require = createRequire(import.meta.url);
const API = '/2018-06-01/runtime';

// ---- the Runtime API client: next, respond, fail, initError ----

class RuntimeClient {
  constructor(address) {
    const at = address.lastIndexOf(':');
    this.host = address.slice(0, at);
    this.port = Number(address.slice(at + 1));
    // Idle keep-alive sockets are unref'd by the agent, so they never keep the event loop alive.
    this.agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
  }

  request(method, urlPath, body, headers) {
    return new Promise((resolve, reject) => {
      const req = http.request(
        { host: this.host, port: this.port, method, path: API + urlPath, agent: this.agent, headers },
        (res) => {
          const chunks = [];
          res.on('data', (chunk) => chunks.push(chunk));
          res.on('end', () => resolve({ status: res.statusCode, headers: res.headers, body: Buffer.concat(chunks) }));
          res.on('error', reject);
        },
      );
      req.on('error', reject);
      req.end(body);
    });
  }

  async next() {
    const res = await this.request('GET', '/invocation/next');
    if (res.status !== 200) {
      throw new Error(`GET /next returned ${res.status}: ${res.body.toString()}`);
    }
    return res;
  }

  respond(id, result) {
    let body;
    try {
      body = JSON.stringify(result === undefined ? null : result);
    } catch {
      return this.fail(id, new Error('Unable to stringify response body'));
    }
    return this.post(`/invocation/${encodeURIComponent(id)}/response`, body, 'application/json');
  }

  fail(id, error) {
    const shape = toErrorShape(error);
    return this.post(`/invocation/${encodeURIComponent(id)}/error`, JSON.stringify(shape), 'application/json', shape.errorType);
  }

  initError(error) {
    const shape = toErrorShape(error);
    return this.post('/init/error', JSON.stringify(shape), 'application/json', shape.errorType);
  }

  // A streamed response: a chunked POST /response opened at once (as AWS's client does), so a failure,
  // whenever it happens, travels in the error trailers.
  stream(id) {
    const request = http.request({
      host: this.host,
      port: this.port,
      method: 'POST',
      path: `${API}/invocation/${encodeURIComponent(id)}/response`,
      agent: this.agent,
      headers: {
        'Content-Type': 'application/octet-stream',
        'Transfer-Encoding': 'chunked',
        'Lambda-Runtime-Function-Response-Mode': 'streaming',
        Trailer: 'Lambda-Runtime-Function-Error-Type, Lambda-Runtime-Function-Error-Body',
      },
    });
    const answered = new Promise((resolve, reject) => {
      request.on('response', (res) => {
        res.resume();
        res.on('end', resolve);
      });
      request.on('error', reject);
    });
    let prelude;
    let wrote = false;
    const stream = new Writable({
      write: (chunk, encoding, callback) => {
        if (!wrote && prelude !== undefined) {
          request.write(prelude);
          request.write(Buffer.alloc(8)); // eight NUL bytes end the HTTP integration prelude
        }
        wrote = true;
        request.write(chunk, encoding, callback);
      },
      final: (callback) => {
        request.end();
        callback();
      },
    });
    stream.setContentType = (value) => request.setHeader('Content-Type', value);
    stream.setPrelude = (value) => {
      prelude = value;
    };
    return {
      stream,
      // Resolves once the Runtime API has answered the (ended) response.
      finished: () => answered,
      fail: (error) => {
        if (!request.writableEnded) {
          const shape = toErrorShape(error);
          request.addTrailers({
            'Lambda-Runtime-Function-Error-Type': shape.errorType,
            'Lambda-Runtime-Function-Error-Body': Buffer.from(JSON.stringify(shape)).toString('base64'),
          });
          request.end();
        }
        return answered;
      },
    };
  }

  async post(urlPath, body, contentType, errorType) {
    const headers = { 'Content-Type': contentType, 'Content-Length': Buffer.byteLength(body) };
    if (errorType !== undefined) {
      headers['Lambda-Runtime-Function-Error-Type'] = errorType;
    }
    const res = await this.request('POST', urlPath, body, headers);
    if (res.status !== 202) {
      process.stderr.write(`lambdalet: POST ${urlPath} returned ${res.status}: ${res.body.toString()}\n`);
    }
  }
}

// ---- errors ----

class RuntimeError extends Error {
  constructor(kind, message) {
    super(message);
    this.name = `Runtime.${kind}`;
  }
}

function toErrorShape(error) {
  try {
    const isError =
      util.types.isNativeError(error) ||
      (error && typeof error.name === 'string' && typeof error.message === 'string' && typeof error.stack === 'string');
    if (isError) {
      return { errorType: error.name, errorMessage: error.message, trace: trimTrace(String(error.stack)).split('\n') };
    }
    return { errorType: typeof error, errorMessage: String(error), trace: [] };
  } catch {
    return {
      errorType: 'handled',
      errorMessage: 'callback called with Error argument, but there was a problem while retrieving one or more of its message, name, and stack',
    };
  }
}

const OWN_FILE = new URL(import.meta.url).pathname;

// The bootstrap's own frames say nothing about the user's error.
function trimTrace(stack) {
  return stack
    .split('\n')
    .filter((line) => !line.includes(OWN_FILE))
    .join('\n');
}

// ---- logging: each console record is one line, tagged with time, request id and level ----

let currentRequestId;

function patchConsole() {
  const levels = { log: 'INFO', info: 'INFO', debug: 'DEBUG', warn: 'WARN', error: 'ERROR', trace: 'TRACE', fatal: 'FATAL' };
  for (const [method, level] of Object.entries(levels)) {
    console[method] = (...args) => {
      const message = util.format(...args).replaceAll('\n', '\r');
      process.stdout.write(`${new Date().toISOString()}\t${currentRequestId ?? 'undefined'}\t${level}\t${message}\n`);
    };
  }
}

function logError(what, error) {
  let detail;
  try {
    detail = JSON.stringify(toErrorShape(error));
  } catch {
    detail = String(error);
  }
  console.error(`${what} \t${detail}`);
}

// ---- loading the handler ----

function moduleType(file) {
  // The nearest package.json's "type" decides how a .js file loads (node_modules stops the search).
  let folder = path.dirname(file);
  for (;;) {
    if (folder.endsWith('/node_modules')) return false;
    const manifest = path.join(folder, 'package.json');
    if (fs.existsSync(manifest)) {
      try {
        return JSON.parse(fs.readFileSync(manifest, 'utf8')).type === 'module';
      } catch {
        return false;
      }
    }
    if (folder === '/') return false;
    folder = path.dirname(folder);
  }
}

async function loadModule(taskRoot, moduleRoot, name) {
  const base = path.resolve(taskRoot, moduleRoot, name);
  const exists = (suffix) => fs.existsSync(base + suffix);
  if (exists('')) return require(base);
  const esm = exists('.js') && moduleType(`${base}.js`);
  if (exists('.js') && !esm) return require(`${base}.js`);
  if (esm) return import(pathToFileURL(`${base}.js`).href);
  if (exists('.mjs')) return import(pathToFileURL(`${base}.mjs`).href);
  if (exists('.cjs')) return require(`${base}.cjs`);
  // A package name, resolved from the code directory (node_modules), as Lambda does.
  return require(require.resolve(name, { paths: [taskRoot, moduleRoot] }));
}

const STREAMING = Symbol.for('aws.lambda.runtime.handler.streaming');

globalThis.awslambda = {
  streamifyResponse: (handler) => {
    handler[STREAMING] = 'response';
    return handler;
  },
  HttpResponseStream: {
    from: (stream, prelude) => {
      stream.setContentType('application/vnd.awslambda.http-integration-response');
      stream.setPrelude(JSON.stringify(prelude));
      return stream;
    },
  },
};

async function loadHandler(taskRoot, handlerString) {
  if (handlerString.includes('..')) {
    throw new RuntimeError(
      'MalformedHandlerName',
      `'${handlerString}' is not a valid handler name. Use absolute paths when specifying root directories in handler names.`,
    );
  }
  const file = path.basename(handlerString);
  const moduleRoot = handlerString.slice(0, handlerString.indexOf(file));
  const match = /^([^.]*)\.(.*)$/.exec(file);
  if (!match) throw new RuntimeError('MalformedHandlerName', 'Bad handler');
  const [, name, exportPath] = match;

  let loaded;
  try {
    loaded = await loadModule(taskRoot, moduleRoot, name);
  } catch (error) {
    if (error instanceof SyntaxError) throw new RuntimeError('UserCodeSyntaxError', String(error));
    if (error && error.code === 'MODULE_NOT_FOUND') throw new RuntimeError('ImportModuleError', String(error));
    throw error;
  }
  const handler = exportPath.split('.').reduce((object, key) => object && object[key], loaded);
  if (!handler) throw new RuntimeError('HandlerNotFound', `${handlerString} is undefined or not exported`);
  if (typeof handler !== 'function') throw new RuntimeError('HandlerNotFound', `${handlerString} is not a function`);
  return handler;
}

// ---- the invocation loop ----

// What runs when the event loop has nothing left to do ('beforeExit'): finishing a callback handler
// that waits for an empty event loop, or a handler that never answered.
let onEmptyEventLoop = () => {};
// Where an uncaught exception or unhandled rejection is reported: init error before the first /next,
// the current invocation's error after.
let reportFatal;

function parseJson(text, what) {
  if (text === undefined) return undefined;
  try {
    return JSON.parse(text);
  } catch (error) {
    throw new Error(`Cannot parse ${what} as json: ${error}`);
  }
}

function buildContext(headers, callbacks) {
  const deadline = Number(headers['lambda-runtime-deadline-ms']);
  const env = process.env;
  return Object.assign(callbacks, {
    functionName: env.AWS_LAMBDA_FUNCTION_NAME,
    functionVersion: env.AWS_LAMBDA_FUNCTION_VERSION,
    memoryLimitInMB: env.AWS_LAMBDA_FUNCTION_MEMORY_SIZE,
    logGroupName: env.AWS_LAMBDA_LOG_GROUP_NAME,
    logStreamName: env.AWS_LAMBDA_LOG_STREAM_NAME,
    clientContext: parseJson(headers['lambda-runtime-client-context'], 'ClientContext'),
    identity: parseJson(headers['lambda-runtime-cognito-identity'], 'CognitoIdentity'),
    invokedFunctionArn: headers['lambda-runtime-invoked-function-arn'],
    awsRequestId: headers['lambda-runtime-aws-request-id'],
    tenantId: headers['lambda-runtime-aws-tenant-id'],
    getRemainingTimeInMillis: () => deadline - Date.now(),
  });
}

async function invokeStreaming(client, handler, invocation) {
  const headers = invocation.headers;
  const id = headers['lambda-runtime-aws-request-id'];
  currentRequestId = id;
  if (headers['lambda-runtime-trace-id']) process.env._X_AMZN_TRACE_ID = headers['lambda-runtime-trace-id'];
  else delete process.env._X_AMZN_TRACE_ID;
  const response = client.stream(id);
  const fail = async (error) => {
    logError('Invoke Error', error);
    await response.fail(error);
  };
  reportFatal = (error, code) => {
    fail(error).finally(() => process.exit(code));
  };
  onEmptyEventLoop = () => {};
  try {
    const event = JSON.parse(invocation.body.toString('utf8'));
    const result = handler(event, response.stream, buildContext(headers, {}));
    if (!result || typeof result.then !== 'function') {
      await fail(new Error('Streaming does not support non-async handlers.'));
      return;
    }
    await result;
    // As AWS's aws-lambda-ric: the invocation lasts until the handler ends its stream, so a handler that
    // returns without ending it runs into the function's timeout (Sandbox.Timedout).
    await finished(response.stream);
    await response.finished();
  } catch (error) {
    await fail(error);
  }
}

function invokeOnce(client, handler, invocation) {
  return new Promise((settle) => {
    const headers = invocation.headers;
    const id = headers['lambda-runtime-aws-request-id'];
    currentRequestId = id;
    if (headers['lambda-runtime-trace-id']) process.env._X_AMZN_TRACE_ID = headers['lambda-runtime-trace-id'];
    else delete process.env._X_AMZN_TRACE_ID;

    let finished = false; // only the first of callback/succeed/fail/done/return counts
    let waitsForEmptyEventLoop = true;
    const post = (sending) => {
      onEmptyEventLoop = () => {};
      sending.then(settle, (error) => {
        process.stderr.write(`lambdalet: lost the Runtime API: ${error}\n`);
        process.exit(1);
      });
    };
    const fail = (error) => {
      logError('Invoke Error', error);
      post(client.fail(id, error));
    };
    const once =
      (fn) =>
      (...args) => {
        if (finished) return;
        finished = true;
        fn(...args);
      };
    const done = once((error, result) => {
      if (error !== undefined && error !== null) fail(error);
      else post(client.respond(id, result));
    });
    const callback = once((error, result) => {
      if (error !== undefined && error !== null) fail(error);
      else if (!waitsForEmptyEventLoop) post(client.respond(id, result));
      else onEmptyEventLoop = () => setImmediate(() => post(client.respond(id, result)));
    });
    const callbacks = {
      get callbackWaitsForEmptyEventLoop() {
        return waitsForEmptyEventLoop;
      },
      set callbackWaitsForEmptyEventLoop(value) {
        waitsForEmptyEventLoop = value;
      },
      succeed: (result) => done(null, result),
      fail: (error) => done(error === undefined || error === null ? 'handled' : error),
      done,
    };

    reportFatal = (error, code) => {
      logError('Uncaught Exception', error);
      client.fail(id, error).finally(() => process.exit(code));
    };
    onEmptyEventLoop = () => {
      if (finished) return;
      finished = true;
      // The event loop ran dry without an answer (no callback, or a promise that never settles):
      // the nodejs20.x/22.x client answers null.
      post(client.respond(id, null));
    };

    try {
      const event = JSON.parse(invocation.body.toString('utf8'));
      const result = handler(event, buildContext(headers, callbacks), callback);
      if (result && typeof result.then === 'function') {
        result.then(callbacks.succeed, callbacks.fail);
      }
    } catch (error) {
      callback(error);
    }
  });
}

async function main() {
  patchConsole();
  const client = new RuntimeClient(process.env.AWS_LAMBDA_RUNTIME_API);
  reportFatal = (error, code) => {
    logError('Uncaught Exception', error);
    client.initError(error).finally(() => process.exit(code));
  };
  process.on('uncaughtException', (error) => reportFatal(error, 129));
  process.on('unhandledRejection', (reason) => {
    reportFatal(new RuntimeError('UnhandledPromiseRejection', String(reason)), 128);
  });
  process.on('beforeExit', () => onEmptyEventLoop());

  let handler;
  try {
    handler = await loadHandler(process.env.LAMBDA_TASK_ROOT || process.cwd(), process.env._HANDLER || '');
  } catch (error) {
    logError('Init Error', error);
    await client.initError(error);
    process.exit(1);
  }
  const streaming = handler[STREAMING] === 'response';
  for (;;) {
    const invocation = await client.next();
    if (streaming) await invokeStreaming(client, handler, invocation);
    else await invokeOnce(client, handler, invocation);
  }
}

main().catch((error) => {
  process.stderr.write(`lambdalet: runtime failed: ${error && error.stack ? error.stack : error}\n`);
  process.exit(1);
});
