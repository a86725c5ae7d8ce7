"""Credentials are never written down or printed: a URI's user-info (``user:password@``) and the
values of credential-looking query parameters (``?token=...``) are removed from every config,
provenance record, checkpoint, tracker record and message.

The trackers read credentials from their own environment variables instead (MLflow:
``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``; W&B: ``WANDB_API_KEY``), which never
reach a run folder.
"""

from __future__ import annotations

import re

URI = re.compile(r"[a-z][a-z0-9+.\-]*://[^\s'\"<>]+", re.IGNORECASE)
USER_INFO = re.compile(r"^([a-z][a-z0-9+.\-]*://)[^/?#]*@", re.IGNORECASE)
QUERY_VALUE = re.compile(r"([?&;])([^=&;#\s]+)=([^&;#)\]\s'\"]*)")
SECRET_NAME = re.compile(r"pass|pwd|token|secret|key|auth|sig|credential|session", re.IGNORECASE)
HIDDEN = "***"


def _hide_value(found: re.Match) -> str:
    name, value = found.group(2), found.group(3)
    return f"{found.group(1)}{name}={HIDDEN}" if SECRET_NAME.search(name) and value else found.group(0)


def redact(text: str) -> str:
    """``text`` with every URI's user-info removed (the user name is a credential too) and the
    values of credential-looking query parameters hidden, also where a library quotes a URL's
    path and query without its host (``url: /?token=...``)."""
    if "://" in text:
        text = URI.sub(lambda found: USER_INFO.sub(r"\1", found.group(0)), text)
    return QUERY_VALUE.sub(_hide_value, text) if "=" in text else text


def redacted(value):
    """A config, record or argument list (dicts, lists, tuples, strings) with every string redacted."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {key: redacted(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redacted(item) for item in value)
    return value
