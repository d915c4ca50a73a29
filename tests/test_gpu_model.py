"""benchmarks/gpu_model.py: the roofline model reads the launch configurations the code uses, counts
the FLOPs the kernels execute, and prints predictions (no GPU involved). These tests check the model's
format and its internal consistency; none takes the model's own outputs as expectations."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import gpu_model  # noqa: E402

from fusedkd import _dispatch  # noqa: E402

GPUS = [gpu_model.H100, gpu_model.H200]


@pytest.mark.parametrize("hw", GPUS, ids=lambda hw: hw.name)
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_flops_are_the_methods_own(divergence, hw):
    shapes = gpu_model.Shapes(16384, divergence=divergence)
    methods = gpu_model.evaluate(shapes, hw)["methods"]
    n, v, hs, ht = shapes.tokens, shapes.vocab, shapes.student_dim, shapes.teacher_dim
    unavoidable = 2 * n * v * (ht + 3 * hs)
    assert shapes.unavoidable_flops == unavoidable
    jsd_pass = 2 * n * v * (hs + ht) if divergence == "jsd" else 0
    # Fused kernels: 2NV(2H_t + 4H_s) (+ the JSD's pass), padded to whole tiles (V is not a multiple of 128).
    fused = 2 * n * v * (2 * ht + 4 * hs) + jsd_pass
    assert fused <= methods["fusedkd_fused"]["flops"] <= fused * 1.001
    # The tile path and Liger keep the logits: exactly the unavoidable FLOPs.
    assert methods["fusedkd_tile"]["flops"] == pytest.approx(unavoidable)
    assert methods["liger"]["flops"] == pytest.approx(unavoidable)
    assert methods["trl"]["flops"] == pytest.approx(2 * n * v * (2 * ht + 4 * hs) + jsd_pass)


@pytest.mark.parametrize("hw", GPUS, ids=lambda hw: hw.name)
@pytest.mark.parametrize("tokens", [4096, 32768])
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_times_respect_the_rooflines(hw, tokens, divergence):
    """No kernel beats its own MMA bound at its engine's efficiency, its HBM or L2 bound; a method's time
    is its kernels' sum and its useful rate the unavoidable FLOPs over that time."""
    shapes = gpu_model.Shapes(tokens, divergence=divergence)
    result = gpu_model.evaluate(shapes, hw)
    for row in result["methods"].values():
        for k in row["kernels"]:
            assert k["quantization"] >= 1.0 and k["fill_s"] >= 0.0 and k["launch_s"] >= 0.0
            floor = max(k["mma_s"], k["hbm_s"], k["l2_s"], k["atomics_s"], k["elementwise_s"])
            assert k["time_s"] >= floor * (1 - 1e-12)
            assert k["time_s"] >= k["flops"] / hw.bf16_flops
            assert k["time_s"] >= k["hbm_bytes"] / hw.hbm_bytes_per_s
        assert row["time_s"] == pytest.approx(sum(k["time_s"] for k in row["kernels"]))
        assert row["time_s"] >= row["flops"] / hw.bf16_flops
        assert 0 < row["fraction_of_peak"] < 1
        assert row["useful_tflops"] == pytest.approx(shapes.unavoidable_flops / row["time_s"] / 1e12)
        assert row["useful_fraction_of_peak"] <= row["fraction_of_peak"] + 1e-12


def test_triton_and_cublas_efficiencies_apply_to_their_own_kernels():
    shapes, hw = gpu_model.Shapes(16384), gpu_model.H200
    slower = dataclasses.replace(hw, triton_mma_efficiency=hw.triton_mma_efficiency / 2)
    base, other = gpu_model.evaluate(shapes, hw)["methods"], gpu_model.evaluate(shapes, slower)["methods"]
    for kernel, changed in zip(base["fusedkd_fused"]["kernels"], other["fusedkd_fused"]["kernels"]):
        assert changed["mma_s"] == pytest.approx(2 * kernel["mma_s"])
    # cuBLAS GEMMs (the peers', the tile path's) do not move with Triton's efficiency.
    for method in ("liger", "trl"):
        assert other[method]["time_s"] == pytest.approx(base[method]["time_s"])
    tile_gemms = [k for k in base["fusedkd_tile"]["kernels"] if "cuBLAS" in k["kernel"]]
    assert tile_gemms and all(
        k["mma_s"] == pytest.approx(k["flops"] / (hw.bf16_flops * hw.cublas_mma_efficiency))
        for k in tile_gemms
    )


def test_h100_differs_from_h200_in_hbm_only():
    """Same die: the same FLOPs and bytes; the H100's slower HBM never makes a method faster."""
    assert gpu_model.H100.bf16_flops == gpu_model.H200.bf16_flops
    assert gpu_model.H100.hbm_bytes_per_s < gpu_model.H200.hbm_bytes_per_s
    for divergence in ("forward_kl", "jsd"):
        shapes = gpu_model.Shapes(16384, divergence=divergence)
        h100 = gpu_model.evaluate(shapes, gpu_model.H100)["methods"]
        h200 = gpu_model.evaluate(shapes, gpu_model.H200)["methods"]
        for method in gpu_model.METHODS:
            assert h100[method]["flops"] == h200[method]["flops"]
            assert h100[method]["hbm_bytes"] == pytest.approx(h200[method]["hbm_bytes"])
            assert h100[method]["time_s"] >= h200[method]["time_s"]


def test_gradient_phases_add_and_quantize_from_the_launch_grid():
    """The fused gradient kernel is two rooflines in series, each scaled by the busiest program's share
    of the vocabulary groups the code's grid gives it."""
    from fusedkd.kernels import config

    shapes, hw = gpu_model.Shapes(16384), gpu_model.H200
    phases = gpu_model.fusedkd_gradient(shapes, hw)
    assert len(phases) == 2
    cfg = config.gpu_config(gpu_model._dtype())
    group = config.gradient_group_width(cfg, cfg.gradient)
    programs = config.gradient_programs(shapes.vocab, group, hw.sms)
    groups = math.ceil(shapes.vocab / group)
    for phase in phases:
        assert phase.engine == "triton"
        assert phase.quantization == pytest.approx(math.ceil(groups / programs) / (groups / programs))
        t = phase.times(hw)
        assert t["time_s"] >= max(t["mma_s"], t["hbm_s"], t["l2_s"]) * phase.quantization
    kernel_rows = gpu_model.evaluate(shapes, hw)["methods"]["fusedkd_fused"]["kernels"]
    gradient = [k for k in kernel_rows if k["kernel"].startswith("gradient_kernel")]
    assert len(gradient) == 2


def test_the_model_follows_the_code_configuration(monkeypatch):
    """Changing the configuration the kernels launch with changes the prediction (nothing is copied)."""
    from fusedkd.kernels import config

    shapes, hw = gpu_model.Shapes(16384), gpu_model.Hardware()
    _, before = gpu_model.fusedkd_gradient(shapes, hw)
    fewer = dataclasses.replace(config.HALF_CONFIG, gradient_sub_blocks=1)
    monkeypatch.setattr(config, "gpu_config", lambda dtype: fewer)
    _, after = gpu_model.fusedkd_gradient(shapes, hw)
    # One token block per weight-gradient update: sub_blocks times the float32 read-modify-writes of dW.
    rmw = {s.name: s.total for s in after.streams}["dW float32 read-modify-write"]
    ratio = config.HALF_CONFIG.gradient_sub_blocks
    assert ratio > 1
    assert rmw == pytest.approx(
        ratio * {s.name: s.total for s in before.streams}["dW float32 read-modify-write"]
    )


def test_evict_first_streams_take_no_l2_room():
    """A stream loaded with the evict_first hint goes to HBM and leaves the L2 budget to the others."""
    hw = gpu_model.Hardware()
    budget = hw.l2_capacity * hw.l2_usable
    kept = gpu_model.Stream("re-read", 100.0, working_set=0.6 * budget)
    streamed = gpu_model.Stream("streamed", 1000.0, working_set=0.5 * budget, evict_first=True)
    p = gpu_model.Prediction("k", streams=[streamed, kept])
    p.place(hw)
    assert p.l2_resident == ["re-read"] and p.hbm == 1000.0 and p.l2 == 1100.0
    # Without the hint the smaller working set goes first and the other no longer fits.
    p = gpu_model.Prediction(
        "k", streams=[gpu_model.Stream("streamed", 1000.0, working_set=0.5 * budget), kept]
    )
    p.place(hw)
    assert p.l2_resident == ["streamed"] and p.hbm == 100.0


def test_tile_path_chunk_and_memory_follow_the_budget():
    shapes = gpu_model.Shapes(16384)
    v, hs = shapes.vocab, shapes.student_dim
    # The default budget gives chunks of at least 1,024 tokens at Qwen3's vocabulary (the design's rule).
    chunk = gpu_model.tile_chunk(shapes)
    assert chunk >= 1024 and chunk % gpu_model.TILE_CHUNK_MULTIPLE == 0
    assert chunk * v * gpu_model.TILE_ENTRY_BYTES <= gpu_model.TILE_BUDGET_BYTES
    # The model's budget and chunk are the code's.
    assert gpu_model.TILE_BUDGET_BYTES == _dispatch.TILES_MEMORY_BUDGET
    assert chunk == _dispatch.tiles_chunk_size(v, None)
    # Extra memory: two float32 c x V tiles (G over the student's), the float32 V x H_s dW, the row
    # statistics.
    assert gpu_model.tile_extra_memory(shapes) == chunk * v * 2 * 4 + v * hs * 4 + chunk * 8 * 4
    # Half the budget, at most half the chunk; a chunk never exceeds N.
    assert gpu_model.tile_chunk(shapes, gpu_model.TILE_BUDGET_BYTES / 2) <= chunk // 2
    assert gpu_model.tile_chunk(gpu_model.Shapes(512)) == 512
    # The largest chunk within a memory limit fits it, and one more step would not.
    limit = 1500 * 2**20
    largest = gpu_model.tile_chunk_within(shapes, limit)
    budget = largest * v * gpu_model.TILE_ENTRY_BYTES
    assert gpu_model.tile_extra_memory(shapes, budget) <= limit
    step = (largest + gpu_model.TILE_CHUNK_MULTIPLE) * v * gpu_model.TILE_ENTRY_BYTES
    assert gpu_model.tile_extra_memory(shapes, step) > limit
    # The tile path's element-wise traffic: 2 x 8 B read (3 x for the JSD), 2 B of G written.
    for divergence, reads in (("forward_kl", 2), ("jsd", 3)):
        s = gpu_model.Shapes(16384, divergence=divergence)
        kernels = gpu_model.fusedkd_tile(s, gpu_model.H200)
        elementwise = [k for k in kernels if "element-wise" in k.kernel]
        assert len(elementwise) == 1
        assert sum(st.total for st in elementwise[0].streams) == s.tokens * v * (reads * 8 + 2)


def test_auto_runs_the_tile_path_when_its_budget_allows():
    shapes, hw = gpu_model.Shapes(16384), gpu_model.H200
    result = gpu_model.evaluate(shapes, hw)
    assert result["methods"]["fusedkd"]["path"] == "tile"
    assert result["methods"]["fusedkd"]["time_s"] == result["methods"]["fusedkd_tile"]["time_s"]
    # A budget too small for one chunk: auto runs the fused kernels, and there is no tile row.
    small = gpu_model.evaluate(shapes, hw, tile_budget=shapes.vocab * gpu_model.TILE_ENTRY_BYTES)
    assert small["methods"]["fusedkd"]["path"] == "fused"
    assert "fusedkd_tile" not in small["methods"]
    assert small["methods"]["fusedkd"]["time_s"] == small["methods"]["fusedkd_fused"]["time_s"]
    with pytest.raises(ValueError):
        gpu_model.fusedkd_tile(shapes, hw, budget=0)


def test_liger_memory_follows_its_chunking():
    """Liger's chunks: num_chunks = max(1, N // 1024), torch.chunk (the largest chunk sets the peak)."""
    for tokens, chunk in ((512, 512), (4096, 1024), (16384, 1024), (2500, 1250)):
        shapes = gpu_model.Shapes(tokens)
        assert gpu_model.liger_chunks(shapes)[1] == chunk
        expected = chunk * shapes.vocab * gpu_model.LIGER_CHUNK_ENTRY_BYTES + shapes.vocab * 1024 * 2
        assert gpu_model.liger_extra_memory(shapes) == expected


def test_fused_memory_is_linear_in_tokens():
    """O(N): the fused path's extra memory grows by the same amount per token between any two sizes."""
    m = [gpu_model.fusedkd_extra_memory(gpu_model.Shapes(n)) for n in (8192, 16384, 32768)]
    assert m[0] < m[1] < m[2]
    assert (m[2] - m[1]) / 16384 == pytest.approx((m[1] - m[0]) / 8192, rel=0.05)


def test_targets_are_evaluated_from_the_predictions():
    for hw in GPUS:
        for tokens in (4096, 16384):
            result = gpu_model.evaluate(gpu_model.Shapes(tokens, divergence="jsd"), hw)
            m, t = result["methods"], result["targets"]
            assert t["time_vs_liger"]["pass"] == (
                m["fusedkd"]["time_s"] <= gpu_model.TARGET_VS_LIGER * m["liger"]["time_s"]
            )
            assert t["time_vs_trl"]["pass"] == (m["fusedkd"]["time_s"] < m["trl"]["time_s"])
            assert t["memory_vs_liger"]["pass"] == (
                m["fusedkd"]["extra_memory_bytes"] <= m["liger"]["extra_memory_bytes"]
            )
            assert ("fused_memory_mib" in t) == (tokens == gpu_model.FUSED_MEMORY_TOKENS)
            checks = [c["pass"] for c in t.values() if isinstance(c, dict)]
            assert t["pass"] == all(checks)
            suggestion = result["suggested_budget"]
            if suggestion is not None:
                assert suggestion["extra_mib"] * 2**20 <= m["liger"]["extra_memory_bytes"]


def test_json_rows(capsys):
    assert gpu_model.main(["--json", "--tokens", "4096,16384"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {r["gpu"] for r in rows} == {"H100", "H200"}
    assert {r["divergence"] for r in rows} == {"forward_kl+ce", "jsd+ce"}
    assert {r["n"] for r in rows} == {4096, 16384}
    assert {r["method"] for r in rows} == set(gpu_model.METHODS)
    assert len(rows) == 2 * 2 * 2 * len(gpu_model.METHODS)
    for r in rows:
        for key in ("gpu", "n", "divergence", "method", "time_ms", "extra_mib", "useful_tflops"):
            assert key in r
        assert r["predicted"] is True and r["time_ms"] > 0 and r["extra_mib"] > 0
        assert r["useful_tflops"] == pytest.approx(r["unavoidable_tflop"] / (r["time_ms"] / 1e3))
        if r["method"] == "fusedkd":
            assert r["path"] in ("tile", "fused")
            same = next(
                o
                for o in rows
                if o["method"] == f"fusedkd_{r['path']}"
                and (o["gpu"], o["n"], o["divergence"]) == (r["gpu"], r["n"], r["divergence"])
            )
            assert same["time_ms"] == r["time_ms"] and same["extra_mib"] == r["extra_mib"]
            assert isinstance(r["targets"]["pass"], bool)


def test_prints_a_table_of_predictions(capsys):
    assert gpu_model.main(["--tokens", "16384", "--divergences", "forward_kl", "--detail"]) == 0
    out = capsys.readouterr().out
    assert "PREDICTIONS" in out and "no GPU ran" in out
    assert "H100" in out and "H200" in out
    for method in gpu_model.METHODS:
        assert method in out
    assert "PASS" in out or "FAIL" in out
    assert "fusedkd_tile total" in out and "liger total" in out and "trl total" in out
    assert "backward HBM traffic" in out and "Sensitivity" in out
