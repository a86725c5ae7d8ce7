"""Credentials out of everything written or printed (``redact.py``)."""

import pytest

from dilemma.config import load_config
from dilemma.redact import redact, redacted


@pytest.mark.parametrize(
    "text,expected",
    [
        ("http://user:password@host:5000", "http://host:5000"),  # MLflow's basic-auth form
        ("https://token@host/api", "https://host/api"),  # a user name alone is a credential too
        ("failed (https://a:b@h/x?token=abc&run=1&api_key=zz)", "failed (https://h/x?token=***&run=1&api_key=***)"),
        ("url: /?token=t0k/api/2.0 (Caused by", "url: /?token=*** (Caused by"),  # a library quoting the path
        ("'http://h/?sig=abc' is neither", "'http://h/?sig=***' is neither"),
        ("sqlite:///mlflow.db", "sqlite:///mlflow.db"),
        ("file:./mlruns and k=20; p=0.2 lr 0.1", "file:./mlruns and k=20; p=0.2 lr 0.1"),
        ("user@example.org wrote", "user@example.org wrote"),  # not a URI
    ],
)
def test_redact_removes_user_info_and_secret_query_values_only(text, expected):
    assert redact(text) == expected


def test_a_config_as_written_holds_no_credentials_but_the_run_keeps_them():
    cfg = load_config(None, ["train.tracking.tracking_uri=http://u:pw@host:5000/?token=t"])
    assert cfg.to_dict()["train"]["tracking"]["tracking_uri"] == "http://host:5000/?token=***"
    assert cfg.train.tracking.tracking_uri == "http://u:pw@host:5000/?token=t"  # for this process's connection
    assert redacted(["dilemma", "--set", "x=http://u:pw@h"]) == ["dilemma", "--set", "x=http://h"]
