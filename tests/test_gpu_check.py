"""benchmarks/gpu_check.py --dry-run runs end to end (a CPU runs it through Triton's interpreter)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # ~100 s on two CPU cores (Triton's interpreter)
def test_gpu_check_dry_run(tmp_path):
    output = tmp_path / "gpu_check.json"
    script = os.path.join(ROOT, "benchmarks", "gpu_check.py")
    proc = subprocess.run(
        [sys.executable, script, "--dry-run", "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # The table comes last: its header, then one row per (N, method).
    lines = proc.stdout.strip().splitlines()
    header = max(i for i, line in enumerate(lines) if line.split()[:2] == ["N", "method"])
    rows = [line.split() for line in lines[header + 2 :]]
    assert rows and all(row[0].isdigit() for row in rows)
    assert {"fusedkd", "naive"} <= {row[1] for row in rows}
    # TRL is compared when importable; otherwise its rows say so (the GPU machine has no network).
    trl_rows = [" ".join(row[2:]) for row in rows if row[1] == "trl"]
    assert trl_rows and all(r.startswith("not installed") or r[0].isdigit() for r in trl_rows)

    details = json.loads(output.read_text())
    assert details["correctness"] and all(row["ok"] for row in details["correctness"])
    assert {"fusedkd", "naive"} <= {r["method"] for r in details["results"] if "error" not in r}
    assert details["matmul"]["tflops"] > 0
