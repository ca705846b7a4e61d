import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.kv_cache import KVCache, kv_cache_bytes
from lmforge.models.transformer import Transformer

CFG = ModelConfig(arch="llama", vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_kv_head=2, seq_len=16)


def _kv(B, T, fill):
    return torch.full((B, CFG.kv_heads, T, CFG.head_dim), float(fill))


def test_block_writes_return_the_prefix():
    cache = KVCache(CFG, 2, 8, "cpu", torch.float32)
    k, v = cache.update(0, _kv(2, 3, 1), _kv(2, 3, 2), start_pos=0)
    assert k.shape == (2, CFG.kv_heads, 3, CFG.head_dim) and (v == 2).all()
    k, _ = cache.update(0, _kv(2, 1, 5), _kv(2, 1, 5), start_pos=3)
    assert k.shape[2] == 4 and (k[:, :, 3] == 5).all() and (k[:, :, :3] == 1).all()
    with pytest.raises(ValueError, match="holds 8"):
        cache.update(0, _kv(2, 2, 0), _kv(2, 2, 0), start_pos=7)


def test_selected_rows_and_per_row_positions():
    cache = KVCache(CFG, 3, 8, "cpu", torch.float32)
    cache.select(1, 2)
    cache.update(1, _kv(1, 2, 7), _kv(1, 2, 7), start_pos=0)
    assert (cache.k[1, 1, :, :2] == 7).all() and (cache.k[1, 0] == 0).all() and (cache.k[1, 2] == 0).all()
    # rows 0..2 each write one token at their own position
    k_new = torch.arange(3, dtype=torch.float32).view(3, 1, 1, 1).expand(3, CFG.kv_heads, 1, CFG.head_dim)
    cache.select(0, 3, torch.tensor([0, 2, 5]), kv_len=6)
    k, _ = cache.update(1, k_new, k_new, start_pos=0)
    assert k.shape == (3, CFG.kv_heads, 6, CFG.head_dim)
    assert (k[0, :, 0] == 0).all() and (k[1, :, 2] == 1).all() and (k[2, :, 5] == 2).all()
    assert (k[1, :, :2] == 7).all()  # the earlier block is untouched
    with pytest.raises(ValueError, match="one token"):
        cache.update(1, _kv(3, 2, 0), _kv(3, 2, 0), start_pos=0)
    with pytest.raises(ValueError, match="outside"):
        cache.select(2, 4)


def test_move_row_and_reorder():
    cache = KVCache(CFG, 3, 8, "cpu", torch.float32)
    cache.k[:, 2, :, :4] = 9
    cache.move_row(2, 0, 4)
    assert (cache.k[:, 0, :, :4] == 9).all() and (cache.k[:, 0, :, 4:] == 0).all()
    cache.reorder(torch.tensor([0]))
    assert cache.k.shape[1] == 1 and cache.batch_size == 1
    assert cache.nbytes() == kv_cache_bytes(CFG, 1, 8)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_model_with_cache_matches_full_forward(arch):
    torch.manual_seed(0)
    cfg = CFG.model_copy(update={"arch": arch})
    model = Transformer(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 10))
    full = model(idx)
    cache = KVCache(cfg, 2, 16, "cpu", torch.float32)
    with torch.no_grad():
        parts = [model(idx[:, :6], kv_cache=cache)]
        parts += [model(idx[:, t:t + 1], kv_cache=cache, start_pos=t) for t in range(6, 10)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-4)
