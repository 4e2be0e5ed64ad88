"""
Hidden graded tests: in the autograder bundle (as hidden_tests.py, next to unittests.py), never in the
student release; students see their results once grades are published. They are graded like
unittests.py (@graded points and TODO regions) and `python -m instructor check` holds them to the same
rules. They catch what the public tests' fixed shapes cannot: code written for one shape only.
"""

import math

import pytest
import torch
from torch.nn import functional as F

from unittests import assert_close, graded, load

MODEL_REGIONS = ("gpt_embed", "gpt_logits", "block", "mlp", "rotary", "attn_qkv", "attn_scores", "attn_mask",
                 "attn_softmax", "attn_values", "attn_flash", "attn_out")


def rotate(t, base=10000.0):
    """Rotary embedding of t (B, nh, T, hs) for positions 0..T-1, half-split pairs."""
    hs, T = t.size(-1), t.size(-2)
    angles = torch.outer(torch.arange(T).float(), base ** (-torch.arange(0, hs, 2).float() / hs))  # (T, hs/2)
    t1, t2 = t.chunk(2, dim=-1)
    return torch.cat((t1 * angles.cos() - t2 * angles.sin(), t1 * angles.sin() + t2 * angles.cos()), dim=-1)


def plain_forward(model, idx):
    """The model's logits computed from its parameters with torch functions only."""
    cfg = model.config
    B, T = idx.shape
    C, nh = cfg.n_embd, cfg.n_head
    x = model.transformer.wte.weight[idx]
    if cfg.abs_emb:
        x = x + model.transformer.wpe.weight[:T]
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    for block in model.transformer.h:
        h = F.layer_norm(x, (C,), block.ln_1.weight, block.ln_1.bias)
        q, k, v = (t.reshape(B, T, nh, C // nh).transpose(1, 2)
                   for t in F.linear(h, block.attn.c_attn.weight, block.attn.c_attn.bias).split(C, dim=-1))
        if not cfg.abs_emb:
            q, k = rotate(q, cfg.rope_base), rotate(k, cfg.rope_base)
        att = (q @ k.transpose(-2, -1) / math.sqrt(C // nh)).masked_fill(future, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, C)
        x = x + F.linear(y, block.attn.c_proj.weight, block.attn.c_proj.bias)
        h = F.layer_norm(x, (C,), block.ln_2.weight, block.ln_2.bias)
        x = x + F.linear(F.gelu(F.linear(h, block.mlp.c_fc.weight, block.mlp.c_fc.bias), approximate="tanh"),
                         block.mlp.c_proj.weight, block.mlp.c_proj.bias)
    x = F.layer_norm(x, (C,), model.transformer.ln_f.weight, model.transformer.ln_f.bias)
    return F.linear(x, model.lm_head.weight)


@pytest.mark.parametrize("abs_emb", [False, True], ids=["rope", "learned"])
@pytest.mark.parametrize("flash", [False, True], ids=["manual", "flash"])
@graded(2, "gpt_logits", needs=MODEL_REGIONS)
def test_other_shape_matches_plain_torch(flash, abs_emb):
    """3 heads of 16, one batch row, 7 tokens: nothing may be hard-coded to the public tests' shapes."""
    gpt = load("gpt")
    torch.manual_seed(3)
    config = gpt.GPTConfig(vocab_size=11, block_size=9, n_layer=2, n_head=3, n_embd=48, dropout=0.0,
                           use_flash_attn=flash, abs_emb=abs_emb)
    model = gpt.GPT(config).eval()
    idx = torch.randint(0, 11, (1, 7))
    with torch.no_grad():
        logits, _ = model(idx)
        assert_close(logits, plain_forward(model, idx), "logits of a (3 heads x 16, 2 layers) model vs plain torch",
                     "gpt_logits")


@graded(1, "sample_top_k", "sample_top_p", needs=("sample_temperature", "sample_draw"))
def test_narrowest_sampling_is_greedy():
    """top_k=1, or a top_p smaller than any probability, leaves only the most likely token of each row."""
    gpt = load("gpt")
    torch.manual_seed(5)
    logits = torch.randn(6, 50) * 3  # (B, V)
    best = logits.argmax(-1, keepdim=True)
    g = torch.Generator().manual_seed(0)
    for kwargs in (dict(top_k=1), dict(top_p=1e-6), dict(top_k=3, top_p=1e-6)):
        ids = gpt.sample_next(logits, temperature=0.7, generator=g, **kwargs)
        if not torch.equal(ids, best):
            pytest.fail(f"sample_next(..., {kwargs}) must return the argmax of each row: expected "
                        f"{best.view(-1).tolist()}, got {ids.view(-1).tolist()}; look at TODO[sample_top_k] / "
                        f"TODO[sample_top_p]", pytrace=False)
