"""The recipe's command line and package structure: help text, option checks, an acyclic import graph."""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

import pytest

import fusedkd.distill
from fusedkd.distill.cli import build_parser, main

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
    assert {"cli", "recipe", "run", "errors", "runtime"} <= set(graph)
    assert "recipe" in graph["cli"] and "run" in graph["cli"]  # the graph does see function-level imports
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"
    assert graph["errors"] == set()


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and a.dest != "help"]


def test_every_option_has_help_text_and_shows_its_default():
    parser = build_parser()
    text = parser.format_help()
    assert _options(parser)
    for action in _options(parser):
        flag = action.option_strings[0]
        assert action.help and action.help.strip(), f"{flag} has no help text"
        help_text = parser._get_formatter()._expand_help(action)
        assert "(default:" in help_text, (flag, help_text)
        if action.default not in (None, False):
            assert f"(default: {action.default})" in help_text, (flag, help_text)
        assert flag in text


def test_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "--teacher-topk" in capsys.readouterr().out


def test_mode_dependent_and_shared_defaults_agree_with_the_modules():
    from fusedkd.distill.cli import MODE_DEFAULTS
    from fusedkd.distill.offline import PART_TOKENS

    parser = build_parser()
    assert parser.get_default("topk_part_tokens") == PART_TOKENS
    actions = {action.dest: action for action in _options(parser)}
    for name, values in MODE_DEFAULTS.items():
        help_text = actions[name].help
        numbers = {float(x) for x in re.findall(r"\d+(?:\.\d+)?(?:e-?\d+)?", help_text)}
        for value in values:
            assert value is None or value in numbers, (name, value, help_text)
        assert "real runs" in help_text and "default" in help_text
