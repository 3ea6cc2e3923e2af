"""Training SAEs with SAELens, on several GPUs or a bigger machine, from a run's stored activations, and
bringing them back into the run folder (issue 23).

Three pieces, all on the training rows notebook 03 would use (`Selection`): the training side of the
held-out split of `split_completions`, minus the groups notebook 04 reserves for analysis
(`analysis_split`), and the corpus's training sequences (`corpus_ids`), so an SAE trained elsewhere
never saw the rows notebook 04 tests it on.

- `export_saelens_cache`: a layer's rows written as SAELens's cached-activations dataset, the folder
  `CacheActivationsRunner` writes and `ActivationsStore` reads with `use_cached_activations=True` and
  `cached_activations_path` (sae_lens 6.54: `cache_activations_runner.py` builds the features
  `{hook_name: Array2D(shape=(context_size, d_in), dtype), "token_ids": Sequence(Value("int32"),
  length=context_size)}` and saves them with `Dataset.save_to_disk`; `training/activations_store.py`
  `load_cached_activation_dataset` checks `features[hook_name].shape == (context_size, d_in)` and reads
  rows in order). Completions have different lengths, and an SAE reads every token alone, so the
  tokens are packed: the selected completions (in a seeded random order) are concatenated and cut into
  rows of `context_size` tokens; the last partial row is dropped (its count is reported). A packed
  row crosses completion boundaries, so position-dependent SAELens options (`seqpos_slice`) must stay
  off. Rows are written `shard_bytes` at a time as Arrow files of the dataset, so memory stays bounded
  whatever the store's size; an interrupted export resumes at its first missing file.
- `store_batches`: the same rows as an endless iterator of float32 `(batch, d_in)` tensors, the data
  provider SAELens's `SAETrainer` takes (its `DataProvider = Iterator[torch.Tensor]`), for training on a
  machine that holds the run folder without writing a second copy of the activations.
- `import_saelens_sae`: a folder SAELens wrote (`save_inference_model`, or a runner's final folder)
  read with `io.load_sae`, saved into `saes/<sae_id>/` in our layout and evaluated on the run's
  held-out rows into `metrics.json`, as `grid.train_grid` does, so notebooks 04-06 read it like ours.

EleutherAI's sparsify reads no activations: it runs the model itself on tokens. `export_sparsify_tokens`
writes the corpus's training sequences as its uint16 token memmap, `sparsify_command` the `python -m` /
`torchrun` line that trains on 1 or N GPUs through `saes.sparsify_main` (sparsify's CLI, able to load our
nanochat class), and `import_sparsify_sae` brings a `<hookpoint>/cfg.json` + `sae.safetensors` folder back
as a TopK SAE, as `import_saelens_sae` does.

Only SAELens and sparsify releases whose formats were checked are accepted (`TESTED_SAELENS`,
`TESTED_SPARSIFY`): another one is refused with the versions tested, as the formats are theirs and may
change with them.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from helpers.collect.completions import (
    ANALYSIS_FRACTION,
    analysis_split,
    ids_for_condition,
    read_completions,
    split_completions,
)
from helpers.collect.corpus import corpus_ids
from helpers.collect.store import LayerStore
from helpers.model.hooks import hook_name
from helpers.run import (
    SAE_CFG,
    SAE_METRICS,
    SAE_WEIGHTS,
    atomic_write_bytes,
    atomic_write_json,
    model_record,
    override_fields,
    read_run_json,
    sae_dir,
    sae_id_of,
    stable_hash,
)
from helpers.saes.evals import evaluate_folder
from helpers.saes.io import LoadedSAE, load_sae, save_sae
from helpers.saes.pipeline import BEHAVIOUR_CONDITIONS, collected_layers
from helpers.saes.train import MixedData, StoreData, TrainConfig

TESTED_SAELENS = ("6.54.12",)
"""SAELens releases whose cached-activations schema and saved-SAE folders tests/saes/test_handoff.py
checked; releases sharing their major.minor are accepted, others refused."""
TESTED_SPARSIFY = ("1.3.3",)
"""EleutherAI sparsify (eai-sparsify) releases whose memmap input and `<hook>/cfg.json` + `sae.safetensors`
output tests/saes/test_handoff_sparsify.py checked (accepted as for SAELens)."""
EXPORT_MANIFEST = "deception_sae_lab_export.json"
"""Written last into an export folder: what it holds and from which run (a folder without it is partial)."""
PARTIAL_MANIFEST = "deception_sae_lab_export.partial.json"
"""Written first: the settings of an export under way, so a rerun resumes it and nothing else."""
KINDS = ("activations", "corpus")


def check_saelens_version(version: str | None = None) -> str:
    """The SAELens release to write for or read from: `version`, else the installed one, else the
    tested one. One whose major.minor no tested release shares is refused, naming the tested ones."""
    return _check_version(
        "sae-lens", "sae_lens", version, TESTED_SAELENS, "cached-activations and SAE formats"
    )


def check_sparsify_version(version: str | None = None) -> str:
    """As `check_saelens_version`, for EleutherAI's sparsify (PyPI: eai-sparsify)."""
    return _check_version(
        "eai-sparsify", "sparsify", version, TESTED_SPARSIFY, "token memmap and output folders"
    )


def _check_version(dist: str, name: str, version: str | None, tested: tuple[str, ...], what: str) -> str:
    if version is None:
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            version = tested[-1]
    known = {".".join(v.split(".")[:2]) for v in tested}
    if ".".join(str(version).split(".")[:2]) not in known:
        raise ValueError(
            f"{name} {version} is a release whose {what} were not checked here (tested: "
            f"{', '.join(tested)}). Install a tested one (pip install {dist}=={tested[-1]}) on the machine "
            "that trains, or check the new format first."
        )
    return str(version)


@dataclasses.dataclass(frozen=True)
class Selection:
    """Which rows of one layer an SAE trained elsewhere uses: the stores of `kinds` (behaviour
    completions in `activations/`, the reference corpus in `corpus/`, or both) and, of the behaviour
    completions, those of `condition` on the training side of notebook 03's splits."""

    run_dir: str
    layer: int
    kinds: tuple[str, ...] = ("activations",)
    condition: str = "mixed"
    """A behaviour condition of notebook 03 (mixed, deceptive_only, honest_only)."""
    eval_fraction: float = 0.1
    """Notebook 03's held-out share of prompt groups (its metrics are computed on them)."""
    seed: int = 0
    """Notebook 03's seed: the held-out and analysis splits depend on it."""

    def __post_init__(self):
        kinds = tuple(self.kinds)
        object.__setattr__(self, "kinds", kinds)
        object.__setattr__(self, "run_dir", str(self.run_dir))
        if not kinds or len(set(kinds)) != len(kinds) or set(kinds) - set(KINDS):
            raise ValueError(f"kinds must be some of {KINDS} (each once), got {kinds}")
        if self.condition not in BEHAVIOUR_CONDITIONS:
            raise ValueError(f"condition must be one of {BEHAVIOUR_CONDITIONS}, got {self.condition!r}")
        if len(kinds) == 2 and self.condition != "mixed":
            raise ValueError(
                "corpus + behaviour uses the mixed completions (notebook 03's "
                f"corpus+behaviour), not {self.condition!r}: pass condition='mixed', or "
                f"kinds=('activations',) for {self.condition!r}"
            )

    @property
    def grid_condition(self) -> str:
        """The condition's name in notebook 03's grid (`corpus`, `corpus+behaviour`, or the behaviour one)."""
        if self.kinds == ("corpus",):
            return "corpus"
        return "corpus+behaviour" if "corpus" in self.kinds else self.condition

    def sources(self) -> list[tuple[str, LayerStore, list[str]]]:
        """(kind, store, training ids) per kind; a missing layer is an error naming the collected ones."""
        run_dir = Path(self.run_dir)
        out = []
        for kind in self.kinds:
            try:
                store = LayerStore(run_dir, self.layer, kind=kind)
            except FileNotFoundError as err:
                raise FileNotFoundError(
                    f"layer {self.layer} has no {kind} store in {run_dir} ({err}). Layers with stored "
                    f"activations: {collected_layers(run_dir) or 'none'}; choose one of them, or collect "
                    "this layer in notebook 02 first."
                ) from err
            if kind == "corpus":
                ids = corpus_ids(run_dir, self.layer, self.seed)[1]
            else:
                rows = read_completions(run_dir)
                train = set(split_completions(rows, self.eval_fraction, self.seed)[0])
                train -= set(analysis_split(rows, ANALYSIS_FRACTION, self.seed)[1])
                ids = [
                    i for i in ids_for_condition(rows, self.condition) if i in train and i in store.entries
                ]
            if not ids:
                raise ValueError(
                    f"no training {kind} rows of condition {self.condition!r} at layer {self.layer}"
                )
            out.append((kind, store, ids))
        if len({s.d_model for _, s, _ in out}) != 1:
            raise ValueError(f"the {self.kinds} stores of layer {self.layer} have different d_model")
        return out

    def held_out(self) -> tuple[LayerStore, list[str]]:
        """Where grid.train_grid evaluates an SAE of this layer: the held-out behaviour completions when
        the run has them, else the held-out corpus sequences."""
        run_dir = Path(self.run_dir)
        rows = read_completions(run_dir)
        try:
            store = LayerStore(run_dir, self.layer)
        except FileNotFoundError:
            store, _, held = corpus_ids(run_dir, self.layer, self.seed)
            return store, held
        held = split_completions(rows, self.eval_fraction, self.seed)[1]
        return store, [i for i in held if i in store.entries]

    def describe(self) -> dict[str, Any]:
        """JSON-able settings (the run by folder name and model), for manifests and SAE metadata."""
        return {
            "run": Path(self.run_dir).name,
            "model_spec": model_record(self.run_dir, required=False).get("spec"),
            "layer": self.layer,
            "kinds": list(self.kinds),
            "condition": self.grid_condition,
            "eval_fraction": self.eval_fraction,
            "seed": self.seed,
            "analysis_split": {"fraction": ANALYSIS_FRACTION, "seed": self.seed},
        }


# --- SAELens's cached-activations dataset ---------------------------------------------------------------
def export_saelens_cache(
    selection: Selection,
    out_dir: str | os.PathLike,
    *,
    context_size: int = 128,
    dtype: str = "float32",
    shard_bytes: int = 1 << 28,
    saelens_version: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the rows of `selection` into `out_dir` as SAELens's cached-activations dataset (module doc)
    and return its manifest (also in `out_dir/deception_sae_lab_export.json`). `dtype` is the Array2D's
    (SAELens writes its cfg.dtype, float32 by default; float16 halves the disk and is what the store
    holds). At most about `shard_bytes` of activations are in memory at a time. A folder holding this
    same export is reused; one holding anything else is refused and left as it is."""
    from datasets import Array2D, Features, Sequence, Value  # the test extra; Colab preinstalls it

    version = check_saelens_version(saelens_version)
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be 'float32' or 'float16', got {dtype!r}")
    out = Path(out_dir)
    sources = selection.sources()
    order = _packing_order(sources, selection.seed)
    d_in = sources[0][1].d_model
    n_tokens = int(sum(n for _, _, _, n in order))
    if context_size < 1:
        raise ValueError(f"context_size must be at least 1, got {context_size}")
    if context_size > n_tokens:
        raise ValueError(
            f"context_size {context_size} is larger than the {n_tokens} training tokens of "
            f"{selection.kinds} at layer {selection.layer} (the longest completion has "
            f"{max(n for *_, n in order)}): not one row of SAELens's dataset can be filled. Use a "
            f"context_size of at most {n_tokens}, or collect more."
        )
    ids_of = _token_source(selection, sources)
    rows_total = n_tokens // context_size
    rows_per_file = max(1, shard_bytes // (context_size * d_in * np.dtype(dtype).itemsize))
    n_files = -(-rows_total // rows_per_file)
    hook = hook_name(selection.layer)
    manifest = {
        "format": "sae_lens cached activations (datasets save_to_disk)",
        "sae_lens_version": version,
        **selection.describe(),
        "hook_name": hook,
        "d_in": d_in,
        "context_size": context_size,
        "dtype": dtype,
        "token_ids": ids_of is not None,
        "n_rows": rows_total,
        "n_tokens": rows_total * context_size,
        "tokens_dropped": n_tokens - rows_total * context_size,
        "n_entries": len(order),
        "files": n_files,
        "rows_per_file": rows_per_file,
    }
    if _existing_export(out, manifest):
        print(f"{out} already holds this export ({rows_total} rows of {context_size} tokens): reused")
        return json.loads((out / EXPORT_MANIFEST).read_text())
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / PARTIAL_MANIFEST, manifest)

    columns = {hook: Array2D(shape=(context_size, d_in), dtype=dtype)}
    if ids_of is not None:  # SAELens uses them to drop special tokens (exclude_special_tokens)
        columns["token_ids"] = Sequence(Value("int32"), length=context_size)
    features = Features(columns)
    names = [f"data-{k:05d}-of-{n_files:05d}.arrow" for k in range(n_files)]
    starts = np.cumsum([0] + [n for *_, n in order])
    for k in tqdm(range(n_files), desc=f"export layer {selection.layer}", disable=not progress):
        if (out / names[k]).exists():  # written whole (renamed into place) by an earlier run
            continue
        rows = min(rows_per_file, rows_total - k * rows_per_file)
        first = k * rows_per_file * context_size
        acts, ids = _packed(order, starts, first, first + rows * context_size, d_in, dtype, ids_of)
        if dtype == "float16" and not np.isfinite(acts).all():  # a shard the store kept in float32
            raise ValueError(
                f"activations of layer {selection.layer} overflow float16: export with dtype='float32'"
            )
        _write_arrow(
            out / names[k],
            features,
            hook,
            acts.reshape(rows, context_size, d_in),
            None if ids is None else ids.reshape(rows, context_size),
        )
    _write_dataset_json(out, features, names, stable_hash(manifest))
    atomic_write_json(out / EXPORT_MANIFEST, manifest)
    (out / PARTIAL_MANIFEST).unlink()
    return manifest


def _existing_export(out: Path, manifest: dict[str, Any]) -> bool:
    """True when `out` holds this export complete; False when it is empty, absent, or this export's
    partial state (resumed); otherwise an error that names what is there and changes nothing."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise FileExistsError(f"{out} is a file: choose another export folder")
    for name, complete in ((EXPORT_MANIFEST, True), (PARTIAL_MANIFEST, False)):
        if (out / name).exists():
            found = json.loads((out / name).read_text())
            if found == manifest:
                return complete
            diff = {k: (found.get(k), v) for k, v in manifest.items() if found.get(k) != v}
            raise FileExistsError(
                f"{out} holds {'an' if complete else 'an unfinished'} export of other data or settings "
                f"(was, now: {diff}); nothing was changed. Choose another folder, or delete this one to "
                "replace it."
            )
    if found := sorted(p.name for p in out.iterdir())[:8]:
        raise FileExistsError(
            f"{out} is not empty and holds no export of this package ({found}); nothing was changed. "
            "Choose an empty or new folder."
        )
    return False


def _packing_order(sources, seed: int) -> list[tuple[str, LayerStore, str, int]]:
    """(kind, store, id, n_tokens) of every selected entry, in one seeded random order across kinds, so
    a dataset read in order (as SAELens reads its cache) mixes completions and corpus throughout."""
    order = [(kind, store, i, store.entries[i][2]) for kind, store, ids in sources for i in ids]
    perm = np.random.default_rng(stable_hash(seed, "export") % 2**32).permutation(len(order))
    return [order[j] for j in perm if order[j][3] > 0]


def _token_source(selection: Selection, sources) -> Callable[[str, LayerStore, str], np.ndarray] | None:
    """`(kind, store, id) -> [n] int32` token ids of an entry's rows (the corpus store's own; for a
    completion, the prompt + completion tokens capture ran the model on, from completions.jsonl), or
    None when some entry has none (a store written before token ids were kept): then no column."""
    tokens: dict[str, list[int]] = {}
    for kind, store, ids in sources:
        if kind == "corpus" and not all(store.has_token_ids):
            return None
        if kind == "activations":
            rows = {r["id"]: r for r in read_completions(selection.run_dir)}
            if any("prompt_token_ids" not in rows[i] or "completion_token_ids" not in rows[i] for i in ids):
                return None
            tokens = {
                i: list(rows[i]["prompt_token_ids"]) + list(rows[i]["completion_token_ids"]) for i in ids
            }

    def ids_of(kind: str, store: LayerStore, cid: str) -> np.ndarray:
        if kind == "corpus":
            return store.token_ids_of(cid)[:, 0]
        _, _, n, first = store.entries[cid]
        if first + n > len(tokens[cid]):
            raise ValueError(
                f"{cid!r} has stored rows past its {len(tokens[cid])} tokens: completions.jsonl changed"
            )
        return np.asarray(tokens[cid][first : first + n], np.int32)

    return ids_of


def _packed(order, starts, lo: int, hi: int, d_in: int, dtype: str, ids_of):
    """Tokens [lo, hi) of the packed stream: ([hi-lo, d_in] activations, [hi-lo] int32 ids or None)."""
    acts = np.empty((hi - lo, d_in), dtype)
    ids = np.empty(hi - lo, np.int32) if ids_of is not None else None
    j = int(np.searchsorted(starts, lo, side="right")) - 1
    pos = lo
    while pos < hi:
        kind, store, cid, n = order[j]
        a, b = pos - starts[j], min(n, hi - starts[j])
        s, row, _, _ = store.entries[cid]
        acts[pos - lo : pos - lo + b - a] = store.shard(s)[row + a : row + b]
        if ids is not None:
            ids[pos - lo : pos - lo + b - a] = ids_of(kind, store, cid)[a:b]
        pos += b - a
        j += 1
    return acts, ids


def _write_arrow(path: Path, features, hook: str, acts: np.ndarray, ids: np.ndarray | None) -> None:
    """One Arrow file of the dataset, built from the arrays without a Python-level copy (datasets'
    Array2D storage is list<list<value>>), written under a temporary name and renamed into place."""
    import pyarrow as pa
    from datasets.arrow_writer import ArrowWriter

    schema = features.arrow_schema
    rows, ctx, d = acts.shape
    storage = schema.field(hook).type.storage_type
    if not (pa.types.is_list(storage) and pa.types.is_list(storage.value_type)):
        raise RuntimeError(
            f"this datasets release stores Array2D as {storage}, not list<list<>>: not supported"
        )
    inner = pa.ListArray.from_arrays(
        pa.array(np.arange(0, rows * ctx * d + 1, d, dtype=np.int32)), pa.array(acts.reshape(-1))
    )
    outer = pa.ListArray.from_arrays(pa.array(np.arange(0, rows * ctx + 1, ctx, dtype=np.int32)), inner)
    arrays = [pa.ExtensionArray.from_storage(schema.field(hook).type, outer)]
    if ids is not None:
        arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1)), ctx))
    table = pa.Table.from_arrays(arrays, schema=schema)
    tmp = path.with_name(f".{path.name}.tmp")
    writer = ArrowWriter(features=features, path=str(tmp))
    try:
        writer.write_table(table)
        writer.finalize()
    finally:
        writer.close()
    os.replace(tmp, path)


def _write_dataset_json(out: Path, features, names: list[str], fingerprint: int) -> None:
    """`state.json` and `dataset_info.json` as `Dataset.save_to_disk` writes them for these files: the
    info is the one datasets itself writes for an empty dataset of these features (its own serialiser,
    whatever the installed release)."""
    from datasets import Dataset

    with tempfile.TemporaryDirectory() as tmp:
        Dataset.from_dict({k: [] for k in features}, features=features).save_to_disk(tmp)
        info = json.loads((Path(tmp) / "dataset_info.json").read_text())
    state = {
        "_data_files": [{"filename": n} for n in names],
        "_fingerprint": f"{fingerprint:016x}"[:16],
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": None,
    }
    atomic_write_json(out / "dataset_info.json", info)
    atomic_write_json(out / "state.json", state)


# --- SAELens's SAETrainer on our store ------------------------------------------------------------------
def store_batches(
    selection: Selection, batch_size: int, *, buffer_bytes: int = 1 << 29
) -> Iterator[torch.Tensor]:
    """Endless float32 `(batch_size, d_in)` batches of the rows of `selection`, in fresh seeded shuffles
    (train.batches: a shuffle buffer of at most `buffer_bytes`), for SAELens's
    `SAETrainer(cfg, sae, data_provider=store_batches(...))`. With both kinds, each batch holds corpus and
    behaviour rows in proportion to their counts, as notebook 03's `corpus+behaviour` condition."""
    sources = selection.sources()
    data = [(StoreData(store, ids), store.count(ids)) for _, store, ids in sources]
    if sum(n for _, n in data) < batch_size:
        raise ValueError(
            f"the selection holds {sum(n for _, n in data)} tokens, fewer than one batch of {batch_size}"
        )
    cfg = TrainConfig(
        batch_size=batch_size, train_tokens=batch_size, seed=selection.seed, buffer_bytes=buffer_bytes
    )
    source = data[0][0] if len(data) == 1 else MixedData([(d, float(n)) for d, n in data])
    return source.batches(cfg, 0)


# --- back into the run folder ---------------------------------------------------------------------------
def _load_trained(folder: Path, hook: str) -> LoadedSAE:
    """`io.load_sae` of a folder SAELens saved. An SAE trained with a bare SAETrainer (not its runner)
    is saved without a hook name (the runner sets it); it is then read as reading `hook`, announced, from
    a temporary copy: the user's folder is never changed."""
    cfg = json.loads((folder / SAE_CFG).read_text()) if (folder / SAE_CFG).is_file() else None
    meta = (cfg or {}).get("metadata") or {}
    if cfg is None or meta.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point"):
        return load_sae(folder)
    print(f"{folder} names no hook (saved by a bare SAETrainer): read as {hook}, the exported layer's")
    tmp = Path(tempfile.mkdtemp(prefix="saelens_import_"))
    shutil.copy(folder / SAE_WEIGHTS, tmp / SAE_WEIGHTS)
    atomic_write_json(tmp / SAE_CFG, {**cfg, "metadata": {**meta, "hook_name": hook}})
    loaded = load_sae(tmp)
    shutil.rmtree(tmp)
    return loaded


def import_saelens_sae(folder: str | os.PathLike, selection: Selection, *, device: str = "cpu") -> str:
    """Copy an SAE that SAELens trained on `selection` (its saved folder: cfg.json and
    sae_weights.safetensors) into `saes/<sae_id>/` of the run and evaluate it on the held-out rows
    notebook 03 uses, writing metrics.json; returns the sae_id `{model}_{arch}-saelens_L{layer}_{condition}`.
    The SAE's metadata records the analysis split its training skipped, as notebook 04 expects."""
    loaded = _load_trained(Path(folder), hook_name(selection.layer))
    meta = loaded.cfg.get("metadata") or {}
    trained_with = meta.get("sae_lens_training_version") or meta.get("sae_lens_version")
    if trained_with:
        check_saelens_version(str(trained_with))
    return _import_loaded(loaded, Path(folder), selection, "saelens", f"sae_lens {trained_with}", device)


def _import_loaded(
    loaded: LoadedSAE, folder: Path, selection: Selection, engine: str, trained_with: str, device: str
) -> str:
    """Save `loaded` as `{model}_{arch}-{engine}_L{layer}_{condition}` in the run and evaluate it there."""
    if loaded.layer != selection.layer:
        raise ValueError(
            f"{folder} reads layer {loaded.layer} ({loaded.hook_name}), "
            f"the selection is layer {selection.layer}"
        )
    held_store, held_ids = selection.held_out()
    if loaded.sae.d_in != held_store.d_model:
        raise ValueError(
            f"{folder} has d_in {loaded.sae.d_in}; the run's layer {selection.layer} has {held_store.d_model}"
        )
    info = selection.describe()
    spec = info["model_spec"] or loaded.model_name or "unknown"
    sae_id = sae_id_of(spec, f"{loaded.sae.architecture}-{engine}", selection.layer, selection.grid_condition)
    out = sae_dir(selection.run_dir, sae_id)
    if (out / SAE_METRICS).exists():
        print(f"{sae_id} was imported earlier: kept (delete {out} to import again)")
        return sae_id
    row = {
        "sae_id": sae_id,
        "layer": selection.layer,
        "condition": info["condition"],
        "architecture": loaded.sae.architecture,
        "model_spec": spec,
        "trained_with": trained_with,
        "imported_from": str(folder),
        "analysis_split": info["analysis_split"],
        "selection": info,
    }
    save_sae(loaded.sae, out, hook_name=hook_name(selection.layer), model_name=spec, metadata=row)
    evaluation = evaluate_folder(out, held_store, held_ids, device=device)
    atomic_write_json(out / SAE_METRICS, {**row, **evaluation})
    print(
        f"imported {sae_id}: explained variance {evaluation['activations']['explained_variance']:.3f}, "
        f"L0 {evaluation['activations']['l0']:.1f} on {len(held_ids)} held-out "
        f"{'sequences' if held_store.dir.parent.name == 'corpus' else 'completions'}"
    )
    return sae_id


# --- EleutherAI sparsify -----------------------------------------------------------------------------------
def export_sparsify_tokens(
    selection: Selection,
    out_path: str | os.PathLike,
    *,
    ctx_len: int | None = None,
    vocab_size: int | None = None,
) -> dict[str, Any]:
    """The training sequences of the run's reference corpus as sparsify's token memmap: uint16, read as
    `np.memmap(path, uint16).reshape(-1, ctx_len)` (sparsify/data.py `MemmapDataset`; it runs the model
    on them itself). Each stored sequence's token ids in order (the special tokens the store skips are
    not there), concatenated and cut into rows of `ctx_len` (default: the corpus's sequence length); the
    last partial row is dropped. Held-out sequences stay out, so notebook 03's evaluation stays
    held out. Returns the manifest (also `<out>.json`); an existing file from other settings is refused."""
    if selection.kinds != ("corpus",):
        raise ValueError(
            "sparsify runs the model on tokens: export the corpus (kinds=('corpus',)), not stored activations"
        )
    check_sparsify_version()
    out = Path(out_path)
    if out.suffix != ".bin":
        raise ValueError(f"{out}: sparsify reads a token memmap only from a path ending in .bin")
    ((_, store, ids),) = selection.sources()
    if not all(store.has_token_ids):
        raise ValueError(
            f"{store.dir} was written without token ids: recollect the corpus (notebook 02) to export it"
        )
    run = read_run_json(selection.run_dir)
    ctx_len = ctx_len or int((run.get("corpus") or {}).get("seq_len") or 0)
    vocab = vocab_size or (run.get("corpus") or {}).get("vocab_size")
    if not ctx_len:
        raise ValueError("pass ctx_len: run.json records no corpus sequence length")
    if vocab is not None and int(vocab) > 2**16:
        raise ValueError(f"the vocabulary has {vocab} tokens; sparsify's memmap is uint16 (at most 65,536)")
    n_tokens = sum(store.entries[i][2] for i in ids)
    if n_tokens < ctx_len:
        raise ValueError(f"ctx_len {ctx_len} is larger than the {n_tokens} training tokens of the corpus")
    manifest = {
        "format": "sparsify uint16 token memmap",
        "sparsify_version": check_sparsify_version(),
        **selection.describe(),
        "ctx_len": ctx_len,
        "n_rows": n_tokens // ctx_len,
        "tokens_dropped": n_tokens % ctx_len,
    }
    side = out.with_suffix(".json")
    if out.exists() or side.exists():
        found = json.loads(side.read_text()) if side.exists() else None
        if found == manifest and out.exists():
            print(f"{out} already holds this export: reused")
            return manifest
        raise FileExistsError(
            f"{out} exists from another export or other settings ({found}); nothing was changed"
        )
    tokens = np.concatenate([store.token_ids_of(i)[:, 0] for i in ids])[: manifest["n_rows"] * ctx_len]
    if len(tokens) and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise ValueError(f"token ids up to {tokens.max()} do not fit sparsify's uint16 memmap")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, tokens.astype(np.uint16).tobytes())
    atomic_write_json(side, manifest)
    return manifest


@dataclasses.dataclass(frozen=True)
class SparsifySettings:
    """How sparsify trains (its own CLI's arguments): given whole to `sparsify_command` as
    `settings=SparsifySettings(...)` or as single fields (`n_gpus=8`, `k=64`)."""

    n_gpus: int = 1
    """GPUs on this machine; more than one launches through `torchrun`."""
    k: int = 32
    expansion_factor: int = 8
    batch_size: int = 8
    save_dir: str = "sparsify_out"
    run_name: str = "run"

    def __post_init__(self) -> None:
        if self.n_gpus < 1:
            raise ValueError(f"n_gpus must be at least 1, got {self.n_gpus}")

    def with_overrides(self, overrides: dict[str, Any]) -> SparsifySettings:
        """These settings with the fields named in `overrides` replaced (unknown names are refused)."""
        return override_fields(self, overrides, "sparsify settings")


def sparsify_command(
    model: str,
    tokens_path: str | os.PathLike,
    layers: list[int],
    *,
    ctx_len: int,
    settings: SparsifySettings | None = None,
    **overrides: Any,
) -> str:
    """The shell command that trains sparsify's TopK SAEs at `layers` (our `blocks.{i}.hook_resid_post` is
    the output of `transformer.h[i]`: sparsify's hookpoint `h.{i}` of the base model) on `n_gpus` GPUs,
    through `python -m helpers.saes.sparsify_main` (sparsify's own CLI once our nanochat class is
    registered, with bf16 off on GPUs without it, e.g. a T4). `settings` (default `SparsifySettings()`),
    or any of its fields as keywords."""
    s = (settings or SparsifySettings()).with_overrides(overrides)
    n_gpus, k, expansion_factor, batch_size = s.n_gpus, s.k, s.expansion_factor, s.batch_size
    save_dir, run_name = s.save_dir, s.run_name
    launch = "python -m" if n_gpus == 1 else f"torchrun --nproc_per_node {n_gpus} -m"
    hooks_ = " ".join(f"h.{i}" for i in layers)
    return (
        f"{launch} helpers.saes.sparsify_main {model} {tokens_path} --ctx_len {ctx_len} --hookpoints "
        f"{hooks_} --k {k} --expansion_factor {expansion_factor} --batch_size {batch_size} --loss_fn fvu "
        f"--save_dir {save_dir} --run_name {run_name} --log_to_wandb false"
    )


def import_sparsify_sae(folder: str | os.PathLike, selection: Selection, *, device: str = "cpu") -> str:
    """Bring a sparsify output folder for one hookpoint (`cfg.json` + `sae.safetensors`; TopK, no skip
    connection, not a transcoder) into `saes/<sae_id>/` as a TopK SAE in SAELens's format, evaluated as
    `import_saelens_sae` does; returns `{model}_topk-sparsify_L{layer}_{condition}`."""
    folder = Path(folder)
    check_sparsify_version()
    cfg = json.loads((folder / "cfg.json").read_text())
    if cfg.get("activation", "topk") != "topk" or cfg.get("transcode") or cfg.get("skip_connection"):
        raise ValueError(f"{folder}: only sparsify's plain TopK SAEs are imported (got {cfg})")
    t = load_file(str(folder / "sae.safetensors"))
    if set(t) != {"encoder.weight", "encoder.bias", "W_dec", "b_dec"}:
        raise ValueError(f"{folder}/sae.safetensors holds {sorted(t)}: not a sparsify 1.3 SAE")
    d_sae, d_in = t["encoder.weight"].shape
    # sparsify: top-k of relu(W (x - b_dec) + b), decoded as acts @ W_dec + b_dec:
    # SAELens's topk with W_enc = W^T
    tmp = Path(tempfile.mkdtemp(prefix="sparsify_import_"))
    save_file(
        {
            "W_enc": t["encoder.weight"].T.contiguous().float(),
            "b_enc": t["encoder.bias"].float(),
            "W_dec": t["W_dec"].float().contiguous(),
            "b_dec": t["b_dec"].float(),
        },
        str(tmp / SAE_WEIGHTS),
    )
    atomic_write_json(
        tmp / SAE_CFG,
        {
            "architecture": "topk",
            "d_in": d_in,
            "d_sae": d_sae,
            "k": int(cfg["k"]),
            "apply_b_dec_to_input": True,
            "normalize_activations": "none",
            "metadata": {"hook_name": hook_name(selection.layer)},
        },
    )
    try:
        return _import_loaded(
            load_sae(tmp), folder, selection, "sparsify", f"sparsify {check_sparsify_version()}", device
        )
    finally:
        shutil.rmtree(tmp)


__all__ = [
    "EXPORT_MANIFEST",
    "TESTED_SAELENS",
    "TESTED_SPARSIFY",
    "check_sparsify_version",
    "export_sparsify_tokens",
    "import_sparsify_sae",
    "sparsify_command",
    "SparsifySettings",
    "Selection",
    "check_saelens_version",
    "export_saelens_cache",
    "import_saelens_sae",
    "store_batches",
]
