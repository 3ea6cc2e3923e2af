"""Benchmark: reference-corpus collection against a bare forward pass, and streamed training's memory.

    python bench/corpus_collect.py                      # CPU, the offline model, the corpus the package ships
    python bench/corpus_collect.py --device cuda --d32  # a GPU: a randomly initialised d32-sized nanochat
                                                        # (no download), collection + one layer's training

Prints one JSON object. Part 1 (`collection`): `collect_corpus` (tokenise and pack, forward pass with
capture stopped after the deepest layer, float16 rounding on the device, shards written atomically)
against the same batches of the same token ids through

- `bare_to_deepest`: the forward pass stopped after the deepest collected layer, nothing copied (the
  true price of capture + writing; the ≤ 10% target is against this one), and
- `bare_full`: the model's plain forward pass over every layer with logits at one position (what one
  would time as "a forward pass").

Contestants alternate over `--repeats` rounds in this one process (medians), so a busy machine slows
them alike; CPU time (process_time) is reported beside wall time.

Part 2 (`streamed_training`, in a fresh process): a TopK SAE trains from `CorpusStream` for more tokens
than its shuffle buffer holds many times over; a thread samples the process's resident memory every
20 ms. Anonymous memory is what the process allocated (model, buffer, SAE, optimiser); the stream's
whole data would be `tokens × d_model × 4` bytes as float32, which never exists at once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import helpers  # noqa: E402
from bench.peak_memory import PeakMemory  # noqa: E402
from helpers.collect import corpus  # noqa: E402
from helpers.collect.corpus import CorpusStream, Packing, collect_corpus, iter_documents, iter_sequences  # noqa: E402
from helpers.model.hooks import hook_name, run_with_capture  # noqa: E402
from helpers.saes.train import StreamData, TrainConfig, Trainer  # noqa: E402


def load(args):
    if not args.d32:
        return helpers.load_model(helpers.OFFLINE_MODEL, device=args.device)
    import transformers as tf

    # nanochat d32's shapes (REFERENCE.md): 32 layers x 2048, vocab 65,536;
    # random weights, fp32 (a T4's rule).
    cfg = tf.NanoChatConfig(
        hidden_size=2048,
        num_hidden_layers=32,
        num_attention_heads=16,
        num_key_value_heads=16,
        intermediate_size=8192,
        vocab_size=65_536,
        max_position_embeddings=2048,
    )
    model = tf.NanoChatForCausalLM(cfg).to(args.device).eval().requires_grad_(False)
    offline = helpers.load_model(helpers.OFFLINE_MODEL, device="cpu")  # its tokenizer packs the text
    info = helpers.ModelInfo("random-d32", "bench", "nanochat", 32, 2048, "float32", args.device, "plain")
    return helpers.LoadedModel(model, offline.tokenizer, info)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str) -> tuple[float, float]:
    sync(device)
    w, c = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - w, time.process_time() - c


def collection(lm, args) -> dict:
    layers = [int(x) for x in args.layers.split(",")]
    packing = Packing.for_tokenizer(lm.tokenizer, args.seq_len)
    seqs = []
    for s in iter_sequences(lm.tokenizer, iter_documents(corpus.resolve_corpus(args.corpus)), packing):
        if len(s) == args.seq_len:
            seqs.append(s)
        if len(seqs) * args.seq_len >= args.tokens:
            break
    kept = int(packing.keep(torch.tensor(seqs)).sum())
    batches = [
        torch.tensor(seqs[i : i + args.batch_size], device=lm.model.device)
        for i in range(0, len(seqs), args.batch_size)
    ]
    deepest = hook_name(max(layers))

    def bare_to_deepest():
        for ids in batches:
            run_with_capture(lm.model, [deepest], stop_early=True, input_ids=ids)

    def bare_full():
        with torch.no_grad():
            for ids in batches:
                lm.model(input_ids=ids, logits_to_keep=1)

    def collect():
        tmp = Path(tempfile.mkdtemp(prefix="corpus_bench_"))
        try:
            with contextlib.redirect_stdout(sys.stderr):  # its messages; stdout carries only the JSON
                collect_corpus(
                    lm,
                    args.corpus,
                    layers,
                    tmp,
                    max_tokens=kept,
                    seq_len=args.seq_len,
                    batch_size=args.batch_size,
                )
        finally:
            shutil.rmtree(tmp)

    collect()  # warm-up: first-call costs (allocations, tokenizer, file system) out of the timings
    runs: dict[str, list[tuple[float, float]]] = {"collect": [], "bare_to_deepest": [], "bare_full": []}
    for _ in range(args.repeats):
        for name, fn in (
            ("bare_to_deepest", bare_to_deepest),
            ("collect", collect),
            ("bare_full", bare_full),
        ):
            runs[name].append(timed(fn, args.device))
    med = {
        k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in runs.items()
    }
    over = lambda k, i: round(med["collect"][i] / med[k][i] - 1, 4)  # noqa: E731
    return {
        "tokens": len(seqs) * args.seq_len,
        "tokens_stored_per_layer": kept,
        "layers": layers,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "seconds_wall": {k: round(v[0], 3) for k, v in med.items()},
        "seconds_cpu": {k: round(v[1], 3) for k, v in med.items()},
        "tokens_per_s_collect": round(len(seqs) * args.seq_len / med["collect"][0]),
        "overhead_vs_bare_to_deepest": {
            "wall": over("bare_to_deepest", 0),
            "cpu": over("bare_to_deepest", 1),
        },
        "overhead_vs_bare_full": {"wall": over("bare_full", 0), "cpu": over("bare_full", 1)},
    }


def streamed_training(args) -> dict:
    """TopK trained from a CorpusStream; resident memory sampled every 20 ms (fresh process)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load(args)

    layer = args.stream_layer
    stream = CorpusStream(
        lm,
        args.corpus,
        layer,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        buffer_tokens=args.buffer_tokens,
    )
    cfg = TrainConfig(
        architecture="topk",
        expansion=8,
        l0=32,
        batch_size=1024,
        train_tokens=args.stream_tokens,
        log_every=50,
        init_tokens=4096,
    )
    data = StreamData(stream)
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        run = Trainer(cfg, stream.d_model, args.device)
        it = data.batches(cfg, 0)
        run.init_from_data(torch.cat([next(it) for _ in range(4)]))
        for _ in range(cfg.total_steps):
            run.train_step(next(it))
        seconds = time.perf_counter() - t0
    gib = lambda b: round(b / 2**30, 3)  # noqa: E731
    return {
        "layer": layer,
        "tokens_streamed": cfg.total_steps * cfg.batch_size + 4 * 1024,
        "d_model": stream.d_model,
        "buffer_tokens": args.buffer_tokens,
        "buffer_gib_float32": gib(args.buffer_tokens * stream.d_model * 4),
        "stream_as_float32_gib": gib((cfg.total_steps + 4) * 1024 * stream.d_model * 4),
        "rss_anon_gib_before": gib(mem.start["RssAnon"]),
        "peak_rss_anon_gib": gib(mem.peak["RssAnon"]),
        "peak_rss_file_gib": gib(mem.peak["RssFile"]),
        "seconds": round(seconds, 1),
        "tokens_per_s": round((cfg.total_steps + 4) * 1024 / seconds),
        "final_batch_explained_variance": round(run.history[-1]["explained_variance"], 4),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default=corpus.BUILTIN_CORPUS)
    p.add_argument(
        "--layers", default="7,15,22", help="collected layers (the notebooks' 1/4, 1/2, 3/4 depth)"
    )
    p.add_argument("--tokens", type=int, default=16_384, help="tokens collected per repeat")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--stream-layer", type=int, default=3, help="layer of the streamed-training run")
    p.add_argument("--stream-tokens", type=int, default=100 * 1024, help="tokens streamed into training")
    p.add_argument("--buffer-tokens", type=int, default=8192, help="the stream's shuffle buffer, in vectors")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument(
        "--d32", action="store_true", help="a random-weight nanochat d32-sized model instead of SmolLM2"
    )
    p.add_argument("--skip-memory", action="store_true")
    args = p.parse_args()
    if args.d32 and args.layers == "7,15,22":
        args.layers, args.stream_layer = "8,16,24", 16
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load(args)
    result = {
        "machine": {
            "device": args.device,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "model": lm.info.spec,
            "corpus": args.corpus,
        }
    }
    print("collection ...", file=sys.stderr, flush=True)
    result["collection"] = collection(lm, args)
    if not args.skip_memory:
        print("streamed training (fresh process) ...", file=sys.stderr, flush=True)
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            result["streamed_training"] = pool.submit(streamed_training, args).result()
    result["targets"] = {
        "collection_overhead_le_10pct": result["collection"]["overhead_vs_bare_to_deepest"]["wall"] <= 0.10
    }
    if "streamed_training" in result:
        m = result["streamed_training"]
        result["targets"]["stream_larger_than_buffer_5x"] = (
            m["stream_as_float32_gib"] >= 5 * m["buffer_gib_float32"]
        )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
