"""`python -m fusedkd.kernels.compile_check`: every kernel, bound and compiled as it is launched at
Qwen3 shapes, for sm_90 (no GPU needed: Triton's bundled ptxas). The bf16 kernels that compute logits
must neither spill nor leave the tensor cores (every tl.dot a Hopper warp-group MMA)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fusedkd import kernels

pytestmark = pytest.mark.skipif(kernels.TRITON_IMPORT_ERROR is not None, reason="needs Triton")

DOT_KERNELS = ("statistics_kernel", "jsd_kernel", "gradient_kernel")


@pytest.fixture(scope="module")
def bf16_rows():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    command = [
        sys.executable,
        "-W",
        "ignore",
        "-m",
        "fusedkd.kernels.compile_check",
        "--json",
        "--dtypes",
        "bf16",
    ]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_every_kernel_compiles_at_qwen_shapes(bf16_rows):
    compiled = {(row["kernel"], row["constexprs"].get("DIVERGENCE")) for row in bf16_rows}
    for divergence in (0, 1, 2):
        for kernel in ("statistics_kernel", "merge_statistics_kernel", "gradient_kernel"):
            assert (kernel, divergence) in compiled
        for kernel in ("kd_logits_forward_kernel", "kd_logits_backward_kernel"):
            assert (kernel, divergence) in compiled
    assert ("jsd_kernel", None) in compiled and ("merge_jsd_kernel", None) in compiled
    # Real launch specialization: unit strides and sizes arrive as constants, as on a GPU.
    assert all(row["specialized_ones"] > 0 for row in bf16_rows if row["kernel"] in DOT_KERNELS)


@pytest.mark.slow
def test_bf16_kernels_neither_spill_nor_leave_the_tensor_cores(bf16_rows):
    for row in bf16_rows:
        assert row["registers"] is not None and row["spill_bytes"] == 0, row
        if row["kernel"] in DOT_KERNELS:
            assert row["dots"] > 0 and row["wgmma_dots"] == row["dots"], row
            assert row["wgmma_instructions"] >= row["dots"], row
            assert row["mma_sync_instructions"] == 0, row
