"""Shared helpers for the benchmark scripts: fair alternating timing, peak memory, dtype/device flags, tiny pipes.

Not a test and not run-time code: the scripts in this folder compare our implementation with the reference
libraries (diffusers, MONAI, transformers) on the same machine in the same run, alternating ours / reference
runs so that a background load hits both equally. Medians, not means: one preempted run must not decide.

Peak memory. tracemalloc does not see torch's allocator, so on CPU each measurement runs in a fresh
subprocess and reports the growth of the process's peak resident set (getrusage ru_maxrss) during ONE call,
above the resident set just before it (the model is already built). On CUDA it is
torch.cuda.max_memory_allocated above the allocation before the call.
"""
import argparse
import contextlib
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Run as `python benchmarks/x.py`: put the repository root first and drop benchmarks/ itself from the path,
# so benchmarks/tokenizer.py or heatmap.py never shadow a library module of the same name.
sys.path[:] = [p for p in sys.path if p and Path(p).resolve() != ROOT / "benchmarks"]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402  (after the path fix)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------------------------------------------
# flags


def base_parser(description):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--runs", type=int, default=3, help="timed runs per implementation (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per implementation first")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32",
                   help="fp32, or autocast to bf16/fp16 (recorded attention probabilities stay float32)")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNets (both ours and the reference)")
    p.add_argument("--json", default=None, help="also write the results as JSON to this path")
    return p


def setup(args):
    """Apply --threads, check --device; returns the torch.device."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False (no GPU, or a CPU-only torch build)")
    if args.device == "cpu" and args.dtype == "fp16":
        print("note: fp16 autocast on CPU is slow and poorly supported; bf16 is the CPU half-precision path")
    return torch.device(args.device)


def autocast(args):
    """The autocast context for --dtype (a no-op for fp32)."""
    if args.dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(args.device, dtype=DTYPES[args.dtype])


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------------
# timing


def time_once(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def alternate(fns, runs, warmup, device):
    """Time several callables {name: fn} in alternation (A B A B ..., order flipped every round).

    Returns {name: [seconds, ...]}. Warm-up runs (first-call allocations, autotuning) are not timed.
    """
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times = {n: [] for n in names}
    for r in range(runs):
        for n in (names if r % 2 == 0 else names[::-1]):
            times[n].append(time_once(fns[n], device)[0])
    return times


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def fmt_s(x):
    return f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.2f} s"


# ---------------------------------------------------------------------------------------------------------
# memory


def current_rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure_call_memory(fn, device):
    """Peak memory growth during one call of fn (bytes), and whether the number is exact.

    CPU: the resident set is sampled every millisecond by a thread while fn runs (torch releases the GIL inside
    its kernels), and ru_maxrss confirms the peak when the call raised the process's all-time peak; when it did
    not (model construction peaked higher), the sampled value stands and is flagged as sampled (exact=False).
    """
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, True
    import threading
    base, peak_before = current_rss_bytes(), peak_rss_bytes()
    sampled, done = [base], threading.Event()

    def sample():
        while not done.is_set():
            sampled.append(current_rss_bytes())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    peak_after = peak_rss_bytes()
    if peak_after > peak_before:                      # the call set a new all-time peak: ru_maxrss is exact
        return peak_after - base, True
    return max(sampled) - base, False


def memory_in_subprocess(module, builder, kwargs, timeout=1800):
    """Run `benchmarks.<module>.<builder>(**kwargs)` in a fresh Python, call the returned fn once, and return
    (bytes, exact). The builder must return a zero-argument callable (models already built)."""
    code = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from benchmarks.common import measure_call_memory\n"
        f"from benchmarks.{module} import {builder} as build\n"
        f"kw = json.loads({json.dumps(json.dumps(kwargs))})\n"
        "fn = build(**kw)\n"
        "b, exact = measure_call_memory(fn, kw.get('device', 'cpu'))\n"
        "print('MEM', json.dumps([b, exact]))\n"
    )
    env = dict(os.environ)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)
    for line in res.stdout.splitlines():
        if line.startswith("MEM "):
            b, exact = json.loads(line[4:])
            return b, exact
    raise RuntimeError(f"memory subprocess for {module}.{builder}({kwargs}) failed:\n{res.stderr[-3000:]}")


def fmt_mb(b, exact=True):
    return f"{b / 2**20:.0f} MiB" + ("" if exact else " (sampled)")


# ---------------------------------------------------------------------------------------------------------
# reporting


def write_json(path, results):
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(results, indent=2))
        print(f"wrote {path}")


def env_line(device):
    d = torch.device(device)
    what = torch.cuda.get_device_name() if d.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    return f"torch {torch.__version__}, {what}"
