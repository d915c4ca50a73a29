"""What Python code costs inside a `torch.compile`'d region: calls, and straight-line bytecode.

    python benchmarks/compile_python_calls.py          # one JSON object per line

fusedkd's losses run inside a compiled step as opaque ops (`fusedkd/_compile.py`) whose bodies are
Python: the eager loss, and on a CPU the Triton interpreter, which is Python throughout. This times
one such body, a loop of `--calls` Python function calls and a loop of as many additions without a
call, run by a `torch.library.custom_op` from an eager step and from the same step compiled
(`fullgraph=True`), alternating, median of `--repeats`. It also reports whether the interpreter's
frame-evaluation function (PEP 523) is CPython's own while the op runs: while dynamo's is installed,
CPython 3.11+ cannot inline Python-to-Python calls, so each call costs more, wherever it happens.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import sys
import time

import torch

_SEEN: dict = {}


def _frame_hook_installed() -> bool | None:
    """Whether the interpreter evaluates frames through a PEP 523 hook (None: cannot tell here)."""
    try:
        api = ctypes.pythonapi
        api.PyInterpreterState_Get.restype = ctypes.c_void_p
        get = api._PyInterpreterState_GetEvalFrameFunc
        get.restype, get.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
        default = ctypes.cast(api._PyEval_EvalFrameDefault, ctypes.c_void_p).value
        return get(api.PyInterpreterState_Get()) != default
    except (AttributeError, ValueError):
        return None


def _calls(n: int) -> int:
    def step(i):
        return i + 1

    total = 0
    for _ in range(n):
        total = step(total)
    return total


def _straight(n: int) -> int:
    total = 0
    for _ in range(n):
        total = total + 1
    return total


@torch.library.custom_op("fusedkd_benchmarks::python_body", mutates_args=())
def python_body(x: torch.Tensor, n: int) -> torch.Tensor:
    _SEEN["hook"] = _frame_hook_installed()
    start = time.perf_counter()
    _calls(n)
    middle = time.perf_counter()
    _straight(n)
    _SEEN["times"] = (middle - start, time.perf_counter() - middle)
    return x * 2


@python_body.register_fake
def _(x, n):
    return torch.empty_like(x)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=300_000)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)

    def step(x):
        return python_body(torch.tanh(x), args.calls) + 1

    x = torch.randn(16)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    compiled(x)
    rows = {"eager": [], "compiled": []}
    hooks = {}
    for _ in range(args.repeats):
        for name, fn in (("eager", step), ("compiled", compiled)):
            fn(x)
            rows[name].append(_SEEN["times"])
            hooks[name] = _SEEN["hook"]
    for name, times in rows.items():
        row = dict(
            region=name,
            python=sys.version.split()[0],
            torch=torch.__version__,
            calls=args.calls,
            calls_ms=1e3 * statistics.median(t[0] for t in times),
            straight_line_ms=1e3 * statistics.median(t[1] for t in times),
            frame_hook_installed=hooks[name],
        )
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
