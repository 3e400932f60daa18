// Response streaming handlers (awslambda.streamifyResponse), as on Lambda's Node.js runtimes.
/* global awslambda */

export const chunks = awslambda.streamifyResponse(async (event, responseStream) => {
  responseStream.setContentType('text/plain');
  for (let i = 0; i < event.count; i += 1) {
    responseStream.write(`chunk ${i} ✓\n`);
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
  responseStream.end();
});

export const http = awslambda.streamifyResponse(async (event, responseStream) => {
  const stream = awslambda.HttpResponseStream.from(responseStream, {
    statusCode: 201,
    headers: { 'x-custom': 'yes' },
  });
  stream.write('hello ');
  stream.end(event.name);
});

export const failsMidStream = awslambda.streamifyResponse(async (event, responseStream) => {
  responseStream.write('partial');
  await new Promise((resolve) => setTimeout(resolve, 5));
  throw new TypeError('stream broke');
});

export const failsBeforeWriting = awslambda.streamifyResponse(async () => {
  throw new RangeError('nothing written');
});

export const neverEnds = awslambda.streamifyResponse(async (event, responseStream) => {
  responseStream.write('started');
});
