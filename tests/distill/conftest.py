"""Fixtures shared by the distillation tests: an 8-clip corpus and a target store for it
(module-scoped: each test module gets its own)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.distill.test_label import make_corpus
from tests.distill.test_lightning import make_store


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"), clips=8)


@pytest.fixture(scope="module")
def store(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_store(corpus, tmp_path_factory.mktemp("targets") / "store")
