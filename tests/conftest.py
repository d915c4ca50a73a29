"""Test setup: without a GPU, Triton kernels run through Triton's interpreter (docs/design.md §7).

TRITON_INTERPRET must be set before `triton` is first imported, so this happens at collection time,
before any test module imports fusedkd's kernels.
"""

import os
import shutil

if shutil.which("nvidia-smi") is None and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1" and torch.cuda.is_available():
    raise RuntimeError("TRITON_INTERPRET=1 is set on a machine with CUDA: unset it to test the real kernels")

# Under pytest-xdist (`-n auto`), the workers share the cores: each takes its part of them rather than
# all of them, so that they do not oversubscribe the CPU.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _small_tiles(request, monkeypatch):
    """Tests marked small_tiles(n) run the torch backend's default chunking at its smallest (MIN_CHUNK
    tokens) and its element-wise passes in groups of n rows, so small test shapes take many chunks
    and groups, with partial last ones, as large shapes do."""
    marker = request.node.get_closest_marker("small_tiles")
    if marker is not None:
        from fusedkd.torch_backend import tiles

        rows = marker.args[0]
        monkeypatch.setattr(tiles, "TILE_BYTES", 1)
        monkeypatch.setattr(tiles, "LINEAR_TILE_BYTES", 1)
        monkeypatch.setattr(tiles.Scratch, "group_rows", staticmethod(lambda chunk, *_: min(rows, chunk)))
