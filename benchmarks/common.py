"""Small helpers shared by the benchmarks: timing, machine info, output."""

import json
import os
import platform
import statistics
import sys
import time

from keras_lora import memory
from keras_lora.files.atomic import atomic_write_file


def time_calls(fn, warmup=3, repeats=20):
    """Calls `fn` `warmup` times untimed, then returns `repeats` timings.

    `fn` must block until its work is done (e.g. `block_until_ready` on
    JAX). Returns the per-call wall-clock times in seconds.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def time_interleaved(fns, warmup=3, repeats=20):
    """Times several callables side by side, one call of each per round.

    `fns` maps names to callables. Each is warmed up `warmup` times first;
    then every round calls each callable once (the order rotates from round
    to round), so slow drift of the machine hits all of them alike.
    Returns `{name: [seconds per call, ...]}`.
    """
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    times = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


def summarize(times):
    """Median, quartiles and min of a list of seconds, in milliseconds."""
    ms = sorted(t * 1e3 for t in times)
    quartiles = statistics.quantiles(ms, n=4) if len(ms) > 1 else ms * 3
    return {
        "median_ms": statistics.median(ms),
        "p25_ms": quartiles[0],
        "p75_ms": quartiles[2],
        "min_ms": ms[0],
        "n": len(ms),
    }


def paired_ratio(numerator, denominator):
    """Median of the element-wise ratios of two equally long time lists."""
    pairs = zip(numerator, denominator, strict=True)
    return statistics.median(a / b for a, b in pairs)


def cpu_model():
    """The CPU model name from /proc/cpuinfo (or `platform` as fallback)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def backend_versions(backend):
    """Version strings of the packages behind a Keras backend name."""
    versions = {}
    modules = {
        "jax": ("jax", "jaxlib"),
        "tensorflow": ("tensorflow",),
        "torch": ("torch",),
        "numpy": ("numpy",),
    }.get(backend, ())
    for module_name in modules:
        try:
            module = __import__(module_name)
            versions[module_name] = module.__version__
        except ImportError:
            versions[module_name] = None
    return versions


def machine_info(backend=None):
    """A JSON-friendly description of this machine and software stack."""
    import keras
    import numpy

    try:
        usable_cores = len(os.sched_getaffinity(0))
    except AttributeError:
        usable_cores = os.cpu_count()
    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable_cores,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "numpy": numpy.__version__,
        "keras": keras.__version__,
    }
    if backend is not None:
        info["backend"] = backend
        info["backend_versions"] = backend_versions(backend)
    return info


def load_average():
    """The 1/5/15-minute load averages (None where unsupported)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def record_end_load(result, monitor):
    """Adds the end-of-run load average and the share of the CPU other
    processes used since `monitor` (a `CpuMonitor`) started to `result`."""
    result["load_average_end"] = load_average()
    share = monitor.other_share()
    result["other_processes_cpu_share"] = (
        None if share is None else round(share, 4)
    )


class CpuMonitor:
    """Measures how much CPU other processes use while this one runs.

    Compares the machine-wide busy time from /proc/stat with this
    process's own CPU time (all its threads). A share is the other
    processes' busy time as a fraction of the machine's capacity (cores x
    wall time): near 0 on a quiet machine, None where /proc is missing.
    """

    def __init__(self):
        self._start = self._last = self._snapshot()

    @staticmethod
    def _snapshot():
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        ticks = os.sysconf("SC_CLK_TCK")
        idle = fields[3] + fields[4]  # idle + iowait
        busy = sum(fields[:8]) - idle  # guest time is already in user
        return busy / ticks, time.process_time(), time.perf_counter()

    @staticmethod
    def _share(start, end):
        if start is None or end is None:
            return None
        busy = end[0] - start[0]
        own = end[1] - start[1]
        capacity = (end[2] - start[2]) * (os.cpu_count() or 1)
        return max(0.0, (busy - own) / capacity) if capacity > 0 else None

    def other_share(self):
        """Other processes' CPU share since this monitor was created."""
        return self._share(self._start, self._snapshot())

    def lap(self):
        """Other processes' CPU share since the previous `lap()`."""
        now = self._snapshot()
        share = self._share(self._last, now)
        self._last = now
        return share


def time_interleaved_quiet(
    fns,
    warmup=3,
    repeats=20,
    min_repeats=None,
    max_other_share=0.05,
    block_seconds=0.5,
    max_seconds=60.0,
):
    """Like `time_interleaved`, but keeps only rounds timed on a quiet CPU.

    Rounds run in blocks of about `block_seconds`; a block in which other
    processes used more than `max_other_share` of the machine's CPU (see
    `CpuMonitor`) is thrown away. Stops once `repeats` rounds are kept, or
    after `max_seconds` with at least `min_repeats` (default `repeats`)
    kept. If even that fails by `3 * max_seconds`, all rounds are used and
    the result is flagged `contended`. Returns `(times, stats)`.
    """
    names = list(fns)
    min_repeats = repeats if min_repeats is None else min_repeats
    for name in names:
        for _ in range(warmup):
            fns[name]()
    kept = {name: [] for name in names}
    every = {name: [] for name in names}
    stats = {"rounds_discarded": 0, "block_other_shares": []}
    monitor = CpuMonitor()
    round_index = 0
    start = time.perf_counter()
    while len(kept[names[0]]) < repeats:
        elapsed = time.perf_counter() - start
        if elapsed > max_seconds and len(kept[names[0]]) >= min_repeats:
            break
        if elapsed > 3 * max_seconds:
            break
        block = {name: [] for name in names}
        monitor.lap()
        block_start = time.perf_counter()
        while time.perf_counter() - block_start < block_seconds:
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                t0 = time.perf_counter()
                fns[name]()
                block[name].append(time.perf_counter() - t0)
            round_index += 1
        share = monitor.lap()
        stats["block_other_shares"].append(
            None if share is None else round(share, 3)
        )
        for name in names:
            every[name] += block[name]
        if share is None or share <= max_other_share:
            for name in names:
                kept[name] += block[name]
        else:
            stats["rounds_discarded"] += len(block[names[0]])
    contended = len(kept[names[0]]) < min_repeats
    times = every if contended else kept
    times = {name: values[:repeats] for name, values in times.items()}
    stats["contended"] = contended
    stats["rounds_kept"] = len(times[names[0]])
    stats["seconds"] = round(time.perf_counter() - start, 2)
    return times, stats


def write_json(path, data):
    """Writes `data` as JSON to `path` atomically (temp file + replace)."""
    write_text(path, json.dumps(data, indent=2) + "\n")


def write_text(path, text):
    """Writes `text` to `path` atomically (`keras_lora.files.atomic`):
    readers see the old file or the new one, never half."""

    def fill(tmp, scratch):
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write_file(path, fill)


def markdown_table(rows, columns=None):
    """Renders a list of dicts as a GitHub markdown table.

    `columns` is a list of keys (or `(key, header)` pairs); by default the
    keys of the first row. Floats are shown with 2 decimals, `None` as
    "n/a". Numeric columns are right-aligned.
    """
    if not rows:
        return ""
    if columns is None:
        columns = list(rows[0])
    columns = [c if isinstance(c, tuple) else (c, c) for c in columns]

    def fmt(value):
        if value is None:
            return "n/a"
        if isinstance(value, float):
            return f"{value:.2f}"
        return str(value)

    def numeric(key):
        values = [r.get(key) for r in rows if r.get(key) is not None]
        return bool(values) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool)
            for v in values
        )

    header = "| " + " | ".join(h for _, h in columns) + " |"
    rule = (
        "|"
        + "|".join("---:" if numeric(key) else "---" for key, _ in columns)
        + "|"
    )
    lines = [header, rule]
    for row in rows:
        cells = [fmt(row.get(key)) for key, _ in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# -- memory ---------------------------------------------------------------


# The process's resident memory, from keras_lora's CPU probe (Linux: VmRSS
# and the resettable VmHWM high-water mark).
_CPU = memory.CpuProbe()


def rss_bytes():
    """This process's resident memory now."""
    return _CPU.current()


def peak_rss_bytes():
    """This process's resident high-water mark since the last
    `reset_peak_rss()` (since the process started where it can't reset)."""
    return _CPU.peak()


def reset_peak_rss():
    """Resets the high-water mark to the current RSS; False where the
    platform cannot (several variants are then measured in one process
    only with that caveat)."""
    if _CPU.peak_scope != "since-reset":
        return False
    _CPU.reset_peak()
    return True


def release_free_memory():
    """Garbage-collects and hands free heap pages back to the OS.

    Without `malloc_trim`, memory freed by one variant stays resident in
    glibc's heap and the next variant reuses it without raising RSS,
    which would understate the next variant's peak.
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def report_header(title, command, results):
    """The first lines of a workload's markdown report: title, the command
    that produced it, date and machine."""
    return [
        f"# {title}",
        "",
        f"Command: `{command}`",
        "",
        f"Date: {results[0]['date']}",
        "",
        f"Machine: {machine_line(results)}",
        "",
    ]


def machine_line(results):
    """One line: CPU, platform, Python and the versions of every backend."""
    first = results[0]["machine"]
    parts = [
        f"CPU {first['cpu']} ({first['cores']} cores, "
        f"{first['usable_cores']} usable)",
        first["platform"],
        f"Python {first['python']}",
        f"NumPy {first['numpy']}",
        f"Keras {first['keras']}",
    ]
    seen = set()
    for result in results:
        machine = result["machine"]
        versions = dict(machine.get("backend_versions", {}))
        versions.update(machine.get("peft_versions", {}))
        for name, version in versions.items():
            if name not in seen:
                seen.add(name)
                parts.append(f"{name} {version}")
    for result in results:
        machine = result["machine"]
        threads = machine.get("torch_threads") or machine.get(
            "torch_num_threads"
        )
        if threads:
            parts.append(f"torch threads {threads}")
            break
    return "; ".join(parts)


def load_line(results):
    """Per backend: other processes' CPU share and the load averages."""

    def load(values):
        return "n/a" if not values else "/".join(f"{v:.2f}" for v in values)

    parts = []
    for r in results:
        share = r.get("other_processes_cpu_share")
        share = "n/a" if share is None else f"{100 * share:.0f}%"
        parts.append(
            f"{r['backend']}: other processes used {share} of the CPU, "
            f"load average {load(r.get('load_average_start'))} -> "
            f"{load(r.get('load_average_end'))}"
        )
    return "; ".join(parts)


def add_timing_args(parser):
    """`--repeats` and `--max-other-share`, shared by the timed workloads."""
    parser.add_argument("--repeats", type=int, help="Override timed rounds.")
    parser.add_argument(
        "--max-other-share",
        type=float,
        help="Discard rounds timed while other processes used more than "
        "this share of the CPU (default 0.05; 1 keeps all).",
    )


def apply_timing_args(settings, args):
    """Applies `add_timing_args`'s options to a workload's `settings`."""
    if args.repeats is not None:
        settings["repeats"] = args.repeats
        settings["min_repeats"] = min(settings["min_repeats"], args.repeats)
    if args.max_other_share is not None:
        settings["max_other_share"] = args.max_other_share
