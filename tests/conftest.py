"""Shared fixtures and the collection guard."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")

# A run that collects fewer tests than this is broken (wrong path, import error hidden by a
# plugin, ...): fail loudly instead of passing with "no tests collected".
MIN_TESTS = 20


def pytest_collection_finish(session: pytest.Session) -> None:
    selected_all = not session.config.args or session.config.args == session.config.getini(
        "testpaths"
    )
    if selected_all and not session.config.option.keyword and len(session.items) < MIN_TESTS:
        raise pytest.UsageError(
            f"only {len(session.items)} tests collected (expected at least {MIN_TESTS}); "
            "the test suite is not being found."
        )


@pytest.fixture(autouse=True)
def _torch_threads():
    torch.set_num_threads(2)
    yield


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)
