"""Publish a run's SAEs to the Hugging Face Hub in the SAELens format, with a generated model card.

`publish_saes(run_dir, sae_ids, repo_id)`: each SAE's SAELens folder (cfg.json, sae_weights.safetensors,
and sparsity.safetensors / metrics.json when present) goes under a subfolder named by its sae_id, with a
model card (README.md: YAML front matter with `library_name: saelens`, the model, hook names, training
data and conditions, metrics, probe results, and how to load the SAEs with `sae_lens` and with
`helpers.saes.io.load_sae`). All files go up in ONE commit, so a failure never leaves a half-published
repo. `dry_run=True` writes exactly what would be uploaded to `run_dir/publish_dry_run/` and touches no
network. Everything that can be checked locally (the repo id's form, the SAE folders load, the token
exists) is checked before the first network call. Zipping the run folder is `helpers.publish.zip_run`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from helpers.env import get_secret
from helpers.release import GITHUB_REPO, INSTALL_URL, __version__
from helpers.run import (
    DRY_RUN_DIR,
    SAE_CFG,
    SAE_METRICS,
    SAE_SPARSITY,
    SAE_WEIGHTS,
    atomic_directory,
    completions_path,
    explorer_dir,
    features_path,
    model_record,
    neuronpedia_dir,
    probes_path,
    read_jsonl,
    sae_dir,
    saes_dir,
)
from helpers.saes.io import load_sae
from helpers.tables import value_ci

SAE_FILES = (SAE_CFG, SAE_WEIGHTS, SAE_SPARSITY, SAE_METRICS)
"""What goes up per SAE (the first two are required); never checkpoint.pt."""


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]*[A-Za-z0-9]$")


CONDITIONS = {
    "mixed": "honest and deceptive completions",
    "deceptive_only": "deceptive completions only",
    "honest_only": "honest completions only",
}


def check_repo_id(repo_id: str) -> str:
    """`repo_id` if it is a valid `owner/name` model repo id, else a ValueError that shows the form."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    hint = "use 'owner/name', e.g. 'your-hf-username/deception-saes' (letters, digits, - _ .)"
    if not isinstance(repo_id, str) or not _REPO_ID.match(repo_id):
        raise ValueError(f"repo_id {repo_id!r} is not a Hugging Face repo id: {hint}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"repo_id {repo_id!r} is not valid ({err}): {hint}") from err
    return repo_id


def sae_files(run_dir: str | os.PathLike, sae_ids: list[str]) -> dict[str, Path]:
    """`{path in the repo: local file}` of the SAEs, each checked to load with `load_sae`."""
    saes = saes_dir(run_dir)
    available = sorted(p.name for p in saes.glob("*") if (p / SAE_CFG).exists()) if saes.is_dir() else []
    if not sae_ids or len(set(sae_ids)) != len(sae_ids):
        raise ValueError(
            f"sae_ids must be a non-empty list without repeats, got {sae_ids!r}; available: {available}"
        )
    files = {}
    for sid in sae_ids:
        folder = saes / sid
        if not (folder / SAE_CFG).exists() or not (folder / SAE_WEIGHTS).exists():
            raise FileNotFoundError(
                f"no trained SAE {sid!r} in {saes} (notebook 03 trains them); available: {available}"
            )
        load_sae(folder)  # tensors as SAELens expects them, or a clear error now rather than after upload
        files |= {f"{sid}/{name}": folder / name for name in SAE_FILES if (folder / name).exists()}
    return files


def explorer_files(run_dir: str | os.PathLike) -> dict[str, Path]:
    """`{path in the repo: local file}` of notebook 06's static explorer and Neuronpedia export, when
    present (the export's copy of the SAE weights is left out: the SAE folders go up already)."""
    out = {}
    for root in (explorer_dir(run_dir), neuronpedia_dir(run_dir)):
        for path in sorted(root.rglob("*")) if root.is_dir() else []:
            rel = path.relative_to(run_dir)
            if (
                path.is_file()
                and not path.name.endswith(".tmp")
                and rel.parts[:2] != ("neuronpedia", "saelens")
            ):
                out[rel.as_posix()] = path
    return out


def publish_saes(
    run_dir: str | os.PathLike,
    sae_ids: list[str],
    repo_id: str,
    *,
    token: str | None = None,
    dry_run: bool = False,
    private: bool = False,
) -> dict[str, Any]:
    """Publish SAEs of the run to `repo_id` in one commit (module doc). Token: `token`, else the
    HF_TOKEN secret (environment, then Colab secrets). Returns what was (or would be) uploaded."""
    repo_id = check_repo_id(repo_id)
    run_dir = Path(run_dir)
    files = sae_files(run_dir, list(sae_ids)) | explorer_files(run_dir)
    card = model_card(run_dir, list(sae_ids), repo_id)
    listing = sorted(["README.md", *files])
    if dry_run:
        out = run_dir / DRY_RUN_DIR
        # Built beside it, then renamed into place (replacing our own earlier dry run: the folder must hold
        # exactly this upload): never a half-written dry run.
        with atomic_directory(out) as tmp:
            (tmp / "README.md").write_text(card)
            for rel, src in files.items():
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, tmp / rel)
        print(f"dry run: nothing uploaded; {len(listing)} files that would go to {repo_id} are in {out}")
        return {"repo_id": repo_id, "dry_run": True, "uploaded": False, "folder": out, "files": listing}
    token = token or get_secret("HF_TOKEN")
    if not token:
        raise PermissionError(
            "no Hugging Face token, so nothing was uploaded: add a secret HF_TOKEN (a token with write "
            "access from huggingface.co/settings/tokens) in Colab's key panel or the environment, or pass "
            "token=...; publish_saes(..., dry_run=True) shows what would be uploaded"
        )
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token=token)
    ops = [CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode())]
    ops += [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(src)) for rel, src in files.items()]
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    commit = api.create_commit(
        repo_id, operations=ops, commit_message=f"Add {len(sae_ids)} SAE(s) from run {run_dir.name}"
    )
    url = getattr(commit, "commit_url", None) or f"https://huggingface.co/{repo_id}"
    print(f"published {len(listing)} files to https://huggingface.co/{repo_id} in one commit")
    return {"repo_id": repo_id, "dry_run": False, "uploaded": True, "url": url, "files": listing}


CARD = """\
---
{front_matter}
---
# Deception SAEs for `{spec}`

{n_saes} sparse autoencoder(s) trained on the residual stream of `{spec}` with \
[deception-sae-lab](https://github.com/{github_repo}) {version}, in the SAELens 6.x format \
(one folder per SAE). Activation normalisation is folded into the weights: they take raw residuals.

## SAEs

{sae_table}

`hook` is TransformerLens's name: `blocks.{{L}}.hook_resid_post` is the output of decoder layer L.

## Training data and conditions

{training}{probes}{features}{explorer}

## Load

With [SAELens](https://github.com/decoderesearch/SAELens) (6.x):

```python
# pip install sae-lens
from sae_lens import SAE

sae = SAE.from_pretrained(release="{repo_id}", sae_id="{first}")
# or from a local copy of the folder:
from huggingface_hub import snapshot_download

path = snapshot_download("{repo_id}", allow_patterns=["{first}/*"])
sae = SAE.load_from_disk(f"{{path}}/{first}")
```

With [helpers](https://github.com/{github_repo}):

```python
# pip install {install_url}
from helpers.saes.io import load_sae

loaded = load_sae("{repo_id}/{first}")  # .sae, .hook_name, .layer
acts, pre_acts = loaded.sae.encode(residual)  # residual: [..., d_in] at loaded.hook_name
```
"""
"""The model card (README.md on the Hub); `model_card` fills it. The optional sections below each start
with the blank line that separates them from the text before them, and are empty when the run lacks them."""

SAE_COLUMNS = (
    "folder (sae_id)",
    "architecture",
    "hook",
    "d_in -> d_sae",
    "condition",
    "training tokens",
    "explained variance",
    "L0",
    "dead %",
    "LM loss recovered",
)

TRAINING = (
    "Residual activations of the model's own completions: {n_completions} completions of {n_prompts} "
    "prompts ({sources}), labelled {labels} by {judges}."
)
RULES_NOTE = "Labels with source `rules` come from the offline regex judge, not from an LLM."
NO_TRAINING = "The run folder holds no completions.jsonl, so the training data is not described here."
CONDITION_LINE = "- `{condition}`: trained on the tokens of {description}"

PROBES = """

## Probes: deceptive vs honest completions (grouped CV, 95% CIs)

{probe_table}"""
PROBE_COLUMNS = ("sae_id", "layer", "balanced accuracy", "AUROC", "raw residual balanced accuracy", "verdict")

FEATURES = """

## Top features of `{sae_id}` (held-out Cohen's d, deceptive - honest)
{feature_lines}"""
"""`feature_lines`: one `FEATURE_LINE` per feature, each after a newline (the first makes the blank line)."""
FEATURE_LINE = "- latent {feature}: d = {d}, q = {q}; {explanation}"

EXPLORER = """

## Feature explorer

`explorer/index.html`: dashboards of every feature of the run's SAEs; download the repo and open it in a \
browser, no server needed. `neuronpedia/`: a Neuronpedia bulk-import export (its README says how to submit \
it)."""


def _f(v: Any, fmt: str = ".3f") -> str:
    return "-" if v is None else format(v, fmt)


def _ci(row: dict[str, Any], key: str, ci: str) -> str:
    return value_ci(row.get(key), row.get(ci), ".3f")


def _counts(c: Counter) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(c.items(), key=lambda kv: -kv[1]))


def _read(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def _table(columns: tuple[str, ...], rows: list[tuple[Any, ...]]) -> str:
    """A Markdown table: the header, its `|---|` line and one line per row."""

    def line(cells: tuple[Any, ...]) -> str:
        return "| " + " | ".join(map(str, cells)) + " |"

    return "\n".join([line(columns), "|" + "---|" * len(columns), *map(line, rows)])


def model_card(run_dir: str | os.PathLike, sae_ids: list[str], repo_id: str) -> str:
    """README.md for the Hub: `CARD` filled with the YAML front matter (library_name saelens, tags, base
    model) and the SAEs' model, hooks, training data and conditions, metrics, probe results, top features
    and loading code."""
    from huggingface_hub import ModelCardData

    run_dir = Path(run_dir)
    cfgs = {sid: json.loads((sae_dir(run_dir, sid) / SAE_CFG).read_text()) for sid in sae_ids}
    metrics = {sid: _read(sae_dir(run_dir, sid) / SAE_METRICS) or {} for sid in sae_ids}
    first_metadata = cfgs[sae_ids[0]].get("metadata") or {}
    spec = model_record(run_dir, required=False).get("spec") or first_metadata.get("model_name")
    hub_model = isinstance(spec, str) and re.fullmatch(r"[\w.\-]+/[\w.\-]+", spec) and not Path(spec).exists()
    archs = sorted({c["architecture"] for c in cfgs.values()})
    front_matter = ModelCardData(
        library_name="saelens",
        base_model=spec if hub_model else None,
        tags=["saelens", "sparse-autoencoder", "interpretability", "deception", *archs],
    ).to_yaml()
    return CARD.format(
        front_matter=front_matter,
        spec=spec,
        n_saes=len(sae_ids),
        github_repo=GITHUB_REPO,
        version=__version__,
        install_url=INSTALL_URL,
        sae_table=_table(SAE_COLUMNS, [_sae_row(sid, cfgs[sid], metrics[sid]) for sid in sae_ids]),
        training=_training(run_dir, metrics),
        probes=_probes(run_dir, sae_ids),
        features="".join(_features(run_dir, sid) for sid in sae_ids),
        explorer=EXPLORER if explorer_files(run_dir) else "",
        repo_id=repo_id,
        first=sae_ids[0],
    )


def _sae_row(sae_id: str, cfg: dict[str, Any], metrics: dict[str, Any]) -> tuple[str, ...]:
    act, meta = metrics.get("activations") or {}, cfg.get("metadata") or {}
    dead = None if act.get("dead_fraction") is None else 100 * act["dead_fraction"]
    return (
        f"`{sae_id}`",
        cfg["architecture"],
        f"`{meta.get('hook_name')}`",
        f"{cfg['d_in']} -> {cfg['d_sae']}",
        metrics.get("condition") or meta.get("condition") or "-",
        _f((metrics.get("training") or {}).get("tokens"), ","),
        _f(act.get("explained_variance")),
        _f(act.get("l0"), ".1f"),
        _f(dead, ".1f"),
        _f((metrics.get("lm") or {}).get("loss_recovered")),
    )


def _training(run_dir: Path, metrics: dict[str, dict[str, Any]]) -> str:
    """The completions the SAEs were trained on (counts by source, label and judge), then one line per
    training condition used."""
    records = read_jsonl(completions_path(run_dir))
    if records:
        judges = Counter(r.get("label_source") for r in records)
        sources = Counter(r.get("source") for r in records)
        lines = [
            TRAINING.format(
                n_completions=len(records),
                n_prompts=len({r["prompt_id"] for r in records}),
                sources=", ".join(f"{k}: {v}" for k, v in sorted(sources.items(), key=str)),
                labels=_counts(Counter(r.get("label") or "unlabelled" for r in records)),
                judges=_counts(judges),
            )
        ]
        if "rules" in judges:
            lines.append(RULES_NOTE)
    else:
        lines = [NO_TRAINING]
    used = sorted({str(m.get("condition")) for m in metrics.values() if m.get("condition") in CONDITIONS})
    lines += [CONDITION_LINE.format(condition=c, description=CONDITIONS[c]) for c in used]
    return "\n".join(lines)


def _probes(run_dir: Path, sae_ids: list[str]) -> str:
    """The probe section: each SAE's probe beside the raw-residual probe of its layer; empty without one."""
    probes = (_read(probes_path(run_dir)) or {}).get("rows", [])
    ours = [r for r in probes if r.get("kind") == "sae" and r.get("sae_id") in sae_ids]
    if not ours:
        return ""
    raw = {r["layer"]: r for r in probes if r.get("kind") == "raw"}
    rows = [
        (
            f"`{r['sae_id']}`",
            r["layer"],
            _ci(r, "balanced_accuracy", "ba_ci"),
            _ci(r, "auroc", "auroc_ci"),
            _ci(raw.get(r["layer"], {}), "balanced_accuracy", "ba_ci"),
            r.get("verdict", "-"),
        )
        for r in ours
    ]
    return PROBES.format(probe_table=_table(PROBE_COLUMNS, rows))


def _features(run_dir: Path, sae_id: str) -> str:
    """The top five features of one SAE by rank; empty when the run has no features file for it."""
    path = features_path(run_dir, sae_id)
    if not path.exists():
        return ""
    rows = sorted(read_jsonl(path), key=lambda r: r.get("rank") or 1e9)[:5]
    lines = [
        FEATURE_LINE.format(
            feature=r["feature"],
            d=_ci(r, "cohens_d", "d_ci"),
            q=_f(r.get("q_value"), ".3g"),
            explanation=r.get("explanation") or "not explained",
        )
        for r in rows
    ]
    return FEATURES.format(sae_id=sae_id, feature_lines="".join("\n" + line for line in lines))
