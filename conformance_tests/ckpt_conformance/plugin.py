"""pytest plugin (``pytest11`` entry point): the ``--ckpt-root`` option.

``pytest --pyargs ckpt_conformance --ckpt-root s3://bucket/some/prefix`` runs the whole
suite against whatever backend serves that URL.
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("ckpt", "ckpt backend conformance suite")
    group.addoption(
        "--ckpt-root",
        action="store",
        default=None,
        help="Root URL under which the ckpt conformance suite creates its test directories.",
    )
