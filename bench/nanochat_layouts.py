"""Benchmark: sampling and capture on a 2026-layout nanochat model against the 2025 layout at the same size.

Prints one JSON object. Two native checkpoints of the same shape are written (random weights): the
2025-10 layout, which `load_model` converts to transformers' `NanoChatForCausalLM`, and the 2026-03-14
layout (value embeddings, gates, lambdas, smear, backout, sliding windows), which loads as our
`NanoChatGPTForCausalLM`. Both go through the real loader, then through the package's own code paths:

- `sampling`: `collect.sample_completions` (batched, KV-cached, left-padded; `stop_ids=[]` so both
  layouts decode exactly `--max-new-tokens` tokens per completion);
- `capture`: `collect.collect_activations` (right-padded batches, float16 shards written) on layers
  reaching the last one.

Contestants are interleaved over `--repeats` rounds in this one process (medians reported), so the
ratio 2026 / 2025 is meaningful on a busy machine. The tokenizer is byte-level (265 tokens), so the
lm_head, identical work in both layouts, weighs less than with a real 32k/65k vocabulary: the ratio is,
if anything, harsher than a real model's. Also printed: the memory of d20/d24/d32-sized models of both
layouts in each dtype, from their parameter counts (models built on the meta device, nothing allocated).

    python bench/nanochat_layouts.py --threads 2
    python bench/nanochat_layouts.py --device cuda --depth 12 --width 768
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import tiktoken
import torch

# Benchmark this checkout's helpers, never a different installed copy.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import helpers  # noqa: E402
from bench.prompts import PROMPTS as SCENARIO_PROMPTS
from helpers.collect.capture import collect_activations  # noqa: E402
from helpers.collect.sampling import Completion, sample_completions  # noqa: E402
from helpers.model import nanochat_layouts as layouts  # noqa: E402
from helpers.model.nanochat import SPECIAL_TOKENS  # noqa: E402
from helpers.model.nanochat_gpt import NanoChatGPTConfig, NanoChatGPTForCausalLM, count_parameters  # noqa: E402

PROMPTS = SCENARIO_PROMPTS[:4]
TEXT = (
    "I did not break the vase. When I came home it was already on the floor, and the cat was sitting "
    "next to it looking very pleased with itself. I was at the library all afternoon, honestly. "
)


def byte_encoding() -> tiktoken.Encoding:
    ranks = {bytes([i]): i for i in range(256)}
    return tiktoken.Encoding(
        name="bytes",
        pat_str=r"""\s+|\S+""",
        mergeable_ranks=ranks,
        special_tokens={s: 256 + i for i, s in enumerate(SPECIAL_TOKENS)},
    )


def layout_config(name: str, depth: int, width: int, vocab: int, seq_len: int) -> NanoChatGPTConfig:
    """nanochat's shapes for a depth (head_dim 128, n_kv_head = n_head) in a layout of the table."""
    layout = layouts.LAYOUTS[layouts.LAYOUT_NAMES.index(name)]
    mc = {"sequence_len": seq_len, "n_layer": depth, "window_pattern": "SSSL"}
    b = layouts.resolve_behaviour(layout, mc) if layout is not layouts.ORIGINAL else {}
    return NanoChatGPTConfig(
        vocab_size=vocab,
        padded_vocab_size=-(-vocab // 64) * 64 if layout is not layouts.ORIGINAL else vocab,
        hidden_size=width,
        num_hidden_layers=depth,
        num_attention_heads=max(1, width // 128),
        max_position_embeddings=seq_len,
        attention_windows=b.get("attention_windows"),
        value_embed_layers=layout.value_embed_layers(depth),
        ve_gate_channels=layout.ve_gate_channels,
        smear_channels=24 if layout.smear else 0,
        backout_layer=depth // 2 if layout.smear else None,
        layout=name,
    )


def write_native(folder: Path, name: str, depth: int, width: int, seq_len: int) -> Path:
    """A random native checkpoint of layout `name`, as nanochat writes one (state dict, meta, tokenizer)."""
    enc = byte_encoding()
    torch.manual_seed(0)
    model = NanoChatGPTForCausalLM(layout_config("2026-03-14", depth, width, enc.n_vocab, seq_len))
    keep = layouts.LAYOUTS[layouts.LAYOUT_NAMES.index(name)].expected_keys(depth)
    sd = {k: v for k, v in model.state_dict().items() if k in keep}
    if name == "2025-10":  # no padding before 2025-12-09
        sd = {
            k: v[: enc.n_vocab] if k in ("transformer.wte.weight", "lm_head.weight") else v
            for k, v in sd.items()
        }
    folder.mkdir(parents=True)
    torch.save(sd, folder / "model_000001.pt")
    mc = {
        "sequence_len": seq_len,
        "vocab_size": enc.n_vocab,
        "n_layer": depth,
        "n_head": max(1, width // 128),
        "n_kv_head": max(1, width // 128),
        "n_embd": width,
        "window_pattern": "SSSL",
    }
    (folder / "meta_000001.json").write_text(json.dumps({"step": 1, "model_config": mc}))
    with open(folder / "tokenizer.pkl", "wb") as f:
        pickle.dump(enc, f)
    return folder


def completions(lm, n: int, seed: int = 0) -> list[Completion]:
    tok = lm.tokenizer
    text = tok.encode(TEXT * 4, add_special_tokens=False)
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prompt = helpers.encode_chat(tok, PROMPTS[i % len(PROMPTS)][1])
        length = int(torch.randint(16, 128, (), generator=g))
        start = int(torch.randint(0, len(text) - length, (), generator=g))
        out.append(
            Completion(
                f"c{i}#0", f"c{i}", 0, prompt, text[start : start + length], "", len(prompt), length, False, 0
            )
        )
    return out


def memory_table() -> dict:
    """GiB of parameters for nanochat-sized models: d20/d24/d32 (width 64·depth, head_dim 128), 2025 layout
    at its default vocabulary 65536, 2026-03-14 layout at its default 32768 (and at 65536)."""
    from transformers import NanoChatConfig, NanoChatForCausalLM

    out = {}
    for depth in (20, 24, 32):
        width = 64 * depth
        cfg25 = NanoChatConfig(
            vocab_size=65536,
            hidden_size=width,
            intermediate_size=4 * width,
            num_hidden_layers=depth,
            num_attention_heads=width // 128,
            num_key_value_heads=width // 128,
            tie_word_embeddings=False,
        )
        with torch.device("meta"):
            n25 = sum(p.numel() for p in NanoChatForCausalLM(cfg25).parameters())
        rows = {"2025-10 (vocab 65536)": n25}
        for vocab in (32768, 65536):
            cfg = layout_config("2026-03-14", depth, width, vocab, 2048)
            rows[f"2026-03-14 (vocab {vocab})"] = count_parameters(cfg)
        ve = 0.5 * depth * 32768 * width  # value embeddings on half the layers, vocab 32768
        out[f"d{depth}"] = {
            name: {
                "params_M": round(n / 1e6, 1),
                "fp32_GiB": round(4 * n / 2**30, 2),
                "bf16_or_fp16_GiB": round(2 * n / 2**30, 2),
            }
            for name, n in rows.items()
        } | {"2026 value_embeds share (vocab 32768)": round(ve / rows["2026-03-14 (vocab 32768)"], 3)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--n-per-prompt", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--n-completions", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="bench_nanochat_layouts_"))
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    lms, comps = {}, {}
    for name in ("2025-10", "2026-03-14"):
        native = write_native(root / name, name, args.depth, args.width, args.seq_len)
        with contextlib.redirect_stdout(sys.stderr):  # the conversion log; stdout is the JSON
            lms[name] = helpers.load_model(str(native), device=args.device, cache_dir=root / "cache")
        comps[name] = completions(lms[name], args.n_completions)

    def sampling(name: str):
        return sample_completions(
            lms[name],
            PROMPTS,
            n_per_prompt=args.n_per_prompt,
            temperature=1.0,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            stop_ids=[],
        )

    def capture(name: str):
        run_dir = root / f"run-{name}"
        shutil.rmtree(run_dir, ignore_errors=True)  # a fresh folder, or collection would resume
        layers = [args.depth // 3, 2 * args.depth // 3, args.depth - 1]
        return collect_activations(lms[name], comps[name], layers, run_dir, batch_size=args.batch_size // 2)

    contestants = {
        f"{task}[{name}]": (fn, name)
        for task, fn in (("sampling", sampling), ("capture", capture))
        for name in lms
    }
    for fn, name in contestants.values():  # warm-up
        fn(name)
    walls: dict[str, list[float]] = {k: [] for k in contestants}
    cpus: dict[str, list[float]] = {k: [] for k in contestants}
    for _ in range(args.repeats):
        for key, (fn, name) in contestants.items():
            sync()
            wall, cpu = time.perf_counter(), time.process_time()
            fn(name)
            sync()
            walls[key].append(time.perf_counter() - wall)
            cpus[key].append(time.process_time() - cpu)
    med = {k: statistics.median(v) for k, v in walls.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpus.items()}
    result = {
        "bench": "nanochat_layouts",
        "device": args.device,
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "torch_threads": torch.get_num_threads(),
        "shape": {"n_layer": args.depth, "n_embd": args.width, "sequence_len": args.seq_len, "vocab": 265},
        "classes": {name: type(lm.model).__name__ for name, lm in lms.items()},
        "params": {name: sum(p.numel() for p in lm.model.parameters()) for name, lm in lms.items()},
        "dtype": {name: lm.info.dtype for name, lm in lms.items()},
        "sampling": {
            "prompts": len(PROMPTS),
            "n_per_prompt": args.n_per_prompt,
            "max_new_tokens": args.max_new_tokens,
            "batch_size": args.batch_size,
        },
        "capture": {"completions": args.n_completions, "batch_size": args.batch_size // 2},
        "repeats": args.repeats,
        "seconds_median": {k: round(v, 3) for k, v in med.items()},
        "cpu_seconds_median": {k: round(v, 3) for k, v in med_cpu.items()},
        "seconds_all": {k: [round(x, 3) for x in v] for k, v in walls.items()},
        "ratio_2026_over_2025": {
            task: {
                "wall": round(med[f"{task}[2026-03-14]"] / med[f"{task}[2025-10]"], 3),
                "cpu": round(med_cpu[f"{task}[2026-03-14]"] / med_cpu[f"{task}[2025-10]"], 3),
            }
            for task in ("sampling", "capture")
        },
        "target": "ratio <= 1.2",
        "memory_by_parameter_count": memory_table(),
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
    }
    shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
