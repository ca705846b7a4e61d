"""Fully sharded data parallel (FSDP2, `torch.distributed.fsdp.fully_shard`): `train.parallel = "fsdp"`.

Each rank holds 1/world of every parameter, gradient and optimizer state; a block's full weights are
all-gathered just for its forward and backward. Checkpoints are sharded too: every rank writes its
own part with `torch.distributed.checkpoint` (DCP) into `step_XXXXXX/dcp/`, and one process with no
process group can read the whole model back from there (export, eval, generation all can).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from lmforge.checkpoint import DCP_DIR
from lmforge.errors import CheckpointError


def shard_model(model: nn.Module, device: torch.device) -> nn.Module:
    """Shard each Transformer block, then the rest (embeddings, final norm, head) as the root group.

    The model is changed in place (its parameters become DTensors), so build the optimizer after this.
    Each rank holds the whole model until then: a model that fits in host memory but not on one device."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # every rank built (and seeded) its own copy: start all from rank 0's weights, as DDP does
    for t in [*model.parameters(), *model.buffers()]:
        dist.broadcast(t.data, src=0)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def save_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Every rank writes its shards of the model and the optimizer into `folder/dcp` (a collective).
    Returns the files the checkpoint's metadata names, relative to `folder`."""
    msd, osd = get_state_dict(model, optimizer)
    meta = dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(Path(folder) / DCP_DIR))
    names = {info.relative_path for info in (meta.storage_data or {}).values()}
    return sorted(f"{DCP_DIR}/{n}" for n in names | {".metadata"})


def load_sharded(ckpt: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Each rank reads its own shards back (a collective)."""
    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(Path(ckpt) / DCP_DIR))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def load_full_model(model: nn.Module, ckpt: Path) -> None:
    """Read a sharded checkpoint's whole model into one unsharded module, without a process group."""
    sd = model.state_dict()
    try:
        with warnings.catch_warnings():  # DCP warns that one process loads: that is the point here
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load({"model": sd}, checkpoint_id=str(Path(ckpt) / DCP_DIR), no_dist=True)
    except Exception as err:  # DCP raises several types (CheckpointException wraps the per-rank ones)
        raise CheckpointError(f"{ckpt}/{DCP_DIR} cannot be read: {str(err).splitlines()[0]}") from None
    model.load_state_dict(sd)


def gather_full_model(model: nn.Module, device: torch.device) -> nn.Module | None:
    """A plain, unsharded copy of `model` on rank 0 (None elsewhere); every rank must call it.

    Samples come from it: the fast decode path reads the weights directly, and a generation's
    length would otherwise have to match on every rank. Its weights must fit on rank 0's device."""
    from lmforge.models.transformer import Transformer

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    with torch.random.fork_rng(devices=[]):  # the copy's throwaway init must not move the training RNG
        copy = Transformer(model.cfg)
    copy.load_state_dict(sd)
    return copy.to(device)


def in_lockstep(batches: Iterable[tuple], seq_len: int, device: torch.device) -> Iterator[tuple]:
    """This rank's (x, y, mask) evaluation batches, then batches that score nothing (mask all False)
    until every rank is done. Ranks may hold different numbers of batches, but each forward of a
    sharded model is a collective (the all-gathers), so all ranks must run as many."""
    it = iter(batches)
    last = None
    while True:
        batch = next(it, None)
        more = torch.tensor(float(batch is not None), device=device)
        dist.all_reduce(more, op=dist.ReduceOp.MAX)
        if not more.item():
            return
        if batch is not None:
            last = batch
            yield batch
        else:  # this rank is done: its last batch's shape (or one window) with every target masked out
            if last is None:
                blank = torch.zeros(1, seq_len, dtype=torch.long, device=device)
                last = (blank, blank)
            yield last[0], last[1], torch.zeros(last[1].shape, dtype=torch.bool, device=last[1].device)


def broadcast(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
