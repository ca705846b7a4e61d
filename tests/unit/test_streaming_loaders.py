"""The streaming loaders: same batches from all three, coverage, epochs, resume, ranks, shutdown."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import time
from itertools import islice
from pathlib import Path

import numpy as np
import orjson
import pytest
import torch

from lmforge.config import Recipe
from lmforge.errors import DataError
from lmforge.loaders import make_loader, split_tokens, streaming_loader
from lmforge.loaders.memmap import MemmapLoader
from lmforge.loaders.procs import RemoteTraceback
from lmforge.shards import ensure_shards, open_split
from lmforge.tokenizer import Tokenizer

KINDS = ("naive", "workers", "ring")
B, T = 4, 32


def _words(shakespeare: str) -> np.ndarray:
    return np.array(sorted(set(shakespeare.split())))


def _write_corpus(path: Path, words: np.ndarray, docs: int, seed: int, bad_line: int | None = None) -> Path:
    """Documents of random words: no two windows of a few dozen tokens coincide."""
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        for i in range(docs):
            if i == bad_line:
                f.write(b'{"text": "broken\n')
                continue
            text = " ".join(rng.choice(words, size=int(rng.integers(20, 400))))
            f.write(orjson.dumps({"text": f"doc {i}: {text}"}) + b"\n")
            if i % 50 == 7:
                f.write(b"\n")  # blank lines are skipped, as sources does
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, shakespeare: str) -> Path:
    return _write_corpus(tmp_path_factory.mktemp("stream") / "corpus.jsonl", _words(shakespeare), 300, 0)


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.load(tiny_tokenizer_dir)


def _recipe(source: Path, tokenizer_dir: Path, tmp: Path, **data: object) -> Recipe:
    return Recipe.model_validate({
        "data": {"source": str(source), "shards_dir": str(tmp / "shards"), "workers": 1, "shard_tokens": 4096,
                 **data},
        "tokenizer": {"dir": str(tokenizer_dir), "vocab_size": 512}})


@pytest.fixture
def recipe(corpus: Path, tiny_tokenizer_dir: Path, tmp_path: Path) -> Recipe:
    return _recipe(corpus, tiny_tokenizer_dir, tmp_path, epochs=1)


def _loader(recipe: Recipe, tok: Tokenizer, kind: str, **kw: object):
    args = dict(batch_size=B, seq_len=T, seed=5) | kw
    return streaming_loader(recipe, "train", tok, kind=kind, **args)


def _stream(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> np.ndarray:
    """A lane's consecutive batches back to its token stream (each batch's first token is the last's last)."""
    flat = [np.concatenate([x.reshape(-1).numpy(), y[-1, -1:].numpy()]) for x, y in batches]
    return np.concatenate([flat[0]] + [f[1:] for f in flat[1:]]) if flat else np.zeros(0, dtype=np.int64)


_BEFORE: set[int] = set()  # children that were there before the current test (not ours to judge)


def _children() -> list[int]:
    """This process's child processes (running or zombie) that the current test started."""
    me = str(os.getpid())
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        if any(line.split()[1:] == [me] for line in status.splitlines() if line.startswith("PPid:")):
            out.append(int(pid))
    return [p for p in out if p not in _BEFORE]


@pytest.fixture
def clean_exit():
    """After the test: no child process (running or zombie) and no shared-memory file from us."""
    shm_before = set(os.listdir("/dev/shm"))
    _BEFORE.clear()
    _BEFORE.update(_children())
    yield
    deadline = time.time() + 10
    while _children() and time.time() < deadline:
        time.sleep(0.05)
    assert not _children(), "loader worker processes were left behind"
    new = set(os.listdir("/dev/shm")) - shm_before
    assert not [n for n in new if "torch" in n or "psm" in n or "lmforge" in n], new


def test_three_loaders_yield_identical_batches(recipe: Recipe, tok: Tokenizer, clean_exit: None) -> None:
    runs = {kind: [(x.clone(), y.clone()) for x, y in _loader(recipe, tok, kind, batch_size=8, seq_len=64)]
            for kind in KINDS}
    assert len(runs["naive"]) > 100
    for kind in ("workers", "ring"):
        assert len(runs[kind]) == len(runs["naive"])
        for (x0, y0), (x1, y1) in zip(runs["naive"], runs[kind], strict=True):
            assert torch.equal(x0, x1) and torch.equal(y0, y1)
    for x, y in runs["ring"][:5]:
        assert x.shape == y.shape == (8, 64) and x.dtype == y.dtype == torch.int64
        assert x.is_contiguous() and y.is_contiguous() and torch.equal(x.reshape(-1)[1:], y.reshape(-1)[:-1])
        assert x.data_ptr() != y.data_ptr()


@pytest.mark.parametrize("val_split", ["tail", "hash"])
def test_covers_the_same_tokens_as_the_shards(corpus: Path, tiny_tokenizer_dir: Path, tok: Tokenizer,
                                              tmp_path: Path, val_split: str) -> None:
    r = _recipe(corpus, tiny_tokenizer_dir, tmp_path, epochs=1, val_split=val_split, val_fraction=0.2,
                loader_workers=1, shuffle=False)
    ensure_shards(r, tok, log=lambda *_: None)
    train = np.concatenate(open_split(r.data.shards_dir, "train")).astype(np.int64)
    # unshuffled, one lane: the shards' own order, up to the last incomplete batch
    got = _stream(list(_loader(r, tok, "naive")))
    assert np.array_equal(got, train[:len(got)]) and len(train) - len(got) < B * T + 1
    # shuffled, two lanes: the same tokens in another order
    r.data.shuffle, r.data.loader_workers = True, 2
    batches = list(_loader(r, tok, "naive"))
    counts = sum(np.bincount(x.reshape(-1).numpy(), minlength=tok.vocab_size) for x, _ in batches)
    missing = np.bincount(train, minlength=tok.vocab_size) - counts
    assert missing.min() >= 0 and missing.sum() < 2 * (B * T + 1)
    # validation in streaming mode: exactly the shards' val split
    val, starts = split_tokens(r, "val", tok)
    shard_val = np.concatenate(open_split(r.data.shards_dir, "val"))
    assert np.array_equal(val, shard_val) and val[starts].tolist() == [tok.bos_id] * len(starts)
    assert np.array_equal(split_tokens(r, "val", tok, limit=1000)[0], shard_val[:1000])


def test_epochs_reshuffle_and_stop(recipe: Recipe, tok: Tokenizer) -> None:
    one = list(_loader(recipe, tok, "naive"))
    recipe.data.epochs = 2
    loader = _loader(recipe, tok, "naive")
    two = list(loader)
    assert abs(len(two) - 2 * len(one)) <= 2  # an epoch's leftover tokens carry into the next
    assert all(torch.equal(a[0], b[0]) for a, b in zip(one[:10], two[:10], strict=True))
    plan = loader.plan
    assert not np.array_equal(plan.lane_chunks(5, 0, True, 0, 1, 0, 2), plan.lane_chunks(5, 1, True, 0, 1, 0, 2))
    assert not torch.equal(two[len(one) + 5][0], one[5][0])  # epoch 2 is in another order
    recipe.data.epochs = 0  # no end
    assert len(list(islice(_loader(recipe, tok, "naive"), 3 * len(one)))) == 3 * len(one)


@pytest.mark.parametrize("first, second", [("ring", "ring"), ("naive", "workers"), ("workers", "naive"),
                                           ("naive", "ring")])
def test_resume_yields_the_uninterrupted_batches(recipe: Recipe, tok: Tokenizer, first: str, second: str,
                                                 clean_exit: None) -> None:
    recipe.data.epochs = 0
    kw = dict(batch_size=8, seq_len=64)  # an epoch is about 100 batches: the next 50 cross into the next
    full = [(x.clone(), y.clone()) for x, y in islice(_loader(recipe, tok, "naive", **kw), 140)]
    with _loader(recipe, tok, first, **kw) as a:
        for _ in range(90):
            next(a)
        state = orjson.loads(orjson.dumps(a.state_dict()))  # as it is saved: JSON
    assert {s["file"] for s in state["lane_states"]} == {str(recipe.data.source)}
    with _loader(recipe, tok, second, seed=0, **kw) as b:
        b.load_state_dict(state)
        rest = list(islice(b, 50))
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(full[90:], rest, strict=True))


def test_ranks_read_disjoint_parts(recipe: Recipe, tok: Tokenizer, clean_exit: None) -> None:
    everything = split_tokens(recipe, "train", tok)[0].astype(np.int64)
    per_rank = [list(_loader(recipe, tok, kind, rank=r, world_size=2)) for r, kind in ((0, "naive"), (1, "ring"))]
    windows = [{x.numpy()[i].tobytes() for x, _ in batches for i in range(B)} for batches in per_rank]
    assert not windows[0] & windows[1]
    counts = sum(np.bincount(x.reshape(-1).numpy(), minlength=tok.vocab_size)
                 for batches in per_rank for x, _ in batches)
    missing = np.bincount(everything, minlength=tok.vocab_size) - counts
    assert missing.min() >= 0 and missing.sum() < 2 * 2 * (B * T + 1)  # each rank's lanes drop a tail
    # the same rank through another loader kind: the same batches
    again = list(_loader(recipe, tok, "naive", rank=1, world_size=2))
    assert all(torch.equal(p[0], q[0]) for p, q in zip(per_rank[1], again, strict=True))


@pytest.mark.parametrize("kind", ["workers", "ring"])
def test_shutdown_on_end_close_and_collection(recipe: Recipe, tok: Tokenizer, kind: str, clean_exit: None) -> None:
    loader = _loader(recipe, tok, kind, batch_size=16, seq_len=64)
    assert len(list(loader)) > 0 and not _children()  # the end closes it
    with _loader(recipe, tok, kind) as loader:
        next(loader)
        assert len(_children()) == 2
    assert not _children()
    loader = _loader(recipe, tok, kind)
    next(loader)
    del loader
    gc.collect()
    assert not _children()


@pytest.mark.parametrize("kind", ["workers", "ring"])
def test_worker_error_surfaces_with_its_traceback(corpus: Path, tiny_tokenizer_dir: Path, tok: Tokenizer,
                                                  tmp_path: Path, shakespeare: str, kind: str,
                                                  clean_exit: None) -> None:
    bad = _write_corpus(tmp_path / "bad.jsonl", _words(shakespeare), 300, 0, bad_line=40)
    r = _recipe(bad, tiny_tokenizer_dir, tmp_path, epochs=1, val_split="hash")
    loader = _loader(r, tok, kind)
    with pytest.raises(DataError, match="not valid JSON") as info:
        list(loader)
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "Traceback" in info.value.__cause__.tb and "parse_line" in info.value.__cause__.tb
    assert not _children()


@pytest.mark.parametrize("kind", ["workers", "ring"])
def test_dead_worker(recipe: Recipe, tok: Tokenizer, kind: str, clean_exit: None) -> None:
    """SIGTERM (a scheduler stopping the job) restarts the workers, stream unchanged; SIGKILL is an error."""
    recipe.data.epochs = 0
    full = list(islice(_loader(recipe, tok, "naive"), 30))
    loader = _loader(recipe, tok, kind)
    got = list(islice(loader, 10))
    os.kill(loader._procs[1].pid, signal.SIGTERM)
    got += list(islice(loader, 20))
    assert all(torch.equal(p[0], q[0]) for p, q in zip(full, got, strict=True))
    os.kill(loader._procs[0].pid, signal.SIGKILL)
    with pytest.raises(RuntimeError, match="died with exit code -9"):
        for _ in range(10_000):
            next(loader)
    assert not _children()


CTRL_C_SCRIPT = """
import sys, time
from lmforge.config import Recipe
from lmforge.loaders import streaming_loader
from lmforge.tokenizer import Tokenizer
r = Recipe.model_validate({{"data": {{"source": {src!r}}}, "tokenizer": {{"dir": {tok!r}}}}})
loader = streaming_loader(r, "train", Tokenizer.load({tok!r}), batch_size=4, seq_len=32, seed=0, kind={kind!r})
next(loader)
print("ready", flush=True)
while True:
    next(loader)
    time.sleep(0.01)
"""


@pytest.mark.parametrize("kind", ["workers", "ring"])
def test_ctrl_c_stops_everything(corpus: Path, tiny_tokenizer_dir: Path, kind: str) -> None:
    script = CTRL_C_SCRIPT.format(src=str(corpus), tok=str(tiny_tokenizer_dir), kind=kind)
    shm_before = set(os.listdir("/dev/shm"))
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    line = proc.stdout.readline()
    assert line.startswith("ready"), proc.stderr.read()
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal does: the whole process group
    _, err = proc.communicate(timeout=30)
    assert "KeyboardInterrupt" in err and "Traceback" in err
    assert err.count("KeyboardInterrupt") == 1, err  # only the main process raised it
    deadline = time.time() + 10
    while time.time() < deadline and _session_pids(proc.pid):
        time.sleep(0.05)
    assert not _session_pids(proc.pid)
    assert not [n for n in set(os.listdir("/dev/shm")) - shm_before if "torch" in n or "psm" in n]


def _session_pids(sid: int) -> list[int]:
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # session id
            out.append(int(pid))
    return out


def test_make_loader_picks_the_loader(recipe: Recipe, tok: Tokenizer, tiny_recipe: Recipe, clean_exit: None) -> None:
    kw = dict(batch_size=B, seq_len=T, seed=1, rank=0, world_size=1, device="cpu")
    mm = make_loader(tiny_recipe, "train", **kw)
    assert isinstance(mm, MemmapLoader)
    mm.close()  # a no-op, so callers can close any loader
    recipe.data.loader = "ring"
    with make_loader(recipe, "train", tokenizer=tok, **kw) as ring:
        x, y = next(ring)
        assert x.shape == (B, T)
    val = make_loader(recipe, "val", tokenizer=tok, **kw)
    assert isinstance(val, MemmapLoader) and next(iter(val))[0].shape == (B, T)
    seq = make_loader(recipe, "val", tokenizer=tok, mode="sequential", **kw)
    assert sum(m.sum().item() for _, _, m in seq.iter_eval()) == seq.num_tokens - 1


def test_non_jsonl_source_is_written_out(tiny_recipe: Recipe, tok: Tokenizer, tmp_path: Path) -> None:
    r = tiny_recipe.model_copy(deep=True)  # a plain text file: read through sources, as the shards were
    r.data.epochs, r.data.shuffle, r.data.loader_workers = 1, False, 1
    loader = _loader(r, tok, "naive")
    train = np.concatenate(open_split(r.data.shards_dir, "train")).astype(np.int64)
    got = _stream(list(loader))
    assert np.array_equal(got, train[:len(got)]) and len(train) - len(got) < B * T + 1
    tmp = Path(loader.keep_alive.name)
    assert tmp.is_dir()
    del loader
    gc.collect()
    assert not tmp.exists()
