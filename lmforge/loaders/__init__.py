"""Batch loaders behind one interface: iterate (x, y) int64 (B, T) tensors; `state_dict()`,
`load_state_dict()`, `close()` (and `with`).

`make_loader` picks one from the recipe's `data.loader`: `memmap` reads the shards; `naive`,
`workers` and `ring` tokenize the raw source on the fly (streaming mode, no tokenize step). In
streaming mode the val split is tokenized once, in this process, into memory (at most
`data.val_tokens` tokens, from the start of the split `sources.iter_split` defines) and served by a
MemmapLoader over that array, so random and sequential (final, every token once) evaluation work as
with shards.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from lmforge.config import Recipe
    from lmforge.tokenizer import Tokenizer

STREAMING = ("naive", "workers", "ring")


def make_loader(recipe: Recipe, split: str, *, batch_size: int, seq_len: int, seed: int, rank: int = 0,
                world_size: int = 1, device: str | torch.device = "cpu", mode: str = "random",
                stride: int | None = None, tokenizer: Tokenizer | None = None) -> Any:
    """The loader `recipe.data.loader` names, for `split` ("train" | "val").

    `mode="sequential"` (evaluation, every window once; `stride` as in MemmapLoader) is served by a
    MemmapLoader in every case. `tokenizer` saves loading `recipe.tokenizer.dir` again in streaming mode.
    """
    from lmforge.loaders.memmap import MemmapLoader

    d = recipe.data
    common = dict(seed=seed, rank=rank, world_size=world_size, device=device, mode=mode, stride=stride)
    if d.loader == "memmap":
        return MemmapLoader(d.shards_dir, split, batch_size, seq_len, align=d.window_align, sampling=d.sampling,
                            resident=d.device_resident and split == "train" and mode == "random",
                            resident_share=d.resident_share, resident_parts=d.resident_parts, **common)
    if d.loader not in STREAMING:
        raise ValueError(f"unknown data.loader {d.loader!r}")
    if tokenizer is None:
        from lmforge.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(recipe.tokenizer.dir)
    if split == "val" or mode == "sequential":
        tokens, starts = split_tokens(recipe, split, tokenizer, d.val_tokens)
        return MemmapLoader(None, split, batch_size, seq_len, tokens=[tokens], doc_starts=starts, **common)
    return streaming_loader(recipe, split, tokenizer, batch_size=batch_size, seq_len=seq_len, seed=seed,
                            rank=rank, world_size=world_size, device=device)


def streaming_loader(recipe: Recipe, split: str, tokenizer: Tokenizer, *, batch_size: int, seq_len: int,
                     seed: int, rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu",
                     kind: str | None = None, chunk_bytes: int | None = None) -> Any:
    """A streaming loader (`kind`, default `recipe.data.loader`) over the raw source's `split`."""
    from lmforge.loaders.plan import build_plan, direct_files, temp_dir
    from lmforge.loaders.ring import RingLoader
    from lmforge.loaders.streaming import NaiveLoader
    from lmforge.loaders.workers import WorkersLoader

    d = recipe.data
    kind = kind or d.loader
    classes = {"naive": NaiveLoader, "workers": WorkersLoader, "ring": RingLoader}
    tmp = temp_dir() if direct_files(d) is None else None  # other sources are written out as JSONL first
    plan = build_plan(d, split, world_size=world_size, lanes=d.loader_workers, chunk_bytes=chunk_bytes,
                      tmp_dir=tmp.name if tmp else None)
    loader = classes[kind](plan, tokenizer, batch_size, seq_len, seed=seed, rank=rank, world_size=world_size,
                           device=device, lanes=d.loader_workers, slots=d.loader_slots, epochs=d.epochs,
                           shuffle=d.shuffle, add_bos=recipe.tokenizer.add_bos)
    loader.keep_alive = tmp  # the written-out JSONL lives as long as the loader
    return loader


_CACHE: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}  # the periodic and the final evaluation share one


def split_tokens(recipe: Recipe, split: str, tokenizer: Tokenizer, limit: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The first `limit` tokens (0 = all) of a split as the shards would hold them, and where docs start."""
    from lmforge.config import section_hash
    from lmforge.sources import source_fingerprint

    key = (section_hash(recipe.data), source_fingerprint(recipe.data), recipe.tokenizer.add_bos, split,
           tokenizer.fingerprint, limit)
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = _split_tokens(recipe, split, tokenizer, limit)
    return _CACHE[key]


def _split_tokens(recipe: Recipe, split: str, tokenizer: Tokenizer, limit: int) -> tuple[np.ndarray, np.ndarray]:
    from lmforge.loaders.plan import build_plan, direct_files
    from lmforge.loaders.streaming import Lane, make_encoder
    from lmforge.shards import dtype_for
    from lmforge.sources import iter_split

    encode = make_encoder(tokenizer)
    bos = tokenizer.bos_id if recipe.tokenizer.add_bos else None
    if direct_files(recipe.data) is not None:  # read the split's byte ranges only
        plan = build_plan(recipe.data, split)
        lane = Lane(plan, encode, bos, tokenizer.eos_id, lane=0, lanes=1, rank=0, world_size=1, seed=0,
                    shuffle=False, epochs=1)
        groups = lane.groups()
    else:
        groups = (_document(encode(text), bos, tokenizer.eos_id) for text in iter_split(recipe.data, split))
    parts, starts, n = [], [], 0
    for tokens, doc_starts in groups:
        parts.append(tokens)
        starts.append(doc_starts + n)
        n += len(tokens)
        if limit and n >= limit:
            break
    tokens = np.concatenate(parts)[:limit or None] if parts else np.zeros(0, dtype=np.int64)
    starts_all = np.concatenate(starts) if starts else np.zeros(0, dtype=np.int64)
    return tokens.astype(dtype_for(tokenizer.vocab_size)), starts_all[starts_all < len(tokens)]


def _document(ids: np.ndarray, bos: int | None, eos: int) -> tuple[np.ndarray, np.ndarray]:
    head = [bos] if bos is not None else []
    return np.concatenate([np.asarray(head, dtype=np.int64), ids, [eos]]), np.zeros(1, dtype=np.int64)


def is_streaming(recipe: Recipe) -> bool:
    return recipe.data.loader in STREAMING

