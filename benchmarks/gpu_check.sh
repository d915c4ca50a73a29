#!/usr/bin/env bash
# Run benchmarks/gpu_check.py on a GPU machine, with Liger-Kernel from a carried wheel when there is one.
#
#   bash benchmarks/gpu_check.sh [gpu_check.py options]      # e.g. --max-minutes 6
#
# Writes to $OUT (or .): gpu_check.jsonl, one JSON line per step, each flushed as the step ends (a run
# cut off keeps every line before), and gpu_check.log, everything the run printed (the same lines and
# a readable line per step, then the table). At most ~8 minutes on one H100 (--max-minutes 8).
#
# Liger-Kernel (pure Python) for a machine without network: here, at the repository root, run
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform any -d .whl liger-kernel==0.8.5
# and carry `.whl` to the GPU machine; this script installs it into /tmp/site there.
# TRL (`trl.kernels.chunked_divergence`, >= 1.16) is compared when it imports there; it needs
# transformers and accelerate besides its own wheel, so on a machine without them (and without
# network) its line says "skipped: not installed" and the rest of the check runs as usual.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-.}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  # Never fatal: without Liger its line says "skipped: not installed" and the rest runs.
  if python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    || python3 -m zipfile -e .whl/*.whl /tmp/site; then
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "gpu_check.sh: the Liger-Kernel wheel did not install; going on without it" >&2
  fi
fi
export PYTHONUNBUFFERED=1
# A hard stop under the machine's 10-minute command limit: SIGINT, on which the script still writes
# its summary line and table (GPU_CHECK_TIMEOUT_S to change it).
timeout -s INT -k 30 "${GPU_CHECK_TIMEOUT_S:-540}" \
  python3 benchmarks/gpu_check.py --output "$out/gpu_check.jsonl" "$@" 2>&1 | tee "$out/gpu_check.log"
