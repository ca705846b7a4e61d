"""The training loop in-process on the tiny fixtures: faults, locks, fallbacks, early stopping, bf16."""

import errno
import math
import os
from pathlib import Path

import orjson
import pytest
import torch

from lmforge.checkpoint import list_steps
from lmforge.errors import ConfigError, TrainingError
from lmforge.train import run_loop, setup


def quiet(*_a):
    pass


def make(recipe, **train):
    for k, v in {"max_steps": 6, "log_every": 1, "eval_every": 3, "save_every": 2, "micro_batch_size": 4,
                 "warmup_steps": 1, "sample_at_eval": False, **train}.items():
        setattr(recipe.train, k, v)
    recipe.eval.batches = 2
    return recipe


def train(recipe, resume=False, **kw):
    tr = setup(recipe, resume=resume, log=quiet)
    try:
        for k, v in kw.items():
            setattr(tr, k, v)
        return tr, run_loop(tr)
    finally:
        tr.close()


def test_loss_decreases_and_metrics_are_logged(tiny_recipe):
    tr, summary = train(make(tiny_recipe, max_steps=30, lr=3e-3, eval_every=30))
    rows = [orjson.loads(x) for x in (tr.run_dir / "metrics.jsonl").read_bytes().splitlines()]
    train_losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert train_losses[-1] < train_losses[0] - 0.5
    assert summary["steps"] == 30 and summary["tokens"] == 30 * 4 * 64
    keys = set().union(*rows)
    assert {"train/loss", "train/lr", "train/tok_per_sec", "train/grad_norm", "train/step_ms", "val/loss",
            "val/bpb"} <= keys
    assert (tr.run_dir / "tb").is_dir()


def test_nan_stops_before_the_update_and_keeps_the_checkpoint(tiny_recipe):
    recipe = make(tiny_recipe, save_every=1, max_steps=10)
    tr = setup(recipe, log=quiet)
    calls = {"n": 0}
    real = tr.loss_fn

    def poisoned(model, x, y):
        calls["n"] += 1
        loss = real(model, x, y)
        return loss * float("nan") if calls["n"] == 4 else loss

    tr.loss_fn = poisoned
    before = {k: v.clone() for k, v in tr.raw.state_dict().items()}
    with pytest.raises(TrainingError, match=r"non-finite loss or gradient at step 4"):
        try:
            run_loop(tr)
        finally:
            tr.close()
    assert [p.name for p in list_steps(tr.run_dir / "checkpoints")][-1] == "step_000003"
    assert os.readlink(tr.run_dir / "checkpoints" / "latest") == "step_000003"
    assert any(not torch.equal(before[k], v) for k, v in tr.raw.state_dict().items())  # steps 1-3 did update


def test_disk_full_is_a_clear_error_and_keeps_previous(tiny_recipe, monkeypatch):
    recipe = make(tiny_recipe, save_every=2, max_steps=6, eval_every=100)
    tr = setup(recipe, log=quiet)
    real_save = __import__("lmforge.checkpoint", fromlist=["save_file"]).save_file
    count = {"n": 0}

    def flaky(*a, **k):
        count["n"] += 1
        if count["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(*a, **k)

    monkeypatch.setattr("lmforge.checkpoint.save_file", flaky)
    with pytest.raises(TrainingError, match="No space left on device.*previous checkpoint is intact"):
        try:
            run_loop(tr)
        finally:
            tr.close()
    assert [p.name for p in list_steps(tr.run_dir / "checkpoints")] == ["step_000002"]
    assert not [p for p in (tr.run_dir / "checkpoints").iterdir() if p.name.startswith(".")]


def test_second_run_on_same_dir_is_refused(tiny_recipe):
    recipe = make(tiny_recipe)
    tr = setup(recipe, log=quiet)
    try:
        with pytest.raises(TrainingError, match="in use by another training process"):
            setup(recipe.model_copy(deep=True), log=quiet)
    finally:
        tr.close()
    setup(recipe, log=quiet, fresh=True).close()  # free again once the first one let go


def test_resume_without_checkpoint(tiny_recipe):
    with pytest.raises(TrainingError, match="nothing to resume"):
        setup(make(tiny_recipe), resume=True, log=quiet)


def test_damaged_latest_falls_back_with_a_warning(tiny_recipe):
    recipe = make(tiny_recipe, save_every=2, max_steps=6, eval_every=100)
    train(recipe)
    latest = Path(tiny_recipe.train.run_dir) / "checkpoints/step_000006/model.safetensors"
    data = bytearray(latest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    latest.write_bytes(bytes(data))
    messages = []
    recipe.train.max_steps = 8
    tr = setup(recipe, resume=True, log=messages.append)
    tr.close()
    assert tr.step == 4
    assert any("skipping damaged checkpoint" in m and "step_000006" in m for m in messages)


def test_resume_refuses_a_different_model_but_allows_harmless_changes(tiny_recipe):
    recipe = make(tiny_recipe)
    train(recipe)
    changed = recipe.model_copy(deep=True)
    changed.model.n_embd = 128
    with pytest.raises(ConfigError, match=r"model.n_embd: 64 -> 128"):
        setup(changed, resume=True, log=quiet)
    harmless = recipe.model_copy(deep=True)
    harmless.train.log_every = 3
    harmless.train.max_steps = 9
    tr, summary = train(harmless, resume=True)
    assert summary["steps"] == 9


def test_early_stopping(tiny_recipe):
    # lr 0 never improves after the first validation: patience 2 stops at the third one
    recipe = make(tiny_recipe, max_steps=100, eval_every=2, lr=1e-12, min_lr=0, warmup_steps=0,
                  early_stop_patience=2, early_stop_min_delta=0.01)
    tr, summary = train(recipe)
    assert summary["steps"] == 6
    assert tr.evals_without_improvement == 2


def test_gradient_accumulation_matches_a_big_batch(tiny_recipe):
    a = make(tiny_recipe.model_copy(deep=True), max_steps=1, micro_batch_size=8, eval_every=100)
    b = make(tiny_recipe.model_copy(deep=True), max_steps=1, micro_batch_size=4, batch_size_tokens=8 * 64,
             eval_every=100)
    b.train.run_dir += "-b"
    tra, trb = setup(a, log=quiet), setup(b, log=quiet)
    try:
        assert trb.accum == 2 and tra.tokens_per_step == trb.tokens_per_step
        with pytest.raises(ConfigError, match="batch_size_tokens"):
            c = b.model_copy(deep=True)
            c.train.batch_size_tokens = 100
            c.train.run_dir += "-c"
            setup(c, log=quiet)
    finally:
        tra.close()
        trb.close()


def test_bf16_tracks_fp32(tiny_recipe):
    common = dict(max_steps=12, eval_every=100, lr=3e-3, micro_batch_size=2)
    r32 = make(tiny_recipe.model_copy(deep=True), dtype="fp32", **common)
    r16 = make(tiny_recipe.model_copy(deep=True), dtype="bf16", **common)
    r16.train.run_dir += "-bf16"
    t32, _ = train(r32)
    t16, _ = train(r16)
    assert t16.dtype == torch.bfloat16
    load = lambda tr: [orjson.loads(x)["train/loss"] for x in (tr.run_dir / "metrics.jsonl").read_bytes().splitlines()  # noqa: E731
                       if b"train/loss" in x]
    l32, l16 = load(t32), load(t16)
    assert all(math.isfinite(v) for v in l16)
    assert abs(l32[-1] - l16[-1]) / l32[-1] < 0.03


def test_init_from_copies_weights_with_a_fresh_optimizer(tiny_recipe):
    base = make(tiny_recipe.model_copy(deep=True), max_steps=3, eval_every=100)
    first, _ = train(base)
    child = make(tiny_recipe.model_copy(deep=True), max_steps=2, eval_every=100)
    child.train.run_dir += "-child"
    child.train.init_from = base.train.run_dir
    tr = setup(child, log=quiet)
    try:
        assert tr.step == 0 and not tr.optimizer.state
        for k, v in first.raw.state_dict().items():
            assert torch.equal(v, tr.raw.state_dict()[k]), k
    finally:
        tr.close()
    other = make(tiny_recipe.model_copy(deep=True), max_steps=2)
    other.train.run_dir += "-other"
    other.train.init_from = base.train.run_dir
    other.model.n_layer = 3
    with pytest.raises(ConfigError, match=r"init_from does not match.*model.n_layer: 2"):
        setup(other, log=quiet)


def test_accumulation_weights_micro_batches_by_their_target_tokens(tiny_recipe):
    from lmforge.objectives import autoregressive_loss
    from lmforge.train import _train_step

    recipe = make(tiny_recipe, micro_batch_size=2, batch_size_tokens=2 * 2 * 64, grad_clip=0.0)
    tr = setup(recipe, log=quiet)
    try:
        assert tr.accum == 2
        g = torch.Generator().manual_seed(3)
        vocab = recipe.model.vocab_size
        x = torch.randint(0, vocab, (4, 64), generator=g)
        y = torch.randint(0, vocab, (4, 64), generator=g)
        y[:2, 5:] = -1  # the first micro-batch has 10 targets, the second 128 (an SFT-like mask)
        start = {k: v.clone() for k, v in tr.raw.state_dict().items()}
        ref = autoregressive_loss(tr.raw, x, y)  # one batch: the mean over all 138 targets
        ref.backward()
        ref_grads = {n: p.grad.clone() for n, p in tr.raw.named_parameters()}
        tr.optimizer.zero_grad(set_to_none=True)
        # weighting each micro-batch by 1/accum instead would give another gradient: the test can tell
        ((autoregressive_loss(tr.raw, x[:2], y[:2]) + autoregressive_loss(tr.raw, x[2:], y[2:])) / 2).backward()
        assert (tr.raw.tok_emb.weight.grad - ref_grads["tok_emb.weight"]).abs().max() > 1e-4
        tr.optimizer.zero_grad(set_to_none=True)
        tr.optimizer = torch.optim.SGD(tr.raw.parameters(), lr=1.0)  # the step's update is then -grad
        loss, _ = _train_step(tr, iter([(x[:2], y[:2]), (x[2:], y[2:])]))
        assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
        after = tr.raw.state_dict()
        for name, grad in ref_grads.items():
            torch.testing.assert_close(start[name] - after[name], grad, atol=1e-6, rtol=1e-4)
    finally:
        tr.close()


def test_resume_accepts_checkpoints_from_before_train_parallel(tiny_recipe):
    from lmforge.resume import check_resume_config

    recipe = tiny_recipe.model_dump(mode="json")
    old_train = {k: v for k, v in recipe["train"].items() if k != "parallel"}
    state = {"model_config": recipe["model"], "tokenizer_fingerprint": "f", "recipe": {"train": old_train},
             "world_size": 1}
    new = {"model": recipe["model"], "tokenizer_fingerprint": "f", "train": recipe["train"], "world_size": 1}
    assert check_resume_config(state, new) == []  # an old run was data parallel: nothing changed
    new["train"] = {**recipe["train"], "parallel": "fsdp"}
    with pytest.raises(ConfigError, match="train.parallel: 'ddp' -> 'fsdp'"):
        check_resume_config(state, new)


def test_a_micro_batch_without_targets_adds_nothing(tiny_recipe):
    from lmforge.train import _train_step

    recipe = make(tiny_recipe, micro_batch_size=2, batch_size_tokens=2 * 2 * 64)
    tr = setup(recipe, log=quiet)
    try:
        g = torch.Generator().manual_seed(4)
        x = torch.randint(0, recipe.model.vocab_size, (2, 2, 64), generator=g)
        y = x.roll(-1, dims=-1)
        y[1] = -1  # the second micro-batch is all padding (as SFT's last batch may be)
        loss, gnorm = _train_step(tr, iter([(x[0], y[0]), (x[1], y[1])]))
        assert math.isfinite(loss.item()) and math.isfinite(gnorm.item())
        with pytest.raises(TrainingError, match="non-finite loss"):  # no target in the whole step: an error
            _train_step(tr, iter([(x[1], y[1]), (x[1], y[1])]))
    finally:
        tr.close()
