"""Shared fixtures: where the real UT1 data lives, and temporary folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FILTERD_SHARED_DATA", REPO.parent / "shared" / "data"))
UT1 = SHARED_DATA / "ut1" / "blacklists"


@pytest.fixture(scope="session")
def ut1() -> Path:
    """The UT1 blacklists folder (../shared/data/ut1/blacklists); the real-data tests need it."""
    if not UT1.is_dir():
        pytest.fail(f"real data missing: {UT1} (set FILTERD_SHARED_DATA)")
    return UT1
