"""Stand-in for `google.colab.files`: a download is recorded, an upload is impossible without a browser."""

from __future__ import annotations

import os

from google.colab._log import record


def download(filename: str) -> None:
    if not os.path.exists(filename):
        raise FileNotFoundError(f"Cannot find file: {filename}")
    record("files.download", path=os.path.abspath(filename))
    print(f"(rehearsal) download offered: {filename}")


def upload(target_dir: str = ""):
    raise RuntimeError("google.colab.files.upload needs Colab's browser front end (rehearsal stand-in)")
