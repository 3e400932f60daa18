#!/usr/bin/env bash
# Builds AWS's Runtime Interface Emulator (aws-lambda-rie) from its published Go module into a cache
# outside the repository; built only when missing. Prints the binary's path.
set -euo pipefail
RIE_VERSION=${RIE_VERSION:-v0.0.0-20261030222936-bef5c4ba774d}
CACHE=${LAMBDALET_CACHE:-$HOME/.cache/lambdalet}
OUT=$CACHE/rie/$RIE_VERSION
BIN=$OUT/aws-lambda-rie
if [ ! -x "$BIN" ]; then
  export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=mod
  mkdir -p "$OUT/src"
  cd "$OUT/src"
  printf 'module local/riebin\n\ngo 1.26\n\nrequire github.com/aws/aws-lambda-runtime-interface-emulator %s\n' "$RIE_VERSION" > go.mod
  printf '//go:build tools\n\npackage tools\n\nimport _ "github.com/aws/aws-lambda-runtime-interface-emulator/cmd/aws-lambda-rie"\n' > tools.go
  go mod tidy >&2
  go build -trimpath -ldflags "-s -w" -o "$BIN" github.com/aws/aws-lambda-runtime-interface-emulator/cmd/aws-lambda-rie >&2
fi
echo "$BIN"
