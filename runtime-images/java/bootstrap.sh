#!/bin/sh
# java17/java21: AWS's Java runtime interface client is the bootstrap; it loads `package.Class::method`
# from _HANDLER out of the code directory (classes at its root, jars in lib/, as in a Lambda zip).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
# The image carries the client in lib/ beside this script; elsewhere fetch-ric.sh puts it in this cache.
# (The agent passes the runtime no LAMBDALET_* variables, so the cache path is fixed under $HOME.)
if [ -d "$here/lib" ]; then ric=$here/lib; else ric=$HOME/.cache/lambdalet/java-ric/2.10.1; fi
if ! ls "$ric"/aws-lambda-java-runtime-interface-client-*.jar >/dev/null 2>&1; then
  echo "lambdalet: AWS's Java runtime interface client is not in $ric; run $here/fetch-ric.sh" >&2
  exit 1
fi
# The client's native library, unpacked once by fetch-ric.sh: without it every JVM start would copy it
# to the one shared path /tmp/.libaws-lambda-jni.so, racing other environments on the same machine.
case "$(uname -m)" in
  aarch64 | arm64) arch=aarch_64 ;;
  *) arch=x86_64 ;;
esac
libc=linux
if ls /lib/ld-musl-* >/dev/null 2>&1; then libc=linux_musl; fi
jni=$ric/jni/libaws-lambda-jni.$libc-$arch.so
set --
if [ -f "$jni" ]; then set -- "-Dcom.amazonaws.services.lambda.runtime.api.client.runtimeapi.NativeClient.JNI=$jni"; fi
task=${LAMBDA_TASK_ROOT:-$PWD}
memory=${AWS_LAMBDA_FUNCTION_MEMORY_SIZE:-128}
# As Lambda's Java runtimes: serial GC, C1 only (fast start), heap bounded by the function's memory; MaxRAM
# sizes everything else (initial heap, buffers) for that memory rather than for the machine's.
exec java -XX:+UseSerialGC -XX:+TieredCompilation -XX:TieredStopAtLevel=1 -Xshare:auto \
  "-XX:MaxRAM=${memory}m" "-Xmx$((memory * 85 / 100))m" "$@" -cp "$task:$task/lib/*:$ric/*" \
  com.amazonaws.services.lambda.runtime.api.client.AWSLambda "${_HANDLER:-}"
