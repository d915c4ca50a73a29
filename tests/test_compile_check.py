"""`python -m fusedkd.kernels.compile_check`: every kernel, bound and compiled as it is launched at
Qwen3 shapes, for sm_90 (no GPU needed: Triton's bundled ptxas). The bf16 kernels that compute logits
must neither spill inside their dots' K-loops nor leave the tensor cores (every tl.dot a Hopper
warp-group MMA, none serialized for want of registers)."""

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
    # The tiles backend's: the dense loss's one pass per divergence, the top-k loss's two passes.
    assert all(("kd_tile_kernel", divergence) in compiled for divergence in (0, 1, 2))
    assert {("topk_tile_statistics_kernel", None), ("topk_tile_gradient_kernel", None)} <= compiled
    # Real launch specialization: unit strides and sizes arrive as constants, as on a GPU.
    assert all(row["specialized_ones"] > 0 for row in bf16_rows if row["kernel"] in DOT_KERNELS)


@pytest.mark.slow
def test_bf16_kernels_neither_spill_in_their_dots_nor_leave_the_tensor_cores(bf16_rows):
    for row in bf16_rows:
        assert row["registers"] is not None, row
        if row["kernel"] not in DOT_KERNELS:
            assert row["spill_bytes"] == 0, row
            continue
        # The parked-tile kernels spill a few scalars per task or tile (outside the K-loops, a few
        # hundred bytes in all); inside the innermost MMA loops nothing.
        assert row["mma_loops"] >= row["dots"] and row["mma_loop_spills"] == 0, row
        assert row["spill_bytes"] <= 512, row
        assert not row["wgmma_serialized"], row
        assert row["dots"] > 0 and row["wgmma_dots"] == row["dots"], row
        assert row["wgmma_instructions"] >= row["dots"], row
        assert row["mma_sync_instructions"] == 0, row


def test_loop_spills_are_found_in_the_loops_only():
    """mma_loop_spills counts spill loads/stores inside the innermost loops that issue MMAs, not the
    ones before, between or after them, nor those of outer loops."""
    from fusedkd.kernels.compile_check import mma_loop_spills

    sass = """
        /*0000*/                   STL [R1+0x4], R2 ;
    .L_x_0:
        /*0010*/                   LDL R3, [R1+0x4] ;
    .L_x_1:
        /*0020*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0030*/                   STL [R1+0x8], R5 ;
        /*0040*/              @P0  BRA `(.L_x_1) ;
        /*0050*/                   LDL R6, [R1+0x8] ;
    .L_x_2:
        /*0060*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0070*/              @P1  BRA `(.L_x_2) ;
        /*0080*/              @P2  BRA `(.L_x_0) ;
        /*0090*/                   EXIT ;
    """
    assert mma_loop_spills(sass) == (2, 1)


def test_a_new_token_count_reuses_the_compiled_kernels():
    """Token counts are not specialized on (`do_not_specialize`): N and N + 1 tokens (and a count that
    is a multiple of 16 and one that is not) bind to the same specializations through Triton's own
    launcher binder, so a training run whose batches vary in length compiles each kernel once. The
    tiles backend's kernels take the chunk's token count as their grid alone (a last, partial chunk
    too)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = (
        "import json; from fusedkd.kernels.compile_check import specializations as s; "
        "print(json.dumps([s(4096), s(4097), s(1000)]))"
    )
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", script], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    n, n_plus_one, other = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(n) >= 6  # statistics, merge, gradient kernels of both divergences
    assert {"kd_tile_kernel", "topk_tile_statistics_kernel", "topk_tile_gradient_kernel"} <= {k for k, _ in n}
    assert n == n_plus_one == other
