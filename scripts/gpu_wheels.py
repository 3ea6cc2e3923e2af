"""Gather, here, what a lent GPU machine lacks for scripts/gpu_check.sh (the wheels, SmolLM2's config and
tokenizer), check that it travels, and print the one `device.run` call that runs the check there.

    python scripts/gpu_wheels.py                   # .gpu_carry/: CPython 3.12 wheels, for the device
    python scripts/gpu_wheels.py --python 3.11 --dest .gpu_carry311   # the same for a rehearsal here

The lent machines (the workplace's `device` tool: nvidia-h100-x1, nvidia-h200) reach no network. Their
image (/work/.library/device/KINDS.md, "Python packages already there", read 2026-11-17: `DEVICE_IMAGE`)
holds torch, transformers, numpy, scipy, scikit-learn and the rest of what the check's steps import, but
not pydantic, which the package's settings classes import. `WHEELS` names every distribution the steps
that can run there need and the image lacks (dependencies included: pip downloads with --no-deps, and
installs there with --no-index --no-deps); each is downloaded at the version installed here, the one CI
tests. tests/scripts/test_gpu_check.py checks the list against the steps' imports and the wheels'
metadata. The wheels go to `<dest>/wheels/`; `<dest>/smollm2-135m/` gets the offline model's config and
tokenizer without its weights (3.5 MB), from which the check builds a random-weight model of the same
shapes for the sampling and capture benchmarks. What needs the offline model itself (98 MB, over the
64 MiB carry limit) or SAELens (transformer-lens and wandb) is not carried: the check skips those steps.

What travels in a call is the checkout's tracked files and the untracked ones git does not ignore, plus
the carried paths, at most 64 MiB in all: the total is printed and checked (exit status 1 over it).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from scripts.gpu_check import SKELETON  # noqa: E402 - the folder name the check reads (stdlib-only module)

CARRY_LIMIT = 64 * 2**20
"""The device tool's limit on what travels in one call (repo + carried paths)."""

WHEELS = ("pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions")
"""Distributions the GPU check's steps import (directly or through the wheels' own requirements) that the
device image lacks, and typing-extensions, which it has at a version not known here while pydantic-core
needs a recent one (>= 4.14.1): the carried one (on PYTHONPATH, before the image's) is CI's."""

# The manylinux tags the device README's recipe names; pip matches each exactly.
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)

_IMAGE_LIST = """
    absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
    certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings
    cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils
    execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet
    httpcore httpx huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax
    jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning
    lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib
    mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
    networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc
    nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver
    nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13
    nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx
    optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker
    prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
    pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout
    pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
    scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools
    shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
    tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
    torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
    typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl
    zipp"""
DEVICE_IMAGE = frozenset(_IMAGE_LIST.split())
"""The device image's Python distributions (KINDS.md, 2026-11-17), names normalised (`canonical`)."""


def canonical(name: str) -> str:
    """A distribution's name as pip compares them: lower case, runs of -_. as one '-'."""
    return "-".join(name.lower().replace("_", "-").replace(".", "-").split("-"))


def pinned() -> list[str]:
    """`name==version` for each of WHEELS at the version installed here."""
    out = []
    for name in WHEELS:
        try:
            out.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            sys.exit(f"{name} is not installed here: install the package (pip install -e .) first")
    return out


def travelling_bytes(carried: list[Path]) -> int:
    """What one device call sends: tracked files and untracked ones git does not ignore, plus `carried`."""
    listed = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    files = [ROOT / name.decode() for name in listed if name]
    for folder in carried:
        files += [p for p in folder.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files if p.is_file() and not p.is_symlink())


def skeleton(folder: Path) -> None:
    """The offline model's converted folder without its weights (config, tokenizer, chat template)."""
    import helpers

    lm = helpers.load_model(helpers.OFFLINE_MODEL, device="cpu")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    for f in Path(lm.info.path).iterdir():
        if f.is_file() and f.suffix not in (".safetensors", ".bin", ".gguf"):
            shutil.copy(f, folder / f.name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python", default="3.12", help="the Python the wheels are for (the device's: 3.12)")
    ap.add_argument("--dest", default=".gpu_carry", help="folder under the repo root (git must ignore it)")
    ap.add_argument("--budget-s", type=int, default=480, help="GPU_CHECK_BUDGET_S of the printed call")
    args = ap.parse_args()
    carry = ROOT / args.dest
    ignored = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", str(carry / "x")]).returncode == 0
    if not ignored:
        sys.exit(f"{args.dest} is not ignored by git: add /{args.dest}/ to .gitignore, or it travels twice")
    dest = carry / "wheels"
    dest.mkdir(parents=True, exist_ok=True)
    skeleton(carry / SKELETON)
    want = pinned()
    # one version of each: a stale wheel of another version would stop the install on the device
    keep = {canonical(w.split("==")[0]) for w in want}
    for old in dest.glob("*.whl"):
        if canonical(old.name.split("-")[0]) in keep:
            old.unlink()
    platforms = [x for p in PLATFORMS for x in ("--platform", p)]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            args.python,
            "--implementation",
            "cp",
            *platforms,
            "-d",
            str(dest),
            *want,
        ],
        check=True,
    )
    wheels = sorted(p.name for p in dest.glob("*.whl"))
    total = travelling_bytes([carry])
    command = f"GPU_CHECK_BUDGET_S={args.budget_s} GPU_CHECK_CARRIED={args.dest} bash scripts/gpu_check.sh"
    call = {"command": command, "carry": [args.dest], "timeout_s": args.budget_s + 60}
    print(
        json.dumps(
            {
                "wheels": wheels,
                "wheels_mib": round(sum((dest / w).stat().st_size for w in wheels) / 2**20, 2),
                "travelling_mib": round(total / 2**20, 1),
                "limit_mib": 64,
            },
            indent=1,
        )
    )
    if total > CARRY_LIMIT:
        sys.exit(f"{total / 2**20:.1f} MiB would travel, over the 64 MiB limit: ignore or remove large files")
    if args.python == "3.12":
        print("the device call (kind left out: an H100 first):\n" + json.dumps(call))


if __name__ == "__main__":
    main()
