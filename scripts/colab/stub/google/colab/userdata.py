"""Stand-in for `google.colab.userdata` (the secrets panel): secret NAME is `$COLAB_SECRET_NAME`.

The rehearsal gives secrets this way, not as plain environment variables, so the package's
Colab-secrets branch is the one that finds them. Values are never recorded.
"""

from __future__ import annotations

import os

from google.colab._log import record


class SecretNotFoundError(Exception):
    """Colab's error for a secret that does not exist."""


class NotebookAccessError(Exception):
    """Colab's error for a secret this notebook may not read."""


class TimeoutException(Exception):
    """Colab's error when the secrets panel does not answer."""


def get(key: str) -> str:
    value = os.environ.get(f"COLAB_SECRET_{key}")
    record("userdata.get", name=key, found=value is not None)
    if value is None:
        raise SecretNotFoundError(f"Secret {key} does not exist.")
    return value
