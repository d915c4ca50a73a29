"""benchmarks/gpu_check.py --dry-run: every step runs (a CPU runs it through Triton's interpreter) and
writes one well-formed JSON line, to the --output file before stdout, as soon as it ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.py")
STEPS = ("machine", "gemm", "compile", "correctness", "topk", "timing", "targets", "profile", "summary")
STATUSES = {"ok", "skipped", "failed"}


def run_streaming(tmp_path, *options) -> tuple[int, list[dict], list[dict], str]:
    """Run the dry run; for every JSON line on stdout, check that the file already holds it (written
    and flushed per step, not at the end). Returns (rc, stdout lines, file lines, stderr)."""
    output = tmp_path / "gpu_check.jsonl"
    proc = subprocess.Popen(
        [sys.executable, SCRIPT, "--dry-run", "--output", str(output), *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    streamed = []
    for line in proc.stdout:
        if not line.startswith("{"):
            continue
        streamed.append(json.loads(line))
        on_file = output.read_text().splitlines()
        assert len(on_file) >= len(streamed), f"line {len(streamed)} on stdout before it was on file"
        assert json.loads(on_file[len(streamed) - 1]) == streamed[-1]
    stderr = proc.stderr.read()
    rc = proc.wait(timeout=600)
    written = [json.loads(line) for line in output.read_text().splitlines()]
    return rc, streamed, written, stderr


def check_well_formed(lines: list[dict]) -> None:
    for line in lines:
        assert {"step", "status", "machine", "t_s"} <= set(line), line
        assert line["step"] in STEPS and line["status"] in STATUSES, line
        assert line["machine"].startswith("cpu"), line
        if line["status"] == "skipped":
            assert line["reason"], line
        if line["step"] != "summary":
            assert line["estimate_s"] >= 0, line
        if line["status"] != "skipped":
            assert line["elapsed_s"] >= 0, line
    times = [line["t_s"] for line in lines]
    assert times == sorted(times)
    assert lines[0]["step"] == "machine" and lines[-1]["step"] == "summary"


@pytest.mark.slow  # ~40 s on two CPU cores (Triton's interpreter)
def test_gpu_check_dry_run(tmp_path):
    rc, streamed, lines, stderr = run_streaming(tmp_path)
    assert rc == 0, stderr[-3000:]
    assert streamed == lines
    check_well_formed(lines)
    by_step = {step: [line for line in lines if line["step"] == step] for step in STEPS}
    assert all(by_step.values()), {step: len(v) for step, v in by_step.items()}
    failed = [line for line in lines if line["status"] == "failed"]
    assert not failed, failed

    machine = by_step["machine"][0]
    assert machine["info"]["interpreter"] and machine["plan"] and machine["plan_total_s"] > 0

    gemms = by_step["gemm"]
    assert len(gemms) == 8 and all(g["tflops"] > 0 and g["model_assumed_tflops"] > 0 for g in gemms)

    compiles = {c["method"]: c for c in by_step["compile"]}
    assert set(compiles) == {"tiles", "triton"}
    assert all(c["first_call_s"] > 0 and c["compile_s"] >= 0 for c in compiles.values())

    checks = {(c["dtype"], c["backend"]): c for c in by_step["correctness"]}
    assert set(checks) == {(d, b) for d in ("float32", "bfloat16") for b in ("tiles", "triton")}
    for check in checks.values():
        assert check["ok"] and check["dw_bitwise_repeat"], check
        assert set(check["terms"]) == {"loss", "dh", "dW"}
    assert all(checks[(d, "triton")]["dw_updates"] >= 2 for d in ("float32", "bfloat16"))
    assert all(checks[(d, "tiles")]["tiles_chunks"] >= 2 for d in ("float32", "bfloat16"))

    topk = by_step["topk"][0]
    assert topk["ok"] and topk["dw_bitwise_repeat"] and set(topk["terms"]) == {"loss", "dh", "dW"}, topk
    assert topk["tiles_ms"] > 0 and topk["torch_ms"] > 0 and topk["tiles_over_torch"] > 0

    rows = {(r["method"], r["n"]): r for r in by_step["timing"]}
    ok = {key: r for key, r in rows.items() if r["status"] == "ok"}
    for method in ("auto", "tiles", "triton"):
        assert {(method, 16), (method, 32)} <= set(ok)
    assert {("liger", 32), ("trl", 32)} <= set(ok)  # liger-kernel and TRL: the test extra's
    for r in ok.values():
        assert r["forward_ms"] > 0 and r["backward_ms"] >= 0 and r["first_call_ms"] > 0
        assert r["predicted_ms"] > 0 and r["measured_over_predicted"] > 0
    # Both skip paths: the memory check (--pretend-full) and a caught OutOfMemoryError (--pretend-oom).
    assert rows[("naive", 32)]["status"] == "skipped" and "would not fit" in rows[("naive", 32)]["reason"]
    assert rows[("naive", 16)]["status"] == "skipped" and "out of memory" in rows[("naive", 16)]["reason"]

    targets = by_step["targets"][0]
    assert set(targets["checks"]) == {"time_vs_liger", "time_vs_trl", "memory_vs_liger", "fused_memory_mib"}
    for name in ("time_vs_liger", "time_vs_trl"):  # computed from the rows above
        check = targets["checks"][name]
        passed = check["value"] <= check["limit"] if name == "time_vs_liger" else check["value"] < 1
        assert check["pass"] is passed
    for name in ("memory_vs_liger", "fused_memory_mib"):  # no CUDA memory statistics on a CPU
        assert targets["checks"][name]["pass"] is None and targets["checks"][name]["why"]

    profile = by_step["profile"][0]
    assert profile["status"] == "ok" and 0 < len(profile["top"]) <= 15

    summary = by_step["summary"][0]
    assert summary["correctness_ok"] is True and len(summary["skipped"]) == 2
    assert summary["interrupted"] is None

    # The order of PHASES: float32 correctness, then the comparison at N = 32 (the dry run's
    # --compare-tokens), then bf16 correctness, top-k and the other N, each group contiguous.
    labels = []
    for line in lines:
        if line["step"] == "correctness":
            label = f"correctness {line['dtype']}"
        elif line["step"] in ("timing", "targets"):
            label = f"{line['step']}@{line['n']}"
        else:
            label = line["step"]
        if label != "profile" and (not labels or labels[-1] != label):
            labels.append(label)
    expected = ["correctness float32", "timing@32", "targets@32", "correctness bfloat16", "topk", "timing@16"]
    assert labels == ["machine", "gemm", "compile", *expected, "summary"], labels
    assert "meas/pred" in stderr.split("summary")[-1]  # the table, after the last line, on stderr


@pytest.mark.slow  # ~6 s: imports only
def test_gpu_check_max_minutes_skips_every_step(tmp_path):
    rc, streamed, lines, stderr = run_streaming(tmp_path, "--max-minutes", "0")
    assert rc == 0, stderr[-3000:]
    assert streamed == lines
    check_well_formed(lines)
    for line in lines:
        if line["step"] in ("machine", "targets", "summary"):
            assert line["status"] == "ok", line
        else:
            assert line["status"] == "skipped" and "--max-minutes 0" in line["reason"], line
    assert {line["step"] for line in lines} == set(STEPS)
    targets = next(line for line in lines if line["step"] == "targets")
    assert targets["unjudged"] == 4 and targets["all_pass"] is None


@pytest.mark.slow  # ~15 s: up to the first compile line
def test_gpu_check_interrupted_run_still_writes_its_summary(tmp_path):
    """SIGINT (gpu_check.sh's `timeout -s INT`) mid-run: the lines so far stay, and a summary line
    saying so ends the file."""
    output = tmp_path / "gpu_check.jsonl"
    proc = subprocess.Popen(
        [sys.executable, SCRIPT, "--dry-run", "--output", str(output)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    for line in proc.stdout:
        if line.startswith("{") and json.loads(line)["step"] == "compile":
            proc.send_signal(signal.SIGINT)  # during the second compile step or the first correctness
            break
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    check_well_formed(lines)
    summary = lines[-1]
    assert summary["interrupted"].startswith("interrupted after"), summary
    assert not any(line["step"] in ("timing", "topk") for line in lines), [line["step"] for line in lines]
    assert stderr.index("meas/pred") > stderr.index("interrupted after")  # the table still printed
