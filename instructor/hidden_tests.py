"""
Hidden graded tests: in the autograder bundle (as hidden_tests.py, next to unittests.py), never in the
student release; students see their results once grades are published. They are graded like
unittests.py (@graded points and TODO regions, inputs and weights drawn from the tests' own generator,
expected values from plain torch) and `python -m instructor check` holds them to the same rules. They
catch what the public tests' shapes cannot: code written for one shape only.
"""

import pytest
import torch

from unittests import (assert_close, choice, describe, fail, gpt_weights, graded, integral, load, make, new_seed, pick,
                       plain_forward, randint, randn, seeded_inputs)  # noqa: F401 (seeded_inputs: autouse, here too)

MODEL_REGIONS = ("gpt_embed", "gpt_logits", "block", "mlp", "rotary", "attn_qkv", "attn_scores", "attn_mask",
                 "attn_softmax", "attn_values", "attn_flash", "attn_out")


def assert_tokens(actual, expected, what, todo):
    """Compare token ids exactly."""
    if not integral(actual) or actual.shape != expected.shape:
        fail(f"{what}: expected token ids of shape {tuple(expected.shape)}, got {describe(actual)}", todo)
    if not torch.equal(actual.long(), expected):
        fail(f"{what}: expected {expected.tolist()}, got {actual.tolist()}", todo)


@pytest.mark.parametrize("abs_emb", [False, True], ids=["rope", "learned"])
@pytest.mark.parametrize("flash", [False, True], ids=["manual", "flash"])
@graded(2, "gpt_logits", needs=MODEL_REGIONS)
def test_other_shape_matches_plain_torch(flash, abs_emb):
    """2 or 3 heads of 6, 10 or 16, 3 or 4 layers, other lengths: nothing may be hard-coded to the public tests'
    shapes. (Never 1 layer: there, applying only the first block or ln_f after every block is right.)"""
    n_head, head_size, n_layer = choice((2, 3)), choice((6, 10, 16)), pick(3, 5)
    config = dict(vocab_size=pick(5, 30), block_size=pick(6, 13), n_layer=n_layer, n_head=n_head,
                  n_embd=n_head * head_size, dropout=0.0, use_flash_attn=flash, abs_emb=abs_emb)
    weights = gpt_weights(config)
    model = make("GPT", config, weights)
    idx = randint(0, config["vocab_size"], pick(1, 4), pick(2, config["block_size"] + 1))
    with torch.no_grad():
        assert_close(model(idx)[0], plain_forward(weights, config, idx),
                     f"logits of a ({n_head} heads x {head_size}, {n_layer} layers) model vs plain torch", "gpt_logits")


@graded(1, "sample_top_k", "sample_top_p", needs=("sample_temperature", "sample_draw"))
def test_narrowest_sampling_is_greedy():
    """top_k=1, or a top_p smaller than any probability, leaves only the most likely token of each row."""
    gpt = load("gpt")
    logits = randn(pick(2, 8), pick(20, 60)) * 3  # (B, V)
    best = logits.argmax(-1, keepdim=True)
    g = torch.Generator().manual_seed(new_seed())
    for kwargs, todo in ((dict(top_k=1), "sample_top_k"), (dict(top_p=1e-6), "sample_top_p"),
                         (dict(top_k=3, top_p=1e-6), "sample_top_p")):
        assert_tokens(gpt.sample_next(logits.clone(), temperature=0.7, generator=g, **kwargs), best,
                      f"sample_next(..., {kwargs}) must return the argmax of each row", todo)
