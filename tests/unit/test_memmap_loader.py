from __future__ import annotations

from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.errors import DataError
from lmforge.loaders.memmap import MemmapLoader, read_doc_starts
from lmforge.loaders.resident import device_memory, parts_needed
from lmforge.shards import load_manifest, open_split


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


# ---- document-aware, without-replacement and device-resident options ----------------------------------
@pytest.fixture(scope="module")
def para_shards(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    """The tiny corpus with a document per paragraph, in several shards."""
    from lmforge.config import Recipe
    from lmforge.shards import ensure_shards
    from lmforge.tokenizer import Tokenizer

    out = tmp_path_factory.mktemp("para") / "shards"
    recipe = Recipe.model_validate({
        "data": {"source": str(tiny_tokenizer_dir.parent / "corpus.txt"), "doc_split": "paragraph",
                 "shards_dir": str(out), "shard_tokens": 8192, "workers": 1},
        "tokenizer": {"dir": str(tiny_tokenizer_dir), "vocab_size": 512}})
    return ensure_shards(recipe, Tokenizer.load(tiny_tokenizer_dir), log=lambda *_: None)


def test_bos_aligned_windows_start_at_documents(para_shards: Path) -> None:
    bos = load_manifest(para_shards)["bos_id"]
    loader = MemmapLoader(para_shards, "train", 16, 32, seed=1, align="bos")
    tokens = stream(para_shards, "train")
    docs = set(read_doc_starts(para_shards, "train", loader._offsets).tolist())
    assert len(docs) > 500 and len(loader._shards) > 2
    for k, (x, _) in enumerate(take(loader, 5)):
        assert (x[:, 0] == bos).all()
        starts = loader.window_starts(k)
        assert set(starts.tolist()) <= docs
        assert torch.equal(x, torch.from_numpy(np.stack([tokens[s:s + 32] for s in starts])))


@pytest.mark.parametrize("align", ["any", "bos"])
def test_epoch_sampling_visits_every_window_once(para_shards: Path, align: str) -> None:
    b, t = 8, 32
    loader = MemmapLoader(para_shards, "train", b, t, seed=2, sampling="epoch", align=align)
    space = loader._plan.spaces[0]
    per_epoch = loader._plan.round
    assert per_epoch == space.count // b
    first = np.concatenate([loader.window_starts(k) for k in range(per_epoch)])
    second = np.concatenate([loader.window_starts(k) for k in range(per_epoch, 2 * per_epoch)])
    everything = set(space.at(np.arange(space.count)).tolist())
    for epoch in (first, second):
        assert len(set(epoch.tolist())) == len(epoch) == per_epoch * b  # without replacement
        assert set(epoch.tolist()) <= everything and len(everything) - len(epoch) < b
    assert not np.array_equal(first, second)  # reshuffled
    if align == "any":
        assert all(s % t == 0 for s in first - loader._offsets[np.searchsorted(loader._offsets, first, "right") - 1])
    tokens = stream(para_shards, "train")
    for k, (x, _) in enumerate(take(loader, 3)):
        assert torch.equal(x, torch.from_numpy(np.stack([tokens[s:s + t] for s in first[k * b:(k + 1) * b]])))
    ranks = [MemmapLoader(para_shards, "train", b, t, seed=2, sampling="epoch", align=align, rank=r, world_size=2)
             for r in range(2)]
    seen = [set(np.concatenate([rk.window_starts(k) for k in range(rk._plan.round)]).tolist()) for rk in ranks]
    assert not seen[0] & seen[1] and len(everything) - len(seen[0] | seen[1]) < 2 * b


@pytest.mark.parametrize("align, sampling", [("any", "random"), ("bos", "epoch")])
def test_device_resident_gives_the_host_batches(para_shards: Path, align: str, sampling: str) -> None:
    kw = dict(seed=3, align=align, sampling=sampling)
    host = take(MemmapLoader(para_shards, "train", 8, 32, **kw), 70)  # more than one block of draws
    with MemmapLoader(para_shards, "train", 8, 32, resident=True, device="cpu", **kw) as resident:
        got = take(resident, 70)
        assert resident._resident.loads == 1  # the tokens crossed once
    for (x0, y0), (x1, y1) in zip(host, got, strict=True):
        assert torch.equal(x0, x1) and torch.equal(y0, y1) and x1.is_contiguous() and x1.dtype == torch.int64


def test_device_resident_in_parts(para_shards: Path) -> None:
    b, t = 4, 16
    tokens = stream(para_shards, "train")
    loader = MemmapLoader(para_shards, "train", b, t, seed=0, resident=True, resident_parts=4)
    plan = loader._plan
    assert len(plan.bounds) == 4 and plan.bounds[-1][1] == len(tokens)
    n = 2 * plan.round + 3  # every part twice, in turns
    batches = take(loader, n)
    parts = [plan.part_of(k) for k in range(n)]
    assert sorted(set(parts)) == [0, 1, 2, 3] and parts == sorted(parts[:plan.round]) * 2 + parts[:3]
    assert loader._resident.loads == 9  # a load per turn, none per batch
    for k, (x, y) in enumerate(batches):
        lo, hi = plan.bounds[parts[k]]
        starts = loader.window_starts(k)
        assert (starts >= lo).all() and (starts + t + 1 <= hi).all()
        assert torch.equal(x, torch.from_numpy(np.stack([tokens[s:s + t] for s in starts])))
        assert torch.equal(y, torch.from_numpy(np.stack([tokens[s + 1:s + t + 1] for s in starts])))
    resumed = MemmapLoader(para_shards, "train", b, t, seed=9, resident=True, resident_parts=4)
    resumed.load_state_dict(loader.state_dict())
    assert all(torch.equal(p[0], q[0]) for p, q in zip(take(loader, 5), take(resumed, 5), strict=True))
    with pytest.raises(DataError, match="parts"):
        MemmapLoader(para_shards, "train", b, t).load_state_dict(loader.state_dict())
    loader.close()
    assert loader._resident._tokens is None


def test_parts_follow_the_memory_share() -> None:
    ram = device_memory(torch.device("cpu"))
    assert parts_needed(ram // 4, torch.device("cpu"), 0.5) == 1
    assert parts_needed(ram, torch.device("cpu"), 0.25) == 4


def test_loader_over_tokens_in_memory(tiny_shards_dir: Path) -> None:
    tokens = stream(tiny_shards_dir, "val").astype(np.uint16)
    a = take(MemmapLoader(None, "val", 4, 16, seed=1, tokens=[tokens]), 3)
    b = take(MemmapLoader(tiny_shards_dir, "val", 4, 16, seed=1), 3)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a, b, strict=True))
