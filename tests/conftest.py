"""Shared pytest configuration for ironsocket's tests."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "ktls: needs a kernel with kTLS; runs in the VM (tools/vm/ktls-vm)")
