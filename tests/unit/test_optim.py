import pytest

from lmforge.config import ModelConfig, TrainConfig
from lmforge.models.transformer import Transformer
from lmforge.optim import lr_at, param_groups


def cfg(**kw):
    base = dict(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=100)
    return TrainConfig(**{**base, **kw})


def test_cosine_endpoints():
    c = cfg(schedule="cosine")
    assert lr_at(0, c) == pytest.approx(1e-4)  # first warmup step
    assert lr_at(9, c) == pytest.approx(1e-3)  # warmup ends at the peak
    assert lr_at(99, c) == pytest.approx(1e-4)  # ends at min_lr
    assert lr_at(54, c) == pytest.approx(5.5e-4, rel=0.02)  # halfway down
    lrs = [lr_at(s, c) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


def test_wsd_endpoints():
    c = cfg(schedule="wsd", decay_fraction=0.2)
    assert lr_at(50, c) == pytest.approx(1e-3)
    assert lr_at(79, c) == pytest.approx(1e-3)  # stable until the last 20 steps
    assert lr_at(80, c) < 1e-3
    assert lr_at(99, c) == pytest.approx(1e-4)


def test_constant():
    c = cfg(schedule="constant")
    assert lr_at(5, c) == pytest.approx(6e-4)
    assert lr_at(99, c) == pytest.approx(1e-3)


def test_decay_only_matrices():
    m = Transformer(ModelConfig(preset="tiny", vocab_size=50, bias=True))
    decay, no_decay = param_groups(m, 0.1)
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() < 2 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0
    n = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert n == m.num_params()  # tied weight counted once
