"""
Graded tests of Micro-GPT. Run them with `pytest unittests.py` (or `python unittests.py`).

Each test checks one concept, carries its points (@graded) and names the TODO regions it checks
(`pytest unittests.py -k <region id>` runs them); a failure says what was expected, what came out,
and which TODO to look at. Your modules are imported inside the tests, so a mistake in one file
fails only the tests that use it. Reference values come from unittests_ref.pt, computed with the
reference solution.
"""

import importlib
import math
import os
import sys

import pytest
import torch
from torch.nn import functional as F

REF_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "unittests_ref.pt")


def graded(points, *todos, needs=()):
    """Mark a test with its points, the TODO regions it checks (`pytest unittests.py -k <region id>` selects
    it) and those it only needs to run (needs)."""
    def mark(test):
        covered = dict.fromkeys((*todos, *needs))  # in order, once each
        return pytest.mark.points(points)(pytest.mark.todo(*covered)(pytest.mark.checks(*todos)(test)))
    return mark


def load(module):
    """Import one of your modules; an error there fails this test only."""
    try:
        return importlib.import_module(module)
    except Exception as e:  # a syntax error is an Exception too
        pytest.fail(f"cannot import {module}.py: {type(e).__name__}: {e}", pytrace=False)


def fail(message, todo):
    pytest.fail(f"{message}; look at TODO[{todo}]", pytrace=False)


def close(actual, expected, atol=1e-5, rtol=1e-4):
    """Whether two tensors agree (for deciding which part to blame before asserting)."""
    return (torch.is_tensor(actual) and actual.shape == expected.shape
            and torch.allclose(actual.detach().double(), expected.detach().double(), atol=atol, rtol=rtol))


def assert_close(actual, expected, what, todo, atol=1e-5, rtol=1e-4):
    """Compare tensors; on failure report the largest difference and where it is."""
    if not torch.is_tensor(actual):
        fail(f"{what}: expected a tensor, got {type(actual).__name__}", todo)
    if actual.shape != expected.shape:
        fail(f"{what}: expected shape {tuple(expected.shape)}, got {tuple(actual.shape)}", todo)
    actual, expected = actual.detach().double(), expected.detach().double()
    diff = (actual - expected).abs()
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, math.inf), diff)
    if not bool((diff <= atol + rtol * expected.abs()).all()):
        where = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        fail(f"{what} differs from the expected values: largest difference {diff.max().item():.3g} at index "
             f"{where} (expected {expected[where].item():.6g}, got {actual[where].item():.6g})", todo)


@pytest.fixture(scope="module")
def ref():
    return torch.load(REF_PATH, weights_only=True)


def tiny_config(**overrides):
    gpt = load("gpt")
    return gpt.GPTConfig(**{**dict(vocab_size=13, block_size=16, n_layer=2, n_head=4, n_embd=32, dropout=0.0),
                            **overrides})


def ref_model(ref, **overrides):
    """The reference model with the stored weights (rotary positions unless abs_emb=True)."""
    gpt = load("gpt")
    config = gpt.GPTConfig(**{**ref["config"], **overrides})
    model = gpt.GPT(config).eval()
    state = dict(ref["state_dict"])
    if config.abs_emb:
        state["transformer.wpe.weight"] = ref["wpe"]
    model.load_state_dict(state)
    return model


# ----------------------------------------------------------------------------- tokenizer and data

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n"


@graded(2, "tokenizer_encode", "tokenizer_decode")
def test_tokenizer_round_trip(tmp_path):
    dataset = load("dataset")
    tok = dataset.CharTokenizer(TEXT)
    chars = sorted(set(TEXT))
    assert tok.vocab_size == len(chars), f"vocab_size should be {len(chars)} (distinct characters), got {tok.vocab_size}"
    ids = tok.encode("hear me")
    expected = [chars.index(c) for c in "hear me"]
    if ids != expected:
        fail(f"encode('hear me') should give {expected} (index of each character in sorted order), got {ids}",
             "tokenizer_encode")
    if tok.decode(expected) != "hear me":
        fail(f"decode({expected}) should give 'hear me', got {tok.decode(expected)!r}", "tokenizer_decode")
    assert tok.decode(tok.encode(TEXT)) == TEXT, "decode(encode(text)) must give the text back"
    tok.save(tmp_path / "tok.json")
    assert dataset.CharTokenizer.load(tmp_path / "tok.json").encode(TEXT) == tok.encode(TEXT)


@graded(0)
def test_tokenizer_unknown_character_error():
    dataset = load("dataset")
    tok = dataset.CharTokenizer(TEXT)
    with pytest.raises(ValueError) as error:
        tok.encode("hear Zé")
    message = str(error.value)
    assert "'Z'" in message and "'é'" in message and "position 5" in message, \
        f"the error should name the unknown characters and where they are, got: {message}"


@graded(2, "dataset_item")
def test_dataset_windows_and_shift():
    dataset = load("dataset")
    data = torch.arange(100, 130)  # token ids 100..129, so a window's position is visible in its values
    ds = dataset.TextDataset(data, block_size=8)
    assert len(ds) == 30 - 8, f"a text of 30 tokens has {30 - 8} windows of 8 + 1 tokens, len(ds) gave {len(ds)}"
    for i in (0, 5, len(ds) - 1):
        x, y = ds[i]
        assert_close(x, data[i:i + 8], f"x of ds[{i}]", "dataset_item", atol=0, rtol=0)
        assert_close(y, data[i + 1:i + 9], f"y of ds[{i}] (x shifted by one)", "dataset_item", atol=0, rtol=0)
        if x.dtype != torch.long:
            fail(f"x should be a LongTensor, got {x.dtype}", "dataset_item")


@graded(0)
def test_dataset_split_and_errors():
    dataset = load("dataset")
    data = torch.arange(1000)
    train, val = dataset.train_val_split(data, 0.1)
    assert len(train) == 900 and len(val) == 100 and train[-1] == 899 and val[0] == 900
    with pytest.raises(ValueError, match="too short"):
        dataset.TextDataset(torch.arange(8), block_size=8)


# ----------------------------------------------------------------------------- norms

def norm_inputs():
    """(name, x): spread-out values, and values so close together that eps's place in the formula matters."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    return (("x (std 3)", x * 3 + 1), ("x (std 0.001, variance below eps: eps goes inside the sqrt)", x * 1e-3))


@graded(2, "layernorm")
def test_layernorm_by_hand(ref, monkeypatch):
    """LayerNorm computed by hand (the model uses PyTorch's kernel unless fused_norm=False)."""
    gpt = load("gpt")
    weight, bias = torch.randn(16) * 0.3 + 1, torch.randn(16) * 0.3
    norms = [gpt.LayerNorm(16, bias=True), gpt.LayerNorm(16, bias=False)]
    norms[0].load_state_dict({"weight": weight, "bias": bias})
    norms[1].load_state_dict({"weight": weight})
    ref_ln = gpt.LayerNorm(ref["config"]["n_embd"])  # the hand-written one, with the reference model's weights
    ref_ln.load_state_dict(ref_model(ref).transformer.h[0].ln_1.state_dict())

    def forbidden(*args, **kwargs):
        raise AssertionError("LayerNorm.forward calls F.layer_norm; compute it by hand in TODO[layernorm]")
    monkeypatch.setattr(F, "layer_norm", forbidden)
    monkeypatch.setattr(torch, "layer_norm", forbidden)
    for what, x in norm_inputs():
        for ln, b in zip(norms, (bias, None)):
            mean, var = x.mean(-1, keepdim=True), x.var(-1, keepdim=True, unbiased=False)
            formula = (x - mean) / torch.sqrt(var + 1e-5) * weight + (0 if b is None else b)
            assert_close(ln(x), formula, f"LayerNorm(bias={b is not None}) of {what} vs its formula", "layernorm")
    assert_close(ref_ln(ref["x"]), ref["layernorm_out"], "LayerNorm vs the reference", "layernorm")


@graded(2, "rmsnorm")
def test_rmsnorm_matches_formula_and_torch(ref):
    gpt = load("gpt")
    weight = torch.randn(16) * 0.3 + 1
    rms = gpt.RMSNorm(16)
    rms.load_state_dict({"weight": weight})
    for what, x in norm_inputs():
        expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * weight
        assert_close(rms(x), expected, f"RMSNorm of {what} vs its formula", "rmsnorm")
        assert_close(rms(x), F.rms_norm(x, (16,), weight, 1e-5), f"RMSNorm of {what} vs F.rms_norm", "rmsnorm")
    rms = gpt.RMSNorm(ref["config"]["n_embd"])
    rms.load_state_dict({"weight": ref["rmsnorm_weight"]})
    assert_close(rms(ref["x"]), ref["rmsnorm_out"], "RMSNorm vs the reference", "rmsnorm")


# ----------------------------------------------------------------------------- rotary embedding

def rotary(head_size=8):
    return load("gpt").RotaryEmbedding(head_size)


@graded(1, "rotary")
def test_rotary_identity_at_zero_and_keeps_norms():
    rope = rotary()
    x = torch.randn(2, 3, 10, 8)  # (B, nh, T, hs)
    y = rope(x)
    assert_close(y[:, :, 0], x[:, :, 0], "rotary at position 0 (a rotation by angle 0)", "rotary")
    assert_close(y.norm(dim=-1), x.norm(dim=-1), "vector norms after rotary (rotations keep norms)", "rotary")
    if torch.allclose(y[:, :, 1:], x[:, :, 1:]):
        fail("rotary left positions > 0 unchanged", "rotary")


@graded(2, "rotary")
def test_rotary_scores_depend_only_on_distance():
    rope = rotary()
    qs = rope(torch.randn(8).expand(1, 1, 20, 8))[0, 0]  # the same q at every position, rotated: (20, 8)
    ks = rope(torch.randn(8).expand(1, 1, 20, 8))[0, 0]
    s0 = (qs[2] @ ks[0]).item()
    for m, n in ((3, 1), (7, 5), (19, 17)):
        s = (qs[m] @ ks[n]).item()
        if abs(s - s0) > 1e-4:
            fail(f"q_m . k_n must depend only on m - n: positions (2, 0) give {s0:.6f} but ({m}, {n}) give {s:.6f}",
                 "rotary")


@graded(1, "rotary")
def test_rotary_offset_and_reference(ref):
    rope = rotary()
    x = torch.randn(2, 3, 20, 8)
    full = rope(x)
    assert_close(rope(x[:, :, 7:12], offset=7), full[:, :, 7:12],
                 "rotary of positions 7..11 given offset=7 vs the same slice of the full sequence", "rotary")
    if rope(x.bfloat16()).dtype != torch.bfloat16:
        fail(f"rotary of a bf16 x returned {rope(x.bfloat16()).dtype}: return x's dtype (.type_as(x))", "rotary")
    assert_close(rope(x.bfloat16()).float(), full, "rotary in bf16 (compute in fp32, return x's dtype)", "rotary",
                 atol=0.05, rtol=0.02)
    model = ref_model(ref)
    assert_close(model.transformer.h[0].attn.rotary(ref["q"], offset=3), ref["rotary_out"],
                 "rotary vs the reference", "rotary")


# ----------------------------------------------------------------------------- attention

def attention(**overrides):
    gpt = load("gpt")
    torch.manual_seed(0)
    return gpt.CausalSelfAttention(tiny_config(**overrides)).eval()


@graded(2, "attn_qkv")
def test_attention_qkv_shapes_and_heads():
    attn = attention()
    x = torch.randn(2, 7, 32)
    q, k, v = attn.qkv(x)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not torch.is_tensor(t) or t.shape != (2, 4, 7, 8):
            fail(f"{name} should have shape (B, nh, T, hs) = (2, 4, 7, 8), got "
                 f"{tuple(t.shape) if torch.is_tensor(t) else type(t).__name__}", "attn_qkv")
    qkv = attn.c_attn(x)  # (B, T, 3C): q for head h is channels h*hs:(h+1)*hs of the first C
    for name, t, part in (("q", q, 0), ("k", k, 1), ("v", v, 2)):
        for h in (0, 3):
            start = part * 32 + h * 8
            assert_close(t[:, h], qkv[:, :, start:start + 8],
                         f"{name} of head {h} (channels {start}..{start + 7} of c_attn's output)", "attn_qkv")


@graded(2, "attn_scores", "attn_mask", "attn_softmax")
def test_attention_probs_formula():
    attn = attention()
    q, k = torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8)
    scores = q @ k.transpose(-2, -1) / math.sqrt(8)
    scores = scores.masked_fill(torch.ones(6, 6).triu(1).bool(), float("-inf"))
    assert_close(attn.attention_probs(q, k), scores.softmax(-1),
                 "attention probabilities softmax(mask(q k^T / sqrt(hs)))", "attn_scores")


@graded(1, "attn_softmax", needs=("attn_scores",))
def test_attention_rows_sum_to_one():
    attn = attention()
    probs = attn.attention_probs(torch.randn(2, 4, 9, 8), torch.randn(2, 4, 9, 8))
    assert_close(probs.sum(-1), torch.ones(2, 4, 9), "sum of each row of attention probabilities", "attn_softmax")
    if (probs < 0).any():
        fail("attention probabilities must not be negative", "attn_softmax")


@graded(2, "attn_mask", needs=("attn_scores",))
def test_attention_mask_hides_future():
    attn = attention()
    probs = attn.attention_probs(torch.randn(2, 4, 9, 8), torch.randn(2, 4, 9, 8))
    future = torch.ones(9, 9).triu(1).bool()
    leak = probs[..., future].abs().max().item()
    if leak != 0:
        fail(f"query i must give zero weight to keys j > i, found weight {leak:.3g}", "attn_mask")
    # a KV cache passes fewer queries than keys: the queries are the last positions
    probs = attn.attention_probs(torch.randn(1, 4, 3, 8), torch.randn(1, 4, 9, 8))
    expected = torch.ones(9, 9).tril().bool()[6:]
    if not torch.equal(probs[0, 0] > 0, expected):
        fail("with 3 queries and 9 keys, query i is position 6 + i and sees keys 0..6+i "
             "(the rows of the queries' positions: self.mask[offset:offset + Tq, :Tk])", "attn_mask")


@pytest.mark.parametrize("abs_emb", [False, True], ids=["rope", "learned"])
@pytest.mark.parametrize("flash", [False, True], ids=["manual", "flash"])
@graded(1, "attn_mask", "attn_flash",
        needs=("attn_qkv", "attn_scores", "attn_softmax", "attn_values", "attn_out", "rotary"))
def test_attention_is_causal(flash, abs_emb):
    attn = attention(use_flash_attn=flash, abs_emb=abs_emb)
    x = torch.randn(2, 10, 32)
    x2 = x.clone()
    x2[:, 6:] = torch.randn(2, 4, 32)  # change the future of position 5
    todo = "attn_flash" if flash else "attn_mask"
    assert_close(attn(x2)[:, :6], attn(x)[:, :6], "attention outputs at positions 0..5 after changing positions 6..9",
                 todo)


def plain_attention(attn, x):
    """Causal self-attention of x (B, T, C) from attn's weights with torch alone (learned positions: no rotary)."""
    B, T, C = x.shape
    q, k, v = (t.view(B, T, attn.n_head, C // attn.n_head).transpose(1, 2)
               for t in F.linear(x, attn.c_attn.weight, attn.c_attn.bias).split(C, dim=-1))
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(T, T, dtype=torch.bool).tril())  # (B, nh, T, hs)
    return F.linear(y.transpose(1, 2).reshape(B, T, C), attn.c_proj.weight, attn.c_proj.bias)


@graded(2, "attn_values", "attn_flash", "attn_out", needs=("attn_qkv", "attn_scores", "attn_mask", "attn_softmax"))
def test_attention_manual_and_flash_match_plain_torch():
    """Each path against attention computed with torch alone; a part both paths share is blamed when both fail."""
    manual = attention(use_flash_attn=False, abs_emb=True)
    flash = attention(use_flash_attn=True, abs_emb=True)
    flash.load_state_dict(manual.state_dict())
    x = torch.randn(2, 10, 32)
    expected = plain_attention(manual, x)
    manual_out, flash_out = manual(x), flash(x)
    if not close(manual_out, expected) and not close(flash_out, expected):
        assert_close(manual_out, expected, "both attention paths differ from plain torch, so look first at what they "
                     "share: the heads (TODO[attn_qkv]) and their output (TODO[attn_out]); manual output", "attn_qkv")
    assert_close(flash_out, expected, "flash attention output vs plain torch", "attn_flash")
    assert_close(manual_out, expected, "manual attention output (probabilities @ v) vs plain torch", "attn_values")


@graded(2, "attn_out", needs=("attn_qkv", "attn_scores", "attn_mask", "attn_softmax", "attn_values", "attn_flash",
                              "rotary"))
def test_attention_reference(ref):
    attn = ref_model(ref).transformer.h[0].attn
    attn.use_flash_attn = False
    x = ref["x"]
    assert_close(attn.attention_probs(ref["q"], ref["q"].flip(2)), ref["attn_probs"],
                 "attention probabilities vs the reference", "attn_scores")
    assert_close(attn(x), ref["attn_out"], "manual attention output vs the reference", "attn_out")
    attn.use_flash_attn = True
    assert_close(attn(x), ref["attn_out"], "flash attention output vs the reference", "attn_flash")


@graded(2, "attn_values", "attn_flash", "mlp",
        needs=("attn_qkv", "attn_scores", "attn_mask", "attn_softmax", "attn_out", "rotary", "block", "gpt_embed",
               "gpt_logits"))
def test_dropout_does_nothing_in_eval():
    """In eval mode every dropout is the identity: a part built with dropout 0.5 equals it at dropout 0."""
    gpt = load("gpt")
    x = torch.randn(2, 6, 32)
    parts = (("manual attention", gpt.CausalSelfAttention, dict(use_flash_attn=False), "attn_values"),
             ("flash attention", gpt.CausalSelfAttention, dict(use_flash_attn=True), "attn_flash"),
             ("MLP", gpt.MLP, {}, "mlp"))
    for what, part, options, todo in parts:
        plain, dropped = (part(tiny_config(dropout=p, **options)).eval() for p in (0.0, 0.5))
        dropped.load_state_dict(plain.state_dict())
        assert_close(dropped(x), plain(x), f"{what} in eval with dropout 0.5 vs dropout 0 (dropout must be off: "
                     f"nn.Dropout modules know, F.dropout needs training=self.training)", todo)
    model, plain = tiny_model(dropout=0.5), tiny_model(dropout=0.0)
    plain.load_state_dict(model.state_dict())
    idx = torch.randint(0, 13, (2, 8))
    assert_close(model(idx)[0], plain(idx)[0], "GPT logits in eval with dropout 0.5 vs dropout 0", "gpt_embed")


@graded(2, "attn_values", "mlp", needs=("attn_qkv", "attn_scores", "attn_mask", "attn_softmax", "attn_out"))
def test_dropout_in_training_drops_probabilities_and_outputs():
    """In training, dropout zeroes the attention probabilities (attn_dropout, before @ v) and the outputs of
    attention (resid_dropout) and of the MLP, each element with probability p, scaled by 1 / (1 - p)."""
    gpt = load("gpt")
    p, x = 0.5, torch.randn(2, 6, 32)
    attn = attention(dropout=p, abs_emb=True, use_flash_attn=False).train()
    torch.manual_seed(1)
    out = attn(x)
    q, k, v = attn.qkv(x)
    probs = torch.ones(6, 6).tril().log().add((q @ k.transpose(-2, -1)) / math.sqrt(8)).softmax(-1)  # (B, nh, T, T)
    torch.manual_seed(1)  # the same random draws, in the same order
    y = (F.dropout(probs, p, training=True) @ v).transpose(1, 2).reshape(2, 6, 32)
    assert_close(out, F.dropout(F.linear(y, attn.c_proj.weight, attn.c_proj.bias), p, training=True),
                 "manual attention in training vs resid_dropout(c_proj(attn_dropout(probabilities) @ v))", "attn_values")
    mlp = gpt.MLP(tiny_config(dropout=p)).train()
    torch.manual_seed(2)
    out = mlp(x)
    hidden = F.gelu(F.linear(x, mlp.c_fc.weight, mlp.c_fc.bias), approximate="tanh")
    torch.manual_seed(2)
    assert_close(out, F.dropout(F.linear(hidden, mlp.c_proj.weight, mlp.c_proj.bias), p, training=True),
                 "MLP in training vs dropout(c_proj(gelu(c_fc(x))))", "mlp")


# ----------------------------------------------------------------------------- MLP and block

@graded(2, "mlp")
def test_mlp(ref):
    gpt = load("gpt")
    mlp = gpt.MLP(tiny_config()).eval()
    x = torch.randn(2, 5, 32)
    hidden = mlp.c_fc(x)
    if hidden.shape[-1] != 4 * 32:
        fail(f"the hidden layer should be 4 * n_embd = 128 wide, got {hidden.shape[-1]}", "mlp")
    expected = mlp.c_proj(F.gelu(hidden, approximate="tanh"))
    assert_close(mlp(x), expected, "MLP: c_proj(gelu_tanh(c_fc(x)))", "mlp")
    assert_close(ref_model(ref).transformer.h[0].mlp(ref["x"]), ref["mlp_out"], "MLP vs the reference", "mlp")


@graded(2, "block", needs=("attn_qkv", "attn_scores", "attn_mask", "attn_softmax", "attn_values", "attn_flash",
                            "attn_out", "rotary", "mlp"))
def test_block_residual_structure(ref):
    block = ref_model(ref).transformer.h[0]
    x = ref["x"]
    h = x + block.attn(block.ln_1(x))
    assert_close(block(x), h + block.mlp(block.ln_2(h)),
                 "Block: x + attn(ln_1(x)), then + mlp(ln_2(.)) (pre-norm residuals)", "block")
    assert_close(block(x), ref["block_out"], "Block vs the reference", "block")


# ----------------------------------------------------------------------------- the whole model

@pytest.mark.parametrize("abs_emb", [False, True], ids=["rope", "learned"])
@graded(3, "gpt_logits", "gpt_embed", needs=("block",))
def test_gpt_logits_reference(ref, abs_emb):
    rope_model = ref_model(ref)
    assert_close(rope_model.transformer.h[0](ref["x"]), ref["block_out"], "the model's first Block vs the reference "
                 "(the parts come first: test_block_residual_structure and the attention tests say which)", "block")
    rope_ok = close(rope_model(ref["idx"])[0], ref["logits"])
    model = ref_model(ref, abs_emb=abs_emb)
    logits, loss = model(ref["idx"])
    if loss is not None:
        fail("forward(idx) without targets must return loss None", "gpt_loss")
    expected = ref["abs_logits" if abs_emb else "logits"]
    assert_close(logits, expected, f"GPT logits ({'learned' if abs_emb else 'rotary'} positions) vs the reference",
                 "gpt_embed" if abs_emb and rope_ok else "gpt_logits")


@graded(2, "gpt_loss", needs=("gpt_embed", "gpt_logits"))
def test_gpt_loss_is_cross_entropy(ref):
    model = ref_model(ref)
    logits, loss = model(ref["idx"], ref["targets"])  # targets hold -1 (ignored) at 3 positions
    expected = F.cross_entropy(logits.view(-1, logits.size(-1)), ref["targets"].view(-1), ignore_index=-1)
    if not torch.is_tensor(loss) or loss.dim() != 0:
        fail(f"loss should be a scalar tensor, got {loss!r}", "gpt_loss")
    assert_close(loss, expected, "loss vs F.cross_entropy with ignore_index=-1", "gpt_loss")
    assert_close(loss, ref["loss"], "loss vs the reference", "gpt_loss")


@pytest.mark.parametrize("abs_emb", [False, True], ids=["rope", "learned"])
@pytest.mark.parametrize("flash", [False, True], ids=["manual", "flash"])
@graded(1, "gpt_logits", needs=("gpt_embed", "attn_qkv", "attn_scores", "attn_mask", "attn_softmax", "attn_values",
                                "attn_flash", "attn_out", "rotary", "block", "mlp"))
def test_gpt_is_causal(flash, abs_emb):
    gpt = load("gpt")
    torch.manual_seed(0)
    model = gpt.GPT(tiny_config(use_flash_attn=flash, abs_emb=abs_emb)).eval()
    idx = torch.randint(0, 13, (2, 12))
    idx2 = idx.clone()
    idx2[:, 8:] = (idx2[:, 8:] + 1) % 13  # change the tokens after position 7
    x = torch.randn(2, 12, 32)
    x2 = torch.cat((x[:, :8], torch.randn(2, 4, 32)), dim=1)
    attn = model.transformer.h[0].attn
    assert_close(attn(x2)[:, :8], attn(x)[:, :8], "the first Block's attention at positions 0..7 after changing "
                 "positions 8..11", "attn_flash" if flash else "attn_mask")
    assert_close(model(idx2)[0][:, :8], model(idx)[0][:, :8],
                 "logits at positions 0..7 after changing tokens 8..11", "gpt_logits")


@graded(0)
def test_gpt2_small_parameter_count():
    gpt = load("gpt")
    config = gpt.GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768, abs_emb=True)
    with torch.device("meta"):  # shapes only, no memory or init time
        model = gpt.GPT(config)
    assert model.num_params() == 124_439_808, \
        f"GPT-2 small with tied weights has 124,439,808 parameters, got {model.num_params():,}"


# ----------------------------------------------------------------------------- generation

def tiny_model(seed=0, **overrides):
    gpt = load("gpt")
    torch.manual_seed(seed)
    return gpt.GPT(tiny_config(block_size=8, **overrides)).eval()


@graded(2, "sample_greedy", needs=("gpt_embed", "gpt_logits"))
def test_generate_greedy_equals_argmax():
    model = tiny_model()
    idx = torch.randint(0, 13, (2, 3))
    out = model.generate(idx, max_new_tokens=10, temperature=0)  # 13 tokens: the context gets cropped to 8
    expected = idx
    for _ in range(10):
        logits, _ = model(expected[:, -8:])
        expected = torch.cat((expected, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    if not torch.equal(out, expected):
        fail(f"temperature 0 must decode greedily (argmax): expected {expected.tolist()}, got {out.tolist()}",
             "sample_greedy")


@pytest.mark.parametrize("abs_emb", [False, True], ids=["rope", "learned"])
@graded(2, "gpt_embed", needs=("rotary", "sample_greedy", "gpt_logits"))
def test_cached_decoding_equals_uncached(abs_emb):
    """generate() with the KV cache feeds one new token at a time: its position is the cache's length
    (offset), for learned positions (wpe) as for rotary ones. It must decode exactly as without the cache."""
    model = tiny_model(abs_emb=abs_emb)
    state = model.state_dict()  # a context that matters: strong attention outputs and, if learned, positions
    state.update({k: v * 30 for k, v in state.items() if k.endswith("attn.c_proj.weight")})
    if abs_emb:
        state["transformer.wpe.weight"] = torch.randn(8, 32)
    model.load_state_dict(state)
    idx = torch.randint(0, 13, (4, 2))
    cached = model.generate(idx, 6, temperature=0, kv_cache=True)
    plain = model.generate(idx, 6, temperature=0, kv_cache=False)
    if not torch.equal(cached, plain):
        fail(f"greedy decoding with the KV cache gave {cached.tolist()}, without it {plain.tolist()}: the new "
             f"tokens sit at positions offset.. offset+T-1", "gpt_embed" if abs_emb else "rotary")


def sample(logits, n=2000, seed=0, **kwargs):
    """n draws of sample_next from the same logits row -> the sampled ids (n,)."""
    gpt = load("gpt")
    g = torch.Generator().manual_seed(seed)
    return gpt.sample_next(logits.expand(n, -1), generator=g, **kwargs).view(-1)


@graded(2, "sample_top_k", needs=("sample_draw", "sample_temperature"))
def test_top_k_never_samples_outside_top_k():
    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0, 0.5, 2.5, 2.0, -1.0]])
    ids = set(sample(logits, top_k=3).tolist())
    if not ids <= {1, 3, 5}:
        fail(f"with top_k=3 only ids {{1, 3, 5}} may be sampled, got {sorted(ids)}", "sample_top_k")
    ids = set(sample(logits, top_k=4).tolist())  # the 4th largest value 2.0 is tied: ids 2 and 6 both stay
    if not ids <= {1, 2, 3, 5, 6} or not {2, 6} <= ids:
        fail(f"with top_k=4 the tie at the 4th value keeps ids 2 and 6: expected ids in {{1, 2, 3, 5, 6}}, "
             f"got {sorted(ids)}", "sample_top_k")
    ids = set(sample(logits, top_k=100).tolist())  # more than the vocabulary: nothing is cut
    if ids != set(range(8)) - {7} and ids != set(range(8)):
        fail(f"top_k=100 with 8 ids must keep them all (k = min(top_k, V)), got {sorted(ids)}", "sample_top_k")


@graded(2, "sample_top_p", needs=("sample_draw", "sample_temperature"))
def test_top_p_samples_only_the_nucleus():
    probs = torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15]])
    logits = probs.log()
    # sorted: 0.4 (id 1), 0.3 (id 3), 0.15 (id 4), ... : 0.4 + 0.3 = 0.7 < 0.75, so id 4 crosses and stays
    ids = set(sample(logits, top_p=0.75).tolist())
    if ids != {1, 3, 4}:
        fail(f"with top_p=0.75 the nucleus is ids {{1, 3, 4}} (the token that crosses p stays), got {sorted(ids)}",
             "sample_top_p")
    ids = set(sample(logits, top_p=0.1).tolist())
    if ids != {1}:
        fail(f"with top_p=0.1 only the most likely id 1 stays (at least one token), got {sorted(ids)}", "sample_top_p")
    ids = set(sample(logits, top_k=4, top_p=0.5).tolist())
    if ids != {1, 3}:
        fail(f"top_k=4 with top_p=0.5 should keep ids {{1, 3}}, got {sorted(ids)}", "sample_top_p")


@graded(2, "sample_top_p", "sample_temperature", needs=("sample_top_k", "sample_draw"))
def test_temperature_then_top_k_then_top_p_distribution():
    """Temperature first, then top-k, then top-p on what is left: the support and the probabilities."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2]])
    probs = F.softmax(logits[0] / 0.5, dim=-1)  # temperature 0.5
    probs[probs < probs.topk(6).values[-1]] = 0  # top_k 6
    probs /= probs.sum()
    ranked = probs.sort(descending=True)
    above = ranked.values.cumsum(0) - ranked.values  # mass ranked above each token
    probs[ranked.indices[above >= 0.75]] = 0  # top_p 0.75
    probs /= probs.sum()
    ids = sample(logits, n=20000, temperature=0.5, top_k=6, top_p=0.75)
    support = sorted(probs.nonzero().view(-1).tolist())
    if sorted(set(ids.tolist())) != support:
        fail(f"temperature 0.5, top_k 6, top_p 0.75: expected ids {support} (temperature first, then top-k, then "
             f"top-p on the tempered probabilities), got {sorted(set(ids.tolist()))}", "sample_top_p")
    freq = torch.bincount(ids, minlength=8).float() / len(ids)
    assert_close(freq, probs, "frequencies of 20000 samples vs the renormalised probabilities", "sample_draw",
                 atol=0.02)


@graded(2, "sample_draw", "sample_temperature", needs=("gpt_embed", "gpt_logits"))
def test_sampling_follows_probabilities_and_seed():
    probs = torch.tensor([[0.1, 0.6, 0.3]])
    ids = sample(probs.log(), n=20000, seed=1)
    freq = torch.bincount(ids, minlength=3).float() / len(ids)
    assert_close(freq, probs[0], "frequencies of 20000 samples vs the probabilities", "sample_draw", atol=0.02)
    doubled = sample((probs.log() * 2), n=20000, seed=1, temperature=2.0)
    if not torch.equal(doubled, ids):
        fail("logits * 2 at temperature 2 must sample exactly like logits at temperature 1 "
             "(divide the logits by the temperature)", "sample_temperature")
    model = tiny_model()
    idx = torch.zeros(3, 1, dtype=torch.long)
    runs = [model.generate(idx, 12, top_k=5, top_p=0.9, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    if not torch.equal(runs[0], runs[1]):
        fail("the same seeded torch.Generator must give the same samples", "sample_draw")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__] + sys.argv[1:]))
