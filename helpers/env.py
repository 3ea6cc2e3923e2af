"""Where the notebook runs: Colab or not, device and dtype, Drive, secrets, smoke mode, the run folder.

`setup()` is the first call of every notebook. It prints what a researcher needs to know before
spending a free T4 session (versions, GPU, RAM, disk, run folder) and returns an `Env` that the
later cells pass around. Everything that depends on the machine is decided here, once.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch

from helpers.release import INSTALL_URL, __version__

DEFAULT_PROJECT = "deception-sae-lab"
SECRET_NAMES = ("GEMINI_API_KEY", "GOOGLE_API_KEY", "HF_TOKEN")


class NotebookError(RuntimeError):
    """A problem the researcher must fix, shown in a notebook as its message alone (no traceback).

    IPython renders an exception through `_render_traceback_` when it has one; the message already names
    the problem and the fix, so the stack would only hide it.
    """

    def _render_traceback_(self) -> list[str]:
        return [f"{type(self).__name__}: {self}"]


def drive_root() -> Path:
    """Where Colab mounts Google Drive: /content/drive (`NB_DRIVE_ROOT` moves it, for the Colab rehearsal)."""
    return Path(os.environ.get("NB_DRIVE_ROOT") or "/content/drive")


def drive_home() -> Path:
    """MyDrive inside the mounted Drive."""
    return drive_root() / "MyDrive"


@dataclass
class Env:
    """What `setup()` found. Pass `env.device` and `env.run_dir` to later calls."""

    in_colab: bool
    device: str
    """"cuda" or "cpu"."""
    gpu_name: str | None
    compute_capability: tuple[int, int] | None
    """(major, minor) of the GPU, e.g. (7, 5) for a T4; None on CPU."""
    runs_root: Path
    """Run folders live here (`NB_RUN_DIR` overrides the run folder itself)."""
    cache_dir: Path
    """Converted checkpoints live here: on Drive when mounted, so the next Colab session reuses them."""
    drive_mounted: bool
    smoke: bool
    """True when NB_SMOKE=1: notebooks swap in the offline model, tiny data and few steps."""

    def run_folder(self, run_name: str) -> Path:
        """The run folder for `run_name` (created), printed so the researcher knows where results go."""
        path = resolve_run_dir(run_name, runs_root=self.runs_root)
        print(f"run folder: {path}" + (" (Google Drive)" if self.drive_mounted else ""))
        return path


def in_colab() -> bool:
    return "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in os.environ


def is_smoke() -> bool:
    return os.environ.get("NB_SMOKE", "0") not in ("", "0", "false", "False")


def pick_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def choose_dtype(device: str, family: str, compute_capability: tuple[int, int] | None = None) -> torch.dtype:
    """The dtype rule of DESIGN.md §5.

    - CPU: fp32 (bf16 matmuls on CPU are slow and fp16 is unsupported for many ops).
    - CUDA with compute capability >= 8 (A100, L4, H100): bf16.
    - Older CUDA (a T4 is 7.5): fp32 for nanochat, whose relu² MLP overflows fp16; fp16 for other
      families, which `load_model` then verifies finite on a probe prompt (falling back to fp32 if not).
    `torch.cuda.is_bf16_supported()` is deliberately not consulted: it says True on a T4, where bf16
    is emulated and slow.
    """
    if device == "cpu":
        return torch.float32
    if device != "cuda":
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
    if compute_capability is None:
        compute_capability = torch.cuda.get_device_capability()
    if compute_capability[0] >= 8:
        return torch.bfloat16
    return torch.float32 if family == "nanochat" else torch.float16


def get_secret(name: str) -> str | None:
    """A secret from the environment, then from Colab's secrets panel; None when absent.

    The value is never printed or written anywhere by this package.
    """
    value = os.environ.get(name)
    if value:
        return value
    if not in_colab():
        return None
    try:
        from google.colab import userdata  # type: ignore[import-not-found]
    except ImportError:
        return None
    try:
        return userdata.get(name)
    except Exception as err:  # noqa: BLE001 - Colab raises its own SecretNotFoundError / NotebookAccessError
        kind = type(err).__name__
        if kind == "SecretNotFoundError":
            return None
        if kind == "NotebookAccessError":
            _warn_once(
                name,
                f"Colab has a secret {name}, but this notebook may not read it: open the "
                f"key icon in the left bar and switch on 'Notebook access' for {name}, then "
                "run this cell again. Going on without it.",
            )
            return None
        if kind == "TimeoutException":
            _warn_once(
                name, f"Colab did not answer the request for the secret {name} in time; going on without it."
            )
            return None
        raise


_WARNED: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        print(message)


def mount_drive() -> Path:
    """Mount Google Drive at /content/drive once; return MyDrive. Only in Colab."""
    home = drive_home()
    if home.is_dir():
        return home
    if not in_colab():
        raise NotebookError(
            "Google Drive can only be mounted inside Colab. Outside Colab, set NB_RUN_DIR to a local folder "
            "or call setup(use_drive=False) to use ./runs/<run_name>."
        )
    from google.colab import drive  # type: ignore[import-not-found]

    try:
        drive.mount(str(drive_root()))
    except Exception as err:  # noqa: BLE001 - Colab raises MessageError / ValueError with its own text
        raise NotebookError(
            f"Google Drive was not mounted ({type(err).__name__}: {err}). Run this cell again and accept "
            "the Drive permission prompt, or call helpers.setup(use_drive=False, ...) to keep results in "
            "this Colab VM only (they are lost when the runtime is recycled)."
        ) from None
    if not home.is_dir():
        raise NotebookError(
            f"Drive mount finished but {home} does not exist. Run this cell again and accept the Drive "
            "permission prompt, or call helpers.setup(use_drive=False, ...) to keep results in the Colab VM."
        )
    return home


def resolve_runs_root(project: str = DEFAULT_PROJECT, drive_mounted: bool = False) -> Path:
    """`MyDrive/<project>/runs` on Drive, else `./runs`."""
    return (drive_home() / project / "runs") if drive_mounted else Path("runs").resolve()


def resolve_run_dir(run_name: str, runs_root: Path | None = None) -> Path:
    """`NB_RUN_DIR` if set, else `<runs_root>/<run_name>` (default root: `./runs`). Created if missing."""
    if not run_name or "/" in run_name or run_name in (".", ".."):
        raise ValueError(f"run_name must be a plain folder name like 'd32_mixed', got {run_name!r}")
    override = os.environ.get("NB_RUN_DIR")
    if override:
        path = Path(override).expanduser()
        if str(path).startswith(str(drive_root())) and not drive_home().is_dir():
            raise NotebookError(
                f"NB_RUN_DIR={path} is on Google Drive but Drive is not mounted. "
                "Call setup(use_drive=True) in Colab, or point NB_RUN_DIR at a local folder."
            )
    else:
        path = (runs_root or resolve_runs_root()) / run_name
    path = path.resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def resolve_cache_dir(project: str = DEFAULT_PROJECT, drive_mounted: bool = False) -> Path:
    """`NB_CACHE_DIR` if set; else `MyDrive/<project>/cache` on Drive; else `~/.cache/<project>`."""
    if override := os.environ.get("NB_CACHE_DIR"):
        path = Path(override).expanduser()
    elif drive_mounted:
        path = drive_home() / project / "cache"
    else:
        path = Path.home() / ".cache" / project
    path.mkdir(parents=True, exist_ok=True)
    return path


def smoke_overrides(namespace: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """When NB_SMOKE=1, replace parameters in `namespace` (a notebook's `globals()`) and announce it.

    Every key must already be a parameter: a typo fails loudly instead of silently doing nothing.
    Returns the overrides applied (empty when not in smoke mode).
    """
    unknown = sorted(k for k in overrides if k not in namespace)
    if unknown:
        raise KeyError(f"smoke_overrides got {unknown}, which are not parameters of this notebook")
    if not is_smoke():
        return {}
    namespace.update(overrides)
    print("NB_SMOKE=1: smoke overrides applied ->", ", ".join(f"{k}={v!r}" for k, v in overrides.items()))
    return dict(overrides)


def git_ref() -> str | None:
    """The commit this package was installed from: a git checkout's HEAD, else None."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def setup(
    *,
    use_drive: bool = True,
    project: str = DEFAULT_PROJECT,
    quiet: bool = False,
    notebook_version: str | None = None,
) -> Env:
    """Detect the machine, mount Drive (in Colab, when asked), resolve where runs go, print a summary.

    `notebook_version` is the release the calling notebook was written for (its install cell passes it):
    an installed package of another version stops here with the fix, before anything runs on a mismatch.
    The run folder itself comes from `env.run_folder(RUN_NAME)` once the parameters cell has run.
    """
    if notebook_version is not None and notebook_version != __version__:
        raise NotebookError(
            f"this notebook is for helpers {notebook_version}, but helpers {__version__} is installed in "
            "this runtime. Fix: Runtime > Disconnect and delete runtime, then Run all again (the first cell "
            f"installs {notebook_version}); or run  !pip install --force-reinstall --no-deps "
            f"{INSTALL_URL.replace(__version__, notebook_version)}  and restart the session."
        )

    colab = in_colab()
    drive_ok = False
    if use_drive and colab and not os.environ.get("NB_RUN_DIR"):
        mount_drive()
        drive_ok = True
    elif use_drive and not colab and not quiet:
        print("Not in Colab: Drive is not mounted; results go to a local run folder.")
    device = pick_device()
    gpu_name = capability = None
    if device == "cuda":
        gpu_name = torch.cuda.get_device_name()
        capability = torch.cuda.get_device_capability()
    runs_root = resolve_runs_root(project, drive_ok)
    cache_dir = resolve_cache_dir(project, drive_ok)
    env = Env(colab, device, gpu_name, capability, runs_root, cache_dir, drive_ok, is_smoke())
    if not quiet:
        print_summary(env, __version__)
    return env


def _existing(path: Path) -> Path:
    """`path`, or its nearest existing parent (a run folder is created only when a notebook names it)."""
    return next((p for p in (path, *path.parents) if p.exists()), Path.cwd())


def print_summary(env: Env, version: str) -> None:
    import transformers

    mem = psutil.virtual_memory()
    runs = Path(os.environ.get("NB_RUN_DIR") or env.runs_root).expanduser()
    disk = shutil.disk_usage(_existing(runs))  # what fills up: activations, SAEs, checkpoints
    cache_disk = shutil.disk_usage(env.cache_dir)
    gpu = (
        f"{env.gpu_name} (compute capability {env.compute_capability[0]}.{env.compute_capability[1]})"
        if (env.gpu_name and env.compute_capability)
        else "none (CPU only: correct but slow; in Colab pick Runtime > Change runtime type > T4 GPU)"
    )
    lines = [
        f"helpers {version}" + (f" (git {ref})" if (ref := git_ref()) else ""),
        f"python {sys.version.split()[0]}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}",
        f"colab: {env.in_colab}, smoke mode: {env.smoke}",
        f"device: {env.device}; GPU: {gpu}",
        f"RAM: {mem.total / 2**30:.1f} GiB total, {mem.available / 2**30:.1f} GiB free",
        f"disk free for the runs folder: {disk.free / 2**30:.1f} GiB",
        "runs folder: "
        + (os.environ.get("NB_RUN_DIR") or str(env.runs_root))
        + (" (Google Drive)" if env.drive_mounted else ""),
        f"model cache: {env.cache_dir} ({cache_disk.free / 2**30:.1f} GiB free there)",
        "secrets: " + ", ".join(f"{n} {'set' if get_secret(n) else 'missing'}" for n in SECRET_NAMES),
    ]
    print("\n".join(lines))
