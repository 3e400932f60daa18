#!/bin/sh
# java17/java21: AWS's Java runtime interface client is the bootstrap; it loads `package.Class::method`
# from _HANDLER out of the code directory (classes at its root, jars in lib/, as in a Lambda zip).
# The client's jars come from $LAMBDALET_JAVA_RIC_DIR, else lib/ beside this script (the image), else the
# cache that fetch-ric.sh fills.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
ric=${LAMBDALET_JAVA_RIC_DIR:-}
if [ -z "$ric" ]; then
  if [ -d "$here/lib" ]; then ric=$here/lib; else ric=${LAMBDALET_CACHE:-$HOME/.cache/lambdalet}/java-ric/2.10.1; fi
fi
if ! ls "$ric"/aws-lambda-java-runtime-interface-client-*.jar >/dev/null 2>&1; then
  echo "lambdalet: AWS's Java runtime interface client is not in $ric; run $here/fetch-ric.sh" >&2
  exit 1
fi
task=${LAMBDA_TASK_ROOT:-$PWD}
memory=${AWS_LAMBDA_FUNCTION_MEMORY_SIZE:-128}
# As Lambda's Java runtimes: serial GC, C1 only (fast start), heap bounded by the function's memory.
exec java -XX:+UseSerialGC -XX:+TieredCompilation -XX:TieredStopAtLevel=1 -Xshare:auto \
  "-Xmx$((memory * 85 / 100))m" -cp "$task:$task/lib/*:$ric/*" \
  com.amazonaws.services.lambda.runtime.api.client.AWSLambda "${_HANDLER:-}"
