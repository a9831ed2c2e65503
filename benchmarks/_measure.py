"""Shared helpers for the benchmark scripts: peak memory of one step in a fresh process, timing, JSON.

Peak memory on CPU. torch's default CPU allocator has no cache: tensors come from glibc malloc, and
large blocks (above glibc's mmap threshold, at most 32 MiB) are mmap'ed and returned to the system
when freed, so the resident set size (RSS) follows the live tensors closely. Each variant runs in a
fresh subprocess (no memory left over from another variant). The child:

1. builds the inputs (`setup`), runs one untimed warm-up step when asked (pages of lazily
   initialized libraries), calls `malloc_trim(0)` so freed heap pages leave the RSS,
2. resets the kernel's peak-RSS counter (`echo 5 > /proc/self/clear_refs`, which sets VmHWM to the
   current RSS) and reads the current RSS as the baseline,
3. runs the step once and reads VmHWM: `peak_beyond_inputs = VmHWM - baseline`, the most memory
   the step held at any moment beyond what existed before it (inputs, weights, the interpreter),
4. times `repeats` further steps (wall clock, `time.perf_counter`).

On a CUDA device (`device="cuda"`: the setup builds its tensors there) the peak is
`torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()`, minus the memory allocated
before the step (the caching allocator's own view: what the step's tensors held at most), and every
timed call ends with `torch.cuda.synchronize()` so that the kernels are inside the timing.

Where /proc/self/clear_refs cannot be written, the fallback is `ru_maxrss` after the step minus the
RSS before it, valid when setup's own peak was below the step's; `memory_method` says which was used.
Timings on a shared machine are noisy: report the minimum (least disturbed run) next to the median.

Scripts in benchmarks/ run as files (`python benchmarks/NAME.py`) and import this module as `_measure`
(Python puts a script's own directory first on sys.path; nothing edits the path): the installed opacus
ships a top-level package named `benchmarks`, so `benchmarks.*` imports would find that one instead.
secure-kd itself is imported from the installed package (`make install`: an editable install of the
checkout). These helpers stay here, not in the wheel: they measure this checkout's scripts and write
to its benchmarks/results/.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss_bytes() -> int:
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # no /proc: best available


def trim_heap() -> None:
    """Give freed glibc heap pages back to the system so they do not count in the baseline RSS."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> bool:
    """Set the kernel's peak RSS (VmHWM) to the current RSS; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kib("VmHWM") is not None
    except OSError:
        return False


def peak_rss_bytes() -> int:
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_step(
    step: Callable[[], Any], *, repeats: int, warmup: bool, device: str = "cpu"
) -> dict[str, Any]:
    """Peak memory of one call of `step` beyond what exists now, then `repeats` timed calls."""
    if device.startswith("cuda"):
        return _measure_cuda_step(step, repeats=repeats, warmup=warmup)
    if warmup:
        step()
    trim_heap()
    exact = reset_peak_rss()
    baseline = current_rss_bytes()
    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    peak = peak_rss_bytes()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    times = times or [first]
    return {
        "peak_bytes_beyond_inputs": max(peak - baseline, 0),
        "memory_method": "VmHWM after clear_refs" if exact else "ru_maxrss minus RSS before the step",
        "time_min_s": min(times),
        "time_median_s": statistics.median(times),
        "times_s": times,
    }


def _measure_cuda_step(step: Callable[[], Any], *, repeats: int, warmup: bool) -> dict[str, Any]:
    import torch

    def synchronized() -> None:
        step()
        torch.cuda.synchronize()

    if warmup:
        synchronized()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    start = time.perf_counter()
    synchronized()
    first = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        synchronized()
        times.append(time.perf_counter() - start)
    times = times or [first]
    return {
        "peak_bytes_beyond_inputs": max(peak - baseline, 0),
        "memory_method": "torch.cuda.max_memory_allocated minus memory_allocated before the step",
        "time_min_s": min(times),
        "time_median_s": statistics.median(times),
        "times_s": times,
    }


def run_variant_in_subprocess(
    target: str,
    kwargs: dict[str, Any],
    *,
    repeats: int = 3,
    warmup: bool = False,
    threads: int | None = None,
    timeout: float = 1800,
    device: str = "cpu",
) -> dict[str, Any]:
    """Run `measure_step` in a fresh interpreter on the step returned by `module:function(**kwargs)`.

    The child runs this file as a script, so `module` is a script of benchmarks/ (e.g. "kd_loss"); secure-kd
    itself comes from the installed package (`make install`: an editable install of this checkout).
    `threads`, if given, is passed to `torch.set_num_threads` in the child before setup. With
    `device="cuda"` the setup receives `device=` among its kwargs and the peak is the CUDA allocator's.
    """
    if device != "cpu":
        kwargs = {**kwargs, "device": device}
    payload = json.dumps(
        {
            "target": target,
            "kwargs": kwargs,
            "repeats": repeats,
            "warmup": warmup,
            "threads": threads,
            "device": device,
        }
    )
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), payload],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark variant {target} {kwargs} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ratio(numerator: float, denominator: float) -> float | None:
    return None if denominator == 0 else round(numerator / denominator, 4)


def cuda_info() -> dict[str, Any]:
    """The GPU a run used (name, memory, CUDA and driver-side versions), or {} without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return {}
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {
        "gpu": props.name,
        "gpu_memory_gib": round(props.total_memory / 2**30, 1),
        "cuda": torch.version.cuda,
        "bf16_supported": torch.cuda.is_bf16_supported(),
    }


def write_results(name: str, results: dict[str, Any], out: Path | None = None) -> Path:
    """Write benchmarks/results/<name>.json, or `out` (temp file, then rename); print it as one JSON line."""
    path = Path(out) if out is not None else RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    print(json.dumps(results, sort_keys=True))
    return path


def _child(payload: str) -> None:
    spec = json.loads(payload)
    if spec.get("threads"):
        import torch

        torch.set_num_threads(spec["threads"])
    module_name, function_name = spec["target"].split(":")
    setup = getattr(importlib.import_module(module_name), function_name)
    step = setup(**spec["kwargs"])
    result = measure_step(
        step, repeats=spec["repeats"], warmup=spec["warmup"], device=spec.get("device", "cpu")
    )
    print(json.dumps(result))


if __name__ == "__main__":
    _child(sys.argv[1])
