"""Benchmark: exporting a store in SAELens's cached-activations format, and training SAELens from it.

    python bench/export.py                     # a 2 GiB store, 1 GiB memory cap, prints one JSON object
    python bench/export.py --store-gib 8 --cap-gib 1 --steps 60

1. Export (`helpers.saes.handoff.export_saelens_cache`) of a synthetic store larger than the memory cap:
   float16 shards written by our own `ActivationWriter` (kind `corpus`, d_model 576 as SmolLM2-135M,
   sequences of 256 tokens with their token ids), exported as float32 rows of `--context-size` tokens
   (what SAELens writes by default, so the dataset is twice the store). The export runs in a child
   process whose memory is sampled every 10 ms from /proc/self/status: `peak_rss_anon` (private memory:
   what the cap is about) and `peak_rss` (VmHWM, which also counts file pages mapped from the store and
   the dataset, pages the kernel can drop). The cap is met when peak_rss_anon < cap, while the store
   (and the dataset) are several times the cap. Throughput is GB (1e9 bytes) of activations written
   per second of the whole export; the store was just written, so it is read from the page cache.
2. Training, side by side in one process: SAELens's `SAETrainer` with the same TopK SAE (d_sae 8 x d_in,
   k 32, batch `--batch-tokens`) fed (a) by `handoff.store_batches` (our store as its data provider) and
   (b) by SAELens's own `ActivationsStore` over the export (`use_cached_activations=True`). Steps are
   timed in alternating chunks of 5, so a shared machine's load slows both alike; the data providers
   alone (`--pulls` batches each, no training) are timed the same way, in chunks of 50. torch uses
   `--threads` threads.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from helpers.collect.store import ActivationWriter  # noqa: E402
from helpers.run import update_run_json  # noqa: E402
from helpers.saes.handoff import Selection, export_saelens_cache, store_batches  # noqa: E402

D_MODEL, SEQ_LEN, LAYER = 576, 256, 3


def make_store(run: Path, gib: float, seed: int = 0) -> int:
    """A synthetic reference-corpus store of about `gib` GiB (float16) at LAYER; returns its tokens."""
    update_run_json(run, model={"spec": "bench/synthetic", "n_layers": 8, "d_model": D_MODEL}, layers=[LAYER])
    n_seq = int(gib * 2**30 / (SEQ_LEN * D_MODEL * 2))
    rng = np.random.default_rng(seed)
    with ActivationWriter(run, LAYER, kind="corpus", shard_tokens=1 << 16) as w:
        for i in range(n_seq):
            acts = rng.standard_normal((SEQ_LEN, D_MODEL), dtype=np.float32).astype(np.float16)
            w.add(
                f"seq{i}",
                acts,
                token_ids=rng.integers(0, 49152, SEQ_LEN),
                positions=np.arange(1, SEQ_LEN + 1),
            )
    return n_seq * SEQ_LEN


def _memory_now() -> dict[str, int]:
    """RssAnon (private memory) and VmHWM (peak resident set) of this process, in bytes."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return {key: int(fields[key].split()[0]) * 1024 for key in ("RssAnon", "VmHWM")}


def _memory_sampler(peaks: dict[str, int], stop: threading.Event) -> None:
    while not stop.is_set():
        for key, value in _memory_now().items():
            peaks[key] = max(peaks.get(key, 0), value)
        stop.wait(0.01)


def _export_child(run: str, out: str, context_size: int, shard_bytes: int, queue) -> None:
    import datasets  # noqa: F401 - imported before the clock starts, as in a notebook that used it before

    torch.set_num_threads(1)
    peaks: dict[str, int] = {}
    stop = threading.Event()
    sampler = threading.Thread(target=_memory_sampler, args=(peaks, stop), daemon=True)
    baseline = _memory_now()
    sampler.start()
    start = time.perf_counter()
    manifest = export_saelens_cache(
        Selection(run, LAYER, kinds=("corpus",)),
        out,
        context_size=context_size,
        shard_bytes=shard_bytes,
        progress=False,
    )
    seconds = time.perf_counter() - start
    stop.set()
    sampler.join()
    queue.put({"manifest": manifest, "seconds": seconds, "peaks": peaks, "baseline": baseline})


def export_run(run: Path, out: Path, context_size: int, shard_bytes: int) -> dict:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_export_child, args=(str(run), str(out), context_size, shard_bytes, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def saelens_cache_store(out: Path, manifest: dict, batch_tokens: int):
    """SAELens's ActivationsStore on the export, as its runner builds it with use_cached_activations."""
    import datasets
    from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig, TopKTrainingSAEConfig
    from sae_lens.training.activations_store import ActivationsStore

    cfg = LanguageModelSAERunnerConfig(
        sae=TopKTrainingSAEConfig(d_in=manifest["d_in"], d_sae=8 * manifest["d_in"], k=32),
        hook_name=manifest["hook_name"],
        context_size=manifest["context_size"],
        use_cached_activations=True,
        cached_activations_path=str(out),
        dataset_path="",
        training_tokens=10**9,
        train_batch_size_tokens=batch_tokens,
        store_batch_size_prompts=8,
        n_batches_in_buffer=16,
        device="cpu",
        logger=LoggingConfig(log_to_wandb=False),
    )
    tokens = datasets.Dataset.from_dict({"input_ids": [[0] * manifest["context_size"]] * 4})
    return cfg, ActivationsStore.from_config(None, cfg, override_dataset=tokens)


def alternate(named: dict, steps: int, chunk: int = 5) -> dict[str, float]:
    """Seconds each callable took over `steps` calls, run in alternating chunks of `chunk`."""
    total = dict.fromkeys(named, 0.0)
    for _ in range(0, steps, chunk):
        for name, fn in named.items():
            start = time.perf_counter()
            for _ in range(chunk):
                fn()
            total[name] += time.perf_counter() - start
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--store-gib", type=float, default=2.0)
    p.add_argument("--cap-gib", type=float, default=1.0)
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--shard-mib", type=int, default=256)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--pulls", type=int, default=1000, help="batches pulled per data provider, no training")
    p.add_argument("--batch-tokens", type=int, default=1024)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workdir", default=None, help="where the store and the export go (default: a temp dir)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from sae_lens import TopKTrainingSAE
    from sae_lens.training.sae_trainer import SAETrainer

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_export_"))
    run, out = work / "run", work / "cache"
    try:
        start = time.perf_counter()
        n_tokens = make_store(run, args.store_gib)
        store_seconds = time.perf_counter() - start
        res = export_run(run, out, args.context_size, args.shard_mib << 20)
        m, peaks = res["manifest"], res["peaks"]
        written = m["n_tokens"] * m["d_in"] * 4
        cap = int(args.cap_gib * 2**30)
        export = {
            "store_bytes": n_tokens * D_MODEL * 2,
            "dataset_bytes": written,
            "cap_bytes": cap,
            "seconds": round(res["seconds"], 2),
            "gb_per_s_written": round(written / 1e9 / res["seconds"], 3),
            "peak_rss_anon_bytes": peaks["RssAnon"],
            "peak_rss_bytes": peaks["VmHWM"],
            "rss_anon_before_export_bytes": res["baseline"]["RssAnon"],
            "within_cap": peaks["RssAnon"] < cap,
            "rows": m["n_rows"],
            "files": m["files"],
            "shard_bytes": args.shard_mib << 20,
        }

        cfg, cached = saelens_cache_store(out, m, args.batch_tokens)
        ours = store_batches(
            Selection(run, LAYER, kinds=("corpus",)), args.batch_tokens, buffer_bytes=1 << 28
        )
        providers = {"iterator": ours, "saelens_cache": cached}
        pulled = alternate({k: (lambda it=it: next(it)) for k, it in providers.items()}, args.pulls, chunk=50)
        trainers = {}
        for name, it in providers.items():
            torch.manual_seed(0)
            trainers[name] = (
                SAETrainer(cfg=cfg.to_sae_trainer_config(), sae=TopKTrainingSAE(cfg.sae), data_provider=it),
                it,
            )
        trained = alternate(
            {k: (lambda t=t, it=it: t.step(next(it))) for k, (t, it) in trainers.items()}, args.steps
        )
        tps = {k: args.steps * args.batch_tokens / s for k, s in trained.items()}
        data_tps = {k: args.pulls * args.batch_tokens / s for k, s in pulled.items()}
        print(
            json.dumps(
                {
                    "device": "cpu",
                    "torch_threads": args.threads,
                    "store_write_seconds": round(store_seconds, 1),
                    "export": export,
                    "training": {
                        "steps": args.steps,
                        "batch_tokens": args.batch_tokens,
                        "d_sae": 8 * m["d_in"],
                        "k": 32,
                        "tokens_per_s": {k: round(v) for k, v in tps.items()},
                        "data_only_tokens_per_s": {k: round(v) for k, v in data_tps.items()},
                        "iterator_over_cache": round(tps["iterator"] / tps["saelens_cache"], 3),
                    },
                },
                indent=2,
            )
        )
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
