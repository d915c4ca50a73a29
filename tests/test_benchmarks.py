"""The benchmarks run: `benchmarks/memory_vs_topk.py --smoke` end to end, in a subprocess.

Smoke mode uses tiny shapes (V = 3001, N = 64 and 128) and one worker process, so the numbers are only
checked for sanity: every point measured, the exact methods exact, the biased ones visibly biased, and
the naive recipe's memory where its formula puts it. TRL's chunked divergence has no cross-entropy
term: the default smoke run (alpha = 0.5) says it skips it, and a second, KD-only smoke run
(alpha = 1) measures it when trl is installed.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The scripts import this checkout's fusedkd, not an installed one (a script's own folder, not the
# working directory, leads sys.path).
WORKTREE_ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
SCRIPT = ROOT / "benchmarks" / "memory_vs_topk.py"
COLUMNS = [
    "method",
    "detail",
    "k",
    "tokens",
    "seconds",
    "seconds_min",
    "seconds_max",
    "peak_mib",
    "theory_mib",
    "theory",
    "floor_mib",
    "loss",
    "loss_rel_err",
    "grad_hidden_rel_err",
    "grad_weight_rel_err",
    "teacher_topk_mass",
    "load_1min",
    "error",
]
VOCAB, EXACT_TOKENS, TOKENS, KS = 3001, 64, (64, 128), (1, 8, 64, 3001)
# float32 against the float64 reference, sums over 3001 vocabulary entries: a few 1e-7 in practice.
FP32_RTOL = 1e-5


def run_smoke(out: Path, *options: str) -> tuple[Path, str, list[str] | None, list[dict]]:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(out), *options],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=WORKTREE_ENV,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "memory_vs_topk.csv", newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames
        rows = list(reader)
    return out, proc.stdout, header, rows


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    return run_smoke(tmp_path_factory.mktemp("memory_vs_topk"))


def find(rows: list[dict], method: str, tokens: int, k: int | None = None) -> dict:
    matches = [
        r for r in rows if r["method"] == method and int(r["tokens"]) == tokens and r["k"] == str(k or "")
    ]
    assert len(matches) == 1, (method, tokens, k, matches)
    return matches[0]


def expected_methods() -> list[str]:
    methods = ["naive", "vocab_chunk", "masked_topk", "fusedkd"]
    if importlib.util.find_spec("liger_kernel") is not None:
        methods.append("liger")
    return methods


@pytest.mark.slow
def test_smoke_writes_the_csv_tables_and_plots(smoke):
    out, stdout, header, rows = smoke
    assert header == COLUMNS
    for title in ("### Peak memory growth", "### Theory", "### Time", "### k sweep", "### Exactness"):
        assert title in stdout
    assert (out / "tables.md").read_text().strip() in stdout
    assert (out / "memory_vs_topk.json").stat().st_size > 0
    if importlib.util.find_spec("matplotlib") is not None:
        for name in ("memory_vs_tokens.png", "error_vs_k.png", "memory_vs_k.png"):
            assert (out / name).stat().st_size > 0


@pytest.mark.slow
def test_smoke_measures_every_point(smoke):
    _, _, _, rows = smoke
    assert not [r for r in rows if r["error"]], [
        (r["method"], r["k"], r["error"]) for r in rows if r["error"]
    ]
    for method in expected_methods():
        if method == "masked_topk":
            points = [(n, 8) for n in TOKENS] + [(EXACT_TOKENS, k) for k in KS]
        else:
            points = [(n, None) for n in TOKENS]
        for n, k in points:
            r = find(rows, method, n, k)
            assert float(r["seconds"]) > 0 and float(r["peak_mib"]) > 0, r
            assert float(r["theory_mib"]) > 0 and float(r["floor_mib"]) > 0, r


@pytest.mark.slow
def test_smoke_exactness_is_sane(smoke):
    _, _, _, rows = smoke

    def err(method: str, k: int | None = None) -> tuple[float, float, float]:
        r = find(rows, method, EXACT_TOKENS, k)
        return tuple(float(r[c]) for c in ("loss_rel_err", "grad_hidden_rel_err", "grad_weight_rel_err"))

    exact = ["naive", "fusedkd"] + (["liger"] if "liger" in expected_methods() else [])
    for method in exact:
        assert max(err(method)) < FP32_RTOL, (method, err(method))
    # k = V masks nothing: the masked recipe is the naive one.
    assert max(err("masked_topk", VOCAB)) < FP32_RTOL
    # On a peaked teacher the per-chunk softmax is biased, and a top-1 teacher is far from the dense loss.
    assert err("vocab_chunk")[0] > 1e-2
    assert err("masked_topk", 1)[0] > 1e-2
    # The teacher's listed mass grows with k, to 1 at k = V.
    masses = [float(find(rows, "masked_topk", EXACT_TOKENS, k)["teacher_topk_mass"]) for k in KS]
    assert masses == sorted(masses) and masses[-1] == 1.0 and 0 < masses[0] < 1
    # fusedkd's sparse top-k loss (a default method): exact at k = V.
    assert max(err("sparse_topk", VOCAB)) < FP32_RTOL


@pytest.mark.slow
def test_smoke_memory_follows_the_naive_formula(smoke):
    _, _, _, rows = smoke
    for n in TOKENS:
        r = find(rows, "naive", n)
        # 7 live [N, V] float32 tensors at the forward's peak (the script's docstring).
        assert 0.8 < float(r["peak_mib"]) / float(r["theory_mib"]) < 1.25, r
    assert float(find(rows, "fusedkd", 128)["peak_mib"]) < float(find(rows, "naive", 128)["peak_mib"])


@pytest.mark.slow
def test_smoke_says_why_it_has_no_trl_row(smoke):
    _, stdout, _, rows = smoke
    assert not [r for r in rows if r["method"] == "trl"]
    reason = "has no cross-entropy term" if importlib.util.find_spec("trl") else "trl is not installed"
    assert "No TRL row: " in stdout and reason in stdout


@pytest.mark.slow
def test_kd_only_smoke_measures_trls_chunked_divergence(tmp_path):
    pytest.importorskip("trl", reason='trl is not installed (pip install -e ".[trl]")')
    _, stdout, _, rows = run_smoke(tmp_path, "--alpha", "1", "--methods", "naive,trl,fusedkd")
    assert not [r for r in rows if r["error"]], [(r["method"], r["error"]) for r in rows if r["error"]]
    assert "TRL row: ChunkedDivergenceFunction(beta=0)" in stdout
    for n in TOKENS:
        r = find(rows, "trl", n)
        assert float(r["seconds"]) > 0 and float(r["peak_mib"]) > 0, r
        # At least its two float32 [N, min(V, 32768)] tiles (and the student weight gradient).
        assert float(r["peak_mib"]) > 0.8 * float(r["theory_mib"]), r
    for method in ("naive", "trl", "fusedkd"):
        r = find(rows, method, EXACT_TOKENS)
        errors = [float(r[c]) for c in ("loss_rel_err", "grad_hidden_rel_err", "grad_weight_rel_err")]
        assert max(errors) < FP32_RTOL, (method, errors)
    # alpha = 1: every method computes T^2 KL alone, the same loss.
    losses = [float(find(rows, m, EXACT_TOKENS)["loss"]) for m in ("naive", "trl", "fusedkd")]
    assert max(losses) - min(losses) < FP32_RTOL * abs(losses[0]), losses


@pytest.mark.parametrize("layer", [True, False])
def test_compile_step_benchmark_runs(layer):
    """benchmarks/compile_step.py on a tiny step (the aot_eager compiler: no code generation), with
    and without the student layer; the pairs' geometric mean lies in its confidence interval."""
    import json

    command = [
        sys.executable, "benchmarks/compile_step.py", "--tokens", "32", "--vocab", "300",
        "--student-hidden", "8", "--teacher-hidden", "12", "--repeats", "3", "--compiler", "aot_eager",
        "--json", *([] if layer else ["--no-layer"]),
    ]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT, env=WORKTREE_ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert row["eager_ms"] > 0 and row["compiled_ms"] > 0 and row["backend"] == "torch"
    assert row["layer"] is layer
    low, high = row["pair_ratio_ci95"]
    assert 0 < low <= row["pair_ratio_geomean"] <= high


def test_compile_python_calls_benchmark_runs():
    """benchmarks/compile_python_calls.py, briefly: one row per region, eager and compiled."""
    import json

    command = [sys.executable, "benchmarks/compile_python_calls.py", "--calls", "1000", "--repeats", "2"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT, env=WORKTREE_ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    assert [r["region"] for r in rows] == ["eager", "compiled"]
    assert all(r["calls_ms"] > 0 and r["straight_line_ms"] > 0 for r in rows)
    assert rows[0]["frame_hook_installed"] in (False, None)  # outside any compiled region
