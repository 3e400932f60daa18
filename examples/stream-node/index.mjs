// Response streaming: the caller receives each write as it happens, not the whole result at the end.
// `awslambda` is a global of Lambda's Node.js runtimes (and of lambdalet's).
//
// Event: {"chunks": 3, "delayMs": 300, "failAt": 2}: writes `chunks` lines `delayMs` apart; with
// `failAt`, throws right after writing that chunk (the caller has the chunks before it, then the error).
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

export const handler = awslambda.streamifyResponse(async (event, responseStream) => {
  const chunks = event.chunks ?? 3;
  const delayMs = event.delayMs ?? 300;
  responseStream.setContentType('text/plain; charset=utf-8');
  for (let i = 1; i <= chunks; i += 1) {
    responseStream.write(`chunk ${i} of ${chunks}\n`);
    if (event.failAt === i) {
      throw new Error(`failed after chunk ${i}`);
    }
    if (i < chunks) await sleep(delayMs);
  }
  responseStream.end();
});
