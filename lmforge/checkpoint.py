"""Checkpoints: `checkpoints/step_XXXXXX/` with model.safetensors, optim_rank{r}.pt and state.json.

Each step dir is written under a temporary name, fsynced and renamed; `latest` and `best` are
symlinks updated last, so a crash at any moment leaves the previous good checkpoint loadable.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lmforge.errors import CheckpointError
from lmforge.fsutil import atomic_dir, atomic_write_json, read_json, sha256_file

STEP_RE = re.compile(r"^step_(\d{6,})$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "lmforge_tokenizer.json")
DCP_DIR = "dcp"
"""A sharded (FSDP) checkpoint's weights and optimizer state: `torch.distributed.checkpoint` files."""


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Weights without the tied lm_head copy (safetensors refuses shared storage)."""
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if getattr(getattr(model, "cfg", None), "tie_embeddings", False):
        sd.pop("lm_head.weight", None)
    return sd


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    model: torch.nn.Module,
    state: dict[str, Any],
    *,
    optimizer: torch.optim.Optimizer | None = None,
    tokenizer_dir: Path | None = None,
    rank: int = 0,
    is_best: bool = False,
    keep: int = 2,
) -> Path:
    """Write one step dir atomically, then point `latest` (and `best`) at it, then prune."""
    ckpt_root = Path(ckpt_root)
    final = ckpt_root / step_dir_name(step)
    with atomic_dir(final) as tmp:
        save_file(model_state(model), str(tmp / "model.safetensors"))
        files = {"model.safetensors": sha256_file(tmp / "model.safetensors")}
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / f"optim_rank{rank}.pt")
            files[f"optim_rank{rank}.pt"] = sha256_file(tmp / f"optim_rank{rank}.pt")
        _copy_tokenizer(tokenizer_dir, tmp)
        atomic_write_json(tmp / "state.json", {**state, "step": step, "files": files})
    _publish(ckpt_root, final, is_best, keep)
    return final


def save_sharded_checkpoint(
    ckpt_root: Path,
    step: int,
    model: torch.nn.Module,
    state: dict[str, Any],
    *,
    optimizer: torch.optim.Optimizer,
    tokenizer_dir: Path | None = None,
    is_best: bool = False,
    keep: int = 2,
) -> Path:
    """FSDP: every rank writes its shards into one step dir (`dcp/`), rank 0 adds state.json with the
    checksums and moves the links. A collective: every rank calls it."""
    from lmforge.sharded import broadcast, save_sharded

    ckpt_root = Path(ckpt_root)
    final = ckpt_root / step_dir_name(step)
    main = torch.distributed.get_rank() == 0
    with (atomic_dir(final) if main else contextlib.nullcontext()) as tmp:
        tmp = Path(broadcast(str(tmp) if main else None))
        names = save_sharded(tmp, model, optimizer)
        torch.distributed.barrier()  # every rank's shards are on disk before they are hashed
        if main:
            missing = [n for n in names if not (tmp / n).is_file()]
            if missing:  # written on other machines' disks: DCP needs one filesystem that all ranks share
                raise CheckpointError(f"{final}: shards {missing[:3]} were written elsewhere; put train.run_dir "
                                      "on a filesystem that every node shares")
            files = {name: sha256_file(tmp / name) for name in names}
            _copy_tokenizer(tokenizer_dir, tmp)
            atomic_write_json(tmp / "state.json", {**state, "step": step, "files": files, "sharded": True})
    if main:
        _publish(ckpt_root, final, is_best, keep)
    torch.distributed.barrier()
    return final


def _copy_tokenizer(tokenizer_dir: Path | None, dst: Path) -> None:
    for name in TOKENIZER_FILES if tokenizer_dir is not None else ():
        if (Path(tokenizer_dir) / name).exists():
            shutil.copy2(Path(tokenizer_dir) / name, dst / name)


def _publish(ckpt_root: Path, final: Path, is_best: bool, keep: int) -> None:
    _point(ckpt_root / "latest", final.name)
    if is_best:
        _point(ckpt_root / "best", final.name)
    prune(ckpt_root, keep)


def _point(link: Path, target_name: str) -> None:
    tmp = link.with_name(f".{link.name}.tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(target_name, tmp)
    os.replace(tmp, link)


def list_steps(ckpt_root: Path) -> list[Path]:
    if not ckpt_root.is_dir():
        return []
    dirs = [p for p in ckpt_root.iterdir() if p.is_dir() and not p.is_symlink() and STEP_RE.match(p.name)]
    return sorted(dirs, key=lambda p: int(STEP_RE.match(p.name).group(1)))


def prune(ckpt_root: Path, keep: int) -> None:
    """Keep the newest `keep` step dirs and whatever `best` points at."""
    protected = {p.resolve() for p in (ckpt_root / "best", ckpt_root / "latest") if p.exists()}
    steps = list_steps(ckpt_root)
    for p in steps[:-keep] if keep > 0 else []:
        if p.resolve() not in protected:
            shutil.rmtree(p, ignore_errors=True)


def has_dcp(ckpt: Path) -> bool:
    return (Path(ckpt) / DCP_DIR / ".metadata").is_file()


def is_checkpoint_dir(path: Path) -> bool:
    return (path / "state.json").is_file() and ((path / "model.safetensors").is_file() or has_dcp(path))


def resolve_checkpoint(path: str | os.PathLike, prefer: str = "best") -> Path:
    """A checkpoint dir, a `checkpoints/` dir or a run dir → the checkpoint dir to load."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p} does not exist")
    if is_checkpoint_dir(p):
        return p
    for root in (p / "checkpoints", p):
        order = ("best", "latest") if prefer == "best" else ("latest", "best")
        for name in order:
            link = root / name
            if link.exists() and is_checkpoint_dir(link.resolve()):
                return link.resolve()
        steps = list_steps(root)
        if steps:
            return steps[-1]
    raise CheckpointError(
        f"{p} is not a checkpoint: expected a dir with state.json + model.safetensors (or dcp/), or a run dir "
        "with checkpoints/"
    )


def verify_files(ckpt: Path) -> None:
    state = read_state(ckpt)
    for name, digest in state.get("files", {}).items():
        f = ckpt / name
        if not f.is_file():
            raise CheckpointError(f"{ckpt}: {name} is missing")
        if sha256_file(f) != digest:
            raise CheckpointError(f"{ckpt}: {name} is damaged (checksum mismatch)")


def read_state(ckpt: Path) -> dict[str, Any]:
    try:
        return read_json(Path(ckpt) / "state.json")
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{ckpt}/state.json cannot be read: {err}") from None


def load_model_weights(model: torch.nn.Module, ckpt: Path) -> None:
    """Into an unsharded model, from model.safetensors or from a sharded (FSDP) checkpoint's dcp/."""
    if not (Path(ckpt) / "model.safetensors").is_file() and has_dcp(ckpt):
        from lmforge.sharded import load_full_model  # torch.distributed.checkpoint takes a second to import

        load_full_model(model, ckpt)
        return
    try:
        sd = load_file(str(Path(ckpt) / "model.safetensors"))
    except Exception as err:  # safetensors raises several types for a damaged file
        raise CheckpointError(f"{ckpt}/model.safetensors cannot be read: {err}") from None
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.cfg.tie_embeddings)]
    if missing or unexpected:
        raise CheckpointError(f"{ckpt}: weights do not match the model (missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]})")


def load_optimizer(optimizer: torch.optim.Optimizer, ckpt: Path, rank: int = 0) -> None:
    path = Path(ckpt) / f"optim_rank{rank}.pt"
    if not path.is_file():
        raise CheckpointError(f"{ckpt} has no optimizer state for rank {rank} ({path.name})")
    optimizer.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
