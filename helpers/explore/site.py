"""The static feature explorer: `explorer/index.html` plus its data, written into the run folder. It
opens from disk (Drive, a downloaded zip) with no server and no network: the page is one file with its
own CSS and JavaScript, and data arrive as `<script>` files (browsers refuse `fetch` of file:// URLs but
load scripts), each calling `explorerData(kind, key, data)`:

    explorer/index.html                       the app (static/index.html): table, search, feature pages
    explorer/data/saes.js                     the SAEs: facts, notes, where their data lie, and the
                                              release flag of an SAE trained by an older release
    explorer/data/{sae_id}/table.js           the feature table (one column array per field, all features)
    explorer/data/{sae_id}/pages_{k:04d}.js   feature pages k*CHUNK .. (k+1)*CHUNK-1, loaded on demand
    explorer/data/{sae_id}/text.js            per feature, the text of its top windows (completions and
                                              corpus): loaded when the table's search looks in window text
    explorer/data/{sae_id}/complete.json      written last: the build's settings (a rerun skips the SAE)

16k features stay fast: the first paint needs only table.js (a few MB of column arrays), the table
renders 200 rows at a time, a feature page loads one chunk of CHUNK pages, and text.js loads only for
a search in the windows' text. The density view (firing rates of all features) is drawn from table.js.
Each data file is written atomically; `complete.json` last, so an interrupted build is redone, never
trusted.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from helpers.explore.dashboards import SAEDashboards
from helpers.run import (
    SAE_METRICS,
    atomic_write_bytes,
    atomic_write_json,
    explorer_dir,
    jsonable,
    sae_dir,
    sae_release_flag,
)

CHUNK = 64
"""Feature pages per data file."""
DATA = "data"
COMPLETE = "complete.json"
TEXT = "text.js"


def _js(kind: str, key: str, data: Any) -> bytes:
    """A data file: the JSON on its own line between the call's head and tail (read back by `_read_js`).
    The pages hold Python numbers already; numpy scalars that slip through are converted by `jsonable`."""
    body = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"), default=jsonable)
    return f"explorerData({json.dumps(kind)}, {json.dumps(key)},\n{body}\n);\n".encode()


def _read_js(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8").split("\n")[1])


def explorer_path(run_dir: str | os.PathLike) -> Path:
    """The explorer's page: open it in a browser (from Drive or the unzipped run folder)."""
    return explorer_dir(run_dir) / "index.html"


def sae_data_dir(run_dir: str | os.PathLike, sae_id: str) -> Path:
    return explorer_dir(run_dir) / DATA / sae_id


def is_complete(run_dir: str | os.PathLike, sae_id: str, settings: dict[str, Any]) -> bool:
    """True when this SAE's data were fully written with the same `settings`."""
    path = sae_data_dir(run_dir, sae_id) / COMPLETE
    return path.exists() and json.loads(path.read_text()).get("settings") == jsonable(settings)


def write_sae_data(run_dir: str | os.PathLike, db: SAEDashboards, settings: dict[str, Any]) -> Path:
    """Write one SAE's table and pages (module doc); returns its data folder."""
    out = sae_data_dir(run_dir, db.sae_id)
    (out / COMPLETE).unlink(missing_ok=True)
    n_chunks = -(-db.d_sae // CHUNK)
    text = []
    for k in tqdm(range(n_chunks), desc=f"{db.sae_id}: feature pages", unit="chunk"):
        pages = {str(f): db.page(f) for f in range(k * CHUNK, min((k + 1) * CHUNK, db.d_sae))}
        atomic_write_bytes(out / f"pages_{k:04d}.js", _js("pages", f"{db.sae_id}/{k}", pages))
        text += [window_text(p) for p in pages.values()]
    atomic_write_bytes(out / TEXT, _js("text", db.sae_id, text))
    atomic_write_bytes(out / "table.js", _js("table", db.sae_id, db.table()))
    atomic_write_json(out / COMPLETE, {"info": db.info, "chunk": CHUNK, "settings": jsonable(settings)})
    return out


def window_text(page: dict[str, Any]) -> str:
    """What the table's text search looks in for a feature: its top windows (completions', then the
    corpus's), one per line, as the page shows them."""
    windows = page["top"] + (page.get("corpus") or {}).get("top", [])
    return "\n".join("".join(ex["tokens"]).replace("\n", " ") for ex in windows)


def sae_info(run_dir: str | os.PathLike, sae_id: str) -> dict[str, Any]:
    """The facts `write_sae_data` recorded for an SAE (its complete.json's `info`)."""
    path = sae_data_dir(run_dir, sae_id) / COMPLETE
    if not path.exists():
        raise FileNotFoundError(
            f"no complete explorer data for {sae_id} in {path.parent}: build_explorer first"
        )
    return json.loads(path.read_text())["info"]


def read_table(run_dir: str | os.PathLike, sae_id: str) -> dict[str, list[Any]]:
    return _read_js(sae_data_dir(run_dir, sae_id) / "table.js")


def iter_pages(run_dir: str | os.PathLike, sae_id: str) -> Iterator[dict[str, Any]]:
    """Every feature page of an SAE, in feature order, read back from its data files."""
    folder = sae_data_dir(run_dir, sae_id)
    sae_info(run_dir, sae_id)  # complete, or a clear error
    for path in sorted(folder.glob("pages_*.js")):
        yield from _read_js(path).values()


def read_page(run_dir: str | os.PathLike, sae_id: str, feature: int) -> dict[str, Any]:
    d_sae = int(sae_info(run_dir, sae_id)["d_sae"])
    if not 0 <= int(feature) < d_sae:
        raise IndexError(
            f"feature {feature} is out of range: {sae_id} has d_sae={d_sae} latents (0..{d_sae - 1})"
        )
    return _read_js(sae_data_dir(run_dir, sae_id) / f"pages_{int(feature) // CHUNK:04d}.js")[
        str(int(feature))
    ]


def write_site(run_dir: str | os.PathLike, *, title: str = "") -> Path:
    """index.html and data/saes.js listing every SAE with complete data; returns index.html's path.
    Each SAE's `release` is `run.sae_release_flag` ('' or e.g. 'older release 0.1.0', as on the
    leaderboard) for an SAE notebook 03 trained (one with metrics.json; '' for one brought from
    elsewhere): the page flags an SAE that an older release trained."""
    root = explorer_dir(run_dir)
    saes = []
    for path in sorted((root / DATA).glob(f"*/{COMPLETE}")):
        info = json.loads(path.read_text())["info"]
        trained_here = (sae_dir(run_dir, path.parent.name) / SAE_METRICS).exists()  # by notebook 03
        release = sae_release_flag(run_dir, path.parent.name) if trained_here else ""
        saes.append({**info, "chunk": CHUNK, "path": f"{DATA}/{path.parent.name}", "release": release})
    if not saes:
        raise FileNotFoundError(f"no SAE data under {root / DATA}: build_explorer writes them")
    meta = {"title": title or f"Feature explorer: {Path(run_dir).name}", "saes": saes}
    atomic_write_bytes(root / DATA / "saes.js", _js("saes", "", meta))
    html = resources.files("helpers.explore").joinpath("static/index.html").read_bytes()
    return atomic_write_bytes(explorer_path(run_dir), html)
