"""Benchmark: what activation capture + writing costs over a bare forward pass on the same tokens.

Prints one JSON object. All contestants run in this one process, interleaved over `--repeats`
rounds (medians reported), on the same completions in the same batches (sorted by length, right
padded, as `collect_activations` batches them), so their ratios are meaningful on a busy machine.

- `bare_full_logits`: `model(input_ids, attention_mask)`, logits at every position (what a naive
  timing of "a forward pass" measures; collection never needs these logits).
- `bare_all_layers`: the same with `logits_to_keep=1`: every decoder layer, lm_head on one position.
- `bare_to_deepest`: the forward pass stopped after the deepest layer of the typical set
  (`run_with_capture(stop_early=True)` on that one layer, nothing copied or written).
- `collect_full_depth`: `collect_activations` on layers reaching the last one (no early stop possible):
  capture, float16 shards written to disk, pooled files. Overhead is reported against `bare_all_layers`.
- `collect_typical`: `collect_activations` on mid-depth layers, which stops early: reported against
  `bare_all_layers` (what a user saves over a full pass) and against `bare_to_deepest` (the true cost
  of capture + writing).

    python bench/capture.py
    python bench/capture.py --device cuda --n-completions 512 --batch-size 32
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

# Benchmark this checkout's helpers, never a different installed copy.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import helpers  # noqa: E402
from helpers.collect.capture import collect_activations  # noqa: E402
from helpers.collect.sampling import Completion  # noqa: E402
from helpers.model.chat import pad_token_id  # noqa: E402
from helpers.model.hooks import hook_name, run_with_capture  # noqa: E402

TEXT = (
    "I did not break the vase. When I came home it was already on the floor, and the cat was sitting "
    "next to it looking very pleased with itself. I know how this sounds, but I am telling you the truth: "
    "I was at the library all afternoon, and the librarian can confirm that I returned two books at four. "
)
USERS = ["Did you break the vase?", "Where were you this afternoon? Be honest with me.", "Hi"]


def make_completions(lm, n: int, min_tokens: int, max_tokens: int, seed: int) -> list[Completion]:
    """`n` completions of real text with lengths uniform in [min_tokens, max_tokens] (seeded)."""
    tok = lm.tokenizer
    text = tok.encode(TEXT * (1 + max_tokens // 40), add_special_tokens=False)
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prompt = helpers.encode_chat(tok, USERS[i % len(USERS)])
        length = int(torch.randint(min_tokens, max_tokens + 1, (), generator=g))
        start = int(torch.randint(0, len(text) - length, (), generator=g))
        tokens = text[start : start + length]
        out.append(Completion(f"c{i}#0", f"c{i}", 0, prompt, tokens, "", len(prompt), length, False, seed))
    return out


def batches(lm, completions: list[Completion], batch_size: int) -> list[dict]:
    """The batches collect_activations forms: sorted by length, right padded, with attention masks."""
    seqs = sorted((c.prompt_token_ids + c.completion_token_ids for c in completions), key=len)
    out = []
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start : start + batch_size]
        width = max(map(len, chunk))
        pad = pad_token_id(lm.tokenizer)
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in chunk], device=lm.model.device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in chunk], device=lm.model.device)
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default=helpers.OFFLINE_MODEL)
    parser.add_argument("--n-completions", type=int, default=32)
    parser.add_argument("--min-tokens", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--typical-layers", default=None, help="default: 20%%, 40%%, 60%% of depth")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--run-dir", default=None, help="where shards are written (default: a temp dir)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    lm = helpers.load_model(args.model, device=args.device)
    model, n_layers = lm.model, lm.info.n_layers
    typical = (
        [int(x) for x in args.typical_layers.split(",")]
        if args.typical_layers
        else [round(n_layers * f) for f in (0.2, 0.4, 0.6)]
    )
    full_depth = [n_layers // 3, 2 * n_layers // 3, n_layers - 1]
    completions = make_completions(lm, args.n_completions, args.min_tokens, args.max_tokens, seed=0)
    inputs = batches(lm, completions, args.batch_size)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    root = Path(args.run_dir or tempfile.mkdtemp(prefix="bench_capture_"))

    def bare(**extra):
        with torch.no_grad():
            for batch in inputs:
                model(**batch, **extra)

    def to_deepest():
        for batch in inputs:
            run_with_capture(model, [hook_name(max(typical))], stop_early=True, **batch)

    def collect(layers: list[int], name: str):
        run_dir = root / name
        shutil.rmtree(run_dir, ignore_errors=True)  # a fresh folder, or collection would resume
        summary = collect_activations(lm, completions, layers, run_dir, batch_size=args.batch_size)
        written = sum(f.stat().st_size for f in run_dir.rglob("*") if f.is_file())
        return summary, written

    contestants = {
        "bare_full_logits": bare,
        "bare_all_layers": lambda: bare(logits_to_keep=1),
        "bare_to_deepest": to_deepest,
        "collect_full_depth": lambda: collect(full_depth, "full"),
        "collect_typical": lambda: collect(typical, "typical"),
    }
    bare(logits_to_keep=1)  # warm-up: allocator, kernels
    # Wall seconds include waiting for a core and for the disk; CPU seconds of this process (with one
    # torch thread) hardly depend on other processes' load, but leave out time blocked on I/O.
    walls: dict[str, list[float]] = {k: [] for k in contestants}
    cpus: dict[str, list[float]] = {k: [] for k in contestants}
    extras: dict[str, tuple] = {}
    for _ in range(args.repeats):
        for name, fn in contestants.items():
            sync()
            wall, cpu = time.perf_counter(), time.process_time()
            out = fn()
            sync()
            walls[name].append(time.perf_counter() - wall)
            cpus[name].append(time.process_time() - cpu)
            if out is not None:
                extras[name] = out
    med = {k: statistics.median(v) for k, v in walls.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpus.items()}
    n_tokens = sum(len(c.prompt_token_ids) + c.n_tokens for c in completions)

    def overhead(a: str, b: str) -> dict[str, float]:
        return {
            "wall": round(100 * (med[a] / med[b] - 1), 1),
            "cpu": round(100 * (med_cpu[a] / med_cpu[b] - 1), 1),
        }

    result = {
        "bench": "capture",
        "model": args.model,
        "device": args.device,
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "torch_threads": torch.get_num_threads(),
        "dtype": lm.info.dtype,
        "n_layers": n_layers,
        "n_completions": len(completions),
        "forward_tokens": n_tokens,
        "stored_tokens_per_layer": sum(c.n_tokens for c in completions),
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "full_depth_layers": full_depth,
        "typical_layers": typical,
        "seconds_median": {k: round(v, 3) for k, v in med.items()},
        "cpu_seconds_median": {k: round(v, 3) for k, v in med_cpu.items()},
        "seconds_all": {k: [round(x, 3) for x in v] for k, v in walls.items()},
        "cpu_seconds_all": {k: [round(x, 3) for x in v] for k, v in cpus.items()},
        "bytes_written": {k: v[1] for k, v in extras.items()},
        "overhead_pct": {
            "collect_full_depth_vs_bare_all_layers": overhead("collect_full_depth", "bare_all_layers"),
            "collect_full_depth_vs_bare_full_logits": overhead("collect_full_depth", "bare_full_logits"),
            "collect_typical_vs_bare_to_deepest": overhead("collect_typical", "bare_to_deepest"),
            "collect_typical_vs_bare_all_layers": overhead("collect_typical", "bare_all_layers"),
        },
        "run_dir": str(root),
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
    }
    if not args.run_dir:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
