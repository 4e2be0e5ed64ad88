"""
Sample text from a model trained with train.py, or from OpenAI's pretrained GPT-2.

    python generate.py --prompt "ROMEO:"                # the newest run in runs/
    python generate.py --checkpoint runs/tinyshakespeare-baby --prompt "ROMEO:"
    python generate.py --pretrained gpt2 --prompt "Hello, my name is" --num_samples 3 --top_p 0.9
    python generate.py --checkpoint runs/mine/best.pt --prompt FILE:prompt.txt --output samples.txt
    python generate.py --checkpoint runs/tinyshakespeare-gpt-micro --prompt "ROMEO:" --attention_map attn.png

All options: `python generate.py --help` (cfg.py). Generation uses a KV cache (--no-kv_cache turns it
off; the tokens are the same). A model with learned positions attends to the last block_size tokens:
longer samples slide that window, as rotary models do. --attention_map draws every head's attention over
the prompt (plot.py; needs matplotlib). Exit codes: 0 done; 2 bad option, prompt or checkpoint; 74 --output
or --attention_map cannot be written; 130 stopped by Ctrl-C.
"""

import glob
import os
import sys
import time
from contextlib import contextmanager, nullcontext
from functools import partial

# an operation Apple's GPUs (MPS) lack runs on the CPU instead of failing; read once, when torch loads
os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import plot
from cfg import EXIT_ABORTED, EXIT_IO, EXIT_USAGE, console, parse_sample_config, unfinished
from dataset import DataError, read_text
from files import atomic_write, check_writable
from gpt import GPT, CausalSelfAttention, GPTConfig, KVCache
from pretrained import GPT2Tokenizer, pretrained_folder, tokenizer_from_dict
from train import load_checkpoint

RUNS = "runs"  # where train.py puts its run folders by default
SEPARATOR = "\n" + "-" * 30 + " sample {i} of {n} " + "-" * 30 + "\n"
PACK_MAX_BYTES = 2 ** 31  # a packed copy doubles the weights' memory: not for the largest GPT-2s


class OutputError(ValueError):
    """--output cannot be written (exit EXIT_IO)."""


def run_folders(root=RUNS):
    """The folders under root (and root itself) that hold a best.pt or last.pt, newest first."""
    written = {}
    for path in glob.glob(os.path.join(glob.escape(root), "**", "*.pt"), recursive=True):
        if os.path.basename(path) in ("best.pt", "last.pt"):
            folder = os.path.dirname(path)
            written[folder] = max(written.get(folder, 0), os.path.getmtime(path))
    return sorted(written, key=written.get, reverse=True)


def the_runs(root=RUNS):
    """What the error of a missing run says: the runs there are, or how to make one."""
    found = run_folders(root)
    if not found:
        return f"there is no run in {root}/ yet: train one first (python train.py --preset cpu-speedrun)"
    shown = ", ".join(found[:8]) + (f" and {len(found) - 8} more" if len(found) > 8 else "")
    return f"the runs in {root}/, newest first: {shown}"


def load_run(source):
    """A checkpoint file, or a run folder's best.pt, else (missing or damaged) its last.pt -> (path, checkpoint).
    No source: the newest run folder in runs/."""
    if source is None:
        found = run_folders()
        if not found:
            raise DataError(f"{the_runs()}; or pass --checkpoint RUN_FOLDER_OR_FILE or --pretrained gpt2")
        source = found[0]
    if not os.path.isdir(source):
        if not os.path.isfile(source):
            raise DataError(f"--checkpoint {source} does not exist; {the_runs()}")
        return source, load_checkpoint(source)
    best, last = os.path.join(source, "best.pt"), os.path.join(source, "last.pt")
    if not os.path.isfile(best) and not os.path.isfile(last):
        raise DataError(f"--checkpoint {source} holds no best.pt or last.pt; pass a run folder of train.py or a .pt file")
    try:
        return best, load_checkpoint(best)
    except ValueError as e:
        if not os.path.isfile(last):
            raise
        if os.path.isfile(best):
            print(f"warning: {e}; sampling from {last} instead", file=sys.stderr)
        return last, load_checkpoint(last)


def from_checkpoint(source):
    """A checkpoint file or run folder of train.py -> (model in eval mode on the CPU, tokenizer, where it came from)."""
    path, ckpt = load_run(source)
    model = GPT(GPTConfig.from_dict(ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    tokenizer = tokenizer_from_dict(ckpt["tokenizer"])
    described = f"{path} (step {ckpt['step']}, best val loss {ckpt['best_val_loss']:.4f})" if "step" in ckpt else path
    return model.eval(), tokenizer, described


def load_model(cfg):
    """-> (model in eval mode on cfg.device, tokenizer, where it came from)."""
    if cfg.pretrained:
        folder = pretrained_folder(cfg.pretrained)  # the weights and the BPE files
        model = GPT.from_pretrained(folder)
        tokenizer = GPT2Tokenizer(folder)
        source = folder
    else:
        model, tokenizer, source = from_checkpoint(cfg.checkpoint)
    if cfg.top_k is not None and cfg.top_k > tokenizer.vocab_size:
        raise DataError(f"--top_k {cfg.top_k} is more than the model's vocabulary of {tokenizer.vocab_size} tokens; "
                        f"pass at most {tokenizer.vocab_size}, or leave it out to sample from all of them")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]
    return model.to(device=cfg.device, dtype=dtype).eval(), tokenizer, source


def check_output(path, option="--output"):
    """Before sampling: an output file can be written (its folder, made when missing, takes a new file)."""
    try:
        check_writable(os.path.dirname(os.path.abspath(path)))
    except OSError as e:
        raise OutputError(f"cannot write {option} {path}: {e.strerror}; pass a path in a folder you can write to")


def prompt_text(cfg, tokenizer):
    if cfg.prompt is None:  # GPT-2 starts documents after <|endoftext|>; character models after a newline
        return "<|endoftext|>" if isinstance(tokenizer, GPT2Tokenizer) else tokenizer.default_prompt()
    text = read_text(cfg.prompt[len("FILE:"):], f"--prompt {cfg.prompt}") if cfg.prompt.startswith("FILE:") else cfg.prompt
    if not text:
        raise DataError("the prompt is empty; give some text, or leave --prompt out for the default")
    return text


def main(argv=None):
    console()
    try:
        return generate(argv)
    except NotImplementedError as e:  # a TODO of gpt.py still to write
        if not unfinished(e):
            raise
        return error(unfinished(e), EXIT_USAGE)
    except KeyboardInterrupt:
        print("\nerror: stopped by Ctrl-C", file=sys.stderr)
        return EXIT_ABORTED


def error(message, code):
    print(f"error: {message}", file=sys.stderr)
    return code


def generate(argv):
    try:
        cfg = parse_sample_config(argv)
        if cfg.output:
            check_output(cfg.output)
        if cfg.attention_map:
            check_output(cfg.attention_map, "--attention_map")
            plot.require_matplotlib()
        model, tokenizer, source = load_model(cfg)
        is_gpt2 = isinstance(tokenizer, GPT2Tokenizer)
        prompt = prompt_text(cfg, tokenizer)
        ids = tokenizer.encode(prompt)
    except ValueError as e:  # DataError and GPTConfig's errors are ValueErrors
        return error(e, EXIT_IO if isinstance(e, OutputError) else EXIT_USAGE)
    if cfg.attention_map:
        try:
            plot.save(plot.attention_map(model, tokenizer, ids), cfg.attention_map)
        except OSError as e:
            return error(f"cannot write --attention_map {cfg.attention_map}: {e.strerror}; pass a path in a folder "
                         f"you can write to", EXIT_IO)
        print(f"wrote every head's attention over the prompt to {cfg.attention_map}", file=sys.stderr)
    print(f"sampling from {source}", file=sys.stderr)
    stop = tokenizer.eot_token if is_gpt2 and cfg.stop_at_eot else None
    generator = torch.Generator(cfg.device).manual_seed(cfg.seed)
    options = dict(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, generator=generator,
                   kv_cache=cfg.kv_cache)
    # --stream prints each sample as it grows, so samples are made one after another; otherwise together
    batches = [1] * cfg.num_samples if cfg.stream else [cfg.num_samples]
    samples = []
    for batch in batches:
        if cfg.stream:
            print(SEPARATOR.format(i=len(samples) + 1, n=cfg.num_samples) + prompt, end="", flush=True)
        idx = torch.tensor([ids] * batch, dtype=torch.long, device=cfg.device)
        samples += sample(model, tokenizer, idx, cfg.max_new_tokens, options, stop, stream=cfg.stream)
    text = "".join(SEPARATOR.format(i=i + 1, n=len(samples)) + prompt + s for i, s in enumerate(samples)) + "\n"
    print("\n" if cfg.stream else text, end="")
    if cfg.output:
        try:
            atomic_write(cfg.output, text)
        except OSError as e:
            return error(f"cannot write --output {cfg.output}: {e.strerror}; the samples are printed above", EXIT_IO)
    return 0


def packed_linear(m):
    """nn.Linear m's forward on a copy of its weight prepacked for oneDNN (a blocked layout, the one torch.compile
    uses on CPU)."""
    packed = torch.ops.mkldnn._reorder_linear_weight(m.weight, 1)  # 1: a batch-size hint
    return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, m.bias, "none", [], "")


def faster(first, second, x, rounds=3, calls=10):
    """Whether first(x) takes less time than second(x): the best of a few rounds each, taking turns."""
    best = [float("inf")] * 2
    for _ in range(rounds):
        for i, f in enumerate((first, second)):
            start = time.perf_counter()
            for _ in range(calls):
                f(x)
            best[i] = min(best[i], time.perf_counter() - start)
    return best[0] < best[1]


@contextmanager
def packed_linears(model):
    """Cached decoding on a CPU, faster: inside, every nn.Linear multiplies with a prepacked copy of its weight,
    where that is faster on this CPU. Decoding a token is matrix-vector products that read every weight once; in
    bf16 the packed layout reads them about twice as fast, in fp32 it is 6% faster on an AMD EPYC and twice as
    slow on an Intel Xeon with AMX: so the largest Linear is timed both ways first. That is why this private
    torch.ops API is used at all, and only here. On a CPU in fp32 or bf16, outside autocast, for models under
    PACK_MAX_BYTES; elsewhere nothing changes."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    w = linears[0].weight
    bf16_ok = w.dtype != torch.bfloat16 or torch.ops.mkldnn._is_mkldnn_bf16_supported()
    size = sum(m.weight.numel() * m.weight.element_size() for m in linears)
    if (w.device.type != "cpu" or w.dtype not in (torch.float32, torch.bfloat16) or not bf16_ok
            or not torch.backends.mkldnn.is_available() or torch.is_autocast_enabled("cpu") or size > PACK_MAX_BYTES):
        yield
        return
    largest = max(linears, key=lambda m: m.weight.numel())
    with torch.no_grad():
        pays = faster(packed_linear(largest), largest, torch.randn(1, 1, largest.in_features, dtype=w.dtype))
    for m in linears if pays else []:
        m.forward = packed_linear(m)  # an instance attribute shadows the class's forward until it is deleted
    try:
        yield
    finally:
        for m in linears if pays else []:
            del m.forward


def cached_attention(attn, x, cache=None):
    """CausalSelfAttention.forward once a KV cache holds earlier positions: F.scaled_dot_product_attention, one
    fused op instead of the manual path's ten (and, in bf16, without its slow small bf16 matrix products)."""
    if cache is None or cache.length == 0:  # the prompt: the model's own path
        return CausalSelfAttention.forward(attn, x, cache)
    B, T, C = x.size()
    q, k, v = attn.qkv(x)  # (B, nh, T, hs) each
    offset = cache.length
    if attn.rotary is not None:
        q, k = attn.rotary(q, offset), attn.rotary(k, offset)
    k, v = cache.update(attn.layer, k, v)  # (B, nh, offset + T, hs)
    mask = None if T == 1 else attn.mask[offset:offset + T, :offset + T]  # one query sees every key
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, T, hs)
    return attn.c_proj(y.transpose(1, 2).reshape(B, T, C))  # eval: no dropout


def probe_logits(model):
    """Logits of a short cached decoding (3 prompt tokens, then 2 at once, then 1): (1, 6, vocab_size)."""
    weight = model.lm_head.weight
    idx = torch.arange(6, device=weight.device)[None] % model.config.vocab_size
    cache = KVCache(model.config, 1, weight.device, weight.dtype)
    return torch.cat([model(idx[:, a:b], cache=cache)[0] for a, b in ((0, 3), (3, 5), (5, 6))], dim=1)


@contextmanager
def fast_decoding(model):
    """Cached decoding, faster: inside, nn.Linear multiplies with prepacked weights where that is faster
    (packed_linears) and attention over the cache runs as cached_attention, but only where that gives the logits
    the model's own code gives (checked once, on entry): it samples what the model computes, or decodes the
    model's own way."""
    attentions = []
    with torch.no_grad(), packed_linears(model):
        if model.config.block_size >= 6 and not model.training:
            own = probe_logits(model)
            attentions = [m for m in model.modules() if isinstance(m, CausalSelfAttention)]
            for m in attentions:  # an instance attribute shadows the class's forward until it is deleted
                m.forward = partial(cached_attention, m)
            tolerance = 1e-4 if own.dtype == torch.float32 else 3e-2
            if not torch.allclose(probe_logits(model), own, rtol=tolerance, atol=tolerance):
                for m in attentions:
                    del m.forward
                attentions = []
        try:
            yield
        finally:
            for m in attentions:
                del m.forward


def sample(model, tokenizer, idx, max_new_tokens, options, stop=None, stream=False):
    """Continue every row of idx (B, T) -> B decoded continuations, each ending before `stop` if it comes.
    With stream, row 0's text is printed as it grows."""
    rows, done, shown = [[] for _ in range(len(idx))], [False] * len(idx), 0
    with fast_decoding(model) if options["kv_cache"] else nullcontext():
        for token in model.stream(idx, max_new_tokens, **options):
            for row, t in enumerate(token[:, 0].tolist()):
                done[row] = done[row] or t == stop
                if not done[row]:
                    rows[row].append(t)
            if stream:
                text = tokenizer.decode(rows[0])
                if not text.endswith("\ufffd"):  # a BPE token can end inside a character: wait for the rest
                    print(text[shown:], end="", flush=True)
                    shown = len(text)
            if all(done):
                break
    return [tokenizer.decode(row) for row in rows]


if __name__ == "__main__":
    sys.exit(main())
