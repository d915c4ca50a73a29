"""Compile every Triton kernel of fusedkd as it is launched, for a GPU architecture, without a GPU.

    python -m fusedkd.kernels.compile_check                       # sm_90 (Hopper), Qwen3 shapes, all dtypes
    python -m fusedkd.kernels.compile_check --dtypes bf16 --tokens 16384 --json

Triton's interpreter (the CPU test path) neither type-checks nor lowers the kernels as the compiler
does. This runs the backend's own launch code (`fused_linear_kd`, `kd_logits`, the tiles backend's
`kd_tile` and `topk_tile`) on meta tensors of the given shapes (Qwen3-4B -> Qwen3-0.6B by default:
V = 151,936, H_t = 2560, H_s = 1024), with every kernel replaced by a recorder; then it binds each
recorded launch with Triton's own launcher binder for the target (the same
`create_function_from_signature` a real launch uses: the same stride == 1
constants, divisibility-by-16 attributes and integer specializations; meta tensors sit at address 0,
i.e. aligned like fresh CUDA allocations) and compiles it with the real compiler (Triton's bundled
ptxas). For each kernel it reports registers, spilled bytes (ptxas), shared memory, the number of
`tl.dot`s in the kernel and how many of them lowered to Hopper warp-group MMAs
(`ttng.warp_group_dot` in the TTGIR), and the `wgmma.mma_async` / `mma.sync` instructions in the PTX.
It needs TRITON_INTERPRET unset. The configurations in config.py were sized with it.
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
# The kernels of each launching module (the launchers sit beside their kernels).
FUSED_KERNELS = {
    "statistics": ("statistics_kernel", "merge_statistics_kernel"),
    "jsd": ("jsd_kernel", "merge_jsd_kernel"),
    "gradient": ("gradient_kernel",),
}
LOGITS_KERNELS = ("kd_logits_forward_kernel", "kd_logits_backward_kernel")
TILE_KERNELS = ("kd_tile_kernel",)
TOPK_TILE_KERNELS = ("topk_tile_statistics_kernel", "topk_tile_gradient_kernel")


@contextlib.contextmanager
def _recorded_launches(module, names, launches: list):
    """Replace the module's kernels by recorders of (kernel, args, kwargs) for the duration."""

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.kernel, args, kwargs))

    saved = {name: getattr(module, name) for name in names}
    try:
        for name, kernel in saved.items():
            setattr(module, name, Recorder(kernel))
        yield
    finally:
        for name, kernel in saved.items():
            setattr(module, name, kernel)


def fused_linear_launches(
    dtype: torch.dtype,
    divergence: str,
    tokens: int,
    vocab: int,
    student_dim: int,
    teacher_dim: int,
    multiprocessors: int,
    teacher_dtype: torch.dtype | None = None,
):
    """The (kernel, args, kwargs) the fused linear backend launches for a loss and its gradient."""
    from fusedkd._options import KDOptions
    from fusedkd.kernels import fused_linear_kd, gradient, jsd, statistics

    teacher_dtype = teacher_dtype or dtype
    meta = dict(device="meta")
    options = KDOptions(divergence, 0.5, 2.0, 0.7, -100, "mean", vocab, True)
    problem = fused_linear_kd._make_problem(
        torch.empty(tokens, student_dim, dtype=dtype, **meta),
        torch.empty(vocab, student_dim, dtype=dtype, **meta),
        None,
        torch.empty(tokens, teacher_dim, dtype=teacher_dtype, **meta),
        torch.empty(vocab, teacher_dim, dtype=teacher_dtype, **meta),
        None,
        torch.empty(tokens, dtype=torch.int64, **meta),
        options,
    )
    problem.multiprocessors = multiprocessors  # the grids are sized for the target, not for "meta"
    recorded: list = []
    modules = {"statistics": statistics, "jsd": jsd, "gradient": gradient}
    with contextlib.ExitStack() as stack:
        for name, kernels in FUSED_KERNELS.items():
            stack.enter_context(_recorded_launches(modules[name], kernels, recorded))
        config = fused_linear_kd._select_config(problem)
        stats, _, _ = fused_linear_kd._statistics(problem, config)
        weights = torch.empty(tokens, dtype=torch.float32, **meta)
        fused_linear_kd._gradients(problem, config, stats, weights, weights, (True, True, False))
    return recorded


def kd_logits_launches(dtype: torch.dtype, divergence: str, tokens: int, vocab: int):
    """The launches of the logits-level loss: forward with the fused gradient, and the backward kernel."""
    from fusedkd._options import KDOptions
    from fusedkd.kernels import kd_logits

    recorded: list = []
    with _recorded_launches(kd_logits, LOGITS_KERNELS, recorded):
        for reduction in ("mean", "none"):
            options = KDOptions(divergence, 0.5, 2.0, 0.7, -100, reduction, vocab, True)
            student = torch.empty(tokens, vocab, dtype=dtype, device="meta", requires_grad=True)
            teacher = torch.empty(tokens, vocab, dtype=dtype, device="meta")
            labels = torch.empty(tokens, dtype=torch.int64, device="meta")
            loss, _, _ = kd_logits.kd_logits(student, teacher, labels, options)
            if reduction == "none":
                loss.sum().backward()
    return recorded


def tile_launches(dtype: torch.dtype, divergence: str, tokens: int, vocab: int):
    """The launches of the tiles backend's kernels over one chunk: the dense loss's (`kd_tile`, both
    tiles) and, for the KLs, the top-k loss's (`topk_tile`, tail "bucket", a soft-capped student); G in
    the student tile's bytes for a 16-bit `dtype` (the heads' dtype), over the tile for float32."""
    from fusedkd._options import KDOptions, SupportOptions, TopKOptions
    from fusedkd.kernels import kd_tile, topk_tile

    meta = dict(device="meta")
    tiles = torch.empty(2, tokens, vocab, **meta)  # float32 tiles at distinct (meta) addresses
    s, t = tiles[0], tiles[1]
    grad_out = s.view(dtype)[:, :vocab] if dtype != torch.float32 else None
    weights = (torch.empty(tokens, **meta), torch.empty(tokens, **meta))
    labels = torch.empty(tokens, dtype=torch.int64, **meta)
    recorded: list = []
    with _recorded_launches(kd_tile, TILE_KERNELS, recorded):
        options = KDOptions(divergence, 0.5, 2.0, 0.7, -100, "mean", vocab, True)
        kd_tile.kd_tile_terms_triton(s, t, labels, options, weights, teacher_tempered=True, grad_out=grad_out)
    if divergence in ("forward_kl", "reverse_kl"):
        options = TopKOptions.of(dict(divergence=divergence, temperature=2.0, student_softcap=30.0))
        options = options.resolve(vocab_size=vocab, has_labels=True)
        support = SupportOptions("bucket", 2.0**-24, need_ce=True)
        ids = torch.empty(tokens, 64, dtype=torch.int64, **meta)
        log_p = torch.empty(tokens, 64, **meta)
        with _recorded_launches(topk_tile, TOPK_TILE_KERNELS, recorded):
            topk_tile.topk_tile_terms_triton(
                s, ids, log_p, labels, options, support, weights, grad_out=grad_out
            )
    return recorded


def _ptxas(arch: int) -> str:
    """The ptxas Triton itself runs for `arch` (it ships two)."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(arch).path


def _nvdisasm(ptxas_path: str) -> str:
    """The nvdisasm beside Triton's ptxas."""
    return os.path.join(os.path.dirname(ptxas_path), "nvdisasm")


_SASS_LINE = re.compile(r"^\s*(?:/\*[0-9a-f]+\*/)?\s*(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\b(.*)$")


def mma_loop_spills(sass: str) -> tuple[int, int]:
    """(innermost loops that issue tensor-core MMAs, spill loads/stores inside them) in disassembled SASS.

    A loop is the stretch from a label to a branch back to it. Its MMA loops are those holding an
    HGMMA/HMMA; the innermost are those holding no other MMA loop (the K-loops of the dots). A spill
    there (STL/LDL) costs local-memory traffic at every K step; a spill elsewhere is paid once per
    tile or per program (a handful of scalars), which the `spill_bytes` total cannot tell apart."""
    labels, instructions = {}, []
    for line in sass.splitlines():
        label = re.match(r"^\s*(\.L_x_\d+):", line)
        if label:
            labels[label.group(1)] = len(instructions)
            continue
        match = _SASS_LINE.match(line)
        if match and not line.lstrip().startswith(("//", ".")):
            target = re.search(r"`\((\.L_x_\d+)\)", match.group(3))
            instructions.append((match.group(2), target.group(1) if target else None))
    loops = []
    for end, (opcode, target) in enumerate(instructions):
        if opcode.startswith("BRA") and target in labels and labels[target] <= end:
            loops.append((labels[target], end))
    mma = [
        (a, b) for a, b in loops if any(op.startswith(("HGMMA", "HMMA")) for op, _ in instructions[a : b + 1])
    ]
    innermost = [(a, b) for a, b in mma if not any((c, d) != (a, b) and a <= c and d <= b for c, d in mma)]
    spills = sum(
        1 for a, b in innermost for op, _ in instructions[a : b + 1] if op.startswith(("STL", "LDL"))
    )
    return len(innermost), spills


def _count(pattern: str, text: str) -> int:
    return len(re.findall(pattern, text, flags=re.MULTILINE))


def compile_launch(kernel, args, kwargs, arch: int) -> dict:
    """Bind one recorded launch as Triton's launcher would, compile it for sm_<arch>, report its resources."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(
        backend, kwargs, bound_args, specialization, options
    )
    compiled = triton.compile(
        ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__
    )

    ptx = compiled.asm["ptx"]
    arch_name = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as work:
        source, cubin = os.path.join(work, "kernel.ptx"), os.path.join(work, "kernel.cubin")
        with open(source, "w") as f:
            f.write(ptx)
        ptxas = _ptxas(arch)
        report = subprocess.run(
            # The options Triton's own make_cubin passes (its report is what the cubin got).
            [ptxas, "-v", "--regAllocOptLevel=2", f"--gpu-name={arch_name}", source, "-o", cubin],
            capture_output=True,
            text=True,
        ).stderr
        sass = subprocess.run([_nvdisasm(ptxas), "-c", cubin], capture_output=True, text=True).stdout
    mma_loops, loop_spills = mma_loop_spills(sass)
    registers = re.search(r"Used (\d+) registers", report)
    spill_stores = sum(int(x) for x in re.findall(r"(\d+) bytes spill stores", report))
    spill_loads = sum(int(x) for x in re.findall(r"(\d+) bytes spill loads", report))
    constants = {
        k: v
        for k, v in kwargs.items()
        if k
        in ("DIVERGENCE", "BLOCK_N", "BLOCK_V", "BLOCK_H", "FOLD_V", "SUB_BLOCKS", "FUSE_GRAD", "ACC_DTYPE")
    }
    return {
        "kernel": kernel.__name__,
        "constexprs": {k: str(v) if k == "ACC_DTYPE" else v for k, v in constants.items()},
        "num_warps": options.num_warps,
        "num_stages": options.num_stages,
        "registers": int(registers.group(1)) if registers else None,
        "spill_bytes": spill_stores + spill_loads,
        # Spill instructions inside the innermost loops that issue MMAs (the dots' K-loops), and those loops.
        "mma_loop_spills": loop_spills,
        "mma_loops": mma_loops,
        # ptxas serializes the warp-group MMAs when registers run short (its warning C7512).
        "wgmma_serialized": "wgmma.mma_async instructions are serialized" in report,
        "shared_bytes": compiled.metadata.shared,
        # Dots in the kernel, and those the compiler turned into Hopper warp-group MMAs.
        "dots": _count(r"\btt\.dot\b", compiled.asm["ttir"]),
        "wgmma_dots": _count(r"\bttng\.warp_group_dot\b", compiled.asm["ttgir"]),
        # Instructions in the PTX (lines that start with the opcode, not comments).
        "wgmma_instructions": _count(r"^\s*wgmma\.mma_async\b", ptx),
        "mma_sync_instructions": _count(r"^\s*mma\.sync\b", ptx),
        "specialized_ones": sum(1 for s in specialization if s[0] == "constexpr" and s[1] == 1),
    }


def compile_all(
    dtypes, divergences, arch: int, tokens: int, vocab: int, student_dim: int, teacher_dim: int, sms: int
):
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError(
            "unset TRITON_INTERPRET: the compile check runs Triton's compiler, not its interpreter"
        )
    seen, rows = set(), []
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        for divergence in divergences:
            launches = fused_linear_launches(dtype, divergence, tokens, vocab, student_dim, teacher_dim, sms)
            launches += kd_logits_launches(dtype, divergence, min(tokens, 64), vocab)
            launches += tile_launches(dtype, divergence, min(tokens, 1024), vocab)
            for kernel, args, kwargs in launches:
                key = (
                    kernel.__name__,
                    tuple(str(a.dtype) if isinstance(a, torch.Tensor) else type(a).__name__ for a in args),
                    tuple(sorted(map(str, kwargs.items()))),
                )
                if key in seen:
                    continue
                seen.add(key)
                rows.append({"dtype": dtype_name, **compile_launch(kernel, args, kwargs, arch)})
    return rows


def specializations(
    tokens: int,
    arch: int = 90,
    vocab: int = 151_936,
    student_dim: int = 1024,
    teacher_dim: int = 2560,
    sms: int = 132,
) -> list[tuple[str, str]]:
    """What Triton's launcher binder would compile, per launch of the fused linear loss and its gradient
    (bf16; forward KL and JSD) and of the tiles backend's kernels over a chunk of min(`tokens`, 1,024)
    tokens, at `tokens` tokens: (kernel name, its specialization). A launch with another token count
    reuses the compiled kernel exactly when its specialization is the same."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", arch, 32))
    keys = []
    for divergence in ("forward_kl", "jsd"):
        launches = fused_linear_launches(
            torch.bfloat16, divergence, tokens, vocab, student_dim, teacher_dim, sms
        )
        launches += tile_launches(torch.bfloat16, divergence, min(tokens, 1024), vocab)
        for kernel, args, kwargs in launches:
            binder = create_function_from_signature(kernel.signature, kernel.params, backend)
            _, specialization, options = binder(*args, **kwargs)
            keys.append((kernel.__name__, repr(specialization) + repr(sorted(options.items()))))
    return keys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--arch", type=int, default=90, help="compute capability, e.g. 90 (H100/H200), 80 (A100)"
    )
    parser.add_argument("--dtypes", default="bf16,fp16,fp32")
    parser.add_argument("--divergences", default="forward_kl,reverse_kl,jsd")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--student-hidden", type=int, default=1024)
    parser.add_argument("--teacher-hidden", type=int, default=2560)
    parser.add_argument(
        "--sms", type=int, default=132, help="multiprocessors the grids are sized for (H100/H200)"
    )
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    rows = compile_all(
        args.dtypes.split(","),
        args.divergences.split(","),
        args.arch,
        args.tokens,
        args.vocab,
        args.student_hidden,
        args.teacher_hidden,
        args.sms,
    )
    if args.json:
        print(json.dumps(rows))
        return 0
    columns = (
        "kernel",
        "dtype",
        "div",
        "tile",
        "warps",
        "regs",
        "spill",
        "loop-spill",
        "smem",
        "dots",
        "wgmma",
        "wgmma-ins",
        "serial",
    )
    widths = (26, 5, 3, 16, 5, 4, 5, 10, 6, 4, 5, 9, 6)
    print(" ".join(f"{c:<{w}}" if i < 2 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(columns, widths))))
    for row in rows:
        c = row["constexprs"]
        tile = "x".join(str(c[k]) for k in ("BLOCK_N", "BLOCK_V", "BLOCK_H") if k in c)
        if "SUB_BLOCKS" in c:
            tile += f"/{c['SUB_BLOCKS']}"
        values = (
            row["kernel"],
            row["dtype"],
            c.get("DIVERGENCE", "-"),
            tile or str(c.get("BLOCK_V", "-")),
            row["num_warps"],
            row["registers"],
            row["spill_bytes"],
            row["mma_loop_spills"],
            row["shared_bytes"],
            row["dots"],
            row["wgmma_dots"],
            row["wgmma_instructions"],
            "yes" if row["wgmma_serialized"] else "no",
        )
        print(
            " ".join(f"{v:<{w}}" if i < 2 else f"{v!s:>{w}}" for i, (v, w) in enumerate(zip(values, widths)))
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
