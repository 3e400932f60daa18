// The conformance function (CommonJS, async handler). Every runtime has a twin with the same actions.
'use strict';

let invocations = 0;

class ConformanceError extends Error {
  constructor(message) {
    super(message);
    this.name = 'ConformanceError';
  }
}

exports.handler = async (event, context) => {
  invocations += 1;
  switch (event.action) {
    case 'echo':
      return { echo: event.payload };
    case 'log':
      console.log(`conformance log ${event.message}`);
      return { logged: true };
    case 'count':
      return { count: invocations };
    case 'error':
      throw new ConformanceError(event.message);
    case 'sleep':
      await new Promise((resolve) => setTimeout(resolve, event.seconds * 1000));
      return { slept: event.seconds };
    case 'crash':
      process.exit(3);
      break;
    case 'big':
      return { data: 'x'.repeat(event.size) };
    case 'context':
      return {
        requestId: context.awsRequestId,
        remainingMs: context.getRemainingTimeInMillis(),
        functionName: context.functionName,
        functionVersion: context.functionVersion,
        memoryMB: Number(context.memoryLimitInMB),
        invokedFunctionArn: context.invokedFunctionArn,
        logGroupName: context.logGroupName,
        logStreamName: context.logStreamName,
        clientContext: context.clientContext ?? null,
        identity: context.identity ?? null,
        env: { taskRoot: process.env.LAMBDA_TASK_ROOT, handler: process.env._HANDLER },
      };
    default:
      throw new Error(`unknown action ${event.action}`);
  }
};
