"""What of ``data.creds`` may be written down (summary.json, logs, checkpoints): the key names, a file path and the
endpoint, never a key id, a secret or a token. Here, below sft.data, because the config's own ``to_dict`` redacts;
sft.data.creds resolves the credentials and uses the same rule."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: keys whose values are never written anywhere
SECRET_KEYS = ("aws_access_key_id", "aws_secret_access_key", "aws_session_token")
REDACTED = "<redacted>"


def redact(creds: Any) -> Any:
    """``data.creds`` as it may be written down: a file path as is, a mapping with every secret value replaced."""
    if isinstance(creds, Mapping):
        return {k: REDACTED if k in SECRET_KEYS else v for k, v in creds.items()}
    return creds
