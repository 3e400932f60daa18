#!/usr/bin/env bash
# Fetches AWS's Java runtime interface client (com.amazonaws:aws-lambda-java-runtime-interface-client, the
# java17/java21 bootstrap) and its runtime dependencies from Maven Central into a folder of jars; fetched
# only when missing. Prints the folder. Usage: fetch-ric.sh [DEST] (default: a cache outside the repo).
set -euo pipefail
VERSION=${AWS_LAMBDA_JAVA_RIC_VERSION:-2.10.1}
# Under $HOME (not $LAMBDALET_CACHE): bootstrap.sh looks there, and the agent passes it no LAMBDALET_* variables.
DEST=${1:-$HOME/.cache/lambdalet/java-ric/$VERSION}
if ! compgen -G "$DEST/aws-lambda-java-runtime-interface-client-*.jar" >/dev/null; then
  command -v mvn >/dev/null || { echo "fetching the Java runtime interface client needs mvn (Maven) on PATH" >&2; exit 1; }
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  cat > "$work/pom.xml" <<POM
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>dev.lambdalet</groupId><artifactId>java-ric</artifactId><version>1</version>
  <dependencies>
    <dependency>
      <groupId>com.amazonaws</groupId><artifactId>aws-lambda-java-runtime-interface-client</artifactId>
      <version>$VERSION</version>
    </dependency>
  </dependencies>
</project>
POM
  mkdir -p "$DEST"
  mvn -q -B -f "$work/pom.xml" dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$DEST" >&2
fi
if [ ! -d "$DEST/jni" ]; then
  # The client's native libraries (jni/*.so inside its jar), unpacked once for bootstrap.sh.
  jar=$(ls "$DEST"/aws-lambda-java-runtime-interface-client-*.jar)
  if command -v unzip >/dev/null; then unzip -q -o "$jar" 'jni/*' -d "$DEST"; else (cd "$DEST" && jar xf "$jar" jni); fi
fi
echo "$DEST"
