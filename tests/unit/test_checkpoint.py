import os

import pytest
import torch

from lmforge.checkpoint import (
    list_steps,
    load_model_weights,
    read_state,
    resolve_checkpoint,
    save_checkpoint,
    verify_files,
)
from lmforge.config import ModelConfig
from lmforge.errors import CheckpointError
from lmforge.models.transformer import Transformer


def model():
    torch.manual_seed(0)
    return Transformer(ModelConfig(preset="tiny", vocab_size=50))


def test_save_load_round_trip_and_links(tmp_path):
    m = model()
    root = tmp_path / "checkpoints"
    for step in (10, 20, 30):
        save_checkpoint(root, step, m, {"model_config": m.cfg.model_dump()}, is_best=step == 20, keep=2)
    assert [p.name for p in list_steps(root)] == ["step_000020", "step_000030"]  # 10 pruned
    assert os.readlink(root / "latest") == "step_000030"
    assert os.readlink(root / "best") == "step_000020"
    assert resolve_checkpoint(tmp_path).name == "step_000020"  # run dir → best
    assert resolve_checkpoint(tmp_path, prefer="latest").name == "step_000030"
    m2 = Transformer(m.cfg)
    load_model_weights(m2, root / "step_000030")
    for a, b in zip(m.state_dict().values(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert m2.lm_head.weight.data_ptr() == m2.tok_emb.weight.data_ptr()  # still tied after load
    assert read_state(root / "step_000030")["step"] == 30
    assert not [p for p in root.iterdir() if p.name.endswith(".tmp")]


def test_best_survives_pruning(tmp_path):
    m = model()
    root = tmp_path / "checkpoints"
    save_checkpoint(root, 1, m, {}, is_best=True, keep=1)
    for step in (2, 3, 4):
        save_checkpoint(root, step, m, {}, keep=1)
    assert [p.name for p in list_steps(root)] == ["step_000001", "step_000004"]


def test_damage_is_detected(tmp_path):
    m = model()
    path = save_checkpoint(tmp_path, 5, m, {})
    verify_files(path)
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="damaged"):
        verify_files(path)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="is not a checkpoint"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope")


def test_failed_save_keeps_previous(tmp_path, monkeypatch):
    m = model()
    root = tmp_path / "checkpoints"
    save_checkpoint(root, 1, m, {})

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("lmforge.checkpoint.save_file", boom)
    with pytest.raises(OSError):
        save_checkpoint(root, 2, m, {})
    assert [p.name for p in list_steps(root)] == ["step_000001"]
    assert os.readlink(root / "latest") == "step_000001"
    assert not [p for p in root.iterdir() if p.name.startswith(".")]


def test_saved_keys_are_clean_whatever_the_wrapping(tmp_path):
    from safetensors.torch import load_file

    from lmforge.runtime import prepare_model

    plain = set(model().state_dict()) - {"lm_head.weight"}
    wrapped, raw = prepare_model(model(), torch.device("cpu"), compile=True)
    assert any(k.startswith("_orig_mod.") for k in wrapped.state_dict())  # what saving `wrapped` would give
    path = save_checkpoint(tmp_path, 1, raw, {})
    assert set(load_file(str(path / "model.safetensors"))) == plain
