"""
Training throughput on CPU: this project's GPT against Hugging Face's GPT2LMHeadModel, same shape,
same run, same conditions (nanoGPT's "baby GPT": 6 layers, 6 heads, 384 wide, block 256, vocab 65,
no dropout). One step = forward + backward + AdamW step on a batch of random tokens; the first
steps are warmup and not timed. Both models get the same optimizer (AdamW, weight decay on matrices
only), the same batch, the same thread count, no torch.compile.

    python benchmarks/train_throughput.py [--batch_size 8] [--steps 5] [--threads N]

Prints tokens/s for each model and precision (fp32, and bf16 autocast where the CPU has native
bf16) and the ratio ours / Hugging Face. Needs `pip install transformers` (not a runtime dependency).
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from cfg import cpu_has_bf16  # noqa: E402
from gpt import GPT, GPTConfig  # noqa: E402

SHAPE = dict(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=65)


def ours():
    return GPT(GPTConfig(**SHAPE, dropout=0.0))


def hugging_face(activation):
    from transformers import GPT2Config, GPT2LMHeadModel
    config = GPT2Config(n_layer=SHAPE["n_layer"], n_head=SHAPE["n_head"], n_embd=SHAPE["n_embd"],
                        n_positions=SHAPE["block_size"], vocab_size=SHAPE["vocab_size"],
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, activation_function=activation)
    return GPT2LMHeadModel(config)


def adamw(model):
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.99))


def tokens_per_second(model, dtype, args):
    """Median tokens/s over args.steps timed training steps (after args.warmup untimed ones)."""
    torch.manual_seed(0)
    model.train()
    optimizer = adamw(model)
    B, T = args.batch_size, SHAPE["block_size"]
    x = torch.randint(SHAPE["vocab_size"], (B, T))
    y = torch.randint(SHAPE["vocab_size"], (B, T))
    hf = not isinstance(model, GPT)
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            # HF shifts labels inside the model, so it gets x as labels; same cost as ours with y
            loss = model(input_ids=x, labels=x).loss if hf else model(x, y)[1]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    return B * T / sorted(times)[len(times) // 2]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import transformers
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} threads, "
          f"batch {args.batch_size} x block {SHAPE['block_size']}, {SHAPE}")
    dtypes = [torch.float32] + ([torch.bfloat16] if cpu_has_bf16() else [])
    if len(dtypes) == 1:
        print("this CPU has no native bf16: fp32 only")
    for dtype in dtypes:
        name = "fp32" if dtype == torch.float32 else "bf16 autocast"
        # GPT2Config's default activation "gelu_new" is a Python-level formula; "gelu_pytorch_tanh" is
        # the fused kernel that our MLP uses: report both so the comparison is fair to HF
        ref = {act: tokens_per_second(hugging_face(act), dtype, args) for act in ("gelu_new", "gelu_pytorch_tanh")}
        ours_tps = tokens_per_second(ours(), dtype, args)
        best_ref = max(ref.values())
        print(f"{name:14s} ours {ours_tps:8.0f} tok/s | HF gelu_new {ref['gelu_new']:8.0f} tok/s | "
              f"HF gelu_pytorch_tanh {ref['gelu_pytorch_tanh']:8.0f} tok/s | "
              f"ours/HF {ours_tps / ref['gelu_new']:.2f}x (default HF), {ours_tps / best_ref:.2f}x (fastest HF)")


if __name__ == "__main__":
    main()
