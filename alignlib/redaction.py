"""Secrets from the environment never reach a manifest or a log line.

Tokens and keys reach a job through environment variables (HF_TOKEN, AWS_SECRET_ACCESS_KEY,
WANDB_API_KEY, RAY_AUTH_TOKEN, ...; on Kubernetes from Secrets, by reference). alignlib never
writes the environment anywhere, but an error message, a path or a URL can carry a value by
accident; `redact` masks the value of every variable whose name looks secret in text alignlib
writes: `raydata.log` lines and stage manifests.

    redact("pulling with hf_abc123...")   # -> "pulling with ***" when HF_TOKEN=hf_abc123...
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping

MASK = "***"
SECRET_NAME = re.compile(r"TOKEN|SECRET|KEY|PASSWORD|PASSWD|CREDENTIAL|AUTH", re.IGNORECASE)
# Shorter values are not masked: a flag like RAY_AUTH_MODE=token would otherwise blank every "token" in a log.
MIN_SECRET_LENGTH = 8


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of secret-looking variables, longest first (so a secret containing another is masked whole)."""
    variables = os.environ if environ is None else environ
    values = {v for k, v in variables.items() if SECRET_NAME.search(k) and len(v) >= MIN_SECRET_LENGTH}
    return sorted(values, key=len, reverse=True)


def redact(text: str, environ: Mapping[str, str] | None = None) -> str:
    """`text` with each secret value masked, also in its JSON-escaped form (as a manifest writes it)."""
    for value in secret_values(environ):
        text = text.replace(value, MASK)
        escaped = json.dumps(value)[1:-1]
        if escaped != value:
            text = text.replace(escaped, MASK)
    return text
