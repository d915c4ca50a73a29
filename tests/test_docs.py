"""Docstring examples run, and the public functions document every option."""

from __future__ import annotations

import doctest
import importlib
import inspect
import pathlib
import pkgutil

import pytest

import fusedkd

MODULES = sorted(
    name
    for _, name, _ in pkgutil.walk_packages(fusedkd.__path__, "fusedkd.")
    if not name.endswith("__main__")
)


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples_run(module_name):
    module = importlib.import_module(module_name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(module, module_name):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {module_name}"


@pytest.mark.parametrize("name", [n for n in fusedkd.__all__ if callable(getattr(fusedkd, n))])
def test_public_callables_document_every_parameter(name):
    obj = getattr(fusedkd, name)
    target = obj.__init__ if inspect.isclass(obj) and obj.__init__.__doc__ else obj
    doc = inspect.getdoc(obj) or ""
    doc += inspect.getdoc(target) or ""
    assert doc, f"fusedkd.{name} has no docstring"
    if inspect.isclass(obj):
        return  # modules document their options by pointing at the function they wrap
    for parameter in inspect.signature(obj).parameters:
        assert parameter in doc, f"fusedkd.{name} does not document {parameter!r}"


def test_no_module_is_over_500_lines():
    """A module over 500 lines does more than one job: split it (docs/design.md §8)."""
    root = pathlib.Path(fusedkd.__file__).parent
    long = {
        str(path.relative_to(root)): count
        for path in root.rglob("*.py")
        if (count := len(path.read_text().splitlines())) > 500
    }
    assert not long, f"modules over 500 lines: {long}"
