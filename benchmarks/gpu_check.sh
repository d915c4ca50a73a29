#!/usr/bin/env bash
# Run benchmarks/gpu_check.py on a GPU machine, with Liger-Kernel from a carried wheel when there is one.
#
#   bash benchmarks/gpu_check.sh [gpu_check.py options]      # details go to $OUT (or .) /gpu_check.json
#
# Liger-Kernel (pure Python) for a machine without network: here, at the repository root, run
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform any -d .whl liger-kernel==0.8.5
# and carry `.whl` to the GPU machine; this script installs it into /tmp/site there.
# TRL (`trl.kernels.chunked_divergence`, >= 1.16) is compared when it imports there; it needs
# transformers and accelerate besides its own wheel, so on a machine without them (and without
# network) its rows say "not installed" and the rest of the check runs as usual.
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
exec python3 benchmarks/gpu_check.py --output "${OUT:-.}/gpu_check.json" "$@"
