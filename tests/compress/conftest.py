"""Tiny models for the compression tests: each technique runs on them in seconds."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_digits():
    from aidc.compress.cases import DigitsCase

    return DigitsCase(hidden=(256, 256), epochs=8, seed=0)


@pytest.fixture(scope="session")
def tiny_bert():
    from aidc.compress.cases import MiniLMCase

    return MiniLMCase.tiny(seed=0)
