"""Stand-in for `google.colab.drive`: a "Drive" that is a local folder."""

from __future__ import annotations

import os
from pathlib import Path

from google.colab._log import record

_mounted: list[str] = []


def _first_missing(path: Path) -> Path | None:
    """The highest folder of `path` that does not exist yet (what mounting creates), or None."""
    missing = None
    for p in [path, *path.parents]:
        if p.exists():
            break
        missing = p
    return missing


def mount(
    mountpoint: str, force_remount: bool = False, timeout_ms: int = 120000, readonly: bool = False
) -> None:
    """Create `<mountpoint>/MyDrive`, as Colab's mount makes it appear.

    The rehearsal's Drive lives under `$NB_DRIVE_ROOT`; a mount elsewhere (a package that ignores
    NB_DRIVE_ROOT) still works, as Colab's would, and is recorded with the folder it created so the
    rehearsal can report it and remove it.
    """
    path = Path(mountpoint).expanduser()
    if str(path) in _mounted and not force_remount:
        print(
            f"Drive already mounted at {mountpoint}; to attempt to forcibly remount, call "
            f'drive.mount("{mountpoint}", force_remount=True).'
        )
        return
    created = _first_missing(path / "MyDrive")
    (path / "MyDrive").mkdir(parents=True, exist_ok=True)
    _mounted.append(str(path))
    root = os.environ.get("NB_DRIVE_ROOT")
    record(
        "drive.mount",
        path=str(path),
        expected=root,
        created=str(created) if created else None,
        readonly=readonly,
    )
    print(f"Mounted at {mountpoint}")


def flush_and_unmount(timeout_ms: int = 86400000) -> None:
    """Colab's synchronous flush of pending Drive writes; here the files are already on disk."""
    record("drive.flush_and_unmount", mounted=list(_mounted))
    _mounted.clear()
    print("All changes made in this colab session should now be visible in Drive.")
