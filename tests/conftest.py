"""Shared fixtures of ckpt's own tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ckpt_backend_local import LocalBackend
from ckpt_conformance.instrumented import InstrumentedBackend


@pytest.fixture
def backend() -> Iterator[InstrumentedBackend]:
    """The real local backend, every primitive passing through test hooks; gates held by a
    test are released at teardown."""
    b = InstrumentedBackend(LocalBackend())
    yield b
    b.release_all()
