"""
Sampling speed on CPU: tokens/s for 255 new tokens from a 1-token prompt, batch 1, on nanoGPT's baby GPT
shape (6 layers, 6 heads, 384 wide, block 256, vocab 65), for this project with and without its KV cache
and for Hugging Face `generate` on a GPT2LMHeadModel of the same shape, in fp32 and bf16 (weights cast).

    python benchmarks/generate_speed.py [--repeats 3] [--threads N] [--tiny]

Greedy decoding, so every run produces exactly 255 tokens. The three take turns for --repeats rounds and
each reports its best round, so a busy machine weighs on all of them alike.
Our model uses learned absolute positions here, the same architecture as GPT-2.
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cfg import cpu_has_bf16  # noqa: E402
from generate import fast_decoding  # noqa: E402
from gpt import GPT, GPTConfig  # noqa: E402

SHAPE = dict(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=65)
TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=65)  # --tiny: a smoke run (the tests')
NEW_TOKENS = 255


def best_tokens_per_sec(runs, repeats, new_tokens):
    """runs: name -> function generating new_tokens tokens. They take turns, `repeats` rounds after a warm-up
    one, and each keeps its best round: a busy machine slows some rounds down, and all runs alike."""
    best = dict.fromkeys(runs, float("inf"))
    for round in range(repeats + 1):
        for name, generate in runs.items():
            t0 = time.perf_counter()
            generate()
            if round:  # round 0 warms up the allocator and kernels
                best[name] = min(best[name], time.perf_counter() - t0)
    return {name: new_tokens / t for name, t in best.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds; each figure is its best round")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model, 31 tokens: a smoke run")
    args = parser.parse_args()
    shape, new_tokens = (TINY, TINY["block_size"] - 1) if args.tiny else (SHAPE, NEW_TOKENS)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    ours = GPT(GPTConfig(**shape, abs_emb=True, dropout=0.0)).eval()
    hf = GPT2LMHeadModel(GPT2Config(n_layer=shape["n_layer"], n_head=shape["n_head"], n_embd=shape["n_embd"],
                                    n_positions=shape["block_size"], vocab_size=shape["vocab_size"],
                                    bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                    attn_pdrop=0.0)).eval()
    prompt = torch.zeros(1, 1, dtype=torch.long)
    bf16 = cpu_has_bf16()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {new_tokens} new tokens, batch 1, "
          f"{shape['n_layer']} layers x {shape['n_embd']}")
    print(f"{'precision':<10}{'ours+cache':>12}{'ours':>10}{'HF':>10}{'cache/HF':>10}{'cache/ours':>12}")
    def cached():  # as generate.py decodes: with the KV cache, prepacked weights and fused attention
        with fast_decoding(ours):
            return ours.generate(prompt, new_tokens, temperature=0)

    for dtype in [torch.float32] + ([torch.bfloat16] if bf16 else []):
        ours.to(dtype)
        hf.to(dtype)
        with torch.no_grad():
            speed = best_tokens_per_sec({
                "cached": cached,
                "uncached": lambda: ours.generate(prompt, new_tokens, temperature=0, kv_cache=False),
                "hf": lambda: hf.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                          do_sample=False, pad_token_id=0)}, args.repeats, new_tokens)
        fast, slow, reference = speed["cached"], speed["uncached"], speed["hf"]
        name = str(dtype).replace("torch.", "")
        print(f"{name:<10}{fast:>12.0f}{slow:>10.0f}{reference:>10.0f}{fast / reference:>10.2f}{fast / slow:>12.2f}")
    if not bf16:
        print("bf16: this CPU has no native bf16")


if __name__ == "__main__":
    main()
