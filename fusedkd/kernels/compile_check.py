"""Compile the fused linear KD kernels for a GPU architecture, without a GPU, and report their resources.

    python -m fusedkd.kernels.compile_check                 # sm_90 (Hopper), every dtype and divergence
    python -m fusedkd.kernels.compile_check --arch 80 --dtypes bf16

Triton's interpreter (the CPU test path) does not type-check or lower the kernels the way the compiler
does; this runs the real compiler (Triton's bundled ptxas) on every kernel specialization that the
backend would launch at Qwen-like shapes, and prints each one's registers, stack (spills), shared
memory and tensor-core instructions. It needs TRITON_INTERPRET unset. The configurations in config.py
were sized with it (the largest tiles that do not spill).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
KERNEL_NAMES = (
    "statistics_kernel",
    "merge_statistics_kernel",
    "jsd_kernel",
    "merge_jsd_kernel",
    "gradient_kernel",
)


@contextlib.contextmanager
def _recorded_launches(module, launches: list):
    """Replace the module's kernels by recorders of (kernel, args, kwargs) for the duration."""

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.kernel, args, kwargs))

    saved = {name: getattr(module, name) for name in KERNEL_NAMES}
    try:
        for name, kernel in saved.items():
            setattr(module, name, Recorder(kernel))
        yield
    finally:
        for name, kernel in saved.items():
            setattr(module, name, kernel)


def _arg_type(value) -> str:
    if isinstance(value, torch.Tensor):
        names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64"}
        return "*" + names[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if abs(value) < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"unexpected kernel argument {value!r}")


def launches(dtype: torch.dtype, divergence: str, tokens=512, vocab=4096, student_dim=1024, teacher_dim=2560):
    """The (kernel, args, kwargs) the backend launches for one loss evaluation and its gradient."""
    from fusedkd._options import KDOptions
    from fusedkd.kernels import config, fused_linear_kd

    options = KDOptions(divergence, 0.5, 2.0, 0.7, -100, "mean", vocab, True)
    problem = fused_linear_kd._make_problem(
        torch.zeros(tokens, student_dim, dtype=dtype),
        torch.zeros(vocab, student_dim, dtype=dtype),
        torch.zeros(vocab, dtype=dtype),
        torch.zeros(tokens, teacher_dim, dtype=dtype),
        torch.zeros(vocab, teacher_dim, dtype=dtype),
        None,
        torch.zeros(tokens, dtype=torch.int64),
        options,
    )
    kernel_config = config.FLOAT32_CONFIG if dtype == torch.float32 else config.HALF_CONFIG
    recorded: list = []
    with _recorded_launches(fused_linear_kd, recorded):
        stats, _, _ = fused_linear_kd._statistics(problem, kernel_config)
        weights = torch.ones(tokens)
        fused_linear_kd._gradients(problem, kernel_config, stats, weights, weights, (True, True, True))
    return recorded


def compile_launch(kernel, args, kwargs, arch: int) -> dict:
    """Compile one recorded launch for sm_<arch>; its resource use as a dict."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kwargs = dict(kwargs)
    options = {"num_warps": kwargs.pop("num_warps", 4), "num_stages": kwargs.pop("num_stages", 3)}
    signature = {name: _arg_type(value) for name, value in zip(kernel.arg_names, args)}
    signature.update({name: "constexpr" for name in kwargs})
    compiled = triton.compile(
        ASTSource(kernel, signature, kwargs), target=GPUTarget("cuda", arch, 32), options=options
    )
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        usage = subprocess.run([cuobjdump, "-res-usage", cubin.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", usage)
    ptx = compiled.asm["ptx"]
    return {
        "kernel": kernel.__name__,
        "constexprs": {
            k: v for k, v in kwargs.items() if k in ("DIVERGENCE", "BLOCK_N", "BLOCK_V", "BLOCK_H")
        },
        **options,
        "registers": int(found.group(1)) if found else None,
        "stack_bytes": int(found.group(2)) if found else None,
        "shared_bytes": compiled.metadata.shared,
        "tensor_core_ops": ptx.count("wgmma.mma_async") + ptx.count("mma.sync"),
    }


def compile_all(dtypes, divergences, arch: int):
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError(
            "unset TRITON_INTERPRET: the compile check runs Triton's compiler, not its interpreter"
        )
    seen, rows = set(), []
    for dtype_name in dtypes:
        for divergence in divergences:
            for kernel, args, kwargs in launches(DTYPES[dtype_name], divergence):
                key = (
                    kernel.__name__,
                    tuple(_arg_type(a) for a in args),
                    tuple(sorted(map(str, kwargs.items()))),
                )
                if key in seen:
                    continue
                seen.add(key)
                rows.append({"dtype": dtype_name, **compile_launch(kernel, args, kwargs, arch)})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--arch", type=int, default=90, help="compute capability, e.g. 90 (H100/H200), 80 (A100)"
    )
    parser.add_argument("--dtypes", default="bf16,fp16,fp32")
    parser.add_argument("--divergences", default="forward_kl,reverse_kl,jsd")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    rows = compile_all(args.dtypes.split(","), args.divergences.split(","), args.arch)
    if args.json:
        print(json.dumps(rows))
        return 0
    columns = ("kernel", "dtype", "div", "tile", "warps", "regs", "stack", "smem", "mma")
    widths = (24, 5, 3, 12, 5, 4, 5, 6, 4)
    print(" ".join(f"{c:<{w}}" if i < 2 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(columns, widths))))
    for row in rows:
        c = row["constexprs"]
        tile = "x".join(str(c[k]) for k in ("BLOCK_N", "BLOCK_V", "BLOCK_H") if k in c) or "-"
        values = (
            row["kernel"],
            row["dtype"],
            c.get("DIVERGENCE", "-"),
            tile,
            row["num_warps"],
            row["registers"],
            row["stack_bytes"],
            row["shared_bytes"],
            row["tensor_core_ops"],
        )
        print(
            " ".join(f"{v:<{w}}" if i < 2 else f"{v!s:>{w}}" for i, (v, w) in enumerate(zip(values, widths)))
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
