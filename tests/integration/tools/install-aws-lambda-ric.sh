#!/usr/bin/env bash
# Installs AWS's Node.js runtime interface client (npm `aws-lambda-ric`, a native addon built from source)
# into a cache outside the repository; installed only when missing. Prints the path of its launcher.
# 3.x is the client of the nodejs20.x/nodejs22.x runtimes (4.x is the Node.js 24 one, without callback handlers).
# Build tools it needs: g++, make, cmake, autoconf, automake, libtool (Debian packages).
set -euo pipefail
VERSION=${AWS_LAMBDA_RIC_VERSION:-3.3.0}
CACHE=${LAMBDALET_CACHE:-$HOME/.cache/lambdalet}
OUT=$CACHE/npm/aws-lambda-ric-$VERSION
BIN=$OUT/node_modules/.bin/aws-lambda-ric
if [ ! -x "$BIN" ]; then
  missing=""
  for tool in g++ make cmake autoconf automake libtoolize npm; do
    command -v "$tool" >/dev/null 2>&1 || missing="$missing $tool"
  done
  if [ -n "$missing" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    # As `make`'s apt step does for the other Debian packages the tests need.
    echo "installing build tools for aws-lambda-ric:$missing" >&2
    packages=$(echo "$missing" | sed 's/libtoolize/libtool/')
    # shellcheck disable=SC2086 (one word per package)
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $packages; } >&2
    missing=""
    for tool in g++ make cmake autoconf automake libtoolize npm; do
      command -v "$tool" >/dev/null 2>&1 || missing="$missing $tool"
    done
  fi
  if [ -n "$missing" ]; then
    echo "aws-lambda-ric $VERSION needs these build tools on PATH:$missing (Debian: g++ make cmake autoconf automake libtool npm)" >&2
    exit 1
  fi
  mkdir -p "$OUT"
  cd "$OUT"
  [ -f package.json ] || echo '{"name":"lambdalet-aws-lambda-ric","private":true}' > package.json
  npm install --no-audit --no-fund --loglevel=error --cache "$CACHE/npm/cache" "aws-lambda-ric@$VERSION" >&2
fi
echo "$BIN"
