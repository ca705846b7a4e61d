"""Chat fine-tuning (SFT): a pretrained checkpoint + conversations → an instruction-following model.

`run_sft` resolves the recipe against the base run (unset keys inherited, SFT defaults, a printed table
of where every value came from), adds the chat tokens to the tokenizer and the embeddings, prepares the
conversations (lmforge.sft_data) and trains with `train.setup(..., loaders, loss_fn, tokenizer)` and
`pipeline.train_and_report`: the one training loop, with SFT batches and the masked loss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from lmforge.config import ModelConfig, Recipe
from lmforge.errors import CheckpointError, ConfigError, TrainingError
from lmforge.loaders.sft import SFTLoader, SFTSplit, sft_loss
from lmforge.tokenizer import Tokenizer

# Set for SFT unless the recipe sets them: a gentle, decaying learning rate from the first step.
SFT_DEFAULTS: dict[str, Any] = {"train.lr": 5e-5, "train.min_lr": 5e-6, "train.warmup_steps": 0,
                                "train.schedule": "cosine", "train.max_time_s": 0.0}
# Always SFT's: the "full" final evaluation would score the pretraining shards instead of the chats.
FORCED: dict[str, Any] = {"eval.final": "batches"}
INHERITED_SECTIONS = ("model", "train", "eval", "sample")
FREE_MODEL_KEYS = {"preset", "dropout", "vocab_size"}  # what SFT may change in the base architecture


@dataclass
class Base:
    """The pretrained model SFT starts from."""

    path: Path
    model: dict[str, Any]
    recipe: dict[str, Any] | None
    tokenizer: Tokenizer
    lineage: dict[str, Any]
    hf: bool = False


def load_base(path: str | Path) -> Base:
    """A checkpoint dir, a run dir or an exported Hugging Face dir → its config, recipe and tokenizer."""
    from lmforge.checkpoint import read_state, resolve_checkpoint
    from lmforge.tokenizer import load_tokenizer

    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"sft.base {p} does not exist; train a model first (e.g. `lmforge demo`)")
    if (p / "config.json").is_file() and not (p / "state.json").is_file():
        from lmforge.fsutil import read_json
        from lmforge.models.hf import from_hf_config

        cfg = from_hf_config(read_json(p / "config.json"), None)
        tok = load_tokenizer(p)
        return Base(p, cfg.model_dump(mode="json"), None, tok, _lineage(p, {}, tok), hf=True)
    ckpt = resolve_checkpoint(p)
    state = read_state(ckpt)
    if "model_config" not in state:
        raise CheckpointError(f"{ckpt}/state.json has no model_config")
    tok = Tokenizer.load(ckpt)
    return Base(ckpt, state["model_config"], state.get("recipe"), tok, _lineage(ckpt, state, tok))


def _lineage(path: Path, state: dict, tok: Tokenizer) -> dict[str, Any]:
    return {"base_checkpoint": str(path.resolve()), "base_step": state.get("step"),
            "base_weights_sha256": (state.get("files") or {}).get("model.safetensors"),  # None if sharded
            "base_tokenizer_fingerprint": tok.fingerprint}


# ---- the recipe ---------------------------------------------------------------------------------------
def explicit_keys(recipe: Recipe) -> set[str]:
    """`section.key` for every key the recipe file or --set gave (the rest may be inherited)."""
    keys = {"name"} & recipe.model_fields_set
    for name in Recipe.model_fields:
        section = getattr(recipe, name)
        if hasattr(section, "model_fields_set"):
            keys |= {f"{name}.{k}" for k in section.model_fields_set}
    return keys


def sft_run_dir(recipe: Recipe, explicit: set[str]) -> Path:
    if "train.run_dir" in explicit:
        return Path(recipe.train.run_dir)
    return Path("runs") / (recipe.name if "name" in explicit else "sft")


def check_recipe(recipe: Recipe, base: Base, explicit: set[str]) -> None:
    bad = [f"model.{k} = {getattr(recipe.model, k)!r} (the base has {base.model.get(k)!r})"
           for k in ModelConfig.model_fields
           if f"model.{k}" in explicit and k not in FREE_MODEL_KEYS and getattr(recipe.model, k) != base.model.get(k)]
    if bad:
        raise ConfigError(f"the recipe's [model] does not match the base model {base.path}: " + "; ".join(bad)
                          + ". SFT keeps the base architecture: remove these keys")
    if "train.init_from" in explicit:
        raise ConfigError("train.init_from is set: SFT starts from sft.base; set that instead")


def inherit(recipe: Recipe, base: Base, explicit: set[str], computed: dict[str, Any],
            fixed: dict[str, Any]) -> list[tuple[str, Any, str]]:
    """Fill `recipe`'s [model], [train], [eval] and [sample]: `fixed` > recipe keys > `computed` > SFT
    defaults > the base run's values > defaults. Returns (key, value, where it came from) for each key."""
    base_sections = {**(base.recipe or {}), "model": base.model}
    fixed = {**FORCED, **fixed}
    rows = []
    for name in INHERITED_SECTIONS:
        section, theirs = getattr(recipe, name), base_sections.get(name) or {}
        values = {}
        for key in type(section).model_fields:
            full, was = f"{name}.{key}", theirs.get(key, "(unset)")
            if full in fixed:
                value, source = fixed[full], "sft"
            elif full in explicit:
                value, source = getattr(section, key), "recipe"
            elif full in computed:
                value, source = computed[full], "sft"
            elif full in SFT_DEFAULTS:
                value, source = SFT_DEFAULTS[full], "sft default"
            elif key in theirs:
                value, source = theirs[key], "base run"
            else:
                value, source = getattr(section, key), "default"
            if source != "base run" and was != "(unset)" and was != value:
                source += f" (base: {_short(was)})"
            values[key] = value
            rows.append((full, value, source))
        # the whole section at once: its validators check fields together (n_embd with n_head, ...)
        setattr(recipe, name, type(section).model_validate(values))
    return rows


def _short(value: Any, width: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def format_table(rows: list[tuple[str, Any, str]]) -> str:
    width = max(len(k) for k, _, _ in rows)
    return "\n".join(f"  {k:<{width}}  {_short(v):<24}  {src}" for k, v, src in rows)


# ---- weights ------------------------------------------------------------------------------------------
def extend_embeddings(weights: dict[str, torch.Tensor], old_tokens: int, new_tokens: int,
                      rows: int) -> dict[str, torch.Tensor]:
    """Embedding (and untied head) matrices grown to `rows`; rows of ids from `old_tokens` on (the new
    tokens, and padding rows no token ever used) start at the mean of the old tokens' rows, the usual
    choice: the new tokens begin as an average token. Old rows are copied unchanged."""
    out = dict(weights)
    for key in ("tok_emb.weight", "lm_head.weight"):
        w = weights.get(key)
        if w is None or (new_tokens <= old_tokens and rows == w.shape[0]):
            continue
        grown = torch.empty(max(rows, w.shape[0]), w.shape[1], dtype=w.dtype)
        grown[: w.shape[0]] = w
        grown[old_tokens:] = w[:old_tokens].double().mean(0).to(w.dtype)
        out[key] = grown
    return out


def base_weights(base: Base) -> dict[str, torch.Tensor]:
    if base.hf:
        from lmforge.models.hf import load_hf_dir

        return load_hf_dir(base.path)[1]
    from lmforge.checkpoint import load_model_weights, model_state
    from lmforge.models.transformer import Transformer

    # through the model, so that every checkpoint layout (safetensors, sharded dcp/) reads the same way
    model = Transformer(ModelConfig.model_validate(base.model))
    load_model_weights(model, base.path)
    return model_state(model)


def write_start_checkpoint(folder: Path, weights: dict[str, torch.Tensor], cfg: ModelConfig, tok: Tokenizer,
                           lineage: dict[str, Any]) -> Path:
    """The base weights with the grown vocabulary, as a checkpoint `train.init_from` can load."""
    from safetensors.torch import save_file

    from lmforge.fsutil import atomic_dir, atomic_write_json, sha256_file

    if cfg.tie_embeddings:
        weights = {k: v for k, v in weights.items() if k != "lm_head.weight"}
    with atomic_dir(folder) as tmp:
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / "model.safetensors"))
        tok.save(tmp)
        atomic_write_json(tmp / "state.json", {
            "step": 0, "model_config": cfg.model_dump(mode="json"), "tokenizer_fingerprint": tok.fingerprint,
            "sft": lineage, "files": {"model.safetensors": sha256_file(tmp / "model.safetensors")}})
    return folder


# ---- the run ------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """Everything `run_sft` resolved before training starts."""

    recipe: Recipe
    base: Base
    tokenizer: Tokenizer
    train: SFTSplit
    val: SFTSplit
    prompts: list[list[dict]]
    lineage: dict[str, Any]
    table: list[tuple[str, Any, str]] = field(default_factory=list)
    supervised_fraction: float = 0.0

    def loaders(self, recipe: Recipe, dist: Any, device: torch.device) -> tuple[SFTLoader, SFTLoader]:
        return make_loaders(recipe, self.tokenizer, self.train, self.val, rank=dist.rank,
                            world_size=dist.world_size, device=device)


def make_loaders(recipe: Recipe, tok: Tokenizer, train: SFTSplit, val: SFTSplit, *, rank: int = 0,
                 world_size: int = 1, device: Any = "cpu") -> tuple[SFTLoader, SFTLoader]:
    pad = next(i for i in (tok.pad_id, tok.eos_id, 0) if i is not None)
    common = dict(pad_id=pad, rank=rank, world_size=world_size, device=device)
    b, t, seed = recipe.train.micro_batch_size, recipe.model.seq_len, recipe.train.seed
    return (SFTLoader(train, b, t, packing=recipe.sft.packing == "pack", seed=seed, **common),
            SFTLoader(val, b, t, packing=False, shuffle=False, loop=False, **common))


def _schedule(recipe: Recipe, train: SFTLoader, val: SFTLoader, world: int) -> dict[str, Any]:
    """max_steps from the epochs, the validation cadence, and eval.batches covering the val split once."""
    t = recipe.train
    micro = sum(train.steps_in_epoch(e) for e in range(recipe.sft.epochs))
    per_micro = t.micro_batch_size * recipe.model.seq_len * world
    accum = max(1, t.batch_size_tokens // per_micro) if t.batch_size_tokens else 1
    steps = max(1, -(-micro // accum))
    every = max(1, steps // (recipe.sft.epochs * recipe.sft.evals_per_epoch))
    return {"train.max_steps": steps, "train.eval_every": every, "train.save_every": every,
            "eval.batches": max(1, val.steps_in_epoch(0))}


def prepare_sft(recipe: Recipe, *, log: Callable[[str], Any] = print) -> Path:
    """`lmforge sft prepare`: tokenize the conversations with the base's chat tokenizer, write them with
    meta.json and examples.txt (rendered conversations, supervised spans marked); returns the folder."""
    from lmforge.loaders.sft import ensure_prepared

    explicit = explicit_keys(recipe)
    base = _base_of(recipe)
    run_dir = sft_run_dir(recipe, explicit)
    data = ensure_prepared(recipe.sft, base.tokenizer.with_chat_tokens(), int(base.model["seq_len"]), run_dir,
                           force=True, log=log)
    log(f"sft data: supervised tokens {data.train.supervised_fraction():.1%} of the training targets")
    return Path(recipe.sft.prepared_dir) if recipe.sft.prepared_dir else run_dir / "sft_data"


def _base_of(recipe: Recipe) -> Base:
    if not recipe.sft.source:
        raise ConfigError("sft.source is not set: point it at a .jsonl/.json file of conversations or hf:NAME")
    return load_base(recipe.sft.base)


def plan_sft(recipe: Recipe, *, log: Callable[[str], Any] = print, world: int = 1) -> Plan:
    """Resolve the recipe against the base, extend the tokenizer, prepare the data, print the table."""
    from lmforge.loaders.sft import ensure_prepared

    explicit = explicit_keys(recipe)
    base = _base_of(recipe)
    check_recipe(recipe, base, explicit)
    run_dir = sft_run_dir(recipe, explicit)
    if base.path.resolve() in (run_dir.resolve(), *run_dir.resolve().parents) or (
            run_dir.resolve() in base.path.resolve().parents and not base.hf):
        raise ConfigError(f"train.run_dir {run_dir} holds the base model {base.path}; choose another run dir")
    tok = base.tokenizer.with_chat_tokens()
    added = [n for n in tok.special_tokens if n not in base.tokenizer.special_tokens]
    lineage = {**base.lineage, "added_tokens": added, "chat_template": tok.chat_template}
    tok.meta["sft"] = base.lineage  # the tokenizer files travel into every checkpoint: so does the lineage
    data = ensure_prepared(recipe.sft, tok, int(base.model["seq_len"]), run_dir, log=log)
    if not len(data.val):
        raise ConfigError("no validation conversations: set sft.val_fraction above 0 (and make sure some "
                          "held-out conversations fit the model's context)")
    fixed = {"train.run_dir": str(run_dir), "train.init_from": str(run_dir / "sft_base"),
             "model.vocab_size": max(int(base.model["vocab_size"]), tok.vocab_size)}
    probe = recipe.model_copy(deep=True)  # resolved once without the schedule, which depends on the rest
    inherit(probe, base, explicit, {}, fixed)
    train_l, val_l = make_loaders(probe, tok, data.train, data.val, world_size=world)
    computed = _schedule(probe, train_l, val_l, world)
    if data.prompts:
        computed["sample.prompts"] = [m[-1]["content"] for m in data.prompts]
    table = inherit(recipe, base, explicit, computed, fixed)
    recipe.tokenizer.dir = str(run_dir / "tokenizer")
    frac = train_l.supervised_fraction()
    log(f"sft: base {base.path} ({_short(base.lineage['base_weights_sha256'] or 'hf', 16)}); chat tokens "
        f"added: {', '.join(added) or 'none (already there)'}; vocab {base.tokenizer.vocab_size} -> {tok.vocab_size}")
    log("sft: settings (recipe = set in the recipe, base run = inherited, sft = for fine-tuning):\n"
        + format_table(table))
    log(f"sft: supervised tokens {frac:.1%} of the training targets (assistant answers and their end of turn)")
    if not 0.0 < frac < 1.0:
        raise TrainingError(f"the supervised fraction of training targets is {frac:.3f}: the loss mask is "
                            + ("empty: no assistant tokens" if frac == 0 else "missing: every token is trained")
                            + "; check the data's roles and lmforge.chat_template")
    lineage["supervised_fraction"] = frac
    return Plan(recipe, base, tok, data.train, data.val, data.prompts, lineage, table, frac)


def _start_files(plan: Plan, resume: bool, fresh: bool) -> None:
    """The chat tokenizer and the start checkpoint, written before training (checked on --resume)."""
    r = plan.recipe
    run_dir, tok_dir = Path(r.train.run_dir), Path(r.tokenizer.dir)
    ckpts = run_dir / "checkpoints"
    if not resume and not fresh and ckpts.is_dir() and any(ckpts.iterdir()):
        raise ConfigError(f"{run_dir} already holds checkpoints: pass --resume to continue it or --fresh "
                          "to start over")
    if resume:
        if not tok_dir.is_dir() or Tokenizer.load(tok_dir).fingerprint != plan.tokenizer.fingerprint:
            raise ConfigError(f"cannot resume: {tok_dir} is missing or differs from the base's chat tokenizer")
        return
    plan.tokenizer.save(tok_dir)
    weights = extend_embeddings(base_weights(plan.base), plan.base.tokenizer.vocab_size,
                                plan.tokenizer.vocab_size, r.model.vocab_size)
    write_start_checkpoint(Path(r.train.init_from), weights, r.model, plan.tokenizer, plan.lineage)


def run_sft(recipe: Recipe, *, resume: bool = False, fresh: bool = False, log: Callable[[str], Any] = print,
            stop_at: int | None = None) -> dict[str, Any]:
    """`lmforge sft RECIPE`: plan, write the start files, train with the one loop, answer held-out prompts."""
    from lmforge.fsutil import atomic_write_json
    from lmforge.pipeline import train_and_report
    from lmforge.runtime import init_distributed
    from lmforge.train import setup

    dist = init_distributed()
    if dist.enabled and recipe.train.parallel == "fsdp":  # its validation and chats run on rank 0 alone
        raise ConfigError('lmforge sft runs data parallel only: set train.parallel = "ddp" (FSDP fine-tuning '
                          "is not supported yet)")
    if dist.is_main:  # one process prepares the data and writes the start files; the others then read them
        plan = plan_sft(recipe, log=log, world=dist.world_size)
        _start_files(plan, resume, fresh)
    if dist.enabled:
        torch.distributed.barrier()
    if not dist.is_main:
        plan = plan_sft(recipe, log=lambda *_: None, world=dist.world_size)
    tr = setup(plan.recipe, resume=resume, fresh=fresh, log=log, loaders=plan.loaders, loss_fn=sft_loss,
               tokenizer=plan.tokenizer)
    tr.extra_state = {"sft": plan.lineage, "chat_template": plan.tokenizer.chat_template}
    tr.stop_at = stop_at
    if tr.step == 0:  # the base model on the SFT data: the "before" that the run's numbers compare with
        from lmforge.train import validate

        before = validate(tr)
        log(f"before fine-tuning: val loss {before['loss']:.4f} | bpb {before['bpb']:.4f}")
        plan.lineage["val_before"] = {"loss": before["loss"], "bpb": before["bpb"]}
        if dist.is_main and plan.prompts:
            write_chats(tr.raw, plan.tokenizer, plan.prompts, tr.recipe, tr.run_dir / "chats.txt", "before")
    if dist.is_main:
        atomic_write_json(tr.run_dir / "sft_lineage.json", plan.lineage)
    result = train_and_report(tr)
    if dist.is_main and plan.prompts:
        result["chats"] = write_chats(tr.raw, plan.tokenizer, plan.prompts, tr.recipe, tr.run_dir / "chats.txt",
                                      f"step {tr.step}")
        for messages, answer in result["chats"]:
            log(f"\n--- chat: {messages[-1]['content'][:200]!r}\n{answer}")
    return result


def answer(model: torch.nn.Module, tokenizer: Any, messages: list[dict], params: Any) -> str:
    """The model's reply to `messages`: the chat template for SFT models, plain "User:" text otherwise."""
    from lmforge.engine import Engine
    from lmforge.generate import render_messages

    prompt = render_messages(tokenizer, messages)
    room = model.cfg.seq_len - min(params.max_new_tokens, model.cfg.seq_len // 2)
    ids = prompt.ids[-room:]
    was_training = model.training
    model.eval()
    engine = Engine(model, tokenizer, max_batch=1, max_len=min(len(ids) + params.max_new_tokens, model.cfg.seq_len))
    row = engine.submit(ids, replace(params, stop=tuple(params.stop) + prompt.stop), stop_ids=prompt.stop_ids)
    engine.run()
    model.train(was_training)
    return row.text


def write_chats(model: torch.nn.Module, tokenizer: Any, prompts: list[list[dict]], recipe: Recipe, path: Path,
                label: str) -> list[tuple[list[dict], str]]:
    """Answer the held-out prompts and append them to `path` (chats.txt)."""
    from lmforge.sampling import SamplingParams

    s = recipe.sample
    out = []
    for i, messages in enumerate(prompts):
        params = SamplingParams(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k,
                                top_p=s.top_p, seed=s.seed + i)
        out.append((messages, answer(model, tokenizer, messages, params)))
    with open(path, "a", encoding="utf-8") as f:
        for messages, text in out:
            f.write(f"=== {label} | user: {messages[-1]['content']!r}\n{text}\n\n")
    return out
