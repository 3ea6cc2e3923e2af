"""Benchmark: batched `sample_completions` against one `model.generate` call per completion.

Prints one JSON object. All contestants run in this one process, one after another, on the same
prompts, so their ratios are meaningful even on a busy machine (absolute numbers are not).

- `loop`: the naive baseline, `model.generate(do_sample=True)` once per completion (batch of 1).
- `batched[bs]`: `helpers.sampling.sample_completions` with `batch_size=bs`.
- `hf_generate_batched`: `model.generate` on left-padded batches of the same size, for reference:
  it shows what our own decoding loop adds over transformers' (shared prefill, finished rows leaving
  the batch).

`--budget fixed` (default) gives every completion exactly `--max-new-tokens` tokens (the loop and HF
batched use `min_new_tokens`, ours `stop_ids=[]`), so the token budget is identical and the ratio is
pure throughput. `--budget natural` lets completions stop at the stop token as in a real run; compare
tokens/s there, since each side's completions have different lengths.

The loop's cost per completion does not depend on how many it runs, so `--loop-samples` can time it
on fewer samples per prompt (still every prompt) when the batched side needs many completions to
fill large batches.

    python bench/sampling.py --threads 1 --repeats 3 --loop-samples 2   # CPU, SmolLM2 offline model
    python bench/sampling.py --device cuda --batch-sizes 32,64,128 --n-per-prompt 16 --loop-samples 2

On a CPU shared with other processes, `--threads 1` avoids OpenMP threads spinning against them
(which slows small per-step matmuls, i.e. the loop, far more than large ones).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

# Benchmark this checkout's helpers, never a different installed copy.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import helpers  # noqa: E402
from bench.prompts import PROMPTS
from helpers.collect.sampling import completion_seed, sample_completions  # noqa: E402
from helpers.model.chat import encode_chat, pad_token_id, stop_token_ids  # noqa: E402


def timed(fn):
    """(fn(), wall seconds, CPU seconds of this process). With one torch thread, CPU seconds hardly
    depend on what other processes do to the machine; wall seconds include waiting for a core."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def rates(times: list[tuple[float, float]], n_completions: int, n_tokens: int) -> dict:
    """Rates from the median wall and the median CPU seconds of the rounds."""
    wall = statistics.median(t[0] for t in times)
    cpu = statistics.median(t[1] for t in times)
    return {
        "completions": n_completions,
        "tokens": n_tokens,
        "seconds": round(wall, 2),
        "completions_per_s": round(n_completions / wall, 3),
        "tokens_per_s": round(n_tokens / wall, 1),
        "cpu_seconds": round(cpu, 2),
        "completions_per_cpu_s": round(n_completions / cpu, 3),
        "tokens_per_cpu_s": round(n_tokens / cpu, 1),
        "seconds_all": [round(t[0], 2) for t in times],
        "cpu_seconds_all": [round(t[1], 2) for t in times],
    }


def generate_kwargs(lm, args, fixed: bool) -> dict:
    return dict(
        do_sample=True,
        temperature=args.temperature,
        top_p=None,
        top_k=None,
        max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.max_new_tokens if fixed else None,
        eos_token_id=stop_token_ids(lm.tokenizer, lm.model.generation_config),
        pad_token_id=pad_token_id(lm.tokenizer),
        use_cache=True,
    )


def new_tokens(row: list[int], stops: list[int], pad: int, width: int) -> list[int]:
    """The sampled tokens of one generate() row, up to (not including) the first stop token."""
    new = row[width:]
    return new[: next((i for i, t in enumerate(new) if t in stops), len(new))]


@torch.inference_mode()
def generate_one_by_one(lm, prompts, n_samples: int, args, fixed: bool) -> list[list[int]]:
    """The naive baseline: one `model.generate` call per completion."""
    model, tok = lm.model, lm.tokenizer
    kwargs = generate_kwargs(lm, args, fixed)
    out = []
    for pid, user, system in prompts:
        ids = torch.tensor([encode_chat(tok, user, system)], device=model.device)
        for k in range(n_samples):
            torch.manual_seed(completion_seed(args.seed, pid, k))
            row = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)[0].tolist()
            out.append(new_tokens(row, kwargs["eos_token_id"], kwargs["pad_token_id"], ids.shape[1]))
    return out


@torch.inference_mode()
def hf_generate_batched(lm, prompts, n_samples: int, batch_size: int, args, fixed: bool) -> list[list[int]]:
    """`model.generate` on left-padded batches: transformers' own batched decoding."""
    model, tok = lm.model, lm.tokenizer
    kwargs = generate_kwargs(lm, args, fixed)
    rows = [encode_chat(tok, u, s) for _, u, s in prompts for _ in range(n_samples)]
    torch.manual_seed(args.seed)
    out = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        width = max(map(len, batch))
        ids = torch.tensor([[kwargs["pad_token_id"]] * (width - len(r)) + r for r in batch])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in batch])
        gen = model.generate(ids.to(model.device), attention_mask=mask.to(model.device), **kwargs)
        out += [new_tokens(r, kwargs["eos_token_id"], kwargs["pad_token_id"], width) for r in gen.tolist()]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default=helpers.OFFLINE_MODEL)
    parser.add_argument("--n-prompts", type=int, default=len(PROMPTS))
    parser.add_argument("--n-per-prompt", type=int, default=4)
    parser.add_argument("--loop-samples", type=int, default=None, help="samples per prompt for the loop")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-sizes", default="8,16,32")
    parser.add_argument("--hf-batch-size", type=int, default=None, help="default: the largest batch size")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--budget", choices=["fixed", "natural"], default="fixed")
    parser.add_argument("--repeats", type=int, default=1, help="rounds over all contestants (medians)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    lm = helpers.load_model(args.model, device=args.device)
    prompts = (PROMPTS * (1 + args.n_prompts // len(PROMPTS)))[: args.n_prompts]
    prompts = [(f"{pid}{i}", u, s) for i, (pid, u, s) in enumerate(prompts)]
    fixed = args.budget == "fixed"
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    hf_bs = args.hf_batch_size or max(batch_sizes)
    loop_samples = args.loop_samples or args.n_per_prompt
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def ours(bs: int, n: int, max_new: int) -> list[list[int]]:
        done = sample_completions(
            lm,
            prompts,
            n_per_prompt=n,
            temperature=args.temperature,
            max_new_tokens=max_new,
            seed=args.seed,
            batch_size=bs,
            stop_ids=[] if fixed else None,
        )
        return [c.completion_token_ids for c in done]

    contestants = {"loop": lambda: generate_one_by_one(lm, prompts, loop_samples, args, fixed)}
    for bs in batch_sizes:
        contestants[f"batched_{bs}"] = lambda bs=bs: ours(bs, args.n_per_prompt, args.max_new_tokens)
    contestants[f"hf_generate_batched_{hf_bs}"] = lambda: hf_generate_batched(
        lm, prompts, args.n_per_prompt, hf_bs, args, fixed
    )

    # Warm up every code path (first calls allocate, pick kernels, load tokenizer caches).
    small = argparse.Namespace(**{**vars(args), "max_new_tokens": 4})
    generate_one_by_one(lm, prompts[:1], 1, small, fixed)
    ours(max(batch_sizes), 1, 4)
    sync()
    # Rounds over all contestants, so a burst of load from other processes hits every one of them.
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in contestants}
    outputs: dict[str, list[list[int]]] = {}
    for _ in range(args.repeats):
        for name, fn in contestants.items():
            sync()
            outputs[name], wall, cpu = timed(fn)
            sync()
            times[name].append((wall, cpu))
    results = {name: rates(t, len(outputs[name]), sum(map(len, outputs[name]))) for name, t in times.items()}
    loop = results["loop"]
    keys = ("completions_per_s", "tokens_per_s", "completions_per_cpu_s", "tokens_per_cpu_s")
    ratio = {
        name: {k: round(r[k] / loop[k], 2) for k in keys} for name, r in results.items() if name != "loop"
    }
    best = max(batch_sizes, key=lambda b: ratio[f"batched_{b}"]["completions_per_s"])
    print(
        json.dumps(
            {
                "bench": "sampling",
                "model": args.model,
                "device": args.device,
                "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
                "cpu": platform.processor() or platform.machine(),
                "torch_threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "dtype": lm.info.dtype,
                "budget": args.budget,
                "temperature": args.temperature,
                "max_new_tokens": args.max_new_tokens,
                "n_prompts": len(prompts),
                "n_per_prompt": args.n_per_prompt,
                "loop_samples_per_prompt": loop_samples,
                "repeats": args.repeats,
                "results": results,
                "ratio_vs_loop": ratio,
                "best_batch_size": best,
                "load_average_1min_at_end": round(os.getloadavg()[0], 2),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
