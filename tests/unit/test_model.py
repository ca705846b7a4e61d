import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import ModelConfig
from lmforge.kv_cache import KVCache
from lmforge.models.transformer import Transformer, param_summary


def make(arch="llama", **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(preset="tiny", arch=arch, vocab_size=97, **kw)
    return Transformer(cfg)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_shapes_and_initial_loss(arch):
    m = make(arch)
    x = torch.randint(0, 97, (3, 17))
    y = torch.randint(0, 97, (3, 17))
    logits = m(x)
    assert logits.shape == (3, 17, 97)
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    assert abs(loss.item() - math.log(97)) < 0.1  # near-uniform predictions at init


def test_tied_weights_share_storage():
    m = make(tie_embeddings=True)
    assert m.lm_head.weight.data_ptr() == m.tok_emb.weight.data_ptr()
    u = make(tie_embeddings=False)
    assert u.lm_head.weight.data_ptr() != u.tok_emb.weight.data_ptr()
    assert param_summary(u)["total"] - param_summary(m)["total"] == 97 * 64


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("kv", [1, 2, 4])
def test_kv_cache_equals_full_recompute(arch, kv):
    m = make(arch, n_kv_head=kv).eval()
    x = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        full = m(x)
        cache = KVCache(m.cfg, 2, m.cfg.seq_len, "cpu", torch.float32)
        parts = [m(x[:, :10], kv_cache=cache, start_pos=0), m(x[:, 10:13], kv_cache=cache, start_pos=10)]
        parts += [m(x[:, t : t + 1], kv_cache=cache, start_pos=t) for t in range(13, 24)]
    inc = torch.cat(parts, 1)
    # the same math in other matmul shapes: equal up to fp32 rounding, and the same argmax
    torch.testing.assert_close(inc, full, atol=1e-5, rtol=1e-5)
    assert torch.equal(inc.argmax(-1), full.argmax(-1))


def test_causality():
    m = make().eval()
    x = torch.randint(0, 97, (1, 16))
    x2 = x.clone()
    x2[0, 10] = (x2[0, 10] + 1) % 97
    with torch.no_grad():
        a, b = m(x), m(x2)
    assert torch.allclose(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_gqa_has_fewer_kv_params():
    full, grouped = make(n_kv_head=4), make(n_kv_head=1)
    assert grouped.blocks[0].attn.qkv.weight.shape[0] == (4 + 2) * 16
    assert full.blocks[0].attn.qkv.weight.shape[0] == 3 * 64
    assert grouped.num_params() < full.num_params()


def test_context_limit_is_enforced():
    m = make()
    with pytest.raises(ValueError, match="exceeds the model's context"):
        m(torch.zeros(1, 65, dtype=torch.long))


def test_flops_per_token():
    m = make(tie_embeddings=False)
    c = m.cfg
    n_matmul = m.num_params() - m.tok_emb.weight.numel()
    assert m.flops_per_token() == 6 * n_matmul + 12 * c.n_layer * c.n_embd * c.seq_len


def test_residual_init_is_scaled():
    m = Transformer(ModelConfig(preset="tiny", n_layer=8, vocab_size=97))
    std_proj = m.blocks[0].attn.proj.weight.std().item()
    std_qkv = m.blocks[0].attn.qkv.weight.std().item()
    assert std_proj == pytest.approx(0.02 / 4, rel=0.2)
    assert std_qkv == pytest.approx(0.02, rel=0.2)
