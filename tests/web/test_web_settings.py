"""ServiceSettings: validated when made, and the body limit each path gets."""

from __future__ import annotations

import pytest

from histolens.errors import ConfigError
from histolens.web.settings import ServiceSettings


def test_body_limits_follow_the_path():
    settings = ServiceSettings(max_upload_bytes=1000)
    assert settings.max_batch_bytes == 8000  # default: eight single uploads
    assert settings.body_limit_for("/v1/predict") == 1000
    assert settings.body_limit_for("/v1/predict/batch") == 8000
    assert settings.body_limit_for("/healthz") is None
    assert settings.body_limit_for("/static/app.js") is None
    assert ServiceSettings(max_batch_bytes=5).body_limit_for("/v1/predict/batch") == 5


def test_limits_are_what_clients_read():
    limits = ServiceSettings(max_queue=3, max_batch=1, batch_wait_ms=0.5).limits
    assert (limits.max_queue, limits.max_batch, limits.batch_wait_ms) == (3, 1, 0.5)


@pytest.mark.parametrize(
    "bad",
    [{"max_upload_bytes": 0}, {"max_queue": 0}, {"max_batch_files": 0}, {"batch_wait_ms": -1}],
)
def test_invalid_settings_name_the_rule(bad):
    with pytest.raises(ConfigError, match="must be at least 1, and batch_wait_ms at least 0"):
        ServiceSettings(**bad)
