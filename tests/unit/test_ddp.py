"""DDP semantics through lmforge's own wrapping and train step, on 2 gloo processes."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lmforge.config import ModelConfig
from lmforge.models.transformer import Transformer
from lmforge.objectives import autoregressive_loss
from lmforge.runtime import Dist, prepare_model

pytestmark = pytest.mark.distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(preset="tiny", vocab_size=97))


def _batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 97, (4, 32), generator=g)
    return x, torch.randint(0, 97, (4, 32), generator=g)


def _join(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)


def _spawn(worker) -> dict:
    """Run `worker(rank, port, out)` on 2 gloo ranks; their `out[rank]`."""
    out = mp.Manager().dict()
    mp.spawn(worker, args=(_free_port(), out), nprocs=2, join=True)
    return dict(out)


def _one_process_step() -> tuple[float, dict[str, torch.Tensor]]:
    """The reference: one SGD step on the whole batch in one process (loss, parameters after)."""
    single = _model()
    opt = torch.optim.SGD(single.parameters(), lr=0.1)
    x, y = _batch()
    loss = autoregressive_loss(single, x, y)
    loss.backward()
    opt.step()
    return loss.item(), single.state_dict()


def _worker(rank: int, port: int, out: dict) -> None:
    _join(rank, port)
    model, raw = prepare_model(_model(), torch.device("cpu"), dist=Dist(rank, rank, 2))
    opt = torch.optim.SGD(raw.parameters(), lr=0.1)
    x, y = _batch()
    loss = autoregressive_loss(model, x[rank * 2:(rank + 1) * 2], y[rank * 2:(rank + 1) * 2])
    loss.backward()
    opt.step()
    out[rank] = {"loss": loss.item(), "params": {k: v.clone() for k, v in raw.state_dict().items()}}
    dist.destroy_process_group()


def test_gradients_are_averaged_and_ranks_stay_identical():
    out = _spawn(_worker)
    full_loss, params = _one_process_step()
    # equal halves: the mean of the rank losses is the full-batch loss
    assert (out[0]["loss"] + out[1]["loss"]) / 2 == pytest.approx(full_loss, abs=1e-6)
    for k, v in params.items():
        assert torch.equal(out[0]["params"][k], out[1]["params"][k]), k
        torch.testing.assert_close(out[0]["params"][k], v, atol=1e-6, rtol=1e-5)


def _fsdp_worker(rank: int, port: int, out: dict) -> None:
    from torch.distributed.fsdp import FSDPModule

    _join(rank, port)
    torch.manual_seed(rank)  # different local weights: sharding must start every rank from rank 0's
    model = Transformer(ModelConfig(preset="tiny", vocab_size=97))
    if rank == 0:
        model.load_state_dict(_model().state_dict())
    model, raw = prepare_model(model, torch.device("cpu"), dist=Dist(rank, rank, 2), parallel="fsdp")
    assert isinstance(raw, FSDPModule) and model is raw
    local = {k: v.to_local().numel() for k, v in raw.state_dict().items()}
    opt = torch.optim.SGD(raw.parameters(), lr=0.1)
    x, y = _batch()
    loss = autoregressive_loss(model, x[rank * 2:(rank + 1) * 2], y[rank * 2:(rank + 1) * 2])
    loss.backward()
    opt.step()
    out[rank] = {"loss": loss.item(), "local": local,
                 "params": {k: v.full_tensor().clone() for k, v in raw.state_dict().items()}}
    dist.destroy_process_group()


def test_fsdp_shards_parameters_and_matches_one_process():
    out = _spawn(_fsdp_worker)
    full_loss, params = _one_process_step()
    assert (out[0]["loss"] + out[1]["loss"]) / 2 == pytest.approx(full_loss, abs=1e-6)
    for k, v in params.items():
        # each rank keeps half of every parameter (dim 0 split in two)
        assert out[0]["local"][k] + out[1]["local"][k] == v.numel(), k
        assert out[0]["local"][k] < v.numel() or v.numel() == 1, k
        assert torch.equal(out[0]["params"][k], out[1]["params"][k]), k
        torch.testing.assert_close(out[0]["params"][k], v, atol=1e-6, rtol=1e-5)


def _lockstep_worker(rank: int, port: int, out: dict) -> None:
    from lmforge.sharded import in_lockstep

    _join(rank, port)
    mine = [(torch.full((2, 8), 10 * rank + i), torch.ones(2, 8, dtype=torch.long), torch.ones(2, 8, dtype=torch.bool))
            for i in range(3 if rank == 0 else 1)]
    got = list(in_lockstep(mine, 8, torch.device("cpu")))
    out[rank] = [(int(x[0, 0]), bool(m.any())) for x, _, m in got]
    dist.destroy_process_group()


def test_in_lockstep_pads_the_shorter_rank_with_batches_that_score_nothing():
    out = _spawn(_lockstep_worker)
    assert out[0] == [(0, True), (1, True), (2, True)]
    assert out[1] == [(10, True), (10, False), (10, False)]  # as many forwards as rank 0, none counted
