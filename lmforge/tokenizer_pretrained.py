"""Pretrained tokenizers: a tokenizer.json, a transformers directory or Hub name, a SentencePiece model.

All of them end up as a Hugging Face `tokenizers` model inside `Tokenizer` (kind "pretrained"), so
they encode in Rust, save as tokenizer.json and carry their own special tokens and roles.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from lmforge.config import TokenizerConfig
from lmforge.errors import ConfigError, DataError
from lmforge.tokenizer import Tokenizer, _hf_tokenizer


def load_pretrained(cfg: TokenizerConfig) -> Tokenizer:
    """A tokenizer.json (file or dir), a SentencePiece .model, a transformers dir, or a Hub name."""
    if not cfg.pretrained:
        raise ConfigError('tokenizer.pretrained: set a tokenizer.json path (or dir), a SentencePiece .model '
                          'or a Hub name for kind = "pretrained"')
    path = Path(cfg.pretrained).expanduser()
    if path.is_file() and path.suffix == ".model":
        return _sentencepiece(path)
    if path.is_dir() and not (path / "tokenizer.json").is_file():
        if (path / "tokenizer.model").is_file():
            return _sentencepiece(path / "tokenizer.model")
        return _transformers(str(path))
    if path.is_dir():
        path = path / "tokenizer.json"
    if path.is_file():
        return _hf_tokenizer(path)  # a pretrained tokenizer keeps its own special tokens
    if HUB_NAME.match(cfg.pretrained) and not cfg.pretrained.startswith((".", "~")):
        return _transformers(cfg.pretrained)
    raise DataError(f"tokenizer.pretrained: {path} not found")


HUB_NAME = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def _from_backend(tok: Any, source: str) -> Tokenizer:
    hf = tok.backend_tokenizer
    specials = {t.content: i for i, t in hf.get_added_tokens_decoder().items() if t.special}
    roles = {r: name for r in ("bos", "eos", "pad") if isinstance(name := getattr(tok, f"{r}_token", None), str)}
    return Tokenizer("pretrained", specials, hf=hf, roles=roles, meta={"pretrained": source})


def _transformers(name: str) -> Tokenizer:
    """Through transformers: a local tokenizer dir, or a Hub name when online (cached afterwards)."""
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(name)
    except Exception as err:  # OSError offline, ValueError for a model without a fast tokenizer, ...
        raise DataError(f"tokenizer.pretrained: cannot load {name!r} through transformers "
                        f"({type(err).__name__}: {str(err)[:300]}); offline, give a local path instead") from None
    if getattr(tok, "backend_tokenizer", None) is None:
        raise DataError(f"tokenizer.pretrained: {name!r} has no fast (tokenizers) version")
    return _from_backend(tok, name)


def _sentencepiece(path: Path) -> Tokenizer:
    """A SentencePiece model with Llama's conventions (<unk>, <s>, </s>; byte fallback), converted by
    transformers to a tokenizers model, so that it saves as tokenizer.json and encodes in Rust."""
    import shutil
    import tempfile

    try:
        from transformers import LlamaTokenizer
    except ImportError:
        raise DataError("SentencePiece .model files need transformers and sentencepiece installed") from None
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(path, Path(tmp) / "tokenizer.model")
        try:
            tok = LlamaTokenizer.from_pretrained(tmp)
        except Exception as err:  # sentencepiece raises RuntimeError for a file that is not a model
            raise DataError(f"tokenizer.pretrained: {path} is not a SentencePiece model ({err})") from None
    return _from_backend(tok, str(path))
