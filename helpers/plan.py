"""A plan before every long step: predicted wall time, peak memory (GPU and RAM) and disk, and whether a free
Colab T4 would hold it; after the step, predicted against measured in `run.json`.

How a plan is made:
- The step's work is counted from the model's size and the step's parameters: matmul FLOPs (2 per weight
  per token forward, 3x that with the backward pass), bytes read from memory (every weight once per
  decoding step), bytes held (KV cache, a batch's activations, an SAE and its optimiser state, activations
  loaded for training) and bytes written to disk (the activation store in fp16, SAE weights).
- Time = FLOPs / the FLOP rate + bytes / the copy rate + small ops (30 a decoder layer's forward, 80 an
  SAE optimiser step, ...) x the time of one, all measured here by a short calibration (about a second: a
  square matmul, a large copy, a tiny matmul), cached per hardware in `plan_calibration.json` under the
  user's cache folder (`env.cache_dir`; `NB_PLAN_CALIBRATION` names another file). The key is the
  processor, its core count, torch's thread count, torch's version and the CUDA card, so a Colab session on
  another card measures again. Real steps run below those peak rates (Python between the matmuls, small
  shapes) and have costs that do not grow with the work (imports, loading the model, the first call's
  warm-up, the tokenizer, writing files): each measured run of a step is kept in the same file per step and
  hardware (the last eight: counted time, wall time, process CPU time, other running threads), and later
  plans on that hardware use the line `fixed + slope × counted` fitted on them (`fit_line`): once runs of
  two sizes are kept, the fixed part is measured and a plan carries to other sizes; before that, a plain
  ratio. The first plan on new hardware uses the counted time alone, and says so. Process CPU time is
  predicted too: on a machine shared with other work it stretches less than wall time (torch's threads
  spin while they wait for each other, so it stretches too).
- Machine load: other processes' threads that are ready to run (`others_running`: the kernel's running
  threads less this process's own) are counted when the plan is made and sampled every 0.1 s while the step
  runs. With this process's torch threads they make `(others + threads) / cores` runnable threads a core;
  above one, a step runs `((others + threads) / cores) ** load_rate` times slower than on an idle machine
  (`crowding` is the log of that share, `Line.factor`). A rate of 1 is a fair share of the cores; it is
  fitted over the runs of every step on this hardware (`fit_load_rate`: each step's line fitted on its runs
  brought back to an idle machine, the log residuals regressed on crowding within each step), so runs at
  any load feed the line, and a plan multiplies the line by the factor for the load it sees now. Until runs
  of one step have seen different loads there is no rate: the lines are fitted on the runs as measured,
  plans make no allowance for load, and a crowded plan says so. (A fair share's rate 1 in its place cost
  the quiet case: it divided quiet runs by the 0-0.7 other threads sampled beside them, which had not
  slowed them, and shortened the lines: 11 of 12 steps within 30% instead of 12 of 12, bench/results/
  planner_cpu_quiet_load_model.json.) On a
  shared 2-core CPU (2 torch threads, bench/planner.py) smoke sampling took 8 s on a quiet machine and 234 s
  with ~6 other running threads; the rate fitted over runs at 3.5-8.5 other threads was 1.03 for wall time
  (0.48 for CPU time). What the count cannot see: what the other threads do (memory traffic, their own
  waits) and how the load changes during the step; at one count a step's time varied up to 1.8x there.
  Nor does the power law carry to an idle machine: from 0 to ~6 other threads sampling slowed ~28x, not
  the 4x of a fair share (torch's threads stall once any other thread takes a core), so a line fitted on
  crowded runs only predicts an idle machine's times up to ~8x too long (bench/results/
  planner_cpu_load_large.json).
- torch's threads: on a CPU each plan also chooses how many intra-op threads the step runs on: the cores
  other processes leave free, `cores - round(others)`, at least 1 and at most the user's count (torch's
  default: one a core) (`matched_threads`); `watch` sets them and `done` restores the user's count. torch's
  threads wait for each other at every op, so a thread without a core stalls the others (the numbers
  below); on a dedicated machine (no other running threads: a Colab VM) the count is the user's and nothing
  changes. The step is then planned at that count: its counted time at rates measured with that many
  threads (`Calibration.rates_for`, measured once and cached beside the key's), its crowding with that many
  threads, and its run is kept with the count it ran on. The count is chosen once, when the plan is made:
  the watch's sampling thread cannot change it mid-step (`torch.set_num_threads` sets the OpenMP count of
  the calling thread only).
- Peak memory here = what this process uses now (RSS; CUDA memory allocated) + the weights it has mapped
  from disk and not read yet (safetensors are memory-mapped; their pages join RSS at the first forward) +
  what the step adds. On a T4 the weights sit in GPU memory at the T4's dtype (fp16, fp32 for nanochat),
  plus a fixed runtime overhead, plus what the step adds; RAM is the runtime's own plus what the step
  keeps on the host. Here the median of earlier runs' measured - counted peak RAM is added (what the
  counts leave out: modules the step imports, allocator slack); runs counted by an older `COUNTS_VERSION`
  are dropped, so a change to the counts never mixes with extras measured against the old ones.

A plan that a free T4 session would not hold (about 14.6 GiB usable VRAM, 12.7 GB RAM, 15 GB of free Drive,
at most 12 hours; REFERENCE.md "Colab") says so before anything runs, naming the parameter to lower.

`watch(run_dir, plan)` starts measuring (wall time, process CPU time, peak RSS sampled every 20 ms by a
thread, CUDA's peak allocation, the load average, and how long this process's most delayed thread waited on
a run queue for a core: `waited_seconds`, from Linux's scheduler statistics); its `done()` stops, prints
predicted against measured, records both in `run.json` under `plans.<step>` and keeps the run for later
plans on this hardware. The waits are recorded, not yet used: bench/run_delay.py found that they bring a
1-thread run on a crowded machine back to an idle machine's time (wall minus wait: 0.85-0.98x a
real-time-priority reference at 2.4-9x the wall time), but not torch's 2 threads alone (the partner spins,
counted as running, while one waits: 2.4-6x the reference at 12-83x). For those, wall x (wall / (wall -
wait)) ** -rate with a rate fitted on crowded runs came to 0.87-1.39x pooled over two runs, 0.54-1.48x with
one run's rate on the other (bench/results/run_delay_cpu*.json); the planner's lines still bring runs back
to idle by the other running threads they saw.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch

from helpers.run import atomic_write_json, read_json_record, read_run_json, update_run_json

T4_VRAM_GIB = 14.6
T4_RAM_GB = 12.7
T4_DRIVE_GB = 15.0
"""A free Google account's Drive, where the run folder lives on Colab."""
T4_HOURS = 12.0
"""Colab's FAQ: a free notebook runs for at most 12 hours (often less when the service is busy)."""
T4_RATES = {"flops_fp32": 4.0e12, "flops_fp16": 25e12, "bytes_per_s": 250e9, "op_s": 2e-5}
"""Half of a T4's peak fp32 (8.1 TFLOP/s) and tensor-core fp16 (65) rates, ~80% of its 320 GB/s, and 20 µs
a small torch op (Python dispatch and a kernel launch on Colab's 2 vCPUs)."""
OVERHEAD_GIB = 1.0
"""CUDA context and allocator slack on the GPU beyond the weights and what a step adds (a rough constant)."""
RUNTIME_RAM_GB = 2.5
"""Python, torch, transformers and the notebook's own data in system memory, beyond the weights."""
CALIBRATION_FILE = "plan_calibration.json"
OPS_PER_LAYER = 30
"""Torch ops of one decoder layer's forward (norms, projections, rotary, attention, MLP, residual adds)."""


# --- rates: measured here, cached per hardware --------------------------------------------------------------
@dataclass
class Rates:
    """What one second buys on a device: matmul FLOPs (fp32 and the half precision used there) and bytes
    read from memory; measured by `machine_rates` or a T4's published rates."""

    flops_fp32: float
    flops_fp16: float
    bytes_per_s: float
    where: str
    op_s: float = 0.0
    """Seconds of one small torch op (Python dispatch, no real work): what a step of many small ops costs
    beyond its FLOPs and bytes."""
    others: float | None = None
    """Other processes' running threads while they were measured (`others_now`); None where not known."""


def machine_rates(device: str, seconds: float = 0.3) -> Rates:
    """Measure this machine: a square fp32 matmul (and fp16 on CUDA) and a large copy, for `seconds` each."""
    others = others_now()
    if device == "cuda":
        torch.cuda.synchronize()

    def rate(work, size: float) -> float:
        work()
        if device == "cuda":
            torch.cuda.synchronize()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            work()
            n += 1
        if device == "cuda":
            torch.cuda.synchronize()
        return n * size / (time.perf_counter() - t0)

    n = 2048 if device == "cuda" else 1024  # the size of a batched forward's matmuls, not a toy one
    a = torch.randn(n, n, device=device)
    fp32 = rate(lambda: a @ a, 2 * n**3)
    half = a.half() if device == "cuda" else None
    fp16 = rate(lambda: half @ half, 2 * n**3) if half is not None else fp32
    buf = torch.empty(64 * 2**20 // 4, device=device)
    bw = rate(lambda: buf.clone(), 2 * buf.numel() * 4)  # read + write
    small = torch.randn(8, 8, device=device)
    ops = rate(lambda: small @ small + small, 2)  # two ops a call
    return Rates(fp32, fp16, bw, f"measured on this {device}", 1 / ops, others)


def t4_rates() -> Rates:
    return Rates(**T4_RATES, where="T4 at half its peak")


def hardware_key(device: str) -> str:
    """What the measured rates depend on: processor, cores, torch threads and version, the CUDA card."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    card = torch.cuda.get_device_name() if device == "cuda" and torch.cuda.is_available() else "no cuda"
    return f"{device} | {cpu} | {os.cpu_count()} cores | {threads_bound()} threads | " + (
        f"torch {torch.__version__} | {card}"
    )


def calibration_path(cache_dir: str | os.PathLike) -> Path:
    """`NB_PLAN_CALIBRATION` when set, else `<cache_dir>/plan_calibration.json`."""
    override = os.environ.get("NB_PLAN_CALIBRATION")
    return Path(override).expanduser() if override else Path(cache_dir) / CALIBRATION_FILE


@dataclass
class Line:
    """A step's measured seconds as `(fixed + slope × counted) × exp(load_rate × crowding)`: `fixed` is what
    does not grow with the work (imports, loading the model, the first call's warm-up, the tokenizer, writing
    files), `slope` how much slower than the calibrated peak rates the work itself runs (Python between the
    matmuls, small shapes), both on an idle machine; `load_rate` how much other processes' running threads
    slow it (`crowding`)."""

    fixed: float
    slope: float
    runs: int
    sizes: int
    """How many distinct sizes (counted times at least `SPREAD` apart) the runs covered: with one, fixed and
    proportional costs cannot be told apart and the line goes through zero (a plain ratio)."""
    load_rate: float = 0.0
    load_fitted: bool = False
    """Whether `load_rate` was fitted on runs at different loads (else 0: no allowance for load)."""

    def __call__(self, counted: float, crowded: float = 0.0) -> float:
        return (self.fixed + self.slope * counted) * self.factor(crowded)

    def factor(self, crowded: float) -> float:
        """How many times slower than on an idle machine at `crowding` `crowded`."""
        return math.exp(self.load_rate * crowded)

    def __str__(self) -> str:
        runs = f"{self.runs} earlier run{'s' if self.runs > 1 else ''} here"
        if self.sizes < 2:
            text = f"measured/counted ratio {self.slope:.2f} of {runs} (one size so far)"
        else:
            text = f"{self.fixed:.1f} s fixed + {self.slope:.2f} x counted, fitted on {runs}"
            text += f" at {self.sizes} sizes"
        return text + (f", load rate {self.load_rate:.2f}" if self.load_fitted else "")


SPREAD = 1.5
"""Counted times this far apart are different sizes of a step: enough spread to fit a fixed part."""


def fit_line(points: list[tuple[float, float]]) -> Line | None:
    """Least squares `measured = fixed + slope × counted` over (counted, measured) pairs of earlier runs, with
    `fixed` and `slope` kept ≥ 0; a plain median ratio while the runs cover one size; None without runs."""
    points = [(c, m) for c, m in points if c > 0 and m is not None and m >= 0]
    if not points:
        return None
    xs, ys = [c for c, _ in points], [m for _, m in points]
    sizes = sorted(xs)
    distinct = 1 + sum(b >= SPREAD * a for a, b in zip(sizes, sizes[1:], strict=False))
    if max(xs) < SPREAD * min(xs):
        return Line(0.0, statistics.median(m / c for c, m in points), len(points), 1)
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x in xs)
    fixed = my - slope * mx
    if slope < 0:  # the time did not grow with the work: all of it is fixed
        return Line(statistics.median(ys), 0.0, len(points), distinct)
    if fixed < 0:  # no fixed part to see: the least-squares line through zero
        slope = sum(x * y for x, y in points) / sum(x * x for x in xs)
        return Line(0.0, slope, len(points), distinct)
    return Line(fixed, slope, len(points), distinct)


def fit_load_rate(groups: list[list[tuple[float, float, float]]], iterations: int = 6) -> float | None:
    """`load_rate` of `measured ≈ line(counted) × exp(load_rate × crowding)` from the (counted, measured,
    crowding) runs of each step (one group a step): each step's line is fitted on its runs divided by the
    current factor, and the rate moves by the regression of the log residuals on crowding taken within each
    step (a step whose runs all saw one crowding teaches nothing about load). None while the crowding of a
    step's runs never differed by `MIN_CROWDING_SPREAD` in all (nothing to fit); never below 0."""
    groups = [[(c, m, z) for c, m, z in g if c > 0 and m is not None and m > 0] for g in groups]
    groups = [g for g in groups if len(g) >= 2]
    spread = 0.0
    for g in groups:
        mean = statistics.fmean(z for _, _, z in g)
        spread += sum((z - mean) ** 2 for _, _, z in g)
    if spread < MIN_CROWDING_SPREAD**2:
        return None
    rate = FAIR_SHARE
    for _ in range(iterations):
        num = 0.0
        for g in groups:
            line = fit_line([(c, m * math.exp(-rate * z)) for c, m, z in g])
            mean = statistics.fmean(z for _, _, z in g)
            for c, m, z in g:
                predicted = line(c) if line else 0.0
                if predicted > 0:
                    num += (z - mean) * (math.log(m / predicted) - rate * z)
        rate = max(0.0, rate + num / spread)
    return rate


MIN_CROWDING_SPREAD = 0.25
"""Crowding (the log of runnable threads a core) that a step's runs must differ by, in all, for a load rate
to be fitted: 0.25 is ~28% more runnable threads."""
FAIR_SHARE = 1.0
"""Where `fit_load_rate` starts: each runnable thread gets an equal share of the cores. Not used until
fitted: a line on runs that never saw different loads is fitted on them as measured."""

COUNTS_VERSION = 6
"""Bumped whenever the counting of a step's work changes: runs recorded under other counts are dropped from
the calibration file (their fixed parts, slopes and RAM extras were measured against other counts). 3: SAE
training counts each SAE's init sample, calibration, checkpoints and saved copy; collection counts its
pooled vectors per completion and layer. 4: the corpus forward runs only to the deepest stored layer. 5:
sampling prefills each distinct prompt once. 6: runs keep the other processes' running threads they saw
(`others`), and lines are fitted on runs brought back to an idle machine."""
KEEP_RUNS = 8
WAITED_SHARE = 0.2
"""A watched step that waited this share of its wall time for a core says so when it ends."""


def others_running() -> float | None:
    """Threads of other processes ready to run now: the kernel's count of running threads (`procs_running`
    in /proc/stat) less this process's own threads in state R; None where /proc is not readable (not
    Linux)."""
    try:
        with open("/proc/stat", "rb") as f:
            running = next(int(ln.split()[1]) for ln in f if ln.startswith(b"procs_running"))
        own = 0
        for task in os.scandir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{task.name}/stat", "rb") as f:
                    text = f.read()
            except OSError:  # the thread ended meanwhile
                continue
            own += text[text.rfind(b")") + 2 : text.rfind(b")") + 3] == b"R"
    except (OSError, StopIteration, ValueError):
        return None
    return float(max(running - own, 0))


def others_now(samples: int = 5, every: float = 0.01) -> float | None:
    """The mean of `others_running` over `samples` readings `every` seconds apart (0.04 s by default)."""
    got = []
    for i in range(samples):
        value = others_running()
        if value is None:
            return None
        got.append(value)
        if i < samples - 1:
            time.sleep(every)
    return statistics.fmean(got)


def thread_schedstats() -> dict[int, tuple[int, int]] | None:
    """Each thread of this process so far: id -> (nanoseconds it ran on a core, nanoseconds it waited on a run
    queue for one), from Linux's scheduler statistics (/proc/self/task/*/schedstat); None where they cannot be
    read."""
    out = {}
    try:
        tasks = os.scandir("/proc/self/task")
    except OSError:
        return None
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task.name}/schedstat", "rb") as f:
                ran, waited = (int(x) for x in f.read().split()[:2])
        except (OSError, ValueError):  # the thread ended meanwhile, or no scheduler statistics
            continue
        out[int(task.name)] = (ran, waited)
    return out or None


def waited_since(before: dict[int, tuple[int, int]] | None) -> float | None:
    """Seconds the most delayed thread of this process waited for a core since `before`
    (`thread_schedstats()`; threads started since count from 0, threads that ended since are missed)."""
    now = thread_schedstats()
    if before is None or now is None:
        return None
    return max(waited - before.get(tid, (0, 0))[1] for tid, (_, waited) in now.items()) / 1e9


def crowding(others: float | None, threads: int | None = None) -> float:
    """The log of the runnable threads a core has, `(others + threads) / cores`, this process's `threads`
    (torch's, by default) and `others` (`others_running`) together, when above one: 0 on an idle machine or
    one with cores to spare."""
    if not others:
        return 0.0
    cores = os.cpu_count() or 1
    threads = torch.get_num_threads() if threads is None else threads
    return math.log(max(1.0, (others + min(threads, cores)) / cores))


_lowered: tuple[int, int] | None = None
"""(torch's thread count before a watched step changed it, the count the step set) while that step runs: a
step that raised before its `done()` leaves torch at the count it set, and the next plan still bounds its
threads by the user's count."""


def threads_bound() -> int:
    """The most intra-op threads a step may use: torch's count now (the user's `torch.set_num_threads`, or
    torch's default of one a core), unless a watched step set the count now in force, then the count before
    that step."""
    now = torch.get_num_threads()
    return _lowered[0] if _lowered is not None and _lowered[1] == now else now


def matched_threads(others: float | None, bound: int | None = None) -> int:
    """torch's intra-op threads for a step that starts with `others` (`others_running`) threads of other
    processes running: the cores they leave free, `cores - round(others)`, at least 1 and at most `bound`
    (`threads_bound()` by default); `bound` itself when no other thread runs (a dedicated machine such as a
    Colab VM: nothing changes) or the count cannot be read. Why: torch's threads wait for each other at
    every op, so one of them without a core stalls the rest: on the shared 2-core CPU the same work took
    10.9 s on 2 threads and 3.5 s on 1 at the machine's own load (bench/results/run_delay_cpu.json).
    Chosen once, when the plan is made: `torch.set_num_threads` from the watch's sampling thread would set
    that thread's OpenMP count, not the count of the thread running the step."""
    bound = threads_bound() if bound is None else bound
    busy = round(others) if others is not None else 0
    if busy <= 0:
        return bound
    return max(1, min(bound, (os.cpu_count() or 1) - busy))


@dataclass
class Calibration:
    rates: Rates
    key: str
    path: Path
    runs: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    """step -> its latest runs on this hardware (at most `KEEP_RUNS`): counted seconds, measured wall and
    process CPU seconds, the other processes' running threads while it ran (`others`), and measured -
    counted peak RAM (`ram_extra_gb`: what the counts leave out, modules the step imports and allocator
    slack, the same at every size)."""
    measured_now: bool = False
    thread_rates: dict[str, dict[str, Any]] = field(default_factory=dict)
    """torch thread count -> `Rates` measured with that many threads, for steps that run on fewer threads
    than `key`'s (`matched_threads`): their counted time is counted at those rates."""

    def rates_for(self, threads: int, others: float | None = None) -> Rates:
        """The rates with `threads` torch threads: `rates` at the key's count, else measured once (about a
        second, torch set to `threads` meanwhile) and cached beside them; rates not measured here stand for
        every count. Measured again (and cached) when the cached ones were measured while other processes
        left fewer than `threads` cores free and `others` (running now) leaves them free: torch's threads
        stall without a core, so such rates are far too low (a 2-thread matmul measured beside one busy
        thread: 56 GFLOP/s, against 85 on one thread; bench/results/planner_cpu_load_matched.json)."""
        if not self.rates.where.startswith("measured on this cpu"):
            return self.rates
        bound = threads_bound()
        got = self.thread_rates.get(str(threads))
        cached = self.rates if threads == bound else (Rates(**got) if got else None)
        if cached is not None and not _measured_crowded(cached, threads, others):
            return cached
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            rates = machine_rates("cpu")
        finally:
            torch.set_num_threads(before)
        record = read_json_record(self.path, "delete it: the next plan measures this machine again")
        entry = record.get(self.key)
        if threads == bound:
            self.rates = rates
        else:
            self.thread_rates[str(threads)] = asdict(rates)
        if entry is not None:  # kept with this hardware's runs; a file without them is left alone
            entry["rates"], entry["thread_rates"] = asdict(self.rates), self.thread_rates
            _write_entry(self.path, self.key, entry)
        return rates

    def _points(self, step: str, measured: str, threads: int | None = None) -> list[tuple[float, ...]]:
        """(counted, measured, crowding) of the step's runs: those on `threads` torch threads when there are
        any (and `threads` is given), else all."""
        runs = self.runs.get(step) or []
        same = [r for r in runs if threads is not None and r.get("threads") == threads]
        return [
            (r["counted"], r.get(measured), crowding(r.get("others"), r.get("threads"))) for r in same or runs
        ]

    def load_rate(self, measured: str = "seconds") -> float | None:
        """`fit_load_rate` over the runs of every step on this hardware (None: not fitted yet)."""
        return fit_load_rate([self._points(step, measured) for step in self.runs])

    def line(self, step: str, measured: str = "seconds", threads: int | None = None) -> Line | None:
        """The fit of `measured` ("seconds": wall time, "cpu_seconds": process CPU time) on counted time,
        over the step's runs each divided by the slow-down its load caused (`load_rate`; as measured while
        no rate is fitted); with `threads`, over its runs on that many torch threads when there are any: runs
        on other counts were counted at other rates, so their counted times differ ~2x for the same work and
        a line through both would read them as two sizes (bench/results/planner_cpu_load_matched.json)."""
        fitted = self.load_rate(measured)
        rate = 0.0 if fitted is None else fitted
        points = self._points(step, measured, threads)
        line = fit_line([(c, m * math.exp(-rate * z) if m is not None else None) for c, m, z in points])
        if line:
            line.load_rate, line.load_fitted = rate, fitted is not None
        return line

    def extra_ram(self, step: str) -> float:
        got = [r["ram_extra_gb"] for r in self.runs.get(step) or [] if r.get("ram_extra_gb") is not None]
        return statistics.median(got) if got else 0.0


def _measured_crowded(rates: Rates, threads: int, others: float | None) -> bool:
    """Whether `rates` were measured while other processes left fewer than `threads` cores free and
    `others` running now leave them free."""
    if rates.others is None or others is None:
        return False
    return matched_threads(rates.others, threads) < threads and matched_threads(others, threads) == threads


def calibrate(device: str, cache_dir: str | os.PathLike, *, refresh: bool = False) -> Calibration:
    """This hardware's rates from the cache file, measured (about a second) and cached when absent; its
    earlier runs of each step, unless they were counted by another `COUNTS_VERSION`."""
    path = calibration_path(cache_dir)
    key = hardware_key(device)
    cached = read_json_record(path, "delete it: the next plan measures this machine again").get(key) or {}
    runs = (cached.get("runs") or {}) if cached.get("counts_version") == COUNTS_VERSION else {}
    if "op_s" in cached.get("rates", {}) and not refresh:
        return Calibration(
            Rates(**cached["rates"]), key, path, runs, thread_rates=cached.get("thread_rates") or {}
        )
    rates = machine_rates(device)
    entry = {"rates": asdict(rates), "counts_version": COUNTS_VERSION, "runs": runs, "measured_at": _now()}
    _write_entry(path, key, entry)
    return Calibration(rates, key, path, runs, measured_now=True)


def _write_entry(path: Path, key: str, entry: dict[str, Any]) -> None:
    record = read_json_record(path, "delete it: the next plan measures this machine again")
    record[key] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, record)


def learn(calibration: Calibration, step: str, run: dict[str, float]) -> None:
    """Keep one measured run of `step` (`counted`, `seconds`, `cpu_seconds`, `ram_extra_gb`) for later plans
    on this hardware."""
    record = read_json_record(calibration.path, "delete it: the next plan measures this machine again")
    entry = record.get(calibration.key) or {}
    if entry.get("counts_version") != COUNTS_VERSION:
        entry = {"rates": asdict(calibration.rates), "counts_version": COUNTS_VERSION, "runs": {}}
    run = {k: float(f"{v:.5g}") for k, v in run.items() if v is not None}
    kept = [*(entry.setdefault("runs", {}).get(step) or []), run][-KEEP_RUNS:]
    entry["runs"][step] = kept
    calibration.runs[step] = kept
    _write_entry(calibration.path, calibration.key, entry)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# --- the model's numbers --------------------------------------------------------------------------------
@dataclass
class ModelNumbers:
    """What a plan needs of the model, as numbers (read once in notebook 02, kept in run.json)."""

    n_params: int
    n_layers: int
    d_model: int
    vocab: int
    kv_dim: int
    """Width of one layer's keys (= values): d_model, or fewer with grouped-query attention."""
    bytes_per_param: int
    family: str = ""

    def weights_bytes(self) -> int:
        return self.n_params * self.bytes_per_param

    def t4_weights_bytes(self) -> int:
        """The T4's load rule: fp32 for nanochat, fp16 for the rest (`env.choose_dtype` at capability 7.5)."""
        return self.n_params * (4 if self.family == "nanochat" else 2)


def model_numbers(model: torch.nn.Module, n_layers: int, d_model: int, family: str = "") -> ModelNumbers:
    """Count a loaded model's parameters and read its vocabulary and key width from its config."""
    params = list(model.parameters())
    cfg = getattr(model, "config", None)
    vocab = getattr(cfg, "vocab_size", None) or 0
    heads = getattr(cfg, "num_attention_heads", None)
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    kv_dim = d_model * kv_heads // heads if heads and kv_heads else d_model
    width = params[0].element_size() if params else 4
    return ModelNumbers(sum(p.numel() for p in params), n_layers, d_model, vocab, kv_dim, width, family)


def record_model(run_dir: str | os.PathLike, numbers: ModelNumbers) -> None:
    update_run_json(run_dir, plans={"model": asdict(numbers)})


def run_model(run_dir: str | os.PathLike) -> ModelNumbers:
    """The numbers notebook 02 kept; a run collected before plans existed gets them from run.json's model
    record (parameters counted as 12·d²·layers, embeddings left out)."""
    run = read_run_json(run_dir)
    kept = (run.get("plans") or {}).get("model")
    if kept:
        return ModelNumbers(**kept)
    model = run.get("model") or {}
    if not model.get("d_model") or not model.get("n_layers"):
        raise ValueError(
            f"{run_dir}/run.json has no model record: run notebooks 01 and 02 for this run first"
        )
    d, n = int(model["d_model"]), int(model["n_layers"])
    width = 2 if model.get("dtype") in ("float16", "bfloat16") else 4
    return ModelNumbers(12 * d * d * n, n, d, 0, d, width, model.get("family") or "")


# --- plans ------------------------------------------------------------------------------------------------
@dataclass
class Work:
    """A step's counted work: what the time and memory of a plan are made of."""

    flops: float
    bytes_read: float
    device_bytes: float
    """Held on the compute device while the step runs, beyond what is already allocated."""
    host_bytes: float
    """Held in system memory beyond what the process uses now (on CPU, `device_bytes` adds to it)."""
    disk_bytes: float
    fp16: bool = False
    ops: float = 0.0
    """Small torch / numpy ops the step dispatches (per layer of a forward, per optimiser step, ...)."""


@dataclass
class Plan:
    step: str
    seconds: float
    counted_seconds: float
    """FLOPs, bytes and small ops at the calibrated rates, before this hardware's fitted line for the step."""
    ram_gb: float
    gpu_gib: float | None
    disk_gb: float
    t4: dict[str, float]
    counted_ram_gb: float
    """Peak RAM from what is in use now and the counted bytes, before this hardware's measured extra."""
    lower: dict[str, str]
    """resource ("time", "gpu", "ram", "disk") -> the notebook parameter that lowers it."""
    warnings: list[str]
    note: str
    work: dict[str, float]
    cpu_seconds: float | None = None
    """This process's CPU time (all its threads) from the line fitted on earlier runs here; None before one:
    on a shared machine the fairer figure, since other processes stretch the wall time more than this."""
    load: float | None = None
    """The machine's 1-minute load average when the plan was made (kept for the record)."""
    others: float | None = None
    """Other processes' running threads when the plan was made (`others_now`)."""
    slowdown: float = 1.0
    """How many times slower than on an idle machine the times are, for `others` (the fitted load rate)."""
    load_known: bool = False
    """Whether a load rate was fitted here (runs of a step at different loads); without one the plan makes no
    allowance for load (`slowdown` 1), and a crowded plan says so."""
    threads: int | None = None
    """torch's intra-op threads for the step (`matched_threads`): `watch` sets them and `done` restores the
    count before; None leaves torch as it is."""

    def fits_t4(self) -> bool:
        return not self.warnings

    def __str__(self) -> str:
        gpu = f", GPU {self.gpu_gib:.2f} GiB" if self.gpu_gib is not None else ""
        cpu = f" (CPU time {_duration(self.cpu_seconds)})" if self.cpu_seconds is not None else ""
        t4 = self.t4
        lines = [
            f"plan {self.step}: ~{_duration(self.seconds)} here{cpu}, peak RAM {self.ram_gb:.2f} GB{gpu}, "
            f"disk {self.disk_gb:.3g} GB ({self.note})",
            f"  on a free T4: ~{_duration(t4['seconds'])}, GPU {t4['gpu_gib']:.2f} GiB, "
            f"RAM {t4['ram_gb']:.2f} GB, disk {t4['disk_gb']:.3g} GB",
        ]
        lines += [f"  WARNING: {w}" for w in self.warnings]
        if crowding(self.others, self.threads) > 0:
            shared = f"{self.others:.1f} threads of other processes are running on {os.cpu_count()} cores"
            if self.load_known:
                times = f"  load: {shared}; the times above are x{self.slowdown:.2f} an idle machine's"
            else:
                times = (
                    f"  load: {shared}; the times above make no allowance for it (no runs here at different "
                    "loads yet to fit what load costs: a crowded machine can take several times longer)"
                )
            lines.append(times)
        if self.threads is not None and self.threads != threads_bound():
            lines.append(
                f"  threads: torch runs this step on {self.threads} of its {threads_bound()} threads, the "
                "cores other processes leave free (its threads stall while one of them waits for a core)"
            )
        return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def make_plan(
    step: str,
    work: Work,
    t4_work: Work,
    model: ModelNumbers,
    calibration: Calibration,
    device: str,
    lower: dict[str, str],
) -> Plan:
    """Time and memory here and on a T4 from the counted work; warnings naming what to lower."""
    others = others_now()
    threads = matched_threads(others) if device != "cuda" else threads_bound()
    rates = calibration.rates_for(threads, others)
    flops_rate = rates.flops_fp16 if work.fp16 and device == "cuda" else rates.flops_fp32
    counted = work.flops / flops_rate + work.bytes_read / rates.bytes_per_s + work.ops * rates.op_s
    line, cpu_line = calibration.line(step, threads=threads), calibration.line(step, "cpu_seconds", threads)
    crowded = crowding(others, threads)
    seconds = line(counted, crowded) if line else counted
    now = memory_now(device)
    on_cpu = device != "cuda"
    unread = unread_weights() if on_cpu else 0  # a mapped model's pages, read by the step's first forward
    ram = now["rss_gb"] + (unread + work.host_bytes + (work.device_bytes if on_cpu else 0)) / 1e9
    gpu = None if on_cpu else now.get("cuda_allocated_gib", 0.0) + work.device_bytes / 2**30
    t4 = t4_rates()
    t4_flops = t4.flops_fp32 if model.family == "nanochat" else t4.flops_fp16
    t4_seconds = t4_work.flops / t4_flops + t4_work.bytes_read / t4.bytes_per_s + t4_work.ops * t4.op_s
    # The line fitted here stands for the overheads a T4 also has (Python, tokenizer, disk, loading): its
    # fixed part is kept and its slope never taken below 1.
    if line:
        t4_seconds = line.fixed + t4_seconds * max(line.slope, 1.0)
    on_t4 = {
        "seconds": t4_seconds,
        "gpu_gib": (model.t4_weights_bytes() + t4_work.device_bytes) / 2**30 + OVERHEAD_GIB,
        "ram_gb": RUNTIME_RAM_GB + t4_work.host_bytes / 1e9,
        "disk_gb": t4_work.disk_bytes / 1e9,
    }
    warnings = []
    limits = {
        "gpu": (on_t4["gpu_gib"], T4_VRAM_GIB, "GiB of GPU memory"),
        "ram": (on_t4["ram_gb"], T4_RAM_GB, "GB of RAM"),
        "disk": (on_t4["disk_gb"], T4_DRIVE_GB, "GB of Drive"),
        "time": (on_t4["seconds"] / 3600, T4_HOURS, "hours"),
    }
    lower = dict(lower)
    if model.t4_weights_bytes() / 2**30 + OVERHEAD_GIB > T4_VRAM_GIB:
        lower["gpu"] = "the model's size: a smaller MODEL in notebook 01 (its weights alone fill the T4)"
    for resource, (need, have, unit) in limits.items():
        if need > have:
            warnings.append(
                f"a free T4 session would not hold this step: it needs {need:.3g} {unit}, the session has "
                f"{have:g}; lower {lower[resource]}"
            )
    if ram > now["rss_gb"] + now["ram_available_gb"]:
        warnings.append(
            f"this machine has {now['rss_gb'] + now['ram_available_gb']:.3g} GB of RAM for this process and "
            f"the step needs {ram:.3g} GB; lower {lower['ram']}"
        )
    note = str(line) if line else "counted work at the calibrated rates; no earlier run of this step here yet"
    counts = {"flops": work.flops, "bytes_read": work.bytes_read, "device_bytes": work.device_bytes}
    counts |= {"host_bytes": work.host_bytes, "disk_bytes": work.disk_bytes, "ops": work.ops}
    planned_ram = ram + calibration.extra_ram(step)
    disk = work.disk_bytes / 1e9
    cpu = cpu_line(counted, crowded) if cpu_line else None
    slowdown = line.factor(crowded) if line else 1.0
    known = bool(line and line.load_fitted)
    load = _load_average()
    return Plan(
        step,
        seconds,
        counted,
        planned_ram,
        gpu,
        disk,
        on_t4,
        ram,
        lower,
        warnings,
        note,
        counts,
        cpu,
        load,
        others,
        slowdown,
        known,
        threads,
    )


def _positive(**values: float) -> None:
    bad = {k: v for k, v in values.items() if v is None or v < 0}
    if bad:
        raise ValueError(f"a plan needs non-negative numbers, got {bad}")


def plan_sampling(
    model: ModelNumbers,
    calibration: Calibration,
    device: str,
    *,
    n_completions: int,
    prompt_tokens: float,
    new_tokens: int,
    batch_size: int,
    n_per_prompt: int = 1,
) -> Plan:
    """Sampling `n_completions` answers of `new_tokens` in batches: every decoding step reads each weight
    once and does 2 FLOPs per weight per sequence; each distinct prompt is read once (prefill: the
    `n_per_prompt` answers of a prompt share it)."""
    _positive(n_completions=n_completions, prompt_tokens=prompt_tokens, new_tokens=new_tokens)
    batch_size = max(1, min(batch_size, max(n_completions, 1)))
    batches = math.ceil(n_completions / batch_size)
    prefilled = math.ceil(n_completions / max(n_per_prompt, 1)) * prompt_tokens

    def work(m_bytes: int, act: int) -> Work:
        length = prompt_tokens + new_tokens
        kv = 2 * model.n_layers * model.kv_dim * batch_size * length * act
        logits = 2 * batch_size * model.vocab * 4
        prefill = batch_size * prompt_tokens * model.d_model * 4 * 8  # residual, attention, 4x MLP
        return Work(
            flops=2 * model.n_params * (prefilled + n_completions * new_tokens),
            bytes_read=batches * (new_tokens + 1) * m_bytes,
            device_bytes=kv + logits + prefill,
            host_bytes=n_completions * length * 64,  # token ids and text of the records
            disk_bytes=n_completions * (length * 8 + 512),
            fp16=act == 2,
            ops=batches * (new_tokens + 1) * (OPS_PER_LAYER * model.n_layers + 20),
        )

    t4_act = 4 if model.family == "nanochat" else 2
    lower = {"time": "MAX_NEW_TOKENS or N_PER_PROMPT", "gpu": "BATCH_SIZE", "ram": "BATCH_SIZE"}
    lower["disk"] = "N_PER_PROMPT"
    return make_plan(
        "sampling",
        work(model.weights_bytes(), model.bytes_per_param),
        work(model.t4_weights_bytes(), t4_act),
        model,
        calibration,
        device,
        lower,
    )


def _forward_work(
    model: ModelNumbers,
    tokens: float,
    batch_tokens: float,
    stored_layers: int,
    stored_tokens: float,
    layers_run: int,
    act: int,
) -> Work:
    """A forward pass over `tokens` in batches of `batch_tokens` through the first `layers_run` decoder
    layers (the capture stops after the deepest layer it reads), storing `stored_tokens` per layer in fp16
    shards of up to 65,536 tokens (one shard buffered in fp32 per layer)."""
    batches = math.ceil(tokens / max(batch_tokens, 1))
    d = model.d_model
    depth = min(max(layers_run, 1), model.n_layers) / max(model.n_layers, 1)
    return Work(
        flops=2 * model.n_params * depth * tokens,
        bytes_read=batches * model.n_params * depth * act,
        device_bytes=batch_tokens * d * act * 8,  # the capture stops at the last layer: no logits
        host_bytes=stored_layers * min(stored_tokens, 65_536) * d * 4 * 2,
        disk_bytes=stored_layers * stored_tokens * d * 2,
        fp16=act == 2,
        ops=batches * (OPS_PER_LAYER * depth * model.n_layers + 20 * stored_layers),
    )


def plan_collection(
    model: ModelNumbers,
    calibration: Calibration,
    device: str,
    *,
    records: list[Any],
    batch_size: int,
    n_layers_stored: int,
    include_prompt: bool = False,
) -> Plan:
    """One forward pass over every completion in `records` (`Completion`s or their dict rows: prompt and
    answer tokens, `token_counts`), storing the answer's tokens (and the prompt's with `include_prompt`) at
    each stored layer."""
    n_completions = len(records)
    prompt_tokens, new_tokens = token_counts(records)
    length = prompt_tokens + new_tokens
    stored = n_completions * (length if include_prompt else new_tokens)
    tokens, batch_tokens = n_completions * length, max(1, batch_size) * length
    lower = {"time": "N_PER_PROMPT or MAX_NEW_TOKENS", "gpu": "BATCH_SIZE", "ram": "BATCH_SIZE"}
    lower["disk"] = "LAYERS or MAX_NEW_TOKENS"
    # The pooled sweep layers reach the model's last layers: the forward runs through all of them.
    forward = (tokens, batch_tokens, n_layers_stored, stored, model.n_layers)
    here, t4 = _forward_works(model, forward)
    # Per completion and pooled layer (the stored ones and up to `POOLED_SWEEP_LAYERS` more): its mean, last
    # and prompt-last vectors, the fp16 rounding and the store's append, each a few small ops.
    pooled = n_completions * (n_layers_stored + min(model.n_layers, POOLED_SWEEP_LAYERS))
    for work in (here, t4):
        work.ops += pooled * POOLED_OPS
    return make_plan("collection", here, t4, model, calibration, device, lower)


def plan_corpus(
    model: ModelNumbers,
    calibration: Calibration,
    device: str,
    *,
    tokens: int,
    seq_len: int,
    batch_size: int,
    n_layers_stored: int,
    deepest_layer: int | None = None,
) -> Plan:
    """A forward pass over `tokens` of the corpus in sequences of `seq_len`, every token stored per layer;
    the forward stops after `deepest_layer` (the deepest stored layer, 0-based; None: runs them all)."""
    _positive(tokens=tokens, seq_len=seq_len)
    batch_tokens = max(1, batch_size) * seq_len
    lower = {"time": "CORPUS_TOKENS", "gpu": "BATCH_SIZE or CORPUS_SEQ_LEN", "ram": "BATCH_SIZE"}
    lower["disk"] = "CORPUS_TOKENS (or 0, and CORPUS_STREAM in notebook 03)"
    layers_run = model.n_layers if deepest_layer is None else deepest_layer + 1
    forward = (tokens, batch_tokens, n_layers_stored, tokens, layers_run)
    return _forward_plan("corpus", model, calibration, device, forward, lower)


POOLED_SWEEP_LAYERS = 16
"""Layers whose pooled vectors collection keeps beyond the stored ones (at most; collect's sweep layers)."""
POOLED_OPS = 12
"""Small ops per completion and pooled layer: slicing, mean, last, prompt-last, fp16 rounding, the append."""


def _forward_works(model: ModelNumbers, forward: tuple[float, float, int, float, int]) -> tuple[Work, Work]:
    """The work of forward passes storing activations: `forward` = (tokens, tokens per batch, layers
    stored, tokens stored per layer, decoder layers run), here at the model's dtype and on a T4 at its
    activation size."""
    t4_act = 4 if model.family == "nanochat" else 2
    return _forward_work(model, *forward, model.bytes_per_param), _forward_work(model, *forward, t4_act)


def _forward_plan(
    step: str,
    model: ModelNumbers,
    calibration: Calibration,
    device: str,
    forward: tuple[float, float, int, float, int],
    lower: dict[str, str],
) -> Plan:
    """The plan of a step that is forward passes storing activations (`_forward_works`)."""
    here, t4 = _forward_works(model, forward)
    return make_plan(step, here, t4, model, calibration, device, lower)


@dataclass
class SaeRun:
    """What sets one SAE's training work; notebook 03's `saes.TrainConfig` has these fields and is passed
    as it is."""

    expansion: int
    train_tokens: int
    batch_size: int
    checkpoint_every: int = 0
    """Steps between checkpoints (each writes the SAE and Adam's two moments); 0: only the last step's."""
    init_tokens: int = 16_384
    """Tokens of the init sample (capped at the layer's stored tokens), read again after training to
    calibrate the inference parameters (BatchTopK's θ)."""


def plan_sae_training(
    model: ModelNumbers,
    calibration: Calibration,
    device: str,
    *,
    n_saes: int,
    train: SaeRun | Any,
    stored_tokens: int,
) -> Plan:
    """`n_saes` SAEs of `train.expansion`·d_model latents, each trained on `train.train_tokens`: encoder
    and decoder forward (4·d·d_sae FLOPs a token) and backward (twice that); the SAE, its gradient and
    Adam's two moments on the device; one layer's stored activations (`stored_tokens`) loaded in fp32 at a
    time. Per SAE too, whatever its steps: the init sample read and encoded twice (init, calibration), each
    checkpoint (SAE and Adam's moments serialised and written) and the saved SAE read back to evaluate it.
    `train`: a `SaeRun` or notebook 03's `TrainConfig`."""
    expansion, train_tokens, batch_size = train.expansion, train.train_tokens, max(train.batch_size, 1)
    _positive(n_saes=n_saes, expansion=expansion, train_tokens=train_tokens, stored_tokens=stored_tokens)
    d = model.d_model
    d_sae = d * expansion
    sae_bytes = (2 * d * d_sae + d_sae + d) * 4
    steps = math.ceil(train_tokens / batch_size)
    every = getattr(train, "checkpoint_every", 0) or steps
    checkpoints = math.ceil(steps / max(every, 1))
    init = getattr(train, "init_tokens", SaeRun.init_tokens)
    init = min(init, stored_tokens) if stored_tokens else init
    init_batches = math.ceil(init / batch_size)
    per_sae = Work(
        flops=2 * 2 * d * d_sae * init,  # the init sample encoded twice
        bytes_read=2 * init * d * 4 + checkpoints * 3 * sae_bytes * 2 + 2 * sae_bytes,
        device_bytes=0.0,
        host_bytes=0.0,
        disk_bytes=sae_bytes * 2,  # the SAE and its last checkpoint
        ops=2 * init_batches * 20 + checkpoints * 3 * 4,  # encode batches; a tensor per state entry
    )
    work = Work(
        flops=n_saes * (12 * d * d_sae * train_tokens + per_sae.flops),
        bytes_read=n_saes * (steps * sae_bytes * 4 + per_sae.bytes_read),
        device_bytes=4 * sae_bytes + 4 * batch_size * (d_sae + d) * 4,
        host_bytes=stored_tokens * d * 4 + 2 * sae_bytes,
        disk_bytes=n_saes * per_sae.disk_bytes,
        ops=n_saes * (steps * 80 + per_sae.ops),  # forward, backward, Adam
    )
    lower = {"time": "TRAIN_TOKENS (or fewer ARCHITECTURES / CONDITIONS / LAYERS)", "gpu": "EXPANSION"}
    lower |= {"ram": "CORPUS_TOKENS in notebook 02 (or CORPUS_STREAM)", "disk": "EXPANSION or CONDITIONS"}
    return make_plan("sae_training", work, work, model, calibration, device, lower)


@dataclass
class ProbeStats:
    """Notebook 04's statistics settings that set the probes' work: cross-validation folds, label
    permutations and bootstrap refits of every probe, label permutations of every SAE feature's test, and
    the Newton steps of one logistic fit."""

    n_folds: int
    n_permutations: int
    n_bootstrap: int
    feature_permutations: int
    newton_steps: int = 12


def plan_probes(
    model: ModelNumbers,
    calibration: Calibration,
    device: str,
    *,
    n_completions: int,
    n_layers: int,
    sae_widths: list[int],
    stats: ProbeStats,
) -> Plan:
    """Notebook 04: per layer one raw probe and per SAE a probe and a random-SAE control, each refitted
    n_folds · (1 + permutations + bootstrap) times (a Newton step costs ~4·n·d FLOPs in Hessian-vector
    products, on the n_folds' training rows); then each SAE's features tested with `feature_permutations`
    label permutations (2·n·d_sae each)."""
    n_folds, n_permutations, n_bootstrap = stats.n_folds, stats.n_permutations, stats.n_bootstrap
    feature_permutations, newton_steps = stats.feature_permutations, stats.newton_steps
    _positive(n_completions=n_completions, n_folds=n_folds, n_permutations=n_permutations)
    n = n_completions
    refits = n_folds * (1 + n_permutations + n_bootstrap)
    fit = newton_steps * 4 * n * (n_folds - 1) / max(n_folds, 1)
    flops = n_layers * refits * fit * model.d_model + sum(2 * refits * fit * w for w in sae_widths)
    flops += sum(2 * n * w * feature_permutations for w in sae_widths)
    widest = max([model.d_model, *sae_widths])
    work = Work(
        flops=flops,
        bytes_read=0.0,
        device_bytes=0.0,
        host_bytes=n * widest * 8 * (2 + n_folds) + (n_permutations + n_bootstrap) * n * 8,
        disk_bytes=len(sae_widths) * widest * 512,
        ops=(n_layers + 2 * len(sae_widths)) * refits * newton_steps * 15
        + len(sae_widths) * feature_permutations * 10,
    )
    lower = {"time": "N_PERMUTATIONS, N_BOOTSTRAP or FEATURE_PERMUTATIONS (or SAE_FILTER)"}
    lower |= {"gpu": "SAE_FILTER", "ram": "SAE_FILTER", "disk": "SAE_FILTER"}
    return make_plan("probes", work, work, model, calibration, device, lower)


def plan_explorer(
    model: ModelNumbers,
    calibration: Calibration,
    device: str,
    *,
    stored_tokens: int,
    sae_widths: list[int],
    batch_tokens: int = 4096,
    loads_model: bool = True,
) -> Plan:
    """Notebook 06's pass: each SAE encodes every stored token of its layer (2·d·d_sae FLOPs a token, the
    fp16 store read once), keeping per-latent statistics and top examples; `loads_model`: the step loads
    the model too (its weights join the peak RAM on CPU)."""
    _positive(stored_tokens=stored_tokens)
    d = model.d_model
    widest = max(sae_widths or [d])
    work = Work(
        flops=sum(2 * d * w * stored_tokens for w in sae_widths),
        bytes_read=len(sae_widths) * stored_tokens * d * 2,
        device_bytes=batch_tokens * widest * 4 * 2 + widest * d * 4 * 2,
        host_bytes=batch_tokens * d * 4 + widest * 64 * 8 + (model.weights_bytes() if loads_model else 0),
        disk_bytes=len(sae_widths) * widest * 2048,
        ops=sum(
            math.ceil(stored_tokens / batch_tokens) * 20 + 100 * w for w in sae_widths
        ),  # a page a latent
    )
    lower = {"time": "MAX_SAES or SAE_FILTER", "gpu": "MAX_SAES", "ram": "MAX_SAES", "disk": "MAX_SAES"}
    return make_plan("explorer", work, work, model, calibration, device, lower)


def stored_tokens(run_dir: str | os.PathLike, layer: int | None = None) -> int:
    """Tokens in the run's activation store and corpus at one layer (the first stored layer by default)."""
    total = 0
    for kind in ("activations", "corpus"):
        folders = sorted(Path(run_dir, kind).glob("layer_*"))
        if layer is not None:
            folders = [f for f in folders if f.name == f"layer_{layer}"]
        for folder in folders[:1]:
            for meta in folder.glob("*.json"):
                try:
                    total += int(json.loads(meta.read_text()).get("n_tokens") or 0)
                except (ValueError, json.JSONDecodeError):
                    continue
    return total


def token_counts(records: list[Any]) -> tuple[float, float]:
    """Mean prompt and answer tokens of completions (`Completion`s or their dict rows)."""

    def get(r: Any, key: str) -> Any:
        return r.get(key) if isinstance(r, dict) else getattr(r, key, None)

    if not records:
        return 0.0, 0.0
    prompt = [len(get(r, "prompt_token_ids") or []) for r in records]
    answer = [len(get(r, "completion_token_ids") or []) for r in records]
    return sum(prompt) / len(records), sum(answer) / len(records)


def sae_widths(folders: list[Path]) -> list[int]:
    """Each SAE folder's latent count (`d_sae` of its cfg.json)."""
    widths = []
    for folder in folders:
        cfg = Path(folder) / "cfg.json"
        if not cfg.is_file():
            raise FileNotFoundError(f"{cfg} is missing: is {folder} an SAE folder of notebook 03?")
        widths.append(int(json.loads(cfg.read_text())["d_sae"]))
    return widths


# --- measuring a step -------------------------------------------------------------------------------------
RSS_KEYS = ("RssAnon", "RssFile")
"""Anonymous (private: tensors, Python objects) and file-backed (mapped weights, shards) resident bytes."""


def rss() -> dict[str, int]:
    """`RSS_KEYS` of this process now, in bytes, from /proc/self/status (Linux); elsewhere psutil's RSS,
    counted as anonymous."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return {"RssAnon": psutil.Process(os.getpid()).memory_info().rss, "RssFile": 0}
    return {k: int(v.split()[0]) * 1024 for k, v in (ln.split(":", 1) for ln in lines) if k in RSS_KEYS}


class PeakMemory:
    """`with PeakMemory() as mem:` `mem.start`: `rss()` on entry; `mem.peak`: the largest value of each key
    and of their sum (`total`) while the block runs, sampled by a thread every `every` seconds and once
    more on exit. The one sampler of the plans (`Watch`) and the benches (bench/peak_memory.py). With
    `others_every`, the same thread also reads `others_running` on entry and every `others_every` seconds:
    `mem.others()` is their mean (None where it cannot be read)."""

    def __init__(self, every: float = 0.02, others_every: float | None = None) -> None:
        self.every, self.others_every = every, others_every
        self.others_samples: list[float] = []

    def __enter__(self) -> PeakMemory:
        self.start = rss()
        self.peak = dict.fromkeys((*RSS_KEYS, "total"), 0)
        self._take(self.start)
        self._next_others = time.perf_counter()
        self._count_others()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _take(self, now: dict[str, int]) -> None:
        for key, value in (*now.items(), ("total", sum(now.values()))):
            self.peak[key] = max(self.peak[key], value)

    def _count_others(self) -> None:
        if self.others_every is None or time.perf_counter() < self._next_others:
            return
        value = others_running()
        if value is not None:
            self.others_samples.append(value)
        self._next_others = time.perf_counter() + self.others_every

    def _sample(self) -> None:
        while not self._done.wait(self.every):
            self._take(rss())
            self._count_others()

    def __exit__(self, *_) -> None:
        self._done.set()
        self._thread.join()
        self._take(rss())

    def others(self) -> float | None:
        return statistics.fmean(self.others_samples) if self.others_samples else None


def memory_now(device: str) -> dict[str, float]:
    """What is in use and free now: this process's RSS and the machine's available RAM (GB); on CUDA the
    allocated, reserved and free GPU memory (GiB)."""
    out = {
        "rss_gb": sum(rss().values()) / 1e9,
        "ram_available_gb": psutil.virtual_memory().available / 1e9,
    }
    if device == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        out.update(
            cuda_allocated_gib=torch.cuda.memory_allocated() / 2**30,
            cuda_reserved_gib=torch.cuda.memory_reserved() / 2**30,
            cuda_free_gib=free / 2**30,
        )
    return out


WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".gguf")


def unread_weights() -> int:
    """Bytes of weight files this process has mapped but not read into memory yet: a model loaded from
    safetensors is memory-mapped, and its pages count in RSS only once a forward pass touches them."""
    try:
        maps = psutil.Process(os.getpid()).memory_maps(grouped=True)
    except (psutil.Error, OSError, NotImplementedError):  # not Linux, or /proc unreadable: assume read
        return 0
    return sum(max(m.size - m.rss, 0) for m in maps if m.path.endswith(WEIGHT_FILES))


class Watch:
    """Measures one step from `watch()` to `done()`: wall time, this process's CPU time, peak RSS
    and other processes' running threads every 0.1 s (one `PeakMemory` thread), CUDA's peak allocation and
    the machine's load average at both ends."""

    def __init__(self, run_dir: str | os.PathLike, plan: Plan, calibration: Calibration, device: str):
        self.run_dir, self.plan, self.calibration, self.device = run_dir, plan, calibration, device
        global _lowered
        bound = threads_bound()
        self.threads = torch.get_num_threads() if plan.threads is None else plan.threads
        if self.threads != torch.get_num_threads():
            torch.set_num_threads(self.threads)
        if self.threads != bound:
            _lowered = (bound, self.threads)
        if device == "cuda" and torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.memory = PeakMemory(others_every=0.1).__enter__()
        self.load = _load_average()
        self.started, self.cpu_started = time.perf_counter(), time.process_time()
        self.waits = thread_schedstats()  # read within the wall time's window: never longer than it

    def done(self, *, quiet: bool = False) -> dict[str, Any]:
        """Stop measuring; record predicted and measured in run.json (`plans.<step>`) and this run in the
        calibration file (the line of later plans); return the record."""
        waited = waited_since(self.waits)
        seconds = time.perf_counter() - self.started
        cpu_seconds = time.process_time() - self.cpu_started
        self.memory.__exit__()
        self.restore_threads()
        others = self.memory.others()
        peak_gb = self.memory.peak["total"] / 1e9
        gpu = None
        if self.device == "cuda" and torch.cuda.is_available():
            gpu = torch.cuda.max_memory_allocated() / 2**30
        p = self.plan
        record = {
            "predicted": {
                "seconds": p.seconds,
                "cpu_seconds": p.cpu_seconds,
                "ram_gb": p.ram_gb,
                "gpu_gib": p.gpu_gib,
                "disk_gb": p.disk_gb,
            },
            "measured": {"seconds": seconds, "cpu_seconds": cpu_seconds, "ram_gb": peak_gb, "gpu_gib": gpu},
            "counted_seconds": p.counted_seconds,
            "t4": p.t4,
            "warnings": p.warnings,
            "hardware": self.calibration.key,
            "load_average": [self.load, _load_average()],
            "others_running": {"planned": p.others, "measured": others},
            "waited_seconds": waited,
            "slowdown": p.slowdown,
            "threads": self.threads,
            "at": _now(),
        }
        record["ratio"] = {
            k: record["measured"][k] / record["predicted"][k]
            for k in ("seconds", "cpu_seconds", "ram_gb", "gpu_gib")
            if record["measured"][k] is not None and record["predicted"][k]
        }
        update_run_json(self.run_dir, plans={p.step: record})
        if p.counted_seconds > 0:  # a step with nothing to do (every SAE done earlier) teaches nothing
            load = max((x for x in record["load_average"] if x is not None), default=None)
            run = {"counted": p.counted_seconds, "seconds": seconds, "cpu_seconds": cpu_seconds, "load": load}
            run |= {"others": others, "threads": self.threads, "waited": waited}
            learn(self.calibration, p.step, run | {"ram_extra_gb": peak_gb - p.counted_ram_gb})
        if not quiet:
            ratio = {k: f", x{v:.2f}" for k, v in record["ratio"].items()}
            print(
                f"{p.step}: {_duration(seconds)} (planned {_duration(p.seconds)}{ratio.get('seconds', '')}), "
                f"peak RAM {peak_gb:.2f} GB (planned {p.ram_gb:.2f}{ratio.get('ram_gb', '')})"
                + (f", GPU {gpu:.2f} GiB (planned {p.gpu_gib:.2f})" if gpu is not None else "")
                + (
                    f"; it waited {_duration(waited)} of that for a core taken by other processes"
                    if waited is not None and waited >= WAITED_SHARE * seconds
                    else ""
                )
            )
        return record

    def restore_threads(self) -> None:
        """torch's thread count back to the user's (`threads_bound`) unless something set another since."""
        global _lowered
        if _lowered is not None and torch.get_num_threads() == _lowered[1]:
            torch.set_num_threads(_lowered[0])
        _lowered = None


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # not available on this system
        return None


def watch(run_dir: str | os.PathLike, plan: Plan, calibration: Calibration, device: str) -> Watch:
    """Start measuring the step `plan` is for; call `.done()` after it."""
    return Watch(run_dir, plan, calibration, device)
