"""Shared fixtures: a tiny BPE tokenizer (vocab 512) and shards, built once per session.

They come from the first SLICE_CHARS characters of the bundled Shakespeare, written to a text file
under pytest's temporary directory, and are built through `ensure_tokenizer`/`ensure_shards` with the
recipe that `tiny_recipe` returns, so calling those again with it finds everything up to date.
"""

from __future__ import annotations

import gzip
from importlib import resources
from pathlib import Path

import pytest

from lmforge.config import Recipe

SLICE_CHARS = 120_000


def _quiet(*_args: object) -> None:
    pass


@pytest.fixture(scope="session")
def shakespeare() -> str:
    """The whole bundled corpus."""
    data = (resources.files("lmforge.data") / "tinyshakespeare.txt.gz").read_bytes()
    return gzip.decompress(data).decode("utf-8")


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory, shakespeare: str) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    (root / "corpus.txt").write_text(shakespeare[:SLICE_CHARS], encoding="utf-8")
    return root


def _tiny_raw(root: Path) -> dict:
    return {
        "name": "tiny",
        "data": {"source": str(root / "corpus.txt"), "shards_dir": str(root / "shards"),
                 "shard_tokens": 16384, "workers": 1},
        "tokenizer": {"dir": str(root / "tokenizer"), "vocab_size": 512},
        "model": {"preset": "tiny"},
        "train": {"run_dir": str(root / "run")},
    }


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tiny_root: Path) -> Path:
    from lmforge.tokenizer import ensure_tokenizer

    recipe = Recipe.model_validate(_tiny_raw(tiny_root))
    ensure_tokenizer(recipe, log=_quiet)
    return Path(recipe.tokenizer.dir)


@pytest.fixture(scope="session")
def tiny_shards_dir(tiny_root: Path, tiny_tokenizer_dir: Path) -> Path:
    from lmforge.shards import ensure_shards
    from lmforge.tokenizer import Tokenizer

    recipe = Recipe.model_validate(_tiny_raw(tiny_root))
    return ensure_shards(recipe, Tokenizer.load(tiny_tokenizer_dir), log=_quiet)


@pytest.fixture
def tiny_recipe(tiny_root: Path, tiny_shards_dir: Path, tmp_path: Path) -> Recipe:
    """A fresh Recipe per test: the session's tokenizer and shards, model preset "tiny", run dir in tmp."""
    raw = _tiny_raw(tiny_root)
    raw["train"]["run_dir"] = str(tmp_path / "run")
    return Recipe.model_validate(raw)


@pytest.fixture(scope="session")
def tiny_base_recipe(tiny_root: Path, tiny_shards_dir: Path) -> Recipe:
    """Like `tiny_recipe` but shared by a whole module/session (copy it before changing it)."""
    return Recipe.model_validate(_tiny_raw(tiny_root))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`gpu` tests skip on a machine without CUDA, also when selected by name."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
