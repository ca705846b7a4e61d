from pathlib import Path

import pytest
import tomllib

from lmforge.config import MODEL_PRESETS, ModelConfig, Recipe, load_recipe, to_toml
from lmforge.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_are_the_demo_recipe():
    # `lmforge demo` runs the built-in defaults; recipes/demo.toml spells them out for users
    on_disk = load_recipe(ROOT / "recipes" / "demo.toml")
    assert on_disk.model_dump() == Recipe().model_dump()


def test_set_overrides_are_typed():
    r = load_recipe(None, ["train.max_steps=200", "train.lr=3e-4", "model.tie_embeddings=false",
                           "train.run_dir=runs/x", "sample.prompts=['a', 'b']"])
    assert r.train.max_steps == 200 and isinstance(r.train.max_steps, int)
    assert r.train.lr == pytest.approx(3e-4)
    assert r.model.tie_embeddings is False
    assert r.train.run_dir == "runs/x"
    assert r.sample.prompts == ["a", "b"]


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.max_steps=abc", "train.max_steps: Input should be a valid integer"),
        ("train.maxsteps=3", "train.maxsteps: unknown key"),
        ("train.dtype=fp8", "train.dtype"),
        ("model.n_head=3", "n_embd (256) must be divisible by n_head (3)"),
        ("model.preset=huge", "unknown preset 'huge'"),
        ("novalue", "expected section.key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_recipe(None, [override])
    assert fragment in str(e.value)
    assert "\n" not in str(e.value).strip() or len(str(e.value).splitlines()) <= 2


def test_unknown_key_in_file(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text("[train]\nmax_step = 5\n")
    with pytest.raises(ConfigError, match=r"r.toml: train.max_step: unknown key"):
        load_recipe(p)
    p.write_text("[train]\nmax_steps = 'many'\n")
    with pytest.raises(ConfigError, match=r"train.max_steps"):
        load_recipe(p)
    with pytest.raises(ConfigError, match="not found"):
        load_recipe(tmp_path / "missing.toml")


def test_preset_then_explicit_fields_win():
    m = ModelConfig(preset="gpt2-124m", n_layer=2)
    assert m.n_layer == 2 and m.n_embd == 768 and m.arch == "gpt2"
    for name in MODEL_PRESETS:
        ModelConfig(preset=name)  # every preset is valid


def test_derived_values():
    m = ModelConfig(arch="llama", n_embd=256, n_head=4, n_kv_head=0)
    assert m.kv_heads == 4 and m.head_dim == 64 and m.hidden_dim == 704
    assert ModelConfig(arch="gpt2", n_embd=128, n_head=4).hidden_dim == 512


def test_toml_round_trip():
    r = load_recipe(None, ["model.preset=tiny"])
    assert Recipe.model_validate(tomllib.loads(to_toml(r))) == r


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_recipe_loads(path):
    recipe = load_recipe(path)
    assert recipe.model.n_embd % recipe.model.n_head == 0
