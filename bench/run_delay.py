"""Benchmark: what a step's wall time would have been on an idle machine, from Linux's per-thread scheduler
statistics (`helpers.plan.thread_schedstats`: /proc/self/task/*/schedstat, nanoseconds each of this
process's threads ran on a core and waited on a run queue for one), checked against busy background
processes: could helpers/plan.py bring runs measured on a crowded machine back to an idle machine's time
with it?

A fixed piece of work like the notebooks' (a small Llama's decoding steps: `generate` on random weights, the
work that slowed most under load, and a few SAE training steps) runs in a fresh process for each load and
torch thread count, `--repeats` times, the loads interleaved so that the other users of a shared machine
load them alike. Each run records its wall time, process CPU time and the threads' waits, and the
idle-equivalent estimates `idle_seconds` makes from them. The reference (`idle`) is the same work with
every thread of its process at real-time priority (root only; `--no-idle-reference` to skip): it runs ahead
of every other process, as on an idle machine. A good estimate is the reference's wall time at every load
(`over_reference_wall` near 1) where the wall time grows.

    python -m bench.run_delay --loads 0 2 4 --threads 1 2 --out bench/results/run_delay_cpu.json

`--threads matched` runs the work on the thread count a plan would choose when it starts
(helpers/plan.py `matched_threads`: the cores the other running threads leave free, at most torch's
default), counted in the work's process once the busy processes run; each run records the count it used
(`threads_used`). Against a fixed 2 (`--threads 2 matched`) that is what matching saves at each load.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bench.planner import busy_processes, git_commit, stop
from helpers.plan import matched_threads, others_now, thread_schedstats

ROOT = Path(__file__).resolve().parent.parent


def run_delay_since(before: dict[int, tuple[int, int]] | None) -> dict[str, float] | None:
    """Seconds this process's threads ran and waited for a core since `before` (`thread_schedstats()`): the
    main thread's wait, the sum and the largest over all threads (threads started since count from 0; threads
    that ended since are missed)."""
    now = thread_schedstats()
    if before is None or now is None:
        return None
    ran, waited = {}, {}
    for tid, (r, w) in now.items():
        r0, w0 = before.get(tid, (0, 0))
        ran[tid], waited[tid] = (r - r0) / 1e9, (w - w0) / 1e9
    main = os.getpid()
    return {
        "ran": sum(ran.values()),
        "main_wait": waited.get(main, 0.0),
        "sum_wait": sum(waited.values()),
        "max_wait": max(waited.values()),
        "threads": float(sum(r > 0.01 for r in ran.values())),
    }


def idle_seconds(seconds: float, waits: dict[str, float] | None) -> dict[str, float]:
    """Estimates of `seconds` on an idle machine from the waits of `run_delay_since`."""
    if waits is None:
        return {}
    return {
        "minus_main": seconds - waits["main_wait"],
        "minus_max": seconds - waits["max_wait"],
        "ran_per_thread": waits["ran"] / max(waits["threads"], 1.0),
    }


def realtime(on: bool) -> None:
    """Every thread of this process at the real-time FIFO priority (on) or back to the normal policy: a
    real-time thread runs ahead of every normal one, so the work runs as on an idle machine whatever else
    runs (the kernel still leaves others 5% of each second). Needs root (CAP_SYS_NICE)."""
    policy, param = (os.SCHED_FIFO, os.sched_param(1)) if on else (os.SCHED_OTHER, os.sched_param(0))
    for task in os.listdir("/proc/self/task"):
        os.sched_setscheduler(int(task), policy, param)


def work(threads: int | str, tokens: int, sae_steps: int, idle: bool = False) -> dict:
    """One run of the fixed work in this process, measured; `idle`: at real-time priority (the reference);
    `threads` "matched": `matched_threads` for the other running threads counted now."""
    others = others_now()
    used = matched_threads(others) if threads == "matched" else int(threads)
    torch.set_num_threads(used)
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=8192,
    )
    model = LlamaForCausalLM(config).eval()
    prompt = torch.randint(0, 8192, (4, 32))
    d_sae = 4608
    enc = torch.nn.Linear(576, d_sae)
    dec = torch.nn.Linear(d_sae, 576)
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=1e-4)
    x = torch.randn(512, 576)
    with torch.no_grad():  # warm-up outside the measured part, as a notebook's earlier cells do
        model.generate(prompt, max_new_tokens=2, do_sample=False, pad_token_id=0)
    if idle:
        realtime(True)
    try:
        before = thread_schedstats() or {}
        started, cpu_started = time.perf_counter(), time.process_time()
        with torch.no_grad():
            model.generate(
                prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0
            )
        for _ in range(sae_steps):
            loss = (dec(torch.relu(enc(x))) - x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        seconds = time.perf_counter() - started
        cpu_seconds = time.process_time() - cpu_started
        waits = run_delay_since(before)
        after = thread_schedstats() or {}
    finally:
        if idle:
            realtime(False)
    per_thread = [
        [round((r - before.get(t, (0, 0))[0]) / 1e9, 3), round((w - before.get(t, (0, 0))[1]) / 1e9, 3)]
        for t, (r, w) in after.items()
        if r - before.get(t, (0, 0))[0] > 1e7
    ]
    return {
        "threads_used": used,
        "others_running": others,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "waits": waits,
        "per_thread_ran_waited": per_thread,
        "idle_seconds": idle_seconds(seconds, waits),
    }


def one_run(threads: int | str, load: int | str, args: argparse.Namespace) -> dict:
    idle = load == "idle"
    background = busy_processes(0 if idle else load)
    try:
        time.sleep(0.2)  # the spinners on the run queue before the work starts
        call = f"b.work({threads!r}, {args.tokens}, {args.sae_steps}, {idle})"
        code = f"import json, bench.run_delay as b; print(json.dumps({call}))"
        out = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True, timeout=900
        )
    finally:
        stop(background)
    return {"threads": threads, "background_load": load, **json.loads(out.stdout.strip().splitlines()[-1])}


def waited_crowding(run: dict) -> float:
    """The log of how many times longer the run took than the time its most delayed thread was not waiting
    for a core: 0 when no thread waited."""
    seconds = run["seconds"]
    return math.log(seconds / max(seconds - run["waits"]["max_wait"], 1e-9))


def summarise(runs: list[dict], loads: list, threads_list: list[int | str]) -> dict:
    """Each estimate over the reference's wall time (the first of `loads`), by thread count and load; and the
    `waited_crowding` rate: the slope of log wall time on waited crowding over the loaded runs (no reference
    needed, as a planner would fit it), with the idle time it gives (wall x exp(-rate x crowding))."""
    summary, rates = {}, {}
    for threads in threads_list:
        at_threads = [r for r in runs if r["threads"] == threads]
        loaded = [r for r in at_threads if r["background_load"] != "idle"]
        xs = [waited_crowding(r) for r in loaded]
        ys = [math.log(r["seconds"]) for r in loaded]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        sxx = sum((x - mx) ** 2 for x in xs)
        rate = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx > 0 else 1.0
        rates[f"threads {threads}"] = round(rate, 3)
        base = statistics.median(r["seconds"] for r in at_threads if r["background_load"] == loads[0])
        for load in loads:
            at = [r for r in at_threads if r["background_load"] == load]
            row = {"wall": round(statistics.median(r["seconds"] for r in at) / base, 3)}
            row["wall_s"] = round(statistics.median(r["seconds"] for r in at), 2)
            row["threads_used"] = sorted({r.get("threads_used", threads) for r in at})
            for k in at[0]["idle_seconds"]:
                row[k] = round(statistics.median(r["idle_seconds"][k] for r in at) / base, 3)
            powered = [r["seconds"] * math.exp(-rate * waited_crowding(r)) for r in at]
            row["waited_crowding_power"] = round(statistics.median(powered) / base, 3)
            row["waited_crowding"] = round(statistics.median(waited_crowding(r) for r in at), 3)
            summary[f"threads {threads}, load {load}"] = row
    return {"waited_crowding_rate": rates, "over_reference_wall": summary}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--loads", nargs="+", type=int, default=[0, 1, 2, 4], help="busy background processes"
    )
    parser.add_argument(
        "--threads",
        nargs="+",
        type=lambda t: t if t == "matched" else int(t),
        default=[1, 2],
        help="torch threads, or matched (helpers/plan.py matched_threads)",
    )
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=8, help="decoding steps of the work")
    parser.add_argument("--sae-steps", type=int, default=5, help="SAE training steps of the work")
    parser.add_argument(
        "--no-idle-reference", action="store_true", help="skip the reference runs at real-time priority"
    )
    parser.add_argument("--out", default=None)
    parser.add_argument("--summarise", default=None, help="summarise the runs of an earlier JSON (no runs)")
    args = parser.parse_args(argv)
    if args.summarise:
        earlier = json.loads(Path(args.summarise).read_text())
        loads = list(dict.fromkeys(r["background_load"] for r in earlier["runs"]))
        loads = sorted(loads, key=lambda x: -1 if x == "idle" else x)
        threads = sorted({r["threads"] for r in earlier["runs"]}, key=str)
        print(json.dumps(summarise(earlier["runs"], loads, threads), indent=1))
        return 0
    out = {
        "command": "python -m bench.run_delay " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{os.cpu_count()} cores",
        "commit": git_commit(),
        "load_average_start": round(os.getloadavg()[0], 2),
        "runs": [],
    }
    loads: list[int | str] = ([] if args.no_idle_reference else ["idle"]) + list(args.loads)
    for repeat in range(args.repeats):
        for threads in args.threads:
            for load in loads if repeat % 2 == 0 else loads[::-1]:
                row = one_run(threads, load, args) | {"load_average": round(os.getloadavg()[0], 2)}
                print(json.dumps(row), file=sys.stderr, flush=True)
                out["runs"].append(row)
    out["load_average_end"] = round(os.getloadavg()[0], 2)
    out |= summarise(out["runs"], loads, args.threads)
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
