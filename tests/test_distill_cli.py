"""The recipe's command line and package structure: help text, mode defaults, the size of the package, the
path from the script to the loss, an acyclic import graph."""

from __future__ import annotations

import ast
import inspect
from dataclasses import fields
from pathlib import Path

import pytest

import fusedkd.distill
from fusedkd.distill.cli import MODE_DEFAULTS, DistillArguments, main, parse

PACKAGE = Path(fusedkd.distill.__file__).parent


def _imports(path: Path) -> set[str]:
    """The `fusedkd.distill` modules `path` imports, at any depth (module level and inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            if name.startswith("fusedkd.distill."):
                module = name.split(".")[2]
                if (PACKAGE / f"{module}.py").is_file():
                    found.add(module)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {p.stem: p for p in PACKAGE.glob("*.py")}
    return {name: _imports(path) - {name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_distill_package_import_graph_is_acyclic():
    graph = import_graph()
    assert {"cli", "default", "data", "errors", "models", "offline", "trainer"} <= set(graph)
    assert (
        "default" in graph["cli"] and "trainer" in graph["cli"]
    )  # the graph does see function-level imports
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"
    assert graph["errors"] == set()


def test_the_recipe_is_small_and_three_hops_from_the_script_to_the_loss():
    from fusedkd.distill.trainer import DistillTrainer
    from fusedkd.integrations.hf import KDTrainer

    # the recipe's code; its chat templates (templates/*.jinja, TRL's) are data, not counted here
    code = sum(len(p.read_text(encoding="utf-8").splitlines()) for p in PACKAGE.glob("*.py"))
    assert code <= 2000, f"the recipe has grown to {code} lines"
    # 1. the script builds a DistillTrainer and trains it; 2. the Trainer calls KDTrainer.compute_loss, whose
    # _kd_loss (not overridden by the recipe) 3. calls fused_linear_kd_loss
    run_source = inspect.getsource(fusedkd.distill.cli.run)
    assert "DistillTrainer(" in run_source and "trainer.train(" in run_source
    assert issubclass(DistillTrainer, KDTrainer) and "_kd_loss" not in DistillTrainer.__dict__
    assert "fused_linear_kd_loss(" in inspect.getsource(KDTrainer._kd_loss)


def test_every_option_has_help_text():
    for option in fields(DistillArguments):
        assert option.metadata.get("help", "").strip(), f"--{option.name} has no help text"


def test_help_exits_zero_and_lists_the_recipe_and_the_trainer_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert (
        "--teacher_topk" in out
        and "--per_device_train_batch_size" in out
        and "--gradient_accumulation_steps" in out
    )


def test_mode_defaults_fill_only_what_was_not_given(tmp_path):
    from fusedkd.distill.default import TeacherRecipe
    from fusedkd.distill.trainer import DistillTrainingArguments

    recipe = TeacherRecipe()
    out = ["--output_dir", str(tmp_path / "out")]
    distill, training, mode = parse(out)
    assert mode == "default" and distill.seq_len == recipe.seq_len == 128
    assert (training.learning_rate, training.per_device_train_batch_size, training.max_steps) == (
        recipe.lr,
        16,
        100,
    )
    assert training.warmup_steps == recipe.warmup_ratio
    real = ["--teacher", "t", "--student", "s", "--dataset", "d", *out]
    distill, training, mode = parse(real)
    assert (
        mode == "distill" and distill.seq_len == 1024 and training.lr_scheduler_type == "cosine_with_min_lr"
    )
    defaults = {f.name: f.default for f in fields(DistillTrainingArguments)}
    for name, (value, _) in MODE_DEFAULTS.items():
        assert getattr(distill if name == "seq_len" else training, name) == value
        assert name == "seq_len" or defaults[name] == value
    distill, training, _ = parse([*real, "--learning_rate", "1e-4", "--seq_len", "64", "--max_steps", "7"])
    assert (training.learning_rate, distill.seq_len, training.max_steps) == (1e-4, 64, 7)
