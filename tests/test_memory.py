"""The PyTorch backend never allocates a tensor with N*V elements (docs/design.md §5)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import fusedkd
from fusedkd.torch_backend.tiles import LINEAR_TILE_BYTES, default_chunk_size


class LargestOutput(TorchDispatchMode):
    """Records the largest tensor any aten op produces (every allocation of the loss is an op output)."""

    def __init__(self):
        super().__init__()
        self.numel, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in tree_flatten(out)[0]:
            if isinstance(x, torch.Tensor) and x.numel() > self.numel:
                self.numel, self.op = x.numel(), func
        return out


@pytest.mark.slow  # 8-48 s each on a 2-core CPU (V = 151,936 tiles)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "options",
    [
        dict(reduction="mean", alpha=0.7, temperature=5.0),  # gradient formed in the forward
        dict(reduction="none", alpha=0.7, temperature=5.0, divergence="jsd", beta=0.3),  # recomputed
        dict(reduction="sum", alpha=0.5, return_components=True, divergence="reverse_kl"),
    ],
    ids=["mean", "none-jsd", "components-rkl"],
)
def test_torch_backend_allocates_no_tokens_by_vocab_tensor(dtype, options):
    n, vocab, hidden = 200, 151_936, 8  # hidden << n, so the V x H weight gradient is far below N x V
    student_hidden = torch.randn(n, hidden, dtype=dtype, requires_grad=True)
    student_weight = torch.randn(vocab, hidden, dtype=dtype, requires_grad=True)
    teacher_hidden = torch.randn(n, hidden, dtype=dtype)
    teacher_weight = torch.randn(vocab, hidden, dtype=dtype)
    labels = torch.randint(0, vocab, (n,))
    labels[::5] = -100
    with LargestOutput() as largest:
        out = fusedkd.fused_linear_kd_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, labels, backend="torch", **options
        )
        loss = out[0] if isinstance(out, tuple) else out
        loss.sum().backward()
    chunk = default_chunk_size(vocab, 4, LINEAR_TILE_BYTES)
    assert chunk < n
    assert largest.numel <= chunk * vocab < n * vocab, (largest.numel, largest.op)
    assert student_weight.grad is not None and torch.isfinite(student_weight.grad).all()
