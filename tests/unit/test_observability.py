"""Training observability beyond metrics.jsonl: W&B logging, the batch-size search, NVTX ranges."""

import sys

import pytest
import torch

from lmforge.batch_size import find_batch_size, largest_fitting
from lmforge.errors import ConfigError, LmforgeError
from lmforge.metrics import MetricsWriter
from lmforge.profiling import nvtx_range


@pytest.mark.parametrize("largest", [1, 2, 3, 37, 64, 100, 4096])
def test_largest_fitting_finds_the_boundary_in_few_trials(largest):
    tried = []

    def fits(batch):
        tried.append(batch)
        return batch <= largest

    assert largest_fitting(fits, limit=4096) == largest
    assert len(tried) <= 2 * 13 + 1  # doubling then bisection, never a linear scan
    assert largest_fitting(lambda b: False, limit=64) == 0
    assert largest_fitting(lambda b: True, limit=48) == 48


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only message")
def test_find_batch_size_needs_a_gpu(tiny_recipe):
    with pytest.raises(LmforgeError, match="needs a CUDA GPU"):
        find_batch_size(tiny_recipe)


@pytest.mark.gpu
def test_find_batch_size_on_the_gpu(tiny_recipe):
    lines = []
    tiny_recipe.train.batch_size_tokens = 64 * 1024
    batch = find_batch_size(tiny_recipe, log=lines.append, limit=64)
    assert 1 <= batch <= 64
    assert "gradient accumulation" in lines[-1]


def test_nvtx_ranges_are_nothing_on_the_cpu():
    with nvtx_range("forward", torch.device("cpu")) as r:
        assert r is None


@pytest.mark.gpu
def test_nvtx_ranges_on_cuda():
    with nvtx_range("forward", torch.device("cuda")):
        torch.ones(1, device="cuda").sum().item()


def test_wandb_missing_is_a_clear_config_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: `import wandb` fails
    with pytest.raises(ConfigError, match="train.wandb = true needs the wandb package"):
        MetricsWriter(tmp_path, tensorboard=False, wandb_project="lmforge")


def test_wandb_offline_run_is_continued_by_a_resumed_training(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    w = MetricsWriter(tmp_path, tensorboard=False, wandb_project="lmforge", config={"train": {"lr": 0.1}})
    w.log(1, {"train/loss": 2.5})
    w.close()
    run_id = (tmp_path / "wandb_id").read_text().strip()
    runs = list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0
    size = runs[0].stat().st_size
    w = MetricsWriter(tmp_path, tensorboard=False, wandb_project="lmforge")  # the resumed run: same id
    w.log(2, {"train/loss": 2.0})
    w.close()
    assert (tmp_path / "wandb_id").read_text().strip() == run_id
    assert len(list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))) >= 1
    assert b"train/loss" in b"".join(p.read_bytes() for p in (tmp_path / "wandb").glob(f"*-{run_id}/*.wandb"))
    assert sum(p.stat().st_size for p in (tmp_path / "wandb").glob(f"*-{run_id}/*.wandb")) > size


def test_training_logs_to_wandb_when_enabled(tiny_recipe, monkeypatch):
    pytest.importorskip("wandb")
    from lmforge.train import run_loop, setup

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for k, v in {"max_steps": 2, "eval_every": 2, "log_every": 1, "sample_at_eval": False, "wandb": True,
                 "micro_batch_size": 2}.items():
        setattr(tiny_recipe.train, k, v)
    tiny_recipe.eval.batches = 1
    tr = setup(tiny_recipe, log=lambda *_: None)
    try:
        run_loop(tr)
    finally:
        tr.close()
    run_id = (tr.run_dir / "wandb_id").read_text().strip()
    logged = b"".join(p.read_bytes() for p in (tr.run_dir / "wandb").glob(f"offline-run-*-{run_id}/*.wandb"))
    assert b"train/loss" in logged and b"val/bpb" in logged
