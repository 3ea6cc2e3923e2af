"""Where the stand-in records what the notebooks asked of Colab (never a secret's value).

The Colab rehearsal sets `COLAB_STUB_LOG` to a JSONL file and reads it afterwards: which Drive paths
were mounted, which secrets were asked for and whether they existed, which files were offered for
download. Without the variable nothing is recorded.
"""

from __future__ import annotations

import json
import os
from typing import Any


def record(call: str, **fields: Any) -> None:
    path = os.environ.get("COLAB_STUB_LOG")
    if not path:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"call": call, **fields}) + "\n")
