from __future__ import annotations

from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.errors import DataError
from lmforge.loaders.memmap import MemmapLoader
from lmforge.shards import open_split


def stream(shards_dir: Path, split: str) -> np.ndarray:
    return np.concatenate(open_split(shards_dir, split)).astype(np.int64)


def take(loader: MemmapLoader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(islice(iter(loader), n))


def test_random_shapes_and_shift(tiny_shards_dir: Path) -> None:
    loader = MemmapLoader(tiny_shards_dir, "train", 8, 32, seed=3)
    shards = [np.asarray(s) for s in open_split(tiny_shards_dir, "train")]
    for x, y in take(loader, 5):
        assert x.shape == y.shape == (8, 32) and x.dtype == y.dtype == torch.int64
        assert x.is_contiguous() and y.is_contiguous()
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row_x, row_y in zip(x.numpy(), y.numpy(), strict=True):
            window = np.concatenate([row_x, row_y[-1:]])
            assert any(_contains(s, window) for s in shards)  # a real window of one shard
    assert loader.num_tokens == sum(len(s) for s in shards)


def _contains(haystack: np.ndarray, needle: np.ndarray) -> bool:
    hits = np.nonzero(haystack[: len(haystack) - len(needle) + 1] == needle[0])[0]
    return any(np.array_equal(haystack[h:h + len(needle)], needle) for h in hits)


def test_random_determinism_and_ranks(tiny_shards_dir: Path) -> None:
    a = take(MemmapLoader(tiny_shards_dir, "train", 4, 16, seed=1), 3)
    b = take(MemmapLoader(tiny_shards_dir, "train", 4, 16, seed=1), 3)
    c = take(MemmapLoader(tiny_shards_dir, "train", 4, 16, seed=2), 3)
    r1 = take(MemmapLoader(tiny_shards_dir, "train", 4, 16, seed=1, rank=1, world_size=2), 3)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a, b, strict=True))
    assert not torch.equal(a[0][0], c[0][0])
    assert not torch.equal(a[0][0], r1[0][0])
    assert not torch.equal(a[0][0], a[1][0])  # batches differ from each other


def test_random_covers_all_shards(tiny_shards_dir: Path) -> None:
    shards = [np.asarray(s) for s in open_split(tiny_shards_dir, "train")]
    loader = MemmapLoader(tiny_shards_dir, "train", 64, 8, seed=0)
    x, y = next(iter(loader))
    found = {i for row_x, row_y in zip(x.numpy(), y.numpy(), strict=True)
             for i, s in enumerate(shards) if _contains(s, np.concatenate([row_x, row_y[-1:]]))}
    assert found == set(range(len(shards)))


def test_resume_random(tiny_shards_dir: Path) -> None:
    full = take(MemmapLoader(tiny_shards_dir, "train", 4, 16, seed=7, rank=1, world_size=2), 6)
    first = MemmapLoader(tiny_shards_dir, "train", 4, 16, seed=7, rank=1, world_size=2)
    take(first, 3)
    state = first.state_dict()
    resumed = MemmapLoader(tiny_shards_dir, "train", 4, 16, seed=0, rank=1, world_size=2)
    resumed.load_state_dict(state)
    rest = take(resumed, 3)
    for p, q in zip(full[3:], rest, strict=True):
        assert torch.equal(p[0], q[0]) and torch.equal(p[1], q[1])


def test_sequential_covers_each_token_once(tiny_shards_dir: Path) -> None:
    tokens = stream(tiny_shards_dir, "train")  # several shards: windows cross shard boundaries
    n, t = len(tokens), 32
    loader = MemmapLoader(tiny_shards_dir, "train", 5, t, mode="sequential")
    n_windows = -(-(n - 1) // t)
    assert len(loader) == -(-n_windows // 5)
    starts = [min(k * t, n - 1 - t) for k in range(n_windows)]  # the last one flush with the end
    batches = list(loader.iter_eval())
    assert len(batches) == len(loader)
    assert batches[-1][0].shape[0] == n_windows - 5 * (len(loader) - 1)  # the partial last batch is kept
    rows = [(x, y, m) for bx, by, bm in batches for x, y, m in zip(bx, by, bm, strict=True)]
    count = np.zeros(n, dtype=np.int64)
    for start, (x, y, m) in zip(starts, rows, strict=True):
        assert torch.equal(x, torch.from_numpy(tokens[start:start + t]))
        assert torch.equal(y, torch.from_numpy(tokens[start + 1:start + t + 1]))
        count[start + 1 + np.nonzero(m.numpy())[0]] += 1
    assert count[0] == 0 and (count[1:] == 1).all()  # every target token scored exactly once
    # the plain iterator gives the same windows, and a second pass starts over
    assert all(torch.equal(p[0], q[0]) for p, q in zip(loader, batches, strict=True))
    assert len(list(loader)) == len(loader)


def test_sequential_stride_mask(tiny_shards_dir: Path) -> None:
    tokens = stream(tiny_shards_dir, "val")
    n, t, s = len(tokens), 32, 16
    loader = MemmapLoader(tiny_shards_dir, "val", 4, t, mode="sequential", stride=s)
    windows = [(x, y, m) for bx, by, bm in loader.iter_eval() for x, y, m in zip(bx, by, bm, strict=True)]
    starts = list(range(0, n - 1 - t + 1, s))
    if starts[-1] + t < n - 1:
        starts.append(n - 1 - t)
    assert len(windows) == len(starts)
    scored = np.zeros(n, dtype=np.int64)
    for k, (start, (x, y, m)) in enumerate(zip(starts, windows, strict=True)):
        assert torch.equal(x, torch.from_numpy(tokens[start:start + t]))
        assert torch.equal(y, torch.from_numpy(tokens[start + 1:start + t + 1]))
        if k == 0:
            assert m.all()
        elif k < len(starts) - 1 or (n - 1 - t) % s == 0:
            assert not m[:t - s].any() and m[t - s:].all()  # only the last `stride` targets are new
        scored[start + 1 + np.nonzero(m.numpy())[0]] += 1
    assert (scored[1:] == 1).all()


def test_sequential_ranks_partition(tiny_shards_dir: Path) -> None:
    def windows(rank: int) -> set[bytes]:
        loader = MemmapLoader(tiny_shards_dir, "val", 3, 24, mode="sequential", rank=rank, world_size=2)
        return {row.numpy().tobytes() for x, _ in loader for row in x}

    w0, w1 = windows(0), windows(1)
    full = MemmapLoader(tiny_shards_dir, "val", 3, 24, mode="sequential")
    assert w0 | w1 == {row.numpy().tobytes() for x, _ in full for row in x} and not w0 & w1


def test_resume_sequential(tiny_shards_dir: Path) -> None:
    full = list(MemmapLoader(tiny_shards_dir, "val", 4, 16, mode="sequential"))
    a = MemmapLoader(tiny_shards_dir, "val", 4, 16, mode="sequential")
    it = iter(a)
    for _ in range(5):
        next(it)
    b = MemmapLoader(tiny_shards_dir, "val", 4, 16, mode="sequential")
    b.load_state_dict(a.state_dict())
    rest = list(b)
    assert len(rest) == len(full) - 5
    assert all(torch.equal(p[0], q[0]) for p, q in zip(full[5:], rest, strict=True))


def test_errors(tiny_shards_dir: Path) -> None:
    with pytest.raises(DataError, match="seq_len"):
        MemmapLoader(tiny_shards_dir, "val", 2, 10**7)
    loader = MemmapLoader(tiny_shards_dir, "val", 2, 10**7, mode="sequential")  # one short window
    (x, y, m), = list(loader.iter_eval())
    assert x.shape == (1, loader.num_tokens - 1) and m.all()
    with pytest.raises(DataError, match="shards changed"):
        MemmapLoader(tiny_shards_dir, "train", 2, 8).load_state_dict(
            MemmapLoader(tiny_shards_dir, "val", 2, 8).state_dict())
