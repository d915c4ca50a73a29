"""Measurement helpers shared by the benchmarks: CPU peak-memory growth and median wall time.

CPU memory is measured per method in a fresh subprocess: after the inputs exist and a warm-up call has
run, the kernel's high-water mark (VmHWM) is reset through /proc/self/clear_refs, and the peak growth of
the resident set over the resident set just before the measured call is reported. The subprocess runs
with a fixed glibc mmap threshold, so that freed large buffers go back to the OS and the resident set
tracks live memory instead of the allocator's cache.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0). False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_peak_growth_mib(fn: Callable[[], object]) -> float:
    """Peak resident-set growth, in MiB, of one call of `fn` over the resident set before it."""
    gc.collect()
    if not reset_peak_rss():
        raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs): CPU peak memory unavailable")
    before = _status_kib("VmRSS")
    fn()
    peak = _status_kib("VmHWM")
    return (peak - before) / 1024.0


def median_seconds(
    fn: Callable[[], object], repeats: int, warmup: int = 1, sync: Callable[[], None] | None = None
):
    """Median wall time of `fn` over `repeats` calls after `warmup` calls; also returns every sample."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
        sync()
    samples = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples), samples


def run_in_subprocess(module_file: str, args: list[str], timeout: float) -> dict:
    """Run `python module_file args...` with the allocator settings above; parse its last JSON line."""
    env = dict(os.environ, **MALLOC_ENV)
    proc = subprocess.run(
        [sys.executable, module_file, *args], capture_output=True, text=True, timeout=timeout, env=env
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout)[-2000:]
        return {
            "error": f"exit code {proc.returncode}: {tail.strip().splitlines()[-1] if tail.strip() else ''}"
        }
    return json.loads(lines[-1])


def machine_description() -> dict:
    import platform

    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    for name in ("triton", "liger_kernel"):
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", "installed")
        except Exception:
            info[name] = None
    if info.get("liger_kernel") == "installed":
        from importlib.metadata import version

        info["liger_kernel"] = version("liger-kernel")
    return info
