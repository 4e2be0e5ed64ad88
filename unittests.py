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

def rotate(t, base=10000.0):
    """Rotary embedding of t (B, nh, T, hs) at positions 0..T-1, half-split pairs."""
    hs, T = t.size(-1), t.size(-2)
    angles = torch.outer(torch.arange(T).float(), base ** (-torch.arange(0, hs, 2).float() / hs))  # (T, hs/2)
    t1, t2 = t.chunk(2, dim=-1)  # (B, nh, T, hs/2) each
    return torch.cat((t1 * angles.cos() - t2 * angles.sin(), t1 * angles.sin() + t2 * angles.cos()), dim=-1)


def heads(x, weights, n_head, prefix=""):
    """q, k, v (B, nh, T, hs) of x (B, T, C)."""
    B, T, C = x.shape
    qkv = F.linear(x, weights[prefix + "c_attn.weight"], weights.get(prefix + "c_attn.bias"))  # (B, T, 3C)
    return (t.view(B, T, n_head, C // n_head).transpose(1, 2) for t in qkv.split(C, dim=-1))


def plain_attention(weights, x, n_head, rope, prefix=""):
    """Causal self-attention of x (B, T, C), rotary positions if rope."""
    B, T, C = x.shape
    q, k, v = heads(x, weights, n_head, prefix)
    if rope:
        q, k = rotate(q), rotate(k)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=causal)  # (B, nh, T, hs)
    return F.linear(y.transpose(1, 2).reshape(B, T, C), weights[prefix + "c_proj.weight"],
                    weights.get(prefix + "c_proj.bias"))


def plain_mlp(weights, x, prefix=""):
    hidden = F.linear(x, weights[prefix + "c_fc.weight"], weights.get(prefix + "c_fc.bias"))  # (B, T, 4C)
    return F.linear(F.gelu(hidden, approximate="tanh"), weights[prefix + "c_proj.weight"],
                    weights.get(prefix + "c_proj.bias"))


def plain_norm(weights, x, name):
    return F.layer_norm(x, x.shape[-1:], weights[name + ".weight"], weights.get(name + ".bias"))


def plain_forward(weights, config, idx):
    """Logits (B, T, V) of a GPT of config (a dict) with these weights, for idx (B, T)."""
    x = weights["transformer.wte.weight"][idx]  # (B, T, C)
    if config.get("abs_emb"):
        x = x + weights["transformer.wpe.weight"][:idx.size(1)]
    for i in range(config["n_layer"]):
        block = f"transformer.h.{i}."
        x = x + plain_attention(weights, plain_norm(weights, x, block + "ln_1"), config["n_head"],
                                not config.get("abs_emb"), block + "attn.")
        x = x + plain_mlp(weights, plain_norm(weights, x, block + "ln_2"), block + "mlp.")
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


@graded(2, "layernorm")
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


@graded(2, "rmsnorm")
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


@graded(2, "rotary")
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
    B, T = pick(1, 4), pick(2, 17)
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


@graded(2, "attn_scores", "attn_mask", "attn_softmax")
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
    # a KV cache passes fewer queries than keys: the queries are the last positions
    Tk = pick(3, 17)
    Tq = pick(1, Tk)
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


@graded(2, "attn_values", "mlp", needs=("attn_qkv", "attn_scores", "attn_mask", "attn_softmax", "attn_out"))
def test_dropout_in_training_drops_probabilities_and_outputs():
    """In training, dropout zeroes the attention probabilities (attn_dropout, before @ v) and the outputs of
    attention (resid_dropout) and of the MLP, each element with probability p, scaled by 1 / (1 - p)."""
    p, B, T = pick(2, 7) / 10, pick(1, 4), pick(2, 17)
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
    idx, V = ref["idx"], ref["config"]["vocab_size"]
    targets = randint(0, V, *idx.shape)
    targets.view(-1)[torch.randperm(idx.numel(), generator=INPUTS)[:pick(1, 4)]] = -1  # ignored positions
    logits, loss = ref_model(ref)(idx, targets)
    assert_close(logits, ref["logits"], "logits vs the reference (test_gpt_logits_reference says where)", "gpt_logits")
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


@graded(0)
def test_gpt2_small_parameter_count():
    gpt = load("gpt")
    config = gpt.GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768, abs_emb=True)
    with torch.device("meta"):  # shapes only, no memory or init time
        model = gpt.GPT(config)
    assert model.num_params() == 124_439_808, \
        f"GPT-2 small with tied weights has 124,439,808 parameters, got {model.num_params():,}"


# ----------------------------------------------------------------------------- generation

@graded(2, "sample_greedy", needs=("gpt_embed", "gpt_logits"))
def test_generate_greedy_equals_argmax():
    model, config, weights = tiny_model()
    idx, n = randint(0, 13, pick(3, 6), pick(1, 5)), pick(8, 12)  # more than 8 tokens: the context gets cropped
    assert_greedy(model.generate(idx, max_new_tokens=n, temperature=0), weights, config, idx, n,
                  "temperature 0 must decode greedily (argmax)", "sample_greedy")


@pytest.mark.parametrize("abs_emb", [False, True], ids=["rope", "learned"])
@graded(2, "gpt_embed", needs=("rotary", "sample_greedy", "gpt_logits"))
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


def sample(logits, n=20000, seed=None, **kwargs):
    """n draws of sample_next from the same logits row (1, V), with a torch.Generator seeded with seed (drawn
    if None) -> the sampled ids (n,)."""
    gpt = load("gpt")
    g = torch.Generator().manual_seed(new_seed() if seed is None else seed)
    V = logits.size(-1)
    ids = gpt.sample_next(logits.expand(n, -1), generator=g, **kwargs)
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
    """Temperature first, then top-k, then top-p on what is left: the support and the probabilities."""
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


if __name__ == "__main__":
    sys.exit(pytest.main([__file__] + sys.argv[1:]))
