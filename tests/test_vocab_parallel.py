"""Vocabulary-parallel losses (fusedkd.vocab_parallel) on 2 and 3 gloo processes against one process.

Each world size runs every case in one launch of `_vocab_parallel_worker.py` (heads or logits sharded with
DTensor, uneven blocks: V is never a multiple of the world size); the loss and every gradient must equal
the single-process loss on the whole tensors to float32 rounding, the collectives must be the per-chunk
gathers of a few numbers per token (and one all-reduce of the hidden-state gradient), and each rank's
largest tensor must be its block's tile: memory per rank proportional to V / P.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import _vocab_parallel_worker as worker
import pytest
import torch
from _helpers import _triton_skip_reason

from fusedkd._inputs import shift_labels
from fusedkd.torch_backend.tiles import LINEAR_TILE_BYTES, default_chunk_size

WORKER = Path(__file__).with_name("_vocab_parallel_worker.py")
HS = 12  # the worker's default student hidden size

CASES = {
    "forward_kl": dict(
        kind="linear", seed=1, shape=(3, 7), rows=101, options=dict(temperature=2.0, alpha=0.6)
    ),
    "reverse_kl_bias_sum": dict(
        kind="linear",
        seed=2,
        shape=(19,),
        rows=77,
        bias=True,
        options=dict(divergence="reverse_kl", temperature=0.5, alpha=0.3, reduction="sum"),
    ),
    "jsd_none_components": dict(
        kind="linear",
        seed=3,
        shape=(2, 9),
        rows=64,
        bias=True,
        options=dict(divergence="jsd", beta=0.3, reduction="none", return_components=True, temperature=3.0),
    ),
    "jsd_beta_one": dict(
        kind="linear", seed=4, shape=(11,), rows=53, options=dict(divergence="jsd", beta=1.0)
    ),
    "jsd_beta_zero_t1": dict(
        kind="linear", seed=5, shape=(11,), rows=53, options=dict(divergence="jsd", beta=0.0)
    ),
    "no_labels": dict(kind="linear", seed=6, shape=(13,), rows=59, labels=False, options=dict(alpha=1.0)),
    "head_transforms": dict(
        kind="linear",
        seed=7,
        shape=(15,),
        rows=71,
        bias=True,
        options=dict(
            student_logit_scale=0.5,
            teacher_logit_scale=2.0,
            student_softcap=3.0,
            teacher_softcap=5.0,
            temperature=1.5,
            divergence="reverse_kl",
        ),
    ),
    "padded_vocab": dict(
        kind="linear", seed=8, shape=(12,), rows=64, vocab_size=50, options=dict(vocab_size=50)
    ),
    # With 3 ranks (blocks of 22) the last block starts at 44 > 40: a rank with no counted row.
    "rank_without_rows": dict(
        kind="linear",
        seed=9,
        shape=(12,),
        rows=64,
        vocab_size=40,
        options=dict(vocab_size=40, divergence="jsd", beta=0.6),
    ),
    "ignore_index_many_chunks": dict(
        kind="linear",
        seed=10,
        shape=(40,),
        rows=37,
        ignore=0.6,
        ignore_index=-1,
        options=dict(ignore_index=-1, chunk_size=4, temperature=0.8),
    ),
    "all_ignored": dict(kind="linear", seed=11, shape=(6,), rows=31, ignore=1.0),
    "extreme_logits": dict(
        kind="linear",
        seed=12,
        shape=(9,),
        rows=45,
        logit_scale=3000.0,
        options=dict(divergence="reverse_kl", alpha=0.9),
    ),
    "check_finite": dict(kind="linear", seed=13, shape=(7,), rows=29, options=dict(check_finite=True)),
    # NaN hidden states of an ignored token are never read, and not refused either.
    "check_finite_ignored_nan": dict(
        kind="linear",
        seed=13,
        shape=(7,),
        rows=29,
        ignore_index=-1,
        poke={"labels": ((2,), -1), "student_hidden": ((2, 0), math.nan)},
        options=dict(check_finite=True, ignore_index=-1),
    ),
    "logits_check_finite_rank_without_rows": dict(
        kind="logits",
        seed=26,
        shape=(3, 4),
        rows=64,
        vocab_size=40,
        options=dict(check_finite=True, vocab_size=40),
    ),
    # Raises on every rank (the rank holding row 28 names it; the others say another rank found it).
    "raises_check_finite": dict(
        kind="linear",
        seed=13,
        shape=(7,),
        rows=29,
        options=dict(check_finite=True),
        poke={"student_weight": ((28, 3), math.inf)},
    ),
    "nan_teacher_jsd": dict(
        kind="linear",
        seed=14,
        shape=(8,),
        rows=33,
        ignore=0.0,
        poke={"teacher_hidden": ((2, 0), math.nan)},
        options=dict(divergence="jsd"),
    ),
    "logits_forward_kl": dict(kind="logits", seed=20, shape=(4, 5), rows=67, options=dict(temperature=2.0)),
    "logits_reverse_kl_shift": dict(
        kind="logits",
        seed=21,
        shape=(3, 6),
        rows=41,
        options=dict(divergence="reverse_kl", shift_labels=True, alpha=0.2),
    ),
    "logits_jsd_none_padded": dict(
        kind="logits",
        seed=22,
        shape=(10,),
        rows=48,
        vocab_size=45,
        options=dict(divergence="jsd", beta=0.7, reduction="none", vocab_size=45, teacher_softcap=4.0),
    ),
    "bf16_reverse_kl": dict(
        kind="linear",
        seed=27,
        shape=(2, 11),
        rows=83,
        bias=True,
        dtype="bfloat16",
        options=dict(divergence="reverse_kl", temperature=2.0),
    ),
    "bf16_logits_jsd": dict(
        kind="logits",
        seed=28,
        shape=(2, 11),
        rows=83,
        dtype="bfloat16",
        options=dict(divergence="jsd", beta=0.4),
    ),
    "module_linear": dict(
        kind="linear",
        seed=24,
        shape=(2, 5),
        rows=43,
        bias=True,
        module=True,
        options=dict(alpha=0.4, temperature=1.5, divergence="jsd", beta=0.2),
    ),
    "module_logits": dict(
        kind="logits", seed=25, shape=(2, 5), rows=43, module=True, options=dict(alpha=0.4, temperature=1.5)
    ),
    "logits_nan_student": dict(
        kind="logits", seed=23, shape=(6,), rows=35, ignore=0.0, poke={"student_logits": ((1, 30), math.nan)}
    ),
    # Memory: 1,200 tokens of a 30,000-entry vocabulary, in the default chunks (559 tokens).
    "memory": dict(kind="linear", seed=30, shape=(1200,), rows=30_000, hs=8, ht=8, ignore=0.0),
    # A rank whose block of the vocabulary is empty (4 rows over 3 ranks: blocks of 2, 2 and 0).
    "empty_block": dict(kind="linear", seed=31, shape=(9,), rows=4, bias=True, options=dict(temperature=2.0)),
    "logits_empty_block": dict(kind="logits", seed=32, shape=(9,), rows=4, options=dict(divergence="jsd")),
    # Reverse KL where the teacher gives a token probability 0 and the student does not: +inf, and the
    # token's G row NaN (docs/design.md §9), on the rank that holds the token and on the others.
    "reverse_kl_infinite": dict(
        kind="logits",
        seed=33,
        shape=(5,),
        rows=35,
        ignore=0.0,
        poke={"teacher_logits": ((0, 3), -math.inf)},
        options=dict(divergence="reverse_kl", alpha=1.0),
    ),
    # Heads (and logits) padded to different sizes: the teacher's rows of each student block are moved
    # point to point from the ranks that hold them.
    "realign_linear": dict(
        kind="linear",
        seed=35,
        shape=(11,),
        rows=61,
        teacher_rows=64,
        vocab_size=61,
        bias=True,
        options=dict(vocab_size=61, divergence="jsd", beta=0.3),
    ),
    "realign_logits": dict(
        kind="logits",
        seed=36,
        shape=(11,),
        rows=45,
        teacher_rows=48,
        vocab_size=45,
        options=dict(vocab_size=45, divergence="reverse_kl"),
    ),
    # Ranks passing different labels: every rank raises (none waits in a collective).
    "raises_labels_differ": dict(kind="linear", seed=34, shape=(6,), rows=31, perturb_rank=1),
}
for case in CASES.values():
    case.setdefault("options", {})["backend"] = "torch"
# The fused Triton kernels (Triton's interpreter on a CPU): their passes' per-split states cross the ranks.
TRITON_CASES = {
    "triton_realign_linear": dict(
        kind="linear",
        seed=49,
        shape=(11,),
        rows=61,
        teacher_rows=64,
        vocab_size=61,
        bias=True,
        options=dict(vocab_size=61, temperature=2.0),
    ),
    "triton_realign_logits": dict(
        kind="logits",
        seed=58,
        shape=(11,),
        rows=45,
        teacher_rows=48,
        vocab_size=45,
        options=dict(vocab_size=45, divergence="jsd"),
    ),
    "triton_empty_block": dict(
        kind="linear", seed=47, shape=(9,), rows=4, bias=True, options=dict(divergence="jsd")
    ),
    "triton_logits_empty_block": dict(
        kind="logits", seed=56, shape=(9,), rows=4, options=dict(temperature=2.0)
    ),
    "triton_reverse_kl_infinite": dict(
        kind="linear",
        seed=48,
        shape=(5,),
        rows=35,
        bias=True,
        ignore=0.0,
        poke={"teacher_bias": ((3,), -math.inf)},
        options=dict(divergence="reverse_kl", alpha=1.0),
    ),
    "triton_logits_reverse_kl_infinite": dict(
        kind="logits",
        seed=57,
        shape=(5,),
        rows=35,
        ignore=0.0,
        poke={"teacher_logits": ((0, 3), -math.inf)},
        options=dict(divergence="reverse_kl", alpha=1.0),
    ),
    "triton_forward_kl_bias": dict(
        kind="linear", seed=40, shape=(2, 9), rows=101, bias=True, options=dict(temperature=2.0, alpha=0.6)
    ),
    "triton_reverse_kl_transforms": dict(
        kind="linear",
        seed=41,
        shape=(21,),
        rows=77,
        options=dict(divergence="reverse_kl", temperature=0.7, student_logit_scale=0.5, teacher_softcap=4.0),
    ),
    "triton_jsd_none_components": dict(
        kind="linear",
        seed=42,
        shape=(17,),
        rows=64,
        bias=True,
        options=dict(divergence="jsd", beta=0.3, reduction="none", return_components=True, temperature=3.0),
    ),
    "triton_rank_without_rows": dict(
        kind="linear",
        seed=43,
        shape=(12,),
        rows=64,
        vocab_size=40,
        options=dict(vocab_size=40, divergence="jsd", beta=0.6, alpha=0.2),
    ),
    "triton_ignore_index_no_labels_t1": dict(
        kind="linear",
        seed=44,
        shape=(30,),
        rows=37,
        labels=False,
        options=dict(alpha=1.0, divergence="reverse_kl"),
    ),
    "triton_nan_teacher_jsd": dict(
        kind="linear",
        seed=45,
        shape=(8,),
        rows=33,
        ignore=0.0,
        poke={"teacher_hidden": ((2, 0), math.nan)},
        options=dict(divergence="jsd"),
    ),
    "triton_bf16_forward_kl": dict(
        kind="linear", seed=46, shape=(2, 11), rows=83, dtype="bfloat16", options=dict(temperature=2.0)
    ),
    "triton_logits_forward_kl": dict(
        kind="logits", seed=50, shape=(4, 5), rows=67, options=dict(temperature=2.0)
    ),
    "triton_logits_reverse_kl_shift": dict(
        kind="logits",
        seed=51,
        shape=(3, 6),
        rows=41,
        options=dict(divergence="reverse_kl", shift_labels=True, alpha=0.2),
    ),
    "triton_logits_jsd_none_padded_transforms": dict(
        kind="logits",
        seed=52,
        shape=(10,),
        rows=48,
        vocab_size=45,
        options=dict(
            divergence="jsd",
            beta=0.7,
            reduction="none",
            vocab_size=45,
            teacher_softcap=4.0,
            student_logit_scale=0.5,
            return_components=True,
        ),
    ),
    "triton_logits_rank_without_rows": dict(
        kind="logits",
        seed=53,
        shape=(9,),
        rows=64,
        vocab_size=40,
        options=dict(vocab_size=40, temperature=1.5),
    ),
    "triton_logits_no_labels": dict(
        kind="logits",
        seed=54,
        shape=(7,),
        rows=29,
        labels=False,
        options=dict(alpha=1.0, divergence="reverse_kl"),
    ),
    "triton_logits_nan_student": dict(
        kind="logits", seed=55, shape=(6,), rows=35, ignore=0.0, poke={"student_logits": ((1, 30), math.nan)}
    ),
}
for case in TRITON_CASES.values():
    case.setdefault("options", {})["backend"] = "triton"
TRITON_SKIP = _triton_skip_reason()
if TRITON_SKIP is None:
    CASES.update(TRITON_CASES)


@pytest.fixture(scope="module", params=[2, 3], ids=["2-ranks", "3-ranks"])
def sharded(request, tmp_path_factory):
    """(world size, [per-rank results]) of every case, from one launch of the worker."""
    world = request.param
    directory = tmp_path_factory.mktemp(f"vp{world}")
    cases_path, out_path = directory / "cases.pt", directory / "out.pt"
    torch.save(CASES, cases_path)
    rendezvous = directory / "rendezvous"
    command = [sys.executable, str(WORKER), str(world), str(cases_path), str(out_path), str(rendezvous)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return world, torch.load(out_path, weights_only=False)


@pytest.fixture(scope="module")
def plain():
    return {
        name: worker.run_plain(case, worker.make_inputs(case))
        for name, case in CASES.items()
        if not name.startswith("raises_")
    }


pytestmark = pytest.mark.slow  # two launches of 2 and 3 processes, ~1 min in all on a 2-core CPU


def _counted(case: dict) -> int:
    labels = worker.make_inputs(case)["labels"]
    if not case.get("labels", True):
        return labels.numel()
    ignore_index = case.get("ignore_index", -100)
    if case["options"].get("shift_labels"):
        labels = shift_labels(labels, ignore_index)
    return int((labels != ignore_index).sum())


@pytest.mark.parametrize("name", [n for n in CASES if not n.startswith("raises_")])
def test_equal_to_one_process(sharded, plain, name):
    world, results = sharded
    expected = plain[name]
    for rank, result in enumerate(results):
        result = result[name]
        assert "error" not in result, result.get("error")
        assert set(expected) <= set(result), (sorted(expected), sorted(result))
        for key, value in expected.items():
            finite = value[torch.isfinite(value)].float()
            scale = max(1.0, float(finite.abs().max())) if finite.numel() else 1.0
            # float32: rounding of sums taken in another order; bfloat16 gradients: a few bf16 ulps
            # (each rank's share of dh is rounded to bf16 before the all-reduce sums them).
            rtol = 1.6e-2 if value.dtype == torch.bfloat16 else 3e-5
            torch.testing.assert_close(
                result[key],
                value,
                rtol=rtol,
                atol=rtol / 10 * scale,
                equal_nan=True,
                msg=f"rank {rank}: {key}",
            )
    if name.startswith("nan") or name.startswith("logits_nan"):
        assert torch.isnan(expected["out0"]).all()  # the rule: a NaN input in a counted token stays a NaN


@pytest.mark.parametrize(
    "name", [n for n in CASES if n != "memory" and not n.startswith(("raises_", "realign", "triton_realign"))]
)
def test_collectives_are_per_token_numbers(sharded, name):
    """Per chunk: one gather of 6 numbers per token and one of 2; per call of the fused linear loss one
    all-reduce of the hidden-state gradient [N, H_s]; nothing else (no head or logits gather)."""
    world, results = sharded
    case = CASES[name]
    options = case["options"]
    # The forward's gathers, and the backward's again when it recomputes (reduction "none", components).
    passes = 2 if options.get("reduction") == "none" or options.get("return_components") else 1
    n = math.prod(case["shape"])
    if options["backend"] == "triton":
        return _check_triton_collectives(case, n, results)
    expected = sorted(_expected_log(case, _counted(case), n, passes))
    for rank, result in enumerate(results):
        assert sorted(result[name]["collectives"]) == expected, (rank, result[name]["collectives"])


def _check_triton_collectives(case: dict, n: int, results) -> None:
    """The fused kernels' passes: one gather of the statistics pass's per-split states (8 numbers per
    token and split), one of the JSD pass's (2), both O(N); one all-reduce of the hidden-state gradient."""
    jsd = case["options"].get("divergence") == "jsd"
    if case["kind"] == "logits":  # the row kernels: 6 statistics and 2 sums per row, nothing else
        for rank, result in enumerate(results):
            log = result[case_name(case)]["collectives"]
            assert log == [("all_gather", 4), ("all_gather", 6 * n), ("all_gather", 2 * n)], (rank, log)
        return
    for rank, result in enumerate(results):
        log = result[case_name(case)]["collectives"]
        assert log[0] == ("all_gather", 4), (rank, log)  # the ranks' tokens and labels compared
        log = log[1:]
        names = [name for name, _ in log]
        assert names == ["all_gather"] * (2 if jsd else 1) + ["all_reduce"], (rank, log)
        assert log[0][1] % (8 * n) == 0 and 1 <= log[0][1] // (8 * n) <= 4, (rank, log)
        if jsd:
            assert log[1][1] == log[0][1] // 4, (rank, log)  # the same splits, 2 fields instead of 8
        assert log[-1][1] == n * case.get("hs", HS), (rank, log)


def case_name(case: dict) -> str:
    return next(name for name, c in CASES.items() if c is case)


def _expected_log(case: dict, counted: int, n: int, passes: int) -> list[tuple[str, int]]:
    """The collectives of one loss call and its backward."""
    options = case["options"]
    chunk = options.get("chunk_size") or 4096
    log = [("all_gather", 4)]  # every rank's (tokens, no-labels flag, multiprocessors, label checksum)
    if options.get("check_finite"):
        log.append(("all_reduce", 1))
    gathers = []
    for start in range(0, counted, chunk):
        rows = min(chunk, counted - start)
        gathers += [("all_gather", 6 * rows), ("all_gather", 2 * rows)]
    log += gathers * passes
    if case["kind"] == "linear":
        log.append(("all_reduce", n * case.get("hs", HS)))  # the hidden-state gradient, once
    return log


def test_memory_per_rank_scales_as_vocab_over_world(sharded):
    """In the default chunks (those of one process), the largest tensor a rank makes is one chunk x its
    block of the vocabulary: V / P of one process's."""
    world, results = sharded
    case = CASES["memory"]
    one_process = worker.Largest()
    with one_process:
        worker.run_plain(case, worker.make_inputs(case))
    chunk = default_chunk_size(case["rows"], 4, LINEAR_TILE_BYTES)
    assert chunk < case["shape"][0]  # several chunks
    block = math.ceil(case["rows"] / world)
    assert one_process.numel == chunk * case["rows"]  # the one-process tile: a chunk x V
    for result in results:
        largest = result["memory"]["largest"]
        assert result["memory"]["local_shape"][0] in (block, case["rows"] - block * (world - 1))
        assert largest <= chunk * block, (largest, chunk * block)
        assert largest / one_process.numel <= 1.0 / world + 1e-3


def test_refusals_name_the_layout(sharded):
    world, results = sharded
    messages = results[0]["refusals"]
    assert "FSDP-sharded head" in messages["fsdp"] and "full_tensor()" in messages["fsdp"]
    assert "student_hidden must be a DTensor placed (Replicate(),)" in messages["hidden_sharded"]
    assert "student_weight must be a DTensor placed (Shard(dim=0),)" in messages["weight_dim1"]
    assert "teacher_weight" in messages["teacher_plain"] and "plain tensor" in messages["teacher_plain"]
    assert "backend='tiles' does not run vocabulary-parallel" in messages["tiles"]
    assert "teacher_logits must be a DTensor placed (Shard(-1),)" in messages["logits_replicated"]
    assert "labels must be in [0, 11)" in messages["labels_range"]
    assert messages["blocks"] is None  # heads padded to different sizes: accepted, the teacher's rows moved


def test_integrations_keep_tensor_parallel_heads_sharded(sharded):
    """`fusedkd.integrations` on models whose lm_heads are ``ColwiseParallel``: both heads sharded, or only
    the student's (the plain teacher's block is cut out locally), stay sharded (no gather); a sharded
    teacher with a plain student is gathered (the student's gradient must stay whole). In every layout the
    loss and the student's gradients equal those of the unsharded models."""
    world, results = sharded
    for rank, result in enumerate(results):
        runs = result["integration"]
        plain = runs["plain"]
        assert not plain["head_is_dtensor"]
        for layout in ("both", "student"):
            parallel = runs[layout]
            assert parallel["head_is_dtensor"], layout
            assert {name for name, _ in parallel["collectives"]} == {"all_gather", "all_reduce"}, parallel
            assert max(size for name, size in parallel["collectives"] if name == "all_gather") <= 6 * 18
        assert not runs["teacher"]["head_is_dtensor"]  # gathered: a functional all-gather of the head
        assert any(name.startswith("functional.") for name, _ in runs["teacher"]["collectives"])
        for layout in ("both", "student", "teacher"):
            for key in ("loss", "grad_head", "grad_embedding"):
                torch.testing.assert_close(
                    runs[layout][key], plain[key], rtol=3e-5, atol=1e-6, msg=f"rank {rank}, {layout}: {key}"
                )


def test_tensor_parallel_example_runs():
    """examples/tensor_parallel_kd.py under torchrun on 2 CPU processes: it checks itself against one."""
    example = Path(__file__).parents[1] / "examples" / "tensor_parallel_kd.py"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(example),
        "--vocab", "20011", "--tokens", "128",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "matches one process on whole heads" in done.stdout
    for block in ("(10006, 64)", "(10005, 64)"):  # 20,011 rows over 2 ranks: uneven blocks
        assert f"head gradient block {block}" in done.stdout


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl_bias_sum", "logits_forward_kl", "module_logits"])
def test_gradients_come_back_placed_like_their_inputs(sharded, name):
    """dW (and db) sharded like the head, the logits' gradient like the logits, dh replicated."""
    world, results = sharded
    placements = results[0][name]["placements"]
    if CASES[name]["kind"] == "logits":
        last = len(CASES[name]["shape"])  # the vocabulary dimension of [..., V] logits
        assert placements == {"grad_student_logits": (f"Shard(dim={last})",)}, placements
    else:
        assert placements["grad_student_weight"] == ("Shard(dim=0)",)
        assert placements["grad_student_hidden"] == ("Replicate()",)
        if CASES[name].get("bias"):
            assert placements["grad_student_bias"] == ("Shard(dim=0)",)


def test_check_finite_raises_on_every_rank(sharded):
    """A NaN or inf in one rank's block: every rank raises (none is left waiting in a collective)."""
    world, results = sharded
    owner = 28 // math.ceil(29 / world)
    for rank, result in enumerate(results):
        error = result["raises_check_finite"].get("error", "")
        if rank == owner:
            assert f"student_weight holds a NaN or an inf on rank {owner} (local index" in error, error
        else:
            assert "another rank of the mesh found a NaN or an inf" in error, error


def test_different_labels_raise_on_every_rank(sharded):
    world, results = sharded
    for rank, result in enumerate(results):
        error = result["raises_labels_differ"].get("error", "")
        assert "hold different tokens, labels or devices" in error, (rank, error)


@pytest.mark.parametrize("name", [n for n in CASES if "realign" in n])
def test_heads_padded_differently_move_only_the_teachers_misaligned_rows(sharded, name):
    """Student and teacher split into different blocks: besides the per-token gathers (and the all-reduce
    of dh), each rank exchanges the teacher's rows of its student block point to point; nothing is
    gathered whole."""
    world, results = sharded
    case = CASES[name]
    n = math.prod(case["shape"])
    for rank, result in enumerate(results):
        log = result[name]["collectives"]
        assert {entry for entry, _ in log} <= {"all_gather", "all_reduce", "batch_isend_irecv"}, (rank, log)
        exchanges = 2 if case.get("bias") else 1  # one per teacher tensor: the weight (logits), the bias
        assert sum(entry == "batch_isend_irecv" for entry, _ in log) == exchanges, (rank, log)
        assert max(size for entry, size in log if entry == "all_gather") <= 8 * n, (rank, log)
