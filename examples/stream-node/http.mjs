// A streamed HTTP response for an HTTP route (`/fn/stream-http/...`, a function URL in RESPONSE_STREAM
// mode on Lambda): the status, headers and cookies go first, then the body as it is written.
//
// Query: ?lines=5&delayMs=200&failAt=3 (failAt: throw after that line; the client's body is cut off).
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

export const handler = awslambda.streamifyResponse(async (event, responseStream) => {
  const query = event.queryStringParameters ?? {};
  const lines = Number(query.lines ?? 3);
  const delayMs = Number(query.delayMs ?? 300);
  const failAt = query.failAt === undefined ? undefined : Number(query.failAt);
  const stream = awslambda.HttpResponseStream.from(responseStream, {
    statusCode: 200,
    headers: { 'Content-Type': 'text/html; charset=utf-8', 'Cache-Control': 'no-store' },
    cookies: ['streamed=yes; Path=/'],
  });
  stream.write('<!doctype html><title>streaming</title>\n');
  for (let i = 1; i <= lines; i += 1) {
    stream.write(`<p>line ${i} of ${lines}</p>\n`);
    if (failAt === i) {
      throw new Error(`failed after line ${i}`);
    }
    if (i < lines) await sleep(delayMs);
  }
  stream.end();
});
