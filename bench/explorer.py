"""Benchmark: the explorer's data for EVERY feature of a d_sae = 16,384 SAE over a 1M-token store, and
the static page's first paint with 16k features.

    python bench/explorer.py                       # 1M tokens, d_in 576, d_sae 16384, TopK k=32; JSON
    python bench/explorer.py --tokens 200000       # a quicker look
    python bench/explorer.py --device cuda         # on a GPU
    python bench/explorer.py --pass-only --tokens 100000 --before baaabae --threads 1
        # only the one pass (`feature_pass`) over the store, the code of git revision baaabae (before the
        # pass moved to the device) against HEAD's, alternating, each in a fresh process, results
        # compared array by array
    python bench/explorer.py --pass-only --device cuda --compare-cpu --tokens 100000
        # the pass on CUDA and on the CPU, same code and store: the largest differences, field by field
    python bench/explorer.py --build-only --vocab 49152 --data-dir /tmp/explorer_bench
        # only the data (no offline model needed with --vocab, as with --pass-only)

Data (written once under --data-dir, reused): a store of `--tokens` completion tokens of d_in = 576 (the
offline model SmolLM2-135M's width) in float16 shards, in completions of 250 tokens with random token ids
of SmolLM2's vocabulary and alternating honest / deceptive labels; residuals are Gaussian with a few
high-variance directions. The SAE is a TopK SAE with random weights (k = 32: every token fires exactly
32 latents, so all 16k are alive, ~2,000 firings each). Random weights and data make the work realistic
(the same number of nonzero activations, windows, pages and tokens to decode), not the pages.

Measured in a fresh process (its memory is its own; a thread samples /proc/self/status every 20 ms):
- `build_dashboards` (the one pass; logit effects through SmolLM2's real unembedding; neighbours) and
  writing the explorer (every feature page, the table), with time and peak anonymous memory;
- side by side in the same process on the first `--subset-tokens` tokens, alternating: our one pass
  against the peers (1) a bare encoder pass over the same tokens (the SAE's `encode` on every token,
  outputs dropped: the floor any per-feature statistics pay) and (2) notebook 04's example windows
  (`analysis.contexts.build_contexts`, a Python loop over the features asked for in every batch) at two
  feature counts, its per-feature cost scaled to 16k features and the whole store (an extrapolation);
- the page in Debian's headless chromium from file://: first contentful paint, the table's first render
  (a `performance.mark` the app sets) and opening a feature page (when chromium is installed).

`--pass-only` times just `feature_pass` over the whole store on `--device` (CUDA synchronised before
the clock stops), in a fresh process that imports `helpers` from this tree; with `--before REV` also the
same pass with the `helpers` of git revision REV against those of `--after` (HEAD; both by `git
archive` into a temporary folder, so edits in progress in the working tree change neither), the two
alternating `--repeats` times, and their results compared field by field (counts, sums, histograms,
the kept top and sample entries with their windows): `identical` says whether every array is equal.
Keys name the code and the device (`before_cpu`, `after_cpu`, `after_cuda`); `pass_s` lists each run,
`pass_process_cpu_s` the CPU time of the process (all its threads: on a shared machine the fairer
figure), `tokens_per_s` uses the fastest; `read_and_encode_only_s` is the floor under the pass on each
device (the streamed read and the SAE's encode alone, nothing kept), so the rest is the bookkeeping.
With `--compare-cpu` (or `--before` and a GPU) `cuda_vs_cpu` compares the device's results with the
CPU's of the same code, field by field: equal, or the largest absolute and relative differences and how
many entries differ (the encoder's float rounding on the GPU can move an activation by an ulp, a tie
in a TopK or a kept entry near a feature's k-th score with it).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import helpers  # noqa: E402
from bench.peak_memory import PeakMemory  # noqa: E402
from helpers.analysis.contexts import ContextConfig, EncodedChunks, build_contexts, docs_for  # noqa: E402
from helpers.collect.completions import read_completions, write_completions  # noqa: E402
from helpers.collect.store import ActivationWriter, LayerStore  # noqa: E402
from helpers.explore.dashboards import ExplorerConfig, build_dashboards, feature_pass  # noqa: E402
from helpers.explore.decoder import unembedding_of  # noqa: E402
from helpers.explore.site import write_sae_data, write_site  # noqa: E402
from helpers.model.hooks import hook_name  # noqa: E402
from helpers.run import explorer_dir, sae_dir, update_run_json  # noqa: E402
from helpers.saes import TopKSAE  # noqa: E402
from helpers.saes.io import load_sae, save_sae  # noqa: E402

LAYER, DOC_TOKENS, SAE_ID = 15, 250, "bench_topk_L15_mixed"


def build_data(data_dir: Path, n_tokens: int, d_in: int, d_sae: int, k: int, vocab: int) -> None:
    """The store, completions.jsonl, run.json and the SAE (module doc), once per size."""
    meta = {"tokens": n_tokens, "d_in": d_in, "d_sae": d_sae, "k": k, "vocab": vocab}  # token ids < vocab
    marker = data_dir / "bench_meta.json"
    if marker.exists() and json.loads(marker.read_text()) == meta:
        return
    shutil.rmtree(data_dir, ignore_errors=True)
    rng = np.random.default_rng(0)
    loud = rng.normal(size=(8, d_in)) * 6  # a few high-variance directions, as residual streams have
    records = []
    with ActivationWriter(data_dir, LAYER, shard_tokens=65_536) as writer:
        for i in range(n_tokens // DOC_TOKENS):
            x = rng.normal(size=(DOC_TOKENS, d_in)) + rng.normal(size=(DOC_TOKENS, 8)) @ loud
            ids = rng.integers(100, vocab, DOC_TOKENS).tolist()
            cid = f"p{i // 2}/{'honest' if i % 2 == 0 else 'deceptive'}#0"
            writer.add(cid, x.astype(np.float32))
            records.append(
                {
                    "id": cid,
                    "prompt_id": cid.split("#")[0],
                    "group": f"p{i // 20}",
                    "label": cid.split("/")[1][:-2],
                    "prompt_token_ids": [],
                    "completion_token_ids": ids,
                    "n_tokens": DOC_TOKENS,
                }
            )
    write_completions(data_dir, records)
    update_run_json(
        data_dir, model={"spec": helpers.OFFLINE_MODEL, "n_layers": 30, "d_model": d_in}, layers=[LAYER]
    )
    save_sae(
        TopKSAE(d_in, d_sae, l0=k, seed=0),
        sae_dir(data_dir, SAE_ID),
        hook_name=hook_name(LAYER),
        model_name=helpers.OFFLINE_MODEL,
        metadata={"sae_id": SAE_ID},
    )
    marker.write_text(json.dumps(meta))


def gb(b: float) -> float:
    return round(b / 2**30, 3)


def measure(args: argparse.Namespace) -> dict:
    """Runs in a fresh process (main)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    data_dir = Path(args.data_dir)
    lm = helpers.load_model(helpers.OFFLINE_MODEL, device=args.device)
    loaded = load_sae(sae_dir(data_dir, SAE_ID), device=args.device)
    store = LayerStore(data_dir, LAYER)
    cfg = ExplorerConfig(batch_tokens=args.batch_tokens)
    out: dict = {
        "tokens": store.n_tokens,
        "d_in": store.d_model,
        "d_sae": int(loaded.sae.d_sae),
        "k": args.k,
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "config": vars(cfg),
    }
    unembedding = unembedding_of(lm.model)
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        db = build_dashboards(
            data_dir, loaded, tokenizer=lm.tokenizer, unembedding=unembedding, config=cfg, store=store
        )
        t1 = time.perf_counter()
        write_sae_data(data_dir, db, {"bench": True})
        index = write_site(data_dir, title="bench: 16k features")
        t2 = time.perf_counter()
    out["explorer"] = {
        "build_dashboards_s": round(t1 - t0, 1),
        "write_pages_and_table_s": round(t2 - t1, 1),
        "total_s": round(t2 - t0, 1),
        "rss_anon_gb_before": gb(mem.start["RssAnon"]),
        "peak_rss_anon_gb": gb(mem.peak["RssAnon"]),
        "peak_rss_file_backed_gb": gb(mem.peak["RssFile"]),
        "features_alive": db.info["n_alive"],
        "explorer_mb_on_disk": round(
            sum(p.stat().st_size for p in explorer_dir(data_dir).rglob("*") if p.is_file()) / 2**20, 1
        ),
        "table_js_mb": round(
            (explorer_dir(data_dir) / "data" / SAE_ID / "table.js").stat().st_size / 2**20, 2
        ),
        "text_js_mb": round((explorer_dir(data_dir) / "data" / SAE_ID / "text.js").stat().st_size / 2**20, 2),
    }
    del db
    out["peers_on_a_subset"] = peers(
        store, loaded.sae, lm.tokenizer, read_completions(data_dir), cfg, args, out
    )
    if args.browser:
        out["browser"] = first_paint(index)
    return out


def peers(store: LayerStore, sae, tokenizer, records: list, cfg: ExplorerConfig, args, out: dict) -> dict:
    """Side by side on the first `--subset-tokens` tokens, alternating so load changes hit all alike:
    our one pass (`feature_pass`) against (1) a bare encoder pass over the same tokens, and (2) notebook
    04's `build_contexts` at two feature counts, whose difference gives its cost per feature; that cost
    scaled to all 16k features and the whole store (it is linear in both) is an extrapolation."""
    docs = docs_for(store, records)
    n, sub = 0, []
    for d in docs:
        if n >= args.subset_tokens:
            break
        sub.append(d)
        n += d.n
    ids = {d.id for d in sub}
    sub_records = [r for r in records if r["id"] in ids]

    def bare() -> None:
        for _ in EncodedChunks(store, sae, sub, cfg.batch_tokens):
            pass

    times: dict[str, list[float]] = {"bare_encoder_pass": [], "explorer_pass": []}
    for _ in range(2):
        for name, fn in (
            ("bare_encoder_pass", bare),
            ("explorer_pass", lambda: feature_pass(store, sae, sub, cfg)),
        ):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    contexts = {}
    for n_feat in (args.peer_features // 4, args.peer_features):
        t0 = time.perf_counter()
        build_contexts(
            store,
            sae,
            sub_records,
            list(range(n_feat)),
            tokenizer,
            ContextConfig(batch_tokens=cfg.batch_tokens),
        )
        contexts[n_feat] = time.perf_counter() - t0
    (f1, t1), (f2, t2) = contexts.items()
    per_feature = (t2 - t1) / (f2 - f1)
    scale = store.n_tokens / n
    encode = min(times["bare_encoder_pass"])
    estimate = (
        per_feature * out["d_sae"] + 2 * encode
    ) * scale  # its two passes over the store + per feature
    explorer = min(times["explorer_pass"])
    return {
        "tokens": n,
        "bare_encoder_pass_s": [round(t, 1) for t in times["bare_encoder_pass"]],
        "explorer_pass_s": [round(t, 1) for t in times["explorer_pass"]],
        "explorer_over_bare_encoder": round(explorer / encode, 2),
        "build_contexts_s": {str(k): round(v, 1) for k, v in contexts.items()},
        "build_contexts_per_feature_s": round(per_feature, 3),
        "build_contexts_all_features_whole_store_s_extrapolated": round(estimate),
        "explorer_pass_whole_store_s_scaled": round(explorer * scale),
        "ratio_build_contexts_to_explorer_extrapolated": round(estimate / (explorer * scale), 1),
    }


def _until_mark(browser, name: str, after: float = 0.0) -> float:
    """The time of the page's latest performance mark `name` set after `after` (polled every 10 ms)."""
    script = (
        f"const m = performance.getEntriesByName('{name}'); "
        "return m.length ? m[m.length - 1].startTime : null"
    )
    for _ in range(12_000):
        t = browser.execute_script(script)
        if t is not None and t > after:
            return t
        time.sleep(0.01)
    raise TimeoutError(f"the page never set the mark {name!r}")


def first_paint(index: Path) -> dict:
    """First contentful paint, table render and a feature page's load, in headless chromium."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait
    except ImportError:
        return {"skipped": "selenium is not installed"}
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not binary or not driver:
        return {"skipped": "chromium / chromedriver not installed (.ci/install installs them)"}
    opts = Options()
    for a in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
    ):
        opts.add_argument(a)
    opts.binary_location = binary
    browser = webdriver.Chrome(service=Service(driver), options=opts)
    runs = []
    try:
        for _ in range(3):
            browser.get("about:blank")
            browser.get(index.as_uri())
            WebDriverWait(browser, 120).until(
                lambda b: b.execute_script(
                    "return performance.getEntriesByName('explorer-table-rendered').length"
                )
            )
            fcp = browser.execute_script(
                "return performance.getEntriesByName('first-contentful-paint')[0].startTime"
            )
            table = browser.execute_script(
                "return performance.getEntriesByName('explorer-table-rendered')[0].startTime"
            )
            # Timed in the page, from just before the click to the app's mark once the page is drawn (a
            # WebDriverWait polls every 0.5 s, so timing the waits would measure the polling).
            row = browser.find_elements(By.CSS_SELECTOR, "#table tbody tr")[100]
            t0 = browser.execute_script(
                "performance.clearMarks('explorer-feature-rendered'); return performance.now()"
            )
            row.click()
            page = _until_mark(browser, "explorer-feature-rendered") - t0
            t0 = browser.execute_script("return performance.now()")
            browser.execute_script("history.back()")
            box = WebDriverWait(browser, 60).until(lambda b: b.find_elements(By.ID, "search"))[0]
            box.send_keys("#777")
            WebDriverWait(browser, 60).until(lambda b: b.find_element(By.ID, "count").text.startswith("1 of"))
            search = browser.execute_script("return performance.now()") - t0
            # a search in the text of the top windows: text.js loads on the first one (timed in the page)
            box.clear()
            browser.execute_script(
                "const s = document.getElementById('where'); s.value = 'text'; "
                "s.dispatchEvent(new Event('change'));"
            )
            t0 = browser.execute_script(
                "performance.clearMarks('explorer-table-updated'); return performance.now()"
            )
            box.send_keys("the")
            text = _until_mark(browser, "explorer-table-updated", after=t0) - t0
            runs.append(
                {
                    "first_contentful_paint_ms": round(fcp),
                    "table_rendered_ms": round(table),
                    "feature_page_ms": round(page),
                    "back_and_search_ms": round(search),
                    "text_search_first_ms": round(text),
                }
            )
    finally:
        browser.quit()
    return {"runs": runs, "median": {k: int(np.median([r[k] for r in runs])) for k in runs[0]}}


PASS_RUNNER = """
import json, sys, time
root, data, device, threads, batch, out, sae_id, layer, mode = sys.argv[1:]
sys.path.insert(0, root)
import numpy as np
import torch
import helpers
from helpers.analysis.contexts import docs_for
from helpers.collect.completions import read_completions
from helpers.collect.store import LayerStore
from helpers.explore.dashboards import ExplorerConfig, feature_pass
from helpers.run import sae_dir
from helpers.saes.io import load_sae
assert helpers.__file__.startswith(root), (helpers.__file__, root)
if int(threads):
    torch.set_num_threads(int(threads))
loaded = load_sae(sae_dir(data, sae_id), device=device)
store = LayerStore(data, int(layer))
docs = docs_for(store, read_completions(data))
sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
sync()
t0, c0 = time.perf_counter(), time.process_time()
if mode == "encode":  # the floor: the streamed read and the SAE's encode, nothing kept
    from helpers.analysis.contexts import EncodedChunks
    for _ in EncodedChunks(store, loaded.sae, docs, int(batch), pre=False):
        pass
    sync()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "tokens": store.n_tokens}))
    sys.exit(0)
fp = feature_pass(store, loaded.sae, docs, ExplorerConfig(batch_tokens=int(batch)))
sync()
seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
arrays = {k: getattr(fp, k) for k in ("n_tokens", "fired", "act_sum", "min_activation", "log_counts")}
for name in ("top", "sample"):
    kept = getattr(fp, name)
    for k in ("feature", "score", "value", "doc", "pos", "window", "start", "extra"):
        if getattr(kept, k) is not None:
            arrays[f"{name}.{k}"] = getattr(kept, k)
np.savez(out, **arrays)
peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else 0
print(json.dumps(
    {"seconds": seconds, "cpu_seconds": cpu, "tokens": store.n_tokens, "peak_cuda_gb": peak / 2**30}
))
"""


def run_pass(root: Path, args: argparse.Namespace, device: str, out: Path, mode: str = "pass") -> dict:
    """`feature_pass` over the whole store with the `helpers` package under `root`, in a fresh process
    (mode "encode": only the pass's streamed read and encode, `EncodedChunks`)."""
    cmd = [sys.executable, "-c", PASS_RUNNER, str(root), args.data_dir, device, str(args.threads)]
    done = subprocess.run(
        [*cmd, str(args.batch_tokens), str(out), SAE_ID, str(LAYER), mode],
        capture_output=True,
        text=True,
        env={**os.environ, "TQDM_DISABLE": "1"},
    )
    if done.returncode:
        raise RuntimeError(f"the pass with {root} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(a: Path, b: Path) -> dict:
    """Field by field: equal (nan equal to nan), or the largest absolute difference."""
    with np.load(a) as x, np.load(b) as y:
        if set(x) != set(y):
            return {"identical": False, "fields": f"{sorted(x)} vs {sorted(y)}"}
        out = {}
        for k in sorted(x):
            p, q = x[k], y[k]
            if p.shape != q.shape:
                out[k] = f"shape {p.shape} vs {q.shape}"
            elif np.array_equal(p, q, equal_nan=p.dtype.kind == "f"):
                out[k] = "equal"
            else:
                p, q = p.astype(np.float64), q.astype(np.float64)
                d = np.where(np.isnan(p) & np.isnan(q), 0.0, np.abs(p - q))
                d = np.where(np.isnan(d), np.inf, d)  # nan against a number
                rel = d / np.maximum(np.maximum(np.abs(p), np.abs(q)), 1e-30)
                out[k] = (
                    f"max abs diff {np.max(d):.3g}, max rel diff {np.nanmax(rel):.3g}, "
                    f"{int((d > 0).sum())} of {d.size} differ"
                )
    return {"identical": all(v == "equal" for v in out.values()), "fields": out}


def pass_only(args: argparse.Namespace) -> dict:
    """The one pass alone (module doc): this tree on `--device`, and git revision `--before` on the CPU."""
    tmp = Path(tempfile.mkdtemp(prefix="explorer_pass_"))
    try:
        out: dict = {"device": args.device, "torch_threads": args.threads or "torch default"}
        if args.device.startswith("cuda"):
            out["gpu"] = torch.cuda.get_device_name(0)
        runs = {f"after_{args.device}": (ROOT, args.device)}
        if args.before:  # both from git, so edits in progress in the working tree change neither
            trees = {}
            for name, rev in (("before", args.before), ("after", args.after)):
                trees[name] = tmp / name
                trees[name].mkdir()
                archive = subprocess.run(
                    ["git", "-C", str(ROOT), "archive", rev, "helpers"], capture_output=True, check=True
                ).stdout
                subprocess.run(["tar", "-x", "-C", str(trees[name])], input=archive, check=True)
            runs = {"before_cpu": (trees["before"], "cpu"), "after_cpu": (trees["after"], "cpu")}
            if args.device != "cpu":
                runs[f"after_{args.device}"] = (trees["after"], args.device)
        elif args.compare_cpu and args.device != "cpu":
            runs["after_cpu"] = (ROOT, "cpu")
        times: dict[str, list[float]] = {k: [] for k in runs}
        cpu: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(args.repeats):
            for name, (root, device) in runs.items():
                r = run_pass(root, args, device, tmp / f"{name}.npz")
                times[name].append(r["seconds"])
                cpu[name].append(r["cpu_seconds"])
                out["tokens"] = r["tokens"]
                if device.startswith("cuda"):
                    out["peak_cuda_gb"] = round(r["peak_cuda_gb"], 2)
        out["pass_s"] = {k: [round(t, 1) for t in v] for k, v in times.items()}
        out["pass_process_cpu_s"] = {k: [round(t, 1) for t in v] for k, v in cpu.items()}
        # the floor under the pass on each device: read + encode alone, once (the rest is bookkeeping)
        for name, (root, device) in runs.items():
            if not name.startswith("after"):
                continue
            r = run_pass(root, args, device, tmp / "unused.npz", mode="encode")
            out.setdefault("read_and_encode_only_s", {})[device] = round(r["seconds"], 1)
            out.setdefault("read_and_encode_only_process_cpu_s", {})[device] = round(r["cpu_seconds"], 1)
        best = {k: min(v) for k, v in times.items()}
        out["tokens_per_s"] = {k: round(out["tokens"] / t) for k, t in best.items()}
        if "after_cpu" in runs and args.device != "cpu":  # the same code on the device and on the CPU
            out[f"{args.device}_vs_cpu"] = compare(tmp / f"after_{args.device}.npz", tmp / "after_cpu.npz")
        if args.before:
            out["before_rev"], out["after_rev"] = args.before, args.after
            out["after_over_before_cpu"] = round(best["after_cpu"] / best["before_cpu"], 3)
            least = {k: min(v) for k, v in cpu.items()}
            out["after_over_before_process_cpu"] = round(least["after_cpu"] / least["before_cpu"], 3)
            out["before_vs_after_cpu"] = compare(tmp / "before_cpu.npz", tmp / "after_cpu.npz")
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1_000_000)
    p.add_argument("--d-in", type=int, default=576)
    p.add_argument("--d-sae", type=int, default=16_384)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch-tokens", type=int, default=2048)
    p.add_argument(
        "--peer-features", type=int, default=128, help="build_contexts at this and a quarter of it"
    )
    p.add_argument("--subset-tokens", type=int, default=100_000, help="tokens of the side-by-side peer runs")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-dir", default=str(Path(tempfile.gettempdir()) / "explorer_bench"))
    p.add_argument("--no-browser", dest="browser", action="store_false")
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--pass-only", action="store_true", help="time only the one pass (module doc)")
    p.add_argument("--before", help="with --pass-only: also the pass of this git revision, on the CPU")
    p.add_argument("--after", default="HEAD", help="with --before: the revision to compare it with")
    p.add_argument("--repeats", type=int, default=1, help="with --pass-only: runs of each, alternating")
    p.add_argument(
        "--compare-cpu",
        action="store_true",
        help="with --pass-only and a --device other than cpu: also this tree's pass on the CPU, compared",
    )
    p.add_argument(
        "--vocab",
        type=int,
        default=None,
        help="the store's token ids are drawn below this (default: the offline model's tokenizer's size, "
        "49,152, which loads that model); with --pass-only nothing else needs the model, so a machine "
        "without it (scripts/gpu_check.sh on a lent GPU) passes 49152",
    )
    p.add_argument(
        "--build-only",
        action="store_true",
        help="write the data under --data-dir (or find it there) and stop: scripts/gpu_check.sh builds the "
        "1M-token store on the CPU while other steps use the GPU",
    )
    args = p.parse_args()
    if args.vocab is None:
        args.vocab = len(helpers.load_model(helpers.OFFLINE_MODEL, device="cpu").tokenizer)
    elif not (args.pass_only or args.build_only):
        p.error("--vocab goes with --pass-only or --build-only: the whole explorer loads the offline model")
    t0 = time.perf_counter()
    build_data(Path(args.data_dir), args.tokens, args.d_in, args.d_sae, args.k, args.vocab)
    data_s = time.perf_counter() - t0
    if args.build_only:
        print(json.dumps({"data_dir": args.data_dir, "tokens": args.tokens, "build_s": round(data_s, 1)}))
        return
    if args.pass_only:
        result = pass_only(args)
        result.update(
            d_sae=args.d_sae, k=args.k, batch_tokens=args.batch_tokens, data_build_s=round(data_s, 1)
        )
        text = json.dumps(result, indent=1)
        print(text)
        if args.out:
            Path(args.out).write_text(text + "\n")
        return
    with multiprocessing.get_context("spawn").Pool(1) as pool:  # a fresh process: its memory is its own
        result = pool.apply(measure, (args,))
    result["data_build_s"] = round(data_s, 1)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
