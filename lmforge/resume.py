"""What makes a resumed run the run it would have been: RNG states, config checks, a run-dir lock,
and finding the newest checkpoint that is intact."""

from __future__ import annotations

import base64
import fcntl
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.checkpoint import list_steps, read_state, verify_files
from lmforge.errors import CheckpointError, ConfigError, TrainingError

# recipe keys whose change makes a resumed run a different run
RUN_DEFINING = ("model.", "tokenizer_fingerprint", "train.micro_batch_size", "train.batch_size_tokens",
                "train.seed", "train.parallel", "world_size")


def rng_state() -> dict[str, Any]:
    enc = lambda t: base64.b64encode(t.numpy().tobytes()).decode()  # noqa: E731
    py = random.getstate()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": np.random.get_state(legacy=False),
        "torch": enc(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [enc(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    dec = lambda s: torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype=np.uint8).copy())  # noqa: E731
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np.random.set_state(state["numpy"])
    torch.set_rng_state(dec(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([dec(s) for s in state["cuda"]])


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(old: dict, new: dict) -> tuple[list[str], list[str]]:
    """(run-defining differences, harmless differences) between two nested dicts."""
    a, b = _flatten(old), _flatten(new)
    defining, harmless = [], []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            line = f"{key}: {a.get(key)!r} -> {b.get(key)!r}"
            (defining if key.startswith(RUN_DEFINING) else harmless).append(line)
    return defining, harmless


def check_resume_config(state: dict, new: dict) -> list[str]:
    """Refuse a resume that would change the run; return the harmless changes to report."""
    # checkpoints from before train.parallel existed were all data parallel
    old_train = {"parallel": "ddp", **state["recipe"]["train"]}
    old = {"model": state["model_config"], "tokenizer_fingerprint": state["tokenizer_fingerprint"],
           "train": old_train, "world_size": state.get("world_size", 1)}
    defining, harmless = config_changes(old, new)
    if defining:
        raise ConfigError("cannot resume: these changes would make it a different run: " + "; ".join(defining))
    return harmless


def find_resumable(ckpt_root: Path, warn: Callable[[str], None]) -> Path:
    """The checkpoint `latest` points at, or, if it is damaged, the newest one that verifies."""
    if not ckpt_root.is_dir() or not list_steps(ckpt_root):
        raise TrainingError(f"nothing to resume: no checkpoint in {ckpt_root} (drop --resume to start a new run)")
    candidates = list(reversed(list_steps(ckpt_root)))
    latest = ckpt_root / "latest"
    if latest.exists():
        target = latest.resolve()
        candidates = [target] + [c for c in candidates if c.resolve() != target]
    for ckpt in candidates:
        try:
            verify_files(ckpt)
            read_state(ckpt)
            return ckpt
        except CheckpointError as err:
            warn(f"warning: skipping damaged checkpoint: {err}")
    raise TrainingError(f"no intact checkpoint in {ckpt_root} to resume from")


class RunLock:
    """An exclusive lock on a run dir, so two trainings never write into the same one."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / ".lock"
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise TrainingError(f"{self.path.parent} is in use by another training process") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
