#!/usr/bin/env python
"""What the GPU did while a timed window of training steps ran: summaries of the torch.profiler traces that
`throughput.py --profile DIR` writes (Chrome trace JSON, .json.gz; open one in ui.perfetto.dev to look).

    python benchmarks/traces.py DIR/ceiling.json.gz DIR/shards_dali.json.gz ...   # the first: the step alone

A window is the span of the record_function throughput.py puts around a window's timed steps (its name holds the
step count). Inside it, in milliseconds per step:
- wall: the window's time on the host (it ends with a synchronisation, so the GPU's work is inside);
- GPU busy: the share of the wall with any kernel, copy or memset running on the GPU;
- step kernels: the time a kernel ran on the step's streams (the streams of the first trace's kernels launched by
  the window's own thread: the step alone; all of PyTorch's work, the PyTorch loader's on-device normalisation
  too; not a DALI pipeline still decoding ahead from its threads), other kernels: on any other stream (DALI's),
  overlap: both at once;
- copies: device copies and memsets, any stream, summed;
- host syncs: the window's own thread inside a CUDA call that waits for the GPU (names with "Synchronize");
- step idle: the rest of the wall (wall = step kernels + step idle), by the length of each stretch with no step
  kernel running: under 15 us (between the kernels of a CUDA graph or a launch queue that keeps ahead), 15-200 us
  (a kernel held up: another's blocks on the SMs it needs, a short host hiccup), 200 us and over (the step waiting
  for something: its next batch, the host);
- other launches: kernels on the other streams, per step (DALI's nvJPEG runs one per hardware-decoded image).
The step's kernels taking longer than in the ceiling's window means they run slower beside the loader's (shared
SMs, memory bandwidth); GPU busy well under 1 means the GPU waits for the host (launches, synchronisations); other
kernels that never overlap the step's add their whole time to it (a stream dependency serialises them); idle of
200 us and over that the ceiling's window lacks is the step waiting for the loader.
"""

from __future__ import annotations

import gzip
import json
import sys
from collections import defaultdict
from pathlib import Path

WINDOW = "vitdeit.timed_window"  # + " steps=N": the record_function around a window's timed steps
GPU_WORK = ("kernel", "gpu_memcpy", "gpu_memset")  # trace categories of work on the device
HOST_CALLS = ("cuda_runtime", "cuda_driver")  # the host's CUDA API calls, on every thread of the process
# the step's idle stretches by length, in us: a graph's kernel-to-kernel gaps, a held-up kernel, a wait (an H200's
# graph replays of the DeiT step: 909 kernels a step of 19 ms, 1.0 ms of gaps under 15 us, 0.01 ms of 15-200 us)
IDLE_BOUNDS = (15.0, 200.0)
IDLE_NAMES = ("under_15us", "15_to_200us", "200us_and_over")


def window_name(steps: int) -> str:
    return f"{WINDOW} steps={steps}"


class NotATrace(Exception):
    """A path that is no trace throughput.py --profile wrote: one line, not a traceback."""


def load(path: Path) -> list[dict]:
    """The events of a Chrome trace, .json or .json.gz."""
    try:
        with (gzip.open(path, "rt") if str(path).endswith(".gz") else open(path)) as f:
            return json.load(f)["traceEvents"]
    except (OSError, ValueError, KeyError, TypeError) as e:  # missing, not JSON (or gzip), another JSON
        what = "no traceEvents" if isinstance(e, (KeyError, TypeError)) else f"{type(e).__name__}: {e}"
        raise NotATrace(f"{path}: not a trace ({what}); pass the .json.gz files throughput.py --profile DIR wrote "
                        f"in DIR") from None


def merged(intervals) -> list[list[float]]:
    """The union of (start, end) intervals, as disjoint sorted [start, end] pairs."""
    out: list[list[float]] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return out


def covered(union: list[list[float]]) -> float:
    return sum(end - start for start, end in union)


def overlap(a: list[list[float]], b: list[list[float]]) -> float:
    """How long two unions (merged()) are both covered."""
    i = j = 0
    total = 0.0
    while i < len(a) and j < len(b):
        total += max(0.0, min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def idle_by_length(busy: list[list[float]], t0: float, t1: float) -> list[float]:
    """The time in [t0, t1] outside `busy` (merged(), inside [t0, t1]), summed per IDLE_BOUNDS class of the
    stretch's length."""
    edges = [t0] + [t for interval in busy for t in interval] + [t1]  # idle stretches: (edges[2i], edges[2i + 1])
    out = [0.0] * (len(IDLE_BOUNDS) + 1)
    for start, end in zip(edges[::2], edges[1::2]):
        if end > start:
            out[sum(end - start >= b for b in IDLE_BOUNDS)] += end - start
    return out


def summary(events: list[dict], step_streams: set | None = None, top: int = 5) -> dict:
    """Per-step figures of the one timed window in `events` (module docstring). step_streams: the streams that count
    as the step's (the ceiling's summary's `step_streams`); None: every stream with a kernel in this window launched
    by the window's thread (a kernel's args.correlation is its launch call's), or, where no kernel links to such a
    launch, every stream with a kernel in this window."""
    windows = [e for e in events if e.get("ph") == "X" and e.get("cat") == "user_annotation"  # the host's span (on a
               and str(e.get("name", "")).startswith(WINDOW + " ")]  # GPU, a gpu_user_annotation mirrors it)
    if len(windows) != 1:
        raise ValueError(f"{len(windows)} events named '{WINDOW} steps=N' in the trace; expected exactly one window")
    win = windows[0]
    steps = int(win["name"].rsplit("=", 1)[1])
    t0, t1 = win["ts"], win["ts"] + win["dur"]  # microseconds

    def inside(cats):  # (event, start, end) of the complete events of these categories, clipped to the window
        for e in events:
            if e.get("ph") == "X" and e.get("cat") in cats:
                start, end = max(e["ts"], t0), min(e["ts"] + e.get("dur", 0), t1)
                if end > start:
                    yield e, start, end

    def stream_of(e):  # a kernel's CUDA stream
        return e.get("args", {}).get("stream", e.get("tid"))

    gpu = list(inside(GPU_WORK))
    kernels = [(e, start, end) for e, start, end in gpu if e["cat"] == "kernel"]
    if step_streams is None:  # the streams the window's thread launched kernels on (not another thread's: DALI's)
        launched = {e.get("args", {}).get("correlation") for e in events if e.get("cat") in HOST_CALLS
                    and e.get("tid") == win.get("tid")} - {None, 0}
        step_streams = ({stream_of(e) for e, _, _ in kernels if e.get("args", {}).get("correlation") in launched}
                        or {stream_of(e) for e, _, _ in kernels})
    mine = merged((start, end) for e, start, end in kernels if stream_of(e) in step_streams)
    other = merged((start, end) for e, start, end in kernels if stream_of(e) not in step_streams)
    calls = defaultdict(lambda: [0, 0.0, 0.0])  # CUDA API name -> [calls, microseconds, of them on the window's thread]
    for e, start, end in inside(HOST_CALLS):
        c = calls[e["name"]]
        c[0] += 1
        c[1] += end - start
        c[2] += (end - start) if e.get("tid") == win.get("tid") else 0.0

    def ms(us: float) -> float:  # microseconds in the window -> milliseconds per step
        return us / 1000 / steps

    return {"steps": steps, "wall_ms_per_step": ms(t1 - t0), "gpu_events": len(gpu),
            "gpu_busy_frac": covered(merged((s, e) for _, s, e in gpu)) / (t1 - t0) if gpu and t1 > t0 else None,
            "step_streams": sorted(step_streams, key=lambda v: (type(v).__name__, v)),
            "step_kernel_ms_per_step": ms(covered(mine)),
            "other_kernel_ms_per_step": ms(covered(other)), "overlap_ms_per_step": ms(overlap(mine, other)),
            "copy_ms_per_step": ms(sum(end - start for e, start, end in gpu if e["cat"] != "kernel")),
            "host_sync_ms_per_step": ms(sum(c[2] for name, c in calls.items() if "Synchronize" in name)),
            "step_idle_ms_per_step": dict(zip(IDLE_NAMES, map(ms, idle_by_length(mine, t0, t1)))) if gpu else None,
            "other_kernels_per_step": sum(stream_of(e) not in step_streams for e, _, _ in kernels) / steps,
            "host_calls": [{"name": name, "calls": c[0], "ms_per_step": ms(c[1]), "window_thread_ms_per_step": ms(c[2])}
                           for name, c in sorted(calls.items(), key=lambda kv: -kv[1][1])[:top]]}


# the printed table's columns after the unit's name: (title, width), one space apart (the step-idle ones: 3)
COLUMNS = (("wall", 7), ("GPU busy", 8), ("step kernels", 12), ("other", 7), ("overlap", 7), ("copies", 7),
           ("host syncs", 10), ("step idle: <15us", 18), ("15-200", 6), (">=200", 6), ("other launches", 14))
HEADER = f"{'profile, ms per step':28s} " + " ".join(f"{title:>{width}s}" for title, width in COLUMNS)


def row(unit: str, s: dict, ceiling: dict | None = None) -> str:
    """One printed line: `s` a summary(); the step's kernel time also as a multiple of the ceiling's."""
    if "error" in s:
        return f"{unit:28s} {s['error']}"
    if s["gpu_busy_frac"] is None:  # no GPU work in the window (a CPU run): the host's time alone
        return f"{unit:28s} {s['wall_ms_per_step']:7.2f} " + " ".join(f"{'-':>{width}s}" for _, width in COLUMNS[1:])
    step = f"{s['step_kernel_ms_per_step']:.2f}"
    if ceiling is not None and ceiling.get("step_kernel_ms_per_step") and s is not ceiling:
        step += f" x{s['step_kernel_ms_per_step'] / ceiling['step_kernel_ms_per_step']:.2f}"
    short, held, waits = s["step_idle_ms_per_step"].values()
    return (f"{unit:28s} {s['wall_ms_per_step']:7.2f} {100 * s['gpu_busy_frac']:6.0f} % {step:>12s} "
            f"{s['other_kernel_ms_per_step']:7.2f} {s['overlap_ms_per_step']:7.2f} {s['copy_ms_per_step']:7.2f} "
            f"{s['host_sync_ms_per_step']:10.2f}   {short:16.2f} {held:6.2f} {waits:6.2f} "
            f"{s['other_kernels_per_step']:14.1f}")


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):  # the usage line; the whole docstring with --help
        print(__doc__ if argv else __doc__.split("\n\n")[1], file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    try:
        traces = [(path, load(path)) for path in map(Path, argv)]  # all read before the table starts
    except NotATrace as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    ceiling = None
    print(HEADER)
    for path, events in traces:
        s = summary(events, None if ceiling is None else set(ceiling["step_streams"]))
        ceiling = ceiling or s
        print(row(path.name.split(".json")[0], s, ceiling))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
