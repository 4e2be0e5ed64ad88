"""
Graded tests of Micro-GPT. Run them with `pytest unittests.py` (or `python unittests.py`).

Each test checks one concept, carries its points (@graded) and names the TODO regions it checks
(`pytest unittests.py -k <region id>` runs them); a failure says what was expected, what came out,
and which TODO to look at. Your modules are imported inside the tests, so a mistake in one file
fails only the tests that use it. Every input a test gives your code (tensors, weights, texts, seeds)
comes from that test's own seeded generator, and the expected values are computed from those inputs
with plain torch or come from unittests_ref.pt, computed with the reference solution. The grader runs
these same tests on inputs and reference values drawn afresh when it grades: write code that computes
the answers, not code that knows them.
"""

import importlib
import math
import os
import string
import sys
import zlib

import pytest
import torch
from torch.nn import functional as F

REF_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "unittests_ref.pt")
INPUTS = torch.Generator()  # the tests' own random numbers, seeded before each test: every input comes from it


class StoredInputs:
    """Where the tests' inputs come from on your machine: a fixed seed per test, and the reference values in
    unittests_ref.pt."""

    def seed(self, nodeid):
        return zlib.crc32(nodeid.encode())  # the same on every run and machine

    def reference(self):
        return torch.load(REF_PATH, weights_only=True)


SOURCE = StoredInputs()  # the grader replaces it with inputs and reference values drawn at grade time


@pytest.fixture(autouse=True)
def seeded_inputs(request):
    INPUTS.manual_seed(SOURCE.seed(request.node.nodeid))


@pytest.fixture(scope="module")
def ref():
    return SOURCE.reference()


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


def describe(value):
    return f"{value.dtype} of shape {tuple(value.shape)}" if torch.is_tensor(value) else type(value).__name__


def checked(actual, shape, what, todo):
    """actual, if it is a tensor of that shape (so that it can be compared and sliced); else the test fails."""
    if not torch.is_tensor(actual) or actual.shape != shape:
        fail(f"{what}: expected a tensor of shape {tuple(shape)}, got {describe(actual)}", todo)
    return actual


def close(actual, expected, atol=1e-5, rtol=1e-4):
    """Whether two tensors agree (for deciding which part to blame before asserting)."""
    return (torch.is_tensor(actual) and actual.shape == expected.shape
            and torch.allclose(actual.detach().double(), expected.detach().double(), atol=atol, rtol=rtol))


def assert_close(actual, expected, what, todo, atol=1e-5, rtol=1e-4):
    """Compare tensors; on failure report the largest difference and where it is."""
    actual = checked(actual, expected.shape, what, todo).detach().double()
    expected = expected.detach().double()
    diff = (actual - expected).abs()
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, math.inf), diff)
    if not bool((diff <= atol + rtol * expected.abs()).all()):
        where = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        fail(f"{what} differs from the expected values: largest difference {diff.max().item():.3g} at index "
             f"{where} (expected {expected[where].item():.6g}, got {actual[where].item():.6g})", todo)


def integral(t):
    return torch.is_tensor(t) and not (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool)


# ----------------------------------------------------------------------------- inputs and trusted weights

def randn(*shape):
    return torch.randn(*shape, generator=INPUTS)


def rand(*shape):
    return torch.rand(*shape, generator=INPUTS)


def randint(low, high, *shape):
    return torch.randint(low, high, shape, generator=INPUTS)


def pick(low, high):
    """An int in [low, high)."""
    return int(torch.randint(low, high, (), generator=INPUTS))


def choice(options):
    return options[pick(0, len(options))]


def new_seed():
    """A seed for torch.manual_seed or a torch.Generator of its own."""
    return pick(0, 2 ** 62)


TINY = dict(vocab_size=13, block_size=16, n_layer=2, n_head=4, n_embd=32, dropout=0.0)  # the tests' tiny models


def linear(name, n_out, n_in):
    """Weights of nn.Linear(n_in, n_out): N(0, 1 / n_in), so that outputs are the size of inputs; biases N(0, 0.2)."""
    return {f"{name}.weight": randn(n_out, n_in) / math.sqrt(n_in), f"{name}.bias": randn(n_out) * 0.2}


def norm(name, C):
    return {f"{name}.weight": 1 + 0.2 * randn(C), f"{name}.bias": 0.2 * randn(C)}


def attention_weights(C, prefix=""):
    return {**linear(f"{prefix}c_attn", 3 * C, C), **linear(f"{prefix}c_proj", C, C)}


def mlp_weights(C, prefix=""):
    return {**linear(f"{prefix}c_fc", 4 * C, C), **linear(f"{prefix}c_proj", C, 4 * C)}


def gpt_weights(config):
    """Weights for a GPT of config (a dict), in GPT-2's layout: {name: tensor}, lm_head tied to wte. Embeddings
    N(0, 0.3): larger ones would dominate what the blocks add, and the next token would mostly be the last one."""
    V, C = config["vocab_size"], config["n_embd"]
    weights = {"transformer.wte.weight": randn(V, C) * 0.3}
    if config.get("abs_emb"):
        weights["transformer.wpe.weight"] = randn(config["block_size"], C) * 0.3
    for i in range(config["n_layer"]):
        block = f"transformer.h.{i}."
        weights.update({**norm(block + "ln_1", C), **attention_weights(C, block + "attn."), **norm(block + "ln_2", C),
                        **mlp_weights(C, block + "mlp.")})
    weights.update(norm("transformer.ln_f", C))
    weights["lm_head.weight"] = weights["transformer.wte.weight"]
    return weights


def make(part, config, weights):
    """Your gpt.<part> (a class name) for config (a dict), in eval mode, with the given weights."""
    gpt = load("gpt")
    module = getattr(gpt, part)(gpt.GPTConfig(**config)).eval()
    module.load_state_dict(weights)
    return module


def ref_model(ref, abs_emb=False):
    """Your GPT with the reference weights (rotary positions unless abs_emb=True)."""
    weights = dict(ref["state_dict"])
    if abs_emb:
        weights["transformer.wpe.weight"] = ref["wpe"]
    return make("GPT", {**ref["config"], "abs_emb": abs_emb}, weights)


# ----------------------------------------------------------------------------- the model with torch alone

def rotate(t, base=10000.0, start=0):
    """Rotary embedding of t (B, nh, T, hs) at positions start..start+T-1, half-split pairs."""
    hs, T = t.size(-1), t.size(-2)
    angles = torch.outer(torch.arange(start, start + T).float(), base ** (-torch.arange(0, hs, 2).float() / hs))
    t1, t2 = t.chunk(2, dim=-1)  # (B, nh, T, hs/2) each
    return torch.cat((t1 * angles.cos() - t2 * angles.sin(), t1 * angles.sin() + t2 * angles.cos()), dim=-1)


def heads(x, weights, n_head, prefix=""):
    """q, k, v (B, nh, T, hs) of x (B, T, C)."""
    B, T, C = x.shape
    qkv = F.linear(x, weights[prefix + "c_attn.weight"], weights.get(prefix + "c_attn.bias"))  # (B, T, 3C)
    return (t.view(B, T, n_head, C // n_head).transpose(1, 2) for t in qkv.split(C, dim=-1))


def plain_attention(weights, x, n_head, rope, prefix="", dropout=0.0, flash=False, resid_dropout=True, start=0):
    """Causal self-attention of x (B, T, C) at positions start.., rotary positions if rope. With dropout (training),
    the solution's random draws in its order: the probabilities' (flash: inside F.scaled_dot_product_attention),
    then the output's (resid_dropout, unless resid_dropout=False)."""
    B, T, C = x.shape
    q, k, v = heads(x, weights, n_head, prefix)
    if rope:
        q, k = rotate(q, start=start), rotate(k, start=start)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    if not dropout:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=causal)  # (B, nh, T, hs)
    elif flash:
        y = F.scaled_dot_product_attention(q, k, v, None, dropout, True)  # attn_mask, dropout_p, is_causal
    else:
        probs = (q @ k.transpose(-2, -1) / math.sqrt(C // n_head)).masked_fill(~causal, float("-inf")).softmax(-1)
        y = F.dropout(probs, dropout) @ v
    out = F.linear(y.transpose(1, 2).reshape(B, T, C), weights[prefix + "c_proj.weight"],
                   weights.get(prefix + "c_proj.bias"))
    return F.dropout(out, dropout) if dropout and resid_dropout else out


def plain_mlp(weights, x, prefix="", dropout=0.0):
    hidden = F.linear(x, weights[prefix + "c_fc.weight"], weights.get(prefix + "c_fc.bias"))  # (B, T, 4C)
    out = F.linear(F.gelu(hidden, approximate="tanh"), weights[prefix + "c_proj.weight"],
                   weights.get(prefix + "c_proj.bias"))
    return F.dropout(out, dropout) if dropout else out


def plain_norm(weights, x, name):
    return F.layer_norm(x, x.shape[-1:], weights[name + ".weight"], weights.get(name + ".bias"))


def plain_forward(weights, config, idx, dropout=0.0, start=0):
    """Logits (B, T, V) of a GPT of config (a dict) with these weights, for idx (B, T) at positions start..; with
    dropout, in training, drawing what the solution draws in its order (config's use_flash_attn: which path)."""
    x = weights["transformer.wte.weight"][idx]  # (B, T, C)
    if config.get("abs_emb"):
        x = x + weights["transformer.wpe.weight"][start:start + idx.size(1)]
    if dropout:
        x = F.dropout(x, dropout)
    for i in range(config["n_layer"]):
        block = f"transformer.h.{i}."
        x = x + plain_attention(weights, plain_norm(weights, x, block + "ln_1"), config["n_head"],
                                not config.get("abs_emb"), block + "attn.", dropout, config.get("use_flash_attn", True),
                                start=start)
        x = x + plain_mlp(weights, plain_norm(weights, x, block + "ln_2"), block + "mlp.", dropout)
    return F.linear(plain_norm(weights, x, "transformer.ln_f"), weights["lm_head.weight"])


def greedy(weights, config, idx, n):
    """idx (B, T) and n tokens decoded greedily, the context cropped to block_size -> (B, T + n)."""
    for _ in range(n):
        logits = plain_forward(weights, config, idx[:, -config["block_size"]:])
        idx = torch.cat((idx, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    return idx


def assert_greedy(out, weights, config, idx, n, what, todo):
    """out must be idx (B, T) followed by n greedy tokens: each one the largest logit given the tokens before it
    (the context cropped to block_size), up to 1e-4 where two logits nearly tie."""
    B, T = idx.shape
    if not integral(out) or out.shape != (B, T + n) or out.min() < 0 or out.max() >= config["vocab_size"]:
        fail(f"{what}: expected token ids in 0..{config['vocab_size'] - 1} of shape {(B, T + n)}, got "
             f"{describe(out)}", todo)
    out = out.long()
    decoded = torch.equal(out[:, :T], idx)
    for t in range(T, T + n):
        logits = plain_forward(weights, config, out[:, max(0, t - config["block_size"]):t])[:, -1]  # (B, V)
        decoded = decoded and bool((logits.gather(1, out[:, t:t + 1]) >= logits.amax(-1, True) - 1e-4).all())
    if not decoded:
        fail(f"{what}: expected {greedy(weights, config, idx, n).tolist()}, got {out.tolist()}", todo)


# ----------------------------------------------------------------------------- tokenizer and data

ASCII, OTHERS = string.ascii_letters + string.digits + " .,;:!?'-\n", "éèàüößçñλπжДЖ中文—“”"


def random_text():
    """-> (text, the characters it may hold): random characters of a random alphabet, some of them not ASCII."""
    alphabet = [ASCII[i] for i in torch.randperm(len(ASCII), generator=INPUTS)[:pick(15, 40)]]
    alphabet += [OTHERS[i] for i in torch.randperm(len(OTHERS), generator=INPUTS)[:pick(2, 6)]]
    return "".join(alphabet[i] for i in randint(0, len(alphabet), pick(60, 200)).tolist()), alphabet


@graded(2, "tokenizer_encode", "tokenizer_decode")
def test_tokenizer_round_trip(tmp_path):
    dataset = load("dataset")
    text, _ = random_text()
    tok = dataset.CharTokenizer(text)
    chars = sorted(set(text))
    assert tok.vocab_size == len(chars), \
        f"vocab_size should be {len(chars)} (distinct characters), got {tok.vocab_size}"
    ranks = randint(0, len(chars), pick(5, 12))
    ranks[pick(0, len(ranks))] = len(chars) - 1  # its last character: ids of the query's own characters would differ
    query = "".join(chars[i] for i in ranks.tolist())
    ids = tok.encode(query)
    expected = [chars.index(c) for c in query]
    if ids != expected:
        fail(f"encode({query!r}) should give {expected} (index of each character in sorted order), got {ids}",
             "tokenizer_encode")
    if tok.decode(expected) != query:
        fail(f"decode({expected}) should give {query!r}, got {tok.decode(expected)!r}", "tokenizer_decode")
    assert tok.decode(tok.encode(text)) == text, "decode(encode(text)) must give the text back"
    tok.save(tmp_path / "tok.json")
    assert dataset.CharTokenizer.load(tmp_path / "tok.json").encode(query) == expected


@graded(0)
def test_tokenizer_unknown_character_error():
    dataset = load("dataset")
    text, alphabet = random_text()
    known = sorted(set(text))
    unknown = [choice([c for c in chars if c not in alphabet]) for chars in (string.ascii_letters, OTHERS)]
    position = pick(0, 6)
    query = "".join(choice(known) for _ in range(position)) + unknown[0] + choice(known) + unknown[1]
    with pytest.raises(ValueError) as error:
        dataset.CharTokenizer(text).encode(query)
    message = str(error.value)
    assert repr(unknown[0]) in message and repr(unknown[1]) in message and f"position {position}" in message, \
        f"the error should name the unknown characters of {query!r} and where they are, got: {message}"


@graded(2, "dataset_item")
def test_dataset_windows_and_shift():
    dataset = load("dataset")
    n, block_size = pick(20, 60), pick(3, 11)
    data = torch.randperm(1000, generator=INPUTS)[:n]  # distinct token ids, so a window's position is visible
    ds = dataset.TextDataset(data, block_size=block_size)
    windows = n - block_size
    assert len(ds) == windows, f"a text of {n} tokens has {windows} windows of {block_size} + 1 tokens, len(ds) " \
                               f"gave {len(ds)}"
    for i in (0, pick(1, windows - 1), windows - 1):
        x, y = ds[i]
        assert_close(x, data[i:i + block_size], f"x of ds[{i}]", "dataset_item", atol=0, rtol=0)
        assert_close(y, data[i + 1:i + block_size + 1], f"y of ds[{i}] (x shifted by one)", "dataset_item", atol=0,
                     rtol=0)
        if x.dtype != torch.long:
            fail(f"x should be a LongTensor, got {x.dtype}", "dataset_item")


@graded(0)
def test_dataset_split_and_errors():
    dataset = load("dataset")
    n, fraction = pick(100, 2000), choice((0.1, 0.2, 0.25))
    data = torch.randperm(n, generator=INPUTS)
    train, val = dataset.train_val_split(data, fraction)
    split = int(n * (1 - fraction))
    assert torch.equal(train, data[:split]) and torch.equal(val, data[split:]), \
        f"train_val_split of {n} tokens with val_fraction {fraction} should give the first {split} and the rest"
    block_size = pick(2, 20)
    with pytest.raises(ValueError, match="too short"):
        dataset.TextDataset(randint(0, 10, block_size), block_size=block_size)


# ----------------------------------------------------------------------------- norms

def norm_inputs(C):
    """(name, x): spread-out values, and values so close together that eps's place in the formula matters."""
    x = randn(pick(1, 4), pick(1, 8), C)
    return (("x (std 3)", x * 3 + 1), ("x (std 0.001, variance below eps: eps goes inside the sqrt)", x * 1e-3))


@graded(1, "layernorm")
def test_layernorm_by_hand(ref, monkeypatch):
    """LayerNorm computed by hand (the model uses PyTorch's kernel unless fused_norm=False)."""
    gpt = load("gpt")
    C = pick(8, 33)
    weight, bias = randn(C) * 0.3 + 1, randn(C) * 0.3
    norms = [gpt.LayerNorm(C, bias=True), gpt.LayerNorm(C, bias=False)]
    norms[0].load_state_dict({"weight": weight, "bias": bias})
    norms[1].load_state_dict({"weight": weight})
    ref_ln = gpt.LayerNorm(ref["config"]["n_embd"])  # the hand-written one, with the reference model's weights
    ref_ln.load_state_dict({p: ref["state_dict"][f"transformer.h.0.ln_1.{p}"] for p in ("weight", "bias")})

    def forbidden(*args, **kwargs):
        raise AssertionError("LayerNorm.forward calls F.layer_norm; compute it by hand in TODO[layernorm]")
    monkeypatch.setattr(F, "layer_norm", forbidden)
    monkeypatch.setattr(torch, "layer_norm", forbidden)
    for what, x in norm_inputs(C):
        for ln, b in zip(norms, (bias, None)):
            mean, var = x.mean(-1, keepdim=True), x.var(-1, keepdim=True, unbiased=False)
            formula = (x - mean) / torch.sqrt(var + 1e-5) * weight + (0 if b is None else b)
            assert_close(ln(x), formula, f"LayerNorm(bias={b is not None}) of {what} vs its formula", "layernorm")
    assert_close(ref_ln(ref["x"]), ref["layernorm_out"], "LayerNorm vs the reference", "layernorm")


@graded(1, "rmsnorm")
def test_rmsnorm_matches_formula_and_torch(ref):
    gpt = load("gpt")
    C = pick(8, 33)
    weight = randn(C) * 0.3 + 1
    rms = gpt.RMSNorm(C)
    rms.load_state_dict({"weight": weight})
    for what, x in norm_inputs(C):
        expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * weight
        assert_close(rms(x), expected, f"RMSNorm of {what} vs its formula", "rmsnorm")
        assert_close(rms(x), F.rms_norm(x, (C,), weight, 1e-5), f"RMSNorm of {what} vs F.rms_norm", "rmsnorm")
    rms = gpt.RMSNorm(ref["config"]["n_embd"])
    rms.load_state_dict({"weight": ref["rmsnorm_weight"]})
    assert_close(rms(ref["x"]), ref["rmsnorm_out"], "RMSNorm vs the reference", "rmsnorm")


# ----------------------------------------------------------------------------- rotary embedding

def rotary():
    """Your RotaryEmbedding for a head size of 8 or 16 -> (it, head size)."""
    head_size = choice((8, 16))
    return load("gpt").RotaryEmbedding(head_size), head_size


@graded(1, "rotary")
def test_rotary_identity_at_zero_and_keeps_norms():
    rope, hs = rotary()
    x = randn(pick(1, 4), pick(1, 5), pick(4, 20), hs)  # (B, nh, T, hs)
    y = checked(rope(x), x.shape, "rotary of x (B, nh, T, hs)", "rotary")
    assert_close(y[:, :, 0], x[:, :, 0], "rotary at position 0 (a rotation by angle 0)", "rotary")
    assert_close(y.norm(dim=-1), x.norm(dim=-1), "vector norms after rotary (rotations keep norms)", "rotary")
    if torch.allclose(y[:, :, 1:], x[:, :, 1:]):
        fail("rotary left positions > 0 unchanged", "rotary")


@graded(1, "rotary")
def test_rotary_scores_depend_only_on_distance():
    rope, hs = rotary()
    q, k = randn(hs), randn(hs)
    qs = checked(rope(q.expand(1, 1, 20, hs)), (1, 1, 20, hs), "rotary of (1, 1, 20, hs)", "rotary")[0, 0]
    ks = checked(rope(k.expand(1, 1, 20, hs)), (1, 1, 20, hs), "rotary of (1, 1, 20, hs)", "rotary")[0, 0]
    assert_close(qs.norm(dim=-1), q.norm().expand(20), "the length of q at each position (a rotation keeps it)",
                 "rotary")
    if torch.allclose(qs[1:], q.expand(19, hs)):
        fail("rotary left positions > 0 unchanged", "rotary")
    d = pick(0, 6)  # the same q at every position, rotated, against the same k: (20, hs) each
    s0 = (qs[d] @ ks[0]).item()
    for m in randint(d + 1, 20, 3).tolist():
        s = (qs[m] @ ks[m - d]).item()
        if abs(s - s0) > 1e-4 * max(1.0, abs(s0)):
            fail(f"q_m . k_n must depend only on m - n: positions ({d}, 0) give {s0:.6f} but ({m}, {m - d}) give "
                 f"{s:.6f}", "rotary")


@graded(1, "rotary")
def test_rotary_offset_and_reference(ref):
    rope, hs = rotary()
    offset, T = pick(1, 12), pick(2, 7)
    x = randn(pick(1, 3), pick(1, 4), offset + T + pick(0, 5), hs)  # (B, nh, T, hs)
    full = checked(rope(x), x.shape, "rotary of x (B, nh, T, hs)", "rotary")
    assert_close(full, rotate(x), "rotary vs its formula (pairs: channel i and channel i + hs/2)", "rotary")
    assert_close(rope(x[:, :, offset:offset + T], offset=offset), full[:, :, offset:offset + T],
                 f"rotary of positions {offset}..{offset + T - 1} given offset={offset} vs the same slice of the full "
                 f"sequence", "rotary")
    half = rope(x.bfloat16())
    if not torch.is_tensor(half) or half.dtype != torch.bfloat16:
        fail(f"rotary of a bf16 x returned {describe(half)}: return x's dtype (.type_as(x))", "rotary")
    assert_close(half.float(), full, "rotary in bf16 (compute in fp32, return x's dtype)", "rotary",
                 atol=0.05, rtol=0.02)
    head_size = ref["config"]["n_embd"] // ref["config"]["n_head"]
    assert_close(load("gpt").RotaryEmbedding(head_size)(ref["q"], offset=ref["rotary_offset"]), ref["rotary_out"],
                 "rotary vs the reference", "rotary")


# ----------------------------------------------------------------------------- attention

def attention(**overrides):
    """Your CausalSelfAttention of the tiny config, with weights drawn here -> (it, its weights)."""
    weights = attention_weights(TINY["n_embd"])
    return make("CausalSelfAttention", {**TINY, **overrides}, weights), weights


@graded(2, "attn_qkv")
def test_attention_qkv_shapes_and_heads():
    attn, weights = attention()
    B, T = pick(1, 4), pick(5, 17)  # T is never the 4 heads: (B, T, nh, hs) cannot pass for (B, nh, T, hs)
    x = randn(B, T, 32)
    q, k, v = attn.qkv(x)
    for name, t in (("q", q), ("k", k), ("v", v)):
        checked(t, (B, 4, T, 8), f"{name} should have shape (B, nh, T, hs) = ({B}, 4, {T}, 8)", "attn_qkv")
    qkv = F.linear(x, weights["c_attn.weight"], weights["c_attn.bias"])  # (B, T, 3C): q of head h is h*hs:(h+1)*hs
    for name, t, part in (("q", q, 0), ("k", k, 1), ("v", v, 2)):
        for h in range(4):
            start = part * 32 + h * 8
            assert_close(t[:, h], qkv[:, :, start:start + 8],
                         f"{name} of head {h} (channels {start}..{start + 7} of c_attn's output)", "attn_qkv")


def queries_and_keys(Tq=None, Tk=None):
    """Random q (B, nh, Tq, hs) and k (B, nh, Tk, hs) for the tiny attention, T drawn when not given."""
    B, T = pick(1, 4), pick(2, 17)
    return randn(B, 4, Tq or T, 8), randn(B, 4, Tk or T, 8)


@graded(1, "attn_scores", "attn_mask", "attn_softmax")
def test_attention_probs_formula():
    attn, _ = attention()
    q, k = queries_and_keys()
    T = q.size(2)
    scores = q @ k.transpose(-2, -1) / math.sqrt(8)
    scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
    assert_close(attn.attention_probs(q, k), scores.softmax(-1),
                 "attention probabilities softmax(mask(q k^T / sqrt(hs)))", "attn_scores")


@graded(1, "attn_softmax", needs=("attn_scores",))
def test_attention_rows_sum_to_one():
    attn, _ = attention()
    q, k = queries_and_keys()
    B, _, T, _ = q.shape
    probs = checked(attn.attention_probs(q, k), (B, 4, T, T), "attention probabilities", "attn_softmax")
    assert_close(probs.sum(-1), torch.ones(B, 4, T), "sum of each row of attention probabilities", "attn_softmax")
    if (probs < 0).any():
        fail("attention probabilities must not be negative", "attn_softmax")


def large_scores(dtype):
    """q, k (B, nh, T, 16) of small integers whose scores q.k / 4 are exact in dtype and large: 17.5 to 32.5 for
    fp16 (exp overflows fp16 above 11.1), 92.5 to 107.5 for bf16 (exp overflows bf16 and fp32 above 88.7)."""
    B, T = pick(1, 4), pick(2, 17)
    q, k = randint(-1, 2, B, 4, T, 16).float() * 2, randint(-1, 2, B, 4, T, 16).float()  # q even: sums exact in bf16
    q[..., 0], k[..., 0] = (10.0, 10.0) if dtype == torch.float16 else (20.0, 20.0)
    return q, k


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@graded(1, "attn_softmax", needs=("attn_scores", "attn_mask"))
def test_attention_probs_large_scores_half_precision(dtype):
    """Mixed precision (torch.autocast on a GPU) computes the scores in fp16 or bf16, where exp of a score above
    11.1 (fp16) or 88.7 (bf16) is inf: softmax subtracts each row's max first, so that it never overflows."""
    attn, _ = attention()
    q, k = large_scores(dtype)
    T = q.size(2)
    scores = (q.double() @ k.double().transpose(-2, -1) / 4).masked_fill(torch.ones(T, T).triu(1).bool(), -math.inf)
    expected = scores.softmax(-1)
    atol = 4e-3 if dtype == torch.float16 else 3e-2  # a few roundings of the probabilities in dtype
    name = str(dtype).replace("torch.", "")
    probs = checked(attn.attention_probs(q.to(dtype), k.to(dtype)), expected.shape, "attention probabilities",
                    "attn_softmax")
    why = (f"scores from {scores[scores > -math.inf].min().item():g} to {scores.max().item():g}: exp of a raw score "
           f"overflows {name}; subtract each row's max first (F.softmax does)")
    assert_close(probs, expected, f"attention probabilities of {name} q, k ({why})", "attn_softmax", atol=atol, rtol=0)
    with torch.autocast("cpu", dtype=dtype):
        probs = checked(attn.attention_probs(q, k), expected.shape, "attention probabilities", "attn_softmax")
    assert_close(probs, expected, f"attention probabilities under torch.autocast({name}) ({why})", "attn_softmax",
                 atol=atol, rtol=0)


@graded(2, "attn_mask", needs=("attn_scores",))
def test_attention_mask_hides_future():
    attn, _ = attention()
    q, k = queries_and_keys()
    B, _, T, _ = q.shape
    probs = checked(attn.attention_probs(q, k), (B, 4, T, T), "attention probabilities", "attn_mask")
    future = torch.ones(T, T).triu(1).bool()
    leak = probs[..., future].abs().max().item()
    if leak != 0:
        fail(f"query i must give zero weight to keys j > i, found weight {leak:.3g}", "attn_mask")
    # a KV cache passes fewer queries than keys: the queries are the last positions (a chunk of 2 or more: one
    # query alone sees every key, mask or not)
    Tk = pick(3, 17)
    Tq = pick(2, Tk)
    q, k = queries_and_keys(Tq, Tk)
    probs = checked(attn.attention_probs(q, k), (q.size(0), 4, Tq, Tk), "attention probabilities", "attn_mask")
    expected = torch.ones(Tk, Tk).tril().bool()[Tk - Tq:]
    if not torch.equal(probs > 0, expected.expand_as(probs)):
        fail(f"with {Tq} queries and {Tk} keys, query i is position {Tk - Tq} + i and sees keys 0..{Tk - Tq}+i "
             "(the rows of the queries' positions: self.mask[offset:offset + Tq, :Tk])", "attn_mask")


def changed_after(x, p):
    """x (B, T, C) with new random values at positions p.. (its future as seen from position p - 1)."""
    return torch.cat((x[:, :p], randn(x.size(0), x.size(1) - p, x.size(2))), dim=1)


@pytest.mark.parametrize("abs_emb", [False, True], ids=["rope", "learned"])
@pytest.mark.parametrize("flash", [False, True], ids=["manual", "flash"])
@graded(1, "attn_mask", "attn_flash",
        needs=("attn_qkv", "attn_scores", "attn_softmax", "attn_values", "attn_out", "rotary"))
def test_attention_is_causal(flash, abs_emb):
    attn, _ = attention(use_flash_attn=flash, abs_emb=abs_emb)
    B, T = pick(1, 4), pick(4, 17)
    p = pick(1, T)
    x = randn(B, T, 32)
    x2 = changed_after(x, p)
    todo = "attn_flash" if flash else "attn_mask"
    out = checked(attn(x), x.shape, "attention output", todo)
    out2 = checked(attn(x2), x.shape, "attention output", todo)
    assert_close(out2[:, :p], out[:, :p], f"attention outputs at positions 0..{p - 1} after changing positions "
                 f"{p}..{T - 1}", todo)
    if close(out2[:, p:], out[:, p:]):
        fail(f"attention outputs at positions {p}..{T - 1} stayed the same after changing the inputs there", "attn_out")


@graded(2, "attn_values", "attn_flash", "attn_out", needs=("attn_qkv", "attn_scores", "attn_mask", "attn_softmax"))
def test_attention_manual_and_flash_match_plain_torch():
    """Each path against attention computed with torch alone; a part both paths share is blamed when both fail."""
    manual, weights = attention(use_flash_attn=False, abs_emb=True)
    flash = make("CausalSelfAttention", {**TINY, "use_flash_attn": True, "abs_emb": True}, weights)
    x = randn(pick(1, 4), pick(2, 17), 32)
    expected = plain_attention(weights, x, 4, rope=False)
    manual_out, flash_out = manual(x), flash(x)
    if not close(manual_out, expected) and not close(flash_out, expected):
        assert_close(manual_out, expected, "both attention paths differ from plain torch, so look first at what they "
                     "share: the heads (TODO[attn_qkv]) and their output (TODO[attn_out]); manual output", "attn_qkv")
    assert_close(flash_out, expected, "flash attention output vs plain torch", "attn_flash")
    assert_close(manual_out, expected, "manual attention output (probabilities @ v) vs plain torch", "attn_values")


@graded(1, "attn_out", needs=("attn_qkv", "attn_scores", "attn_mask", "attn_softmax", "attn_values", "attn_flash",
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


@graded(1, "attn_values", "attn_flash", "mlp",
        needs=("attn_qkv", "attn_scores", "attn_mask", "attn_softmax", "attn_out", "rotary", "block", "gpt_embed",
               "gpt_logits"))
def test_dropout_does_nothing_in_eval():
    """In eval mode every dropout is the identity: a part built with dropout 0.5 computes what it does without."""
    x = randn(pick(1, 4), pick(2, 17), 32)
    config = {**TINY, "dropout": 0.5}
    attn, mlp = attention_weights(32), mlp_weights(32)
    parts = (("manual attention", "CausalSelfAttention", dict(use_flash_attn=False), attn,
              plain_attention(attn, x, 4, rope=True), "attn_values"),
             ("flash attention", "CausalSelfAttention", dict(use_flash_attn=True), attn,
              plain_attention(attn, x, 4, rope=True), "attn_flash"),
             ("MLP", "MLP", {}, mlp, plain_mlp(mlp, x), "mlp"))
    for what, part, options, weights, expected, todo in parts:
        assert_close(make(part, {**config, **options}, weights)(x), expected, f"{what} in eval with dropout 0.5 vs "
                     f"plain torch (dropout must be off: nn.Dropout modules know, F.dropout needs "
                     f"training=self.training)", todo)
    weights = gpt_weights(config)
    idx = randint(0, 13, pick(1, 4), pick(2, 17))
    assert_close(make("GPT", config, weights)(idx)[0], plain_forward(weights, config, idx),
                 "GPT logits in eval with dropout 0.5 vs plain torch", "gpt_embed")


@graded(1, "attn_values", "mlp", needs=("attn_qkv", "attn_scores", "attn_mask", "attn_softmax", "attn_out"))
def test_dropout_in_training_drops_probabilities_and_outputs():
    """In training, dropout zeroes the attention probabilities (attn_dropout, before @ v) and the outputs of
    attention (resid_dropout) and of the MLP, each element with probability p, scaled by 1 / (1 - p)."""
    # T >= 4: when dropout zeroes the few entries below the diagonal, the probabilities equal their transpose
    p, B, T = pick(2, 7) / 10, pick(1, 4), pick(4, 17)
    x = randn(B, T, 32)
    attn, weights = attention(dropout=p, abs_emb=True, use_flash_attn=False)
    attn.train()
    seed = new_seed()
    torch.manual_seed(seed)
    out = attn(x)
    q, k, v = heads(x, weights, 4)
    probs = torch.ones(T, T).tril().log().add((q @ k.transpose(-2, -1)) / math.sqrt(8)).softmax(-1)  # (B, nh, T, T)
    torch.manual_seed(seed)  # the same random draws, in the same order
    y = (F.dropout(probs, p, training=True) @ v).transpose(1, 2).reshape(B, T, 32)
    expected = F.dropout(F.linear(y, weights["c_proj.weight"], weights["c_proj.bias"]), p, training=True)
    assert_close(out, expected, f"manual attention in training (dropout {p}) vs "
                 "resid_dropout(c_proj(attn_dropout(probabilities) @ v))", "attn_values")
    weights = mlp_weights(32)
    mlp = make("MLP", {**TINY, "dropout": p}, weights)
    mlp.train()
    seed = new_seed()
    torch.manual_seed(seed)
    out = mlp(x)
    torch.manual_seed(seed)
    assert_close(out, F.dropout(plain_mlp(weights, x), p, training=True),
                 f"MLP in training (dropout {p}) vs dropout(c_proj(gelu(c_fc(x))))", "mlp")


# ----------------------------------------------------------------------------- MLP and block

@graded(2, "mlp")
def test_mlp(ref):
    weights = mlp_weights(32)
    mlp = make("MLP", TINY, weights)
    x = randn(pick(1, 4), pick(1, 17), 32)
    assert_close(mlp(x), plain_mlp(weights, x), "MLP: c_proj(gelu_tanh(c_fc(x)))", "mlp")
    assert_close(ref_model(ref).transformer.h[0].mlp(ref["x"]), ref["mlp_out"], "MLP vs the reference", "mlp")


@graded(2, "block", needs=("attn_qkv", "attn_scores", "attn_mask", "attn_softmax", "attn_values", "attn_flash",
                            "attn_out", "rotary", "mlp"))
def test_block_residual_structure(ref):
    block = ref_model(ref).transformer.h[0]
    weights, x, n_head = ref["state_dict"], ref["x"], ref["config"]["n_head"]
    h = plain_norm(weights, x, "transformer.h.0.ln_1")
    attn = plain_attention(weights, h, n_head, rope=True, prefix="transformer.h.0.attn.")
    assert_close(block.attn(h), attn, "the block's attention vs plain torch (the parts come first: the attention "
                 "tests say which)", "attn_out")
    h = x + attn
    expected = h + plain_mlp(weights, plain_norm(weights, h, "transformer.h.0.ln_2"), "transformer.h.0.mlp.")
    assert_close(block(x), expected, "Block: x + attn(ln_1(x)), then + mlp(ln_2(.)) (pre-norm residuals)", "block")
    assert_close(block(x), ref["block_out"], "Block vs the reference", "block")


# ----------------------------------------------------------------------------- the whole model

@pytest.mark.parametrize("abs_emb", [False, True], ids=["rope", "learned"])
@graded(2, "gpt_logits", "gpt_embed", needs=("block",))
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
    idx, V = ref["idx"], ref["config"]["vocab_size"]
    model = ref_model(ref)
    for _ in range(3):  # three draws of targets: a wrong loss can equal the right one by chance (1 draw in ~700)
        targets = randint(0, V, *idx.shape)
        targets.view(-1)[torch.randperm(idx.numel(), generator=INPUTS)[:pick(1, 4)]] = -1  # ignored positions
        logits, loss = model(idx, targets)
        assert_close(logits, ref["logits"], "logits vs the reference (test_gpt_logits_reference says where)",
                     "gpt_logits")
        if not torch.is_tensor(loss) or loss.dim() != 0:
            fail(f"loss should be a scalar tensor, got {describe(loss)}", "gpt_loss")
        expected = F.cross_entropy(ref["logits"].view(-1, V), targets.view(-1), ignore_index=-1)
        assert_close(loss, expected, "loss vs F.cross_entropy with ignore_index=-1", "gpt_loss")


def tiny_model(**overrides):
    """Your GPT of the tiny config (block_size 8 unless given), with weights drawn here -> (it, config, weights)."""
    config = {**TINY, "block_size": 8, **overrides}
    weights = gpt_weights(config)
    return make("GPT", config, weights), config, weights


@pytest.mark.parametrize("abs_emb", [False, True], ids=["rope", "learned"])
@pytest.mark.parametrize("flash", [False, True], ids=["manual", "flash"])
@graded(1, "gpt_logits", needs=("gpt_embed", "attn_qkv", "attn_scores", "attn_mask", "attn_softmax", "attn_values",
                                "attn_flash", "attn_out", "rotary", "block", "mlp"))
def test_gpt_is_causal(flash, abs_emb):
    model, _, _ = tiny_model(block_size=16, use_flash_attn=flash, abs_emb=abs_emb)
    B, T = pick(1, 4), pick(4, 17)
    p = pick(1, T)
    idx = randint(0, 13, B, T)
    idx2 = idx.clone()
    idx2[:, p:] = (idx2[:, p:] + randint(1, 13, B, T - p)) % 13  # every token from position p on changes
    x = randn(B, T, 32)
    x2 = changed_after(x, p)
    attn = model.transformer.h[0].attn
    out, out2 = (checked(attn(t), x.shape, "the first Block's attention", "attn_out") for t in (x, x2))
    assert_close(out2[:, :p], out[:, :p], f"the first Block's attention at positions 0..{p - 1} after changing "
                 f"positions {p}..{T - 1}", "attn_flash" if flash else "attn_mask")
    logits = checked(model(idx)[0], (B, T, 13), "logits", "gpt_logits")
    logits2 = checked(model(idx2)[0], (B, T, 13), "logits", "gpt_logits")
    assert_close(logits2[:, :p], logits[:, :p], f"logits at positions 0..{p - 1} after changing tokens {p}..{T - 1}",
                 "gpt_logits")
    if close(logits2[:, p:], logits[:, p:]):
        fail(f"logits at positions {p}..{T - 1} stayed the same after changing the tokens there", "gpt_logits")


MODEL_REGIONS = ("gpt_embed", "gpt_logits", "gpt_loss", "block", "mlp", "rotary", "attn_qkv", "attn_scores",
                 "attn_mask", "attn_softmax", "attn_values", "attn_flash", "attn_out")
TRAINING = [pytest.param(False, False, id="rope-manual"), pytest.param(True, True, id="learned-flash")]


def grad_region(name, n_layer):
    """The TODO to look at when the gradient of parameter name is the first one wrong, going backward."""
    if ".wte." in name or ".wpe." in name:
        return "gpt_embed"
    if "ln_f" in name:
        return "gpt_logits"
    if int(name.split(".")[2]) < n_layer - 1:  # the blocks after it are right: the gradient lost its way through them
        return "block"
    return "mlp" if ".mlp." in name else "attn_out" if ".c_proj." in name else "attn_qkv" if ".attn." in name \
        else "block"


@pytest.mark.parametrize("abs_emb, flash", TRAINING)
@graded(2, "block", "gpt_loss", needs=MODEL_REGIONS)
def test_training_step_gradients(abs_emb, flash):
    """One training step: loss.backward() through your GPT gives every parameter the gradient that plain torch
    autograd gives on the same weights (the tied wte / lm_head matrix: the sum of both uses)."""
    model, config, weights = tiny_model(block_size=16, abs_emb=abs_emb, use_flash_attn=flash)
    model.train()  # dropout 0: training computes what eval does
    # B > 1: the rows of targets must line up with the rows of logits; T > B: a square targets can equal its transpose
    B, T = pick(2, 4), pick(4, 17)
    idx, targets = randint(0, 13, B, T), randint(0, 13, B, T)
    targets.view(-1)[torch.randperm(B * T, generator=INPUTS)[:pick(1, min(3, B * T))]] = -1  # ignored, not all
    leaves = {name: w.clone().requires_grad_() for name, w in weights.items() if name != "lm_head.weight"}
    leaves["lm_head.weight"] = leaves["transformer.wte.weight"]  # tied: one tensor, its gradient the sum
    expected = F.cross_entropy(plain_forward(leaves, config, idx).view(-1, 13), targets.view(-1), ignore_index=-1)
    expected.backward()
    _, loss = model(idx, targets)
    if not torch.is_tensor(loss) or loss.dim() != 0:
        fail(f"forward(idx, targets) should return the loss as a scalar tensor, got {describe(loss)}", "gpt_loss")
    assert_close(loss, expected, "the loss vs plain torch (test_gpt_loss_is_cross_entropy and "
                 "test_gpt_logits_reference say where)", "gpt_loss")
    if not loss.requires_grad:
        fail("the loss does not require grad: it is cut off from the parameters (.detach(), .data, .item() or "
             "torch.no_grad on its way)", "gpt_loss")
    try:
        loss.backward()
    except NotImplementedError:  # a TODO's stub
        raise
    except RuntimeError as e:
        fail(f"loss.backward() raised: {str(e).splitlines()[0][:160]} (an in-place update of a tensor that autograd "
             "saved, such as x += ... in Block: write x = x + ...)", "block")
    grads = {name: p.grad for name, p in model.named_parameters()}
    for name in reversed([n for n in weights if n != "lm_head.weight"]):  # backward order: ln_f first, wte last
        grad, todo = grads.get(name), grad_region(name, config["n_layer"])
        if grad is None:
            fail(f"no gradient reached {name}: the graph is cut between it and the loss (.detach(), .data, "
                 "torch.no_grad, a tensor rebuilt from numbers)", todo)
        where = "" if todo != "block" or "ln_" in name else \
            " (the gradients of the later blocks are right: it does not flow back through a Block to its input)"
        assert_close(grad, leaves[name].grad, f"the gradient of {name} vs plain torch autograd{where}", todo,
                     atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("abs_emb, flash", TRAINING)
@graded(1, "gpt_embed", "attn_flash", "attn_values", needs=MODEL_REGIONS)
def test_dropout_in_training_draw_for_draw(abs_emb, flash):
    """In training, with the same seed, your model draws the solution's dropout masks in the solution's order: the
    embeddings' (transformer.drop, after adding wpe), then in each block the attention probabilities' (manual:
    attn_dropout; flash: dropout_p of F.scaled_dot_product_attention), the attention output's (resid_dropout) and
    the MLP output's."""
    p, B, T = pick(2, 6) / 10, pick(1, 4), pick(2, 17)
    config = {**TINY, "block_size": 16, "dropout": p, "abs_emb": abs_emb, "use_flash_attn": flash}
    path, todo = ("flash", "attn_flash") if flash else ("manual", "attn_values")
    x = randn(B, T, 32)
    weights = attention_weights(32)
    attn = make("CausalSelfAttention", config, weights).train()
    seed = new_seed()
    torch.manual_seed(seed)
    out = checked(attn(x), x.shape, "attention output", todo)
    torch.manual_seed(seed)
    expected = plain_attention(weights, x, 4, not abs_emb, dropout=p, flash=flash)
    torch.manual_seed(seed)
    if close(out, plain_attention(weights, x, 4, not abs_emb, dropout=p, flash=flash, resid_dropout=False)):
        fail(f"{path} attention in training (dropout {p}): the output is not dropped (resid_dropout after c_proj)",
             "attn_out")
    assert_close(out, expected, f"{path} attention in training (dropout {p}, the same seed) vs plain torch: "
                 + ("F.scaled_dot_product_attention(..., dropout_p=self.dropout while training)" if flash else
                    "attn_dropout(probabilities) @ v") + ", then resid_dropout(c_proj(.))", todo)
    weights = mlp_weights(32)
    mlp = make("MLP", config, weights).train()
    torch.manual_seed(seed)
    out = mlp(x)
    torch.manual_seed(seed)
    assert_close(out, plain_mlp(weights, x, dropout=p), f"MLP in training (dropout {p}) vs "
                 "dropout(c_proj(gelu(c_fc(x))))", "mlp")
    weights = gpt_weights(config)
    model = make("GPT", config, weights).train()
    idx = randint(0, 13, B, T)
    torch.manual_seed(seed)
    logits = checked(model(idx)[0], (B, T, 13), "logits", "gpt_logits")
    torch.manual_seed(seed)
    assert_close(logits, plain_forward(weights, config, idx, dropout=p), f"GPT logits in training (dropout {p}, the "
                 "same seed) vs plain torch; the attention and the MLP alone are right, so look at the embeddings: "
                 "transformer.drop on wte(idx)" + (" + wpe(pos), after adding the positions" if abs_emb else ""),
                 "gpt_embed")


@graded(0)
def test_gpt2_small_parameter_count():
    gpt = load("gpt")
    config = gpt.GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768, abs_emb=True)
    with torch.device("meta"):  # shapes only, no memory or init time
        model = gpt.GPT(config)
    assert model.num_params() == 124_439_808, \
        f"GPT-2 small with tied weights has 124,439,808 parameters, got {model.num_params():,}"


# ----------------------------------------------------------------------------- generation

@graded(1, "sample_greedy", needs=("gpt_embed", "gpt_logits"))
def test_generate_greedy_equals_argmax():
    model, config, weights = tiny_model()
    idx, n = randint(0, 13, pick(3, 6), pick(1, 5)), pick(8, 12)  # more than 8 tokens: the context gets cropped
    assert_greedy(model.generate(idx, max_new_tokens=n, temperature=0), weights, config, idx, n,
                  "temperature 0 must decode greedily (argmax)", "sample_greedy")


@pytest.mark.parametrize("abs_emb", [False, True], ids=["rope", "learned"])
@graded(1, "gpt_embed", needs=("rotary", "sample_greedy", "gpt_logits"))
def test_cached_decoding_equals_uncached(abs_emb):
    """generate() with the KV cache feeds one new token at a time: its position is the cache's length
    (offset), for learned positions (wpe) as for rotary ones. It must decode exactly as without the cache."""
    gpt = load("gpt")
    model, config, weights = tiny_model(abs_emb=abs_emb)
    todo = "gpt_embed" if abs_emb else "rotary"
    B, T = pick(1, 5), pick(1, 5)
    idx = randint(0, 13, B, 8)
    expected = plain_forward(weights, config, idx)  # (B, 8, V): token t sees tokens 0..t
    cache = gpt.KVCache(gpt.GPTConfig(**config), B, torch.device("cpu"), torch.float32)
    assert_close(model(idx[:, :T], cache=cache)[0], expected[:, :T], f"logits of a {T}-token prompt with an empty "
                 "KV cache", todo)
    for t in range(T, 8):
        assert_close(model(idx[:, t:t + 1], cache=cache)[0], expected[:, t:t + 1], f"logits of token {t} fed alone "
                     f"after {t} cached positions (it sits at position offset = {t})", todo)
    n, prompt = pick(4, 9 - T), idx[:, :T]
    assert_greedy(model.generate(prompt, n, temperature=0, kv_cache=False), weights, config, prompt, n,
                  "greedy decoding without the KV cache", "sample_greedy")
    assert_greedy(model.generate(prompt, n, temperature=0, kv_cache=True), weights, config, prompt, n,
                  "greedy decoding with the KV cache (the new tokens sit at positions offset.. offset+T-1)", todo)


LOOSE = (1e-4, 1e-3)  # atol, rtol


@pytest.mark.parametrize("abs_emb", [False, True], ids=["rope", "learned"])
@graded(1, "attn_mask", "gpt_embed", "rotary", needs=("block", "gpt_logits", "sample_greedy", "attn_qkv",
                                                      "attn_scores", "attn_softmax", "attn_values", "attn_flash",
                                                      "attn_out", "mlp"))
def test_cached_decoding_in_chunks(abs_emb):
    """Queries and keys that carry their positions strongly (q and k weights 3x): the prompt fed with an empty KV
    cache, then token by token, then again in chunks of several tokens (each chunk's queries at positions
    offset.., attending to the cached keys and to the chunk's own up to themselves) must give plain torch's
    logits, and generate() with the cache plain torch's greedy tokens."""
    gpt = load("gpt")
    config = {**TINY, "block_size": 16, "abs_emb": abs_emb}
    weights = gpt_weights(config)
    for i in range(config["n_layer"]):  # sharper attention: keys at the wrong positions change the next token
        for name in (f"transformer.h.{i}.attn.c_attn.weight", f"transformer.h.{i}.attn.c_attn.bias"):
            weights[name][:64] *= 3
    model = make("GPT", config, weights)
    B, T = pick(1, 4), pick(2, 9)
    # random tokens, not a greedy continuation: that can repeat one token, and identical tokens hide a missing mask
    full = randint(0, 13, B, 16)  # (B, 16): a prompt of T tokens, then more
    expected = plain_forward(weights, config, full)  # (B, 16, V)
    todo = "gpt_embed" if abs_emb else "rotary"

    def feed(cache, start, end, after):
        logits = checked(model(full[:, start:end], cache=cache)[0], (B, end - start, 13), "logits", "gpt_logits")
        # sharpened attention amplifies fp32 rounding (another order of the same sums): 10x the usual tolerance,
        # far below what a key at a wrong position changes
        if end - start == 1 and start > 0 and not close(logits, expected[:, start:end], *LOOSE) and close(
                logits, plain_forward(weights, config, full[:, start:end], start=start), *LOOSE):
            fail(f"logits of token {start} fed alone after {start} cached positions ignore them: the cache must reach "
                 "every attention (block(x, cache) in TODO[gpt_logits], self.attn(..., cache))", "block")
        where = f"position {start}" if end - start == 1 else f"positions {start}..{end - 1}"
        assert_close(logits, expected[:, start:end], f"logits of {where} fed {after}", todo
                     if end - start == 1 or start == 0 else "attn_mask", *LOOSE)

    cache = gpt.KVCache(gpt.GPTConfig(**config), B, torch.device("cpu"), torch.float32)
    feed(cache, 0, T, "as the prompt with an empty KV cache")
    for t in range(T, 16):
        feed(cache, t, t + 1, f"alone after {t} cached positions (its position is offset = {t}: rotary angles and "
             "wpe of position offset + i)")
    cache, start = gpt.KVCache(gpt.GPTConfig(**config), B, torch.device("cpu"), torch.float32), 0
    while start < 16:
        end = min(16, start + pick(2, 6))
        feed(cache, start, end, f"as one chunk after {start} cached positions (query i is position {start} + i and "
             f"sees keys 0..{start} + i: self.mask[offset:offset + Tq, :Tk])")
        start = end
    n, prompt = 16 - T + pick(0, 3), full[:, :T]  # past block_size the window starts again
    assert_greedy(model.generate(prompt, n, temperature=0, kv_cache=True), weights, config, prompt, n,
                  "greedy decoding with the KV cache", todo)


def sample(logits, n=20000, seed=None, **kwargs):
    """n draws of sample_next from the same logits row (1, V), with a torch.Generator seeded with seed (drawn
    if None) -> the sampled ids (n,)."""
    gpt = load("gpt")
    g = torch.Generator().manual_seed(new_seed() if seed is None else seed)
    V = logits.size(-1)
    ids = gpt.sample_next(logits.expand(n, -1).clone(), generator=g, **kwargs)  # rows of its own: in place too
    if not integral(ids) or ids.shape != (n, 1):
        fail(f"sample_next of logits ({n}, {V}) should return token ids of shape ({n}, 1), got {describe(ids)}",
             "sample_draw")
    ids = ids.view(-1).long()
    if ids.min() < 0 or ids.max() >= V:
        fail(f"sampled ids should lie in 0..{V - 1}, got ids from {ids.min().item()} to {ids.max().item()}",
             "sample_draw")
    return ids


def spread_logits(V, spread):
    """Logits (1, V): V values at most spread apart in a random order, the largest not at id 0 (so that a mask
    applied in vocabulary order instead of sorted order shows)."""
    logits = rand(1, V) * spread
    best = int(logits.argmax())
    if best == 0:
        swap = pick(1, V)
        logits[0, [0, swap]] = logits[0, [swap, 0]]
    return logits


def ranked(probs):
    """probs (V,) -> (ids from the most likely down, mass ranked above each of them): top-p keeps those < p."""
    values, ids = probs.sort(descending=True)
    return ids, values.cumsum(0) - values


def top_p_keeping(probs, j):
    """A top_p that keeps exactly the j most likely ids of probs (V,), a quarter of the gap from either edge."""
    _, above = ranked(probs)
    return float(above[j - 1] + (0.25 + 0.5 * rand(())) * (above[j] - above[j - 1]))


@graded(2, "sample_top_k", needs=("sample_draw", "sample_temperature"))
def test_top_k_never_samples_outside_top_k():
    V = pick(8, 17)
    values = -(0.05 + rand(V) * 3 / V).cumsum(0)  # descending, spread below 3.8: every id is likely enough
    k = pick(3, V - 1)
    values[k] = values[k - 1]  # the k-th largest value is tied with the next one
    order = torch.randperm(V, generator=INPUTS).tolist()  # id order[r] has rank r
    logits = torch.empty(1, V)
    logits[0, order] = values
    for top_k, keep, why in ((k - 1, order[:k - 1], ""),
                             (k, order[:k + 1], f" (the tie at the {k}th value keeps ids {order[k - 1]} and "
                                                f"{order[k]})"),
                             (V + pick(1, 100), order, f" (more than the {V} ids: k = min(top_k, V))")):
        ids = set(sample(logits, top_k=top_k).tolist())
        if ids != set(keep):
            fail(f"with top_k={top_k} the ids {sorted(keep)} should all be sampled and no other{why}, got "
                 f"{sorted(ids)}", "sample_top_k")


@graded(2, "sample_top_p", needs=("sample_draw", "sample_temperature"))
def test_top_p_samples_only_the_nucleus():
    V = pick(8, 13)
    logits = spread_logits(V, 2.0)
    probs = logits[0].softmax(-1)
    order = ranked(probs)[0].tolist()
    j = pick(2, V - 1)
    top_p = top_p_keeping(probs, j)
    ids = set(sample(logits, top_p=top_p).tolist())
    if ids != set(order[:j]):
        fail(f"with top_p={top_p:.4f} the nucleus is ids {sorted(order[:j])} (the token that crosses p "
             f"stays), got {sorted(ids)}", "sample_top_p")
    top_p = top_p_keeping(probs, 1)
    ids = set(sample(logits, top_p=top_p).tolist())
    if ids != {order[0]}:
        fail(f"with top_p={top_p:.4f} only the most likely id {order[0]} stays (at least one token), got "
             f"{sorted(ids)}", "sample_top_p")
    k = pick(3, V)
    kept = probs.where(probs >= probs.topk(k).values[-1], 0)
    j = pick(2, k)
    top_p = top_p_keeping(kept / kept.sum(), j)
    ids = set(sample(logits, top_k=k, top_p=top_p).tolist())
    if ids != set(order[:j]):
        fail(f"top_k={k} then top_p={top_p:.4f} on the {k} renormalised probabilities should keep ids "
             f"{sorted(order[:j])}, got {sorted(ids)}", "sample_top_p")


def filtered(logits, temperature, top_k):
    """The probabilities (V,) of logits (1, V) after temperature and top_k, renormalised."""
    probs = F.softmax(logits[0] / temperature, dim=-1)
    probs[probs < probs.topk(top_k).values[-1]] = 0
    return probs / probs.sum()


@graded(2, "sample_top_p", "sample_temperature", needs=("sample_top_k", "sample_draw"))
def test_temperature_then_top_k_then_top_p_distribution():
    """Temperature first, then top-k, then top-p on what is left: the support and the probabilities, on three draws (a
    wrong order that happens to keep the same ids on one draw does not on all)."""
    for _ in range(3):
        width = 0.0
        while width < 0.05:  # until some top_p keeps fewer ids of the tempered probabilities than of the untempered
            V = pick(8, 13)
            logits, temperature, top_k = spread_logits(V, 3.0), 0.3 + 0.5 * float(rand(())), pick(4, V)
            probs, untempered = filtered(logits, temperature, top_k), filtered(logits, 1.0, top_k)
            _, above = ranked(probs)
            _, above_untempered = ranked(untempered)  # the same ranking; less mass above each id
            j = pick(2, top_k)
            low, high = max(above[j - 1], above_untempered[j]), above[j]
            width = float(high - low)
        top_p = float(low + (0.25 + 0.5 * rand(())) * (high - low))
        ids = sample(logits, temperature=temperature, top_k=top_k, top_p=top_p)
        order, above = ranked(probs)
        probs[order[j:]] = 0
        probs /= probs.sum()
        support = sorted(order[:j].tolist())
        if sorted(set(ids.tolist())) != support:
            fail(f"temperature {temperature:.3f}, top_k {top_k}, top_p {top_p:.4f}: expected ids {support} (temperature "
                 f"first, then top-k, then top-p on the tempered probabilities), got {sorted(set(ids.tolist()))}",
                 "sample_top_p")
        freq = torch.bincount(ids, minlength=V).float() / len(ids)
        assert_close(freq, probs, f"frequencies of {len(ids)} samples vs the renormalised probabilities", "sample_draw",
                     atol=0.02)  # at least 5.6 standard deviations of a frequency


@graded(2, "sample_draw", "sample_temperature", needs=("gpt_embed", "gpt_logits"))
def test_sampling_follows_probabilities_and_seed():
    V = pick(3, 7)
    probs = F.softmax(torch.randperm(V, generator=INPUTS)[None] * (0.4 + 0.4 * rand(())), dim=-1)  # far from uniform
    seed = new_seed()
    ids = sample(probs.log(), seed=seed)
    freq = torch.bincount(ids, minlength=V).float() / len(ids)
    assert_close(freq, probs[0], f"frequencies of {len(ids)} samples vs the probabilities", "sample_draw",
                 atol=0.02)  # at least 5.6 standard deviations of a frequency
    temperature = choice((0.25, 0.5, 2.0, 4.0))  # powers of two: logits * t / t gives the logits back exactly
    scaled = sample(probs.log() * temperature, seed=seed, temperature=temperature)
    if not torch.equal(scaled, ids):
        fail(f"logits * {temperature} at temperature {temperature} must sample exactly like the logits at temperature "
             "1 (divide the logits by the temperature)", "sample_temperature")
    model, _, _ = tiny_model()
    idx, seed = randint(0, 13, pick(1, 4), 1), new_seed()
    runs = [model.generate(idx, 12, top_k=5, top_p=0.9, generator=torch.Generator().manual_seed(seed))
            for _ in range(2)]
    if not all(integral(run) for run in runs) or not torch.equal(runs[0], runs[1]):
        fail("the same seeded torch.Generator must give the same samples", "sample_draw")


def gpt2_like(rows, V=50257):
    """Logits (rows, V) as large as a GPT-2's and all below -104 (exp gives 0 in fp32): a few ids per row near -105,
    the rest near -130 -> (logits, the few ids (rows, k))."""
    logits = -130 + 3 * randn(rows, V)
    top = randint(0, V, rows, pick(3, 7))
    logits.scatter_(1, top, -105 - rand(*top.shape))
    return logits, top


@graded(2, "sample_draw", needs=("sample_temperature", "sample_top_k"))
def test_sampling_extreme_logits():
    """Logits far from 0: at temperature 0.1 they grow tenfold (exp of 600 is inf), a GPT-2's are around -100
    (exp of -104 is 0 in fp32). Softmax subtracts each row's max and samples them as it samples any logits."""
    gpt = load("gpt")
    V = pick(4, 9)
    for what, logits, temperature in (("logits near 60 at temperature 0.1", 60 + 0.4 * rand(1, V), 0.1),
                                      ("logits all below -104", -105 - 3 * rand(1, V), 1.0)):
        try:
            ids = sample(logits, temperature=temperature)
        except NotImplementedError:  # a TODO's stub
            raise
        except RuntimeError as e:
            fail(f"sample_next of {what} raised {str(e).splitlines()[0][:200]} (exp of raw logits overflows to inf "
                 "or underflows to 0: use F.softmax, which subtracts each row's max)", "sample_draw")
        probs = F.softmax(logits[0].double() / temperature, dim=-1)
        freq = torch.bincount(ids, minlength=V).double() / len(ids)
        assert_close(freq, probs, f"frequencies of {len(ids)} samples of {what} vs softmax(logits / temperature)",
                     "sample_draw", atol=0.02)
    logits, top = gpt2_like(pick(4, 9))
    for kwargs in (dict(), dict(temperature=0.7, top_k=pick(10, 60))):
        g = torch.Generator().manual_seed(new_seed())
        try:
            ids = gpt.sample_next(logits.clone(), generator=g, **kwargs)
        except NotImplementedError:  # a TODO's stub
            raise
        except RuntimeError as e:
            fail(f"sample_next of GPT-2-like logits (all below -104), {kwargs}, raised {str(e).splitlines()[0][:200]} "
                 "(exp of the raw logits is 0: use F.softmax, which subtracts each row's max)", "sample_draw")
        if not integral(ids) or ids.shape != (len(top), 1):
            fail(f"sample_next of logits {tuple(logits.shape)} should return ids of shape ({len(top)}, 1), got "
                 f"{describe(ids)}", "sample_draw")
        if not (ids.long() == top).any(-1).all():
            fail(f"GPT-2-like logits {kwargs}: each row's id should be one of its few logits near -105 (the others, "
                 f"25 lower, are e^-25 less likely), expected one of {top.tolist()}, got {ids.view(-1).tolist()}",
                 "sample_draw")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__] + sys.argv[1:]))
