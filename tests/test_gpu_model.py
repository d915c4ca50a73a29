"""benchmarks/gpu_model.py: the roofline model reads the launch configurations the code uses, counts
the FLOPs the kernels execute, and prints a table of predictions (no GPU involved)."""

from __future__ import annotations

import dataclasses
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import gpu_model  # noqa: E402


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_flops_are_the_methods_own(divergence):
    shapes = gpu_model.Shapes(16384, divergence=divergence)
    result = gpu_model.evaluate(shapes, gpu_model.Hardware())
    methods = result["methods"]
    n, v, hs, ht = shapes.tokens, shapes.vocab, shapes.student_dim, shapes.teacher_dim
    jsd_pass = 2 * n * v * (hs + ht) if divergence == "jsd" else 0
    # fusedkd: 2NV(2H_t + 4H_s) (+ the JSD's pass), padded to whole tiles (V is not a multiple of 128).
    fused = 2 * n * v * (2 * ht + 4 * hs) + jsd_pass
    assert fused <= methods["fusedkd"]["flops"] <= fused * 1.001
    assert methods["liger"]["flops"] == pytest.approx(2 * n * v * (ht + 3 * hs))
    assert methods["trl"]["flops"] == pytest.approx(2 * n * v * (2 * ht + 4 * hs) + jsd_pass)
    for row in methods.values():
        assert row["time_s"] > 0 and 0 < row["fraction_of_peak"] < 1
        assert row["useful_fraction_of_peak"] <= row["fraction_of_peak"] + 1e-12


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


def test_prints_a_table_of_predictions(capsys):
    assert gpu_model.main(["--tokens", "4096", "--divergences", "forward_kl"]) == 0
    out = capsys.readouterr().out
    assert "PREDICTIONS" in out and "no GPU ran" in out
    for method in ("fusedkd total", "liger total", "trl total"):
        assert method in out
    assert "backward HBM traffic" in out
    # The assumptions the prediction hangs on, varied: the L2's bandwidth and the room it leaves.
    assert "Sensitivity to the L2 bandwidth" in out and "Sensitivity to the L2 capacity" in out
