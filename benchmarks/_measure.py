"""Measurement helpers shared by the benchmarks: peak-memory growth and median wall time.

CPU memory is measured per method in a fresh subprocess: after the inputs exist and a warm-up call has
run, the kernel's high-water mark (VmHWM) is reset through /proc/self/clear_refs, and the peak growth of
the resident set over the resident set just before the measured call is reported. The subprocess runs
with a fixed glibc mmap threshold, so that freed large buffers go back to the OS and the resident set
tracks live memory instead of the allocator's cache.

CUDA memory is `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()`, minus the memory
allocated just before the call: the tensors the call allocates, not the caching allocator's reserve.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
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


def cuda_peak_growth_mib(fn: Callable[[], object]) -> float:
    """Peak allocated CUDA memory, in MiB, of one call of `fn` over the memory allocated before it."""
    import torch

    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def peak_growth_mib(fn: Callable[[], object], device_type: str) -> float:
    """`cuda_peak_growth_mib` on "cuda", `cpu_peak_growth_mib` on "cpu"."""
    if device_type == "cuda":
        return cuda_peak_growth_mib(fn)
    if device_type == "cpu":
        return cpu_peak_growth_mib(fn)
    raise ValueError(f"no peak-memory measurement for device type {device_type!r}")


def time_and_peak(
    fn: Callable[[], object],
    repeats: int,
    warmup: int,
    device_type: str,
    before_each: Callable[[], None] | None = None,
) -> dict:
    """Time `repeats` warm calls of `fn` and measure each one's peak-memory growth.

    `before_each` runs before every call, untimed and before the memory baseline is taken: it should
    drop what the previous call left (e.g. set the gradients to None), so that the growth counts the
    call's own allocations, gradients included. The memory bookkeeping (gc, resetting the high-water
    mark, synchronizing) also happens outside the timed window, so one call gives both numbers.
    Returns the median and every sample of the wall time (seconds) and the largest peak growth (MiB)
    over the timed calls.
    """
    sync = _sync_for(device_type)
    before_each = before_each or (lambda: None)
    for _ in range(warmup):
        before_each()
        fn()
        sync()
    samples: list[float] = []
    peaks: list[float] = []

    def timed() -> None:
        sync()
        start = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - start)

    for _ in range(repeats):
        before_each()
        peaks.append(peak_growth_mib(timed, device_type))
    return {"seconds": statistics.median(samples), "samples": samples, "peak_mib": max(peaks)}


def _sync_for(device_type: str) -> Callable[[], None]:
    if device_type == "cuda":
        import torch

        return torch.cuda.synchronize
    return lambda: None


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


def stream_subprocess(
    module_file: str,
    args: list[str],
    timeout: float,
    on_record: Callable[[dict], None] | None = None,
) -> tuple[list[dict], str | None]:
    """Run `python module_file args...` with the allocator settings above, reading JSON lines as they come.

    Every stdout line that starts with "{" is parsed as one record and passed to `on_record`, so a long
    run shows progress and a process that dies (out of memory, timeout) keeps the records it printed.
    Returns (records, error): error is None on success, else the exit status or the timeout and the last
    line of stderr.
    """
    env = dict(os.environ, **MALLOC_ENV)
    records: list[dict] = []
    with tempfile.TemporaryFile(mode="w+") as stderr:
        proc = subprocess.Popen(
            [sys.executable, module_file, *args], stdout=subprocess.PIPE, stderr=stderr, text=True, env=env
        )
        timed_out = threading.Event()

        def kill() -> None:
            timed_out.set()
            proc.kill()

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith("{"):
                    record = json.loads(line)
                    records.append(record)
                    if on_record is not None:
                        on_record(record)
            returncode = proc.wait()
        finally:
            timer.cancel()
        if returncode == 0 and not timed_out.is_set():
            return records, None
        stderr.seek(0)
        lines = stderr.read().strip().splitlines()
        cause = f"timed out after {timeout:.0f} s" if timed_out.is_set() else f"exit code {returncode}"
        if returncode == -9 and not timed_out.is_set():
            cause += " (SIGKILL: out of memory?)"
        return records, f"{cause}: {lines[-1] if lines else ''}".rstrip(": ")


def machine_description() -> dict:
    import platform

    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "os": f"{platform.system()} {platform.release()}",
    }
    memory_kib = _meminfo_kib("MemTotal")
    if memory_kib is not None:
        info["memory_gib"] = round(memory_kib / 2**20, 1)
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
    if torch.cuda.is_available():
        info["cuda"] = torch.version.cuda
    # Installed distributions' versions, read from their metadata (no import: liger-kernel's is slow).
    from importlib.metadata import PackageNotFoundError, version

    for key, distribution in (
        ("fusedkd", "fusedkd"),
        ("triton", "triton"),
        ("liger_kernel", "liger-kernel"),
        ("trl", "trl"),
        ("matplotlib", "matplotlib"),
    ):
        try:
            info[key] = version(distribution)
        except PackageNotFoundError:
            info[key] = None
    return info


def _meminfo_kib(field: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def git_revision(path: str) -> str | None:
    """Short commit of the checkout holding `path`, with "+modified" if its tracked files differ from it."""
    try:

        def git(*args: str) -> str:
            return subprocess.run(
                ["git", *args], cwd=path, capture_output=True, text=True, check=True, timeout=30
            ).stdout.strip()

        commit = git("rev-parse", "--short", "HEAD")
        modified = git("status", "--porcelain", "--untracked-files=no", "--", ".")
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+modified" if modified else "")


def available_memory_gib() -> float | None:
    """MemAvailable from /proc/meminfo, in GiB (None where there is no /proc)."""
    kib = _meminfo_kib("MemAvailable")
    return None if kib is None else kib / 2**20
