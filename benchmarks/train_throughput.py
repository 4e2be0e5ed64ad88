"""
Training throughput on CPU: this project's GPT against Hugging Face's GPT2LMHeadModel of the same shape,
in the same run and under the same conditions: nanoGPT's "baby GPT" (6 layers, 6 heads, 384 wide,
block 256, vocab 65, no dropout), the same random batch, the same optimizer (torch's fused AdamW, weight
decay on matrices only: what configure_optimizers builds on a CPU and Hugging Face's Trainer uses by
default), the same threads, no torch.compile. One step = forward + backward + AdamW step; warmup
steps are not timed.

    python benchmarks/train_throughput.py [--batch_size 8] [--steps 3] [--rounds 3] [--threads N] [--tiny]

The models take turns (rounds) and each reports its best round: other processes on the machine can
only slow a round down. Prints tokens/s for each model at each precision (fp32, and bf16 autocast
where the CPU has native bf16) and the ratios to Hugging Face. Hugging Face is measured twice: with
GPT2Config's default activation "gelu_new" (a Python-level formula, what GPT2LMHeadModel runs by
default) and with "gelu_pytorch_tanh" (the fused kernel our MLP uses). Needs `pip install transformers`.
"""

import argparse
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from cfg import cpu_has_bf16  # noqa: E402
from gpt import GPT, GPTConfig  # noqa: E402
from optim import configure_optimizers  # noqa: E402

SHAPE = dict(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=65)
TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=32)  # --tiny: a smoke run (the tests')


def hugging_face(activation):
    from transformers import GPT2Config, GPT2LMHeadModel
    config = GPT2Config(n_layer=SHAPE["n_layer"], n_head=SHAPE["n_head"], n_embd=SHAPE["n_embd"],
                        n_positions=SHAPE["block_size"], vocab_size=SHAPE["vocab_size"], bos_token_id=0,
                        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        activation_function=activation)
    return GPT2LMHeadModel(config)


MODELS = {  # name -> constructor
    "ours (rotary, default)": lambda: GPT(GPTConfig(**SHAPE)),
    "ours (abs_emb: GPT-2's layout)": lambda: GPT(GPTConfig(**SHAPE, abs_emb=True)),
    "HF GPT2LMHeadModel (gelu_new)": lambda: hugging_face("gelu_new"),
    "HF GPT2LMHeadModel (gelu_pytorch_tanh)": lambda: hugging_face("gelu_pytorch_tanh"),
}


def busy_cpu_seconds():
    """CPU time all processes of the machine have used so far (Linux), to notice a busy machine."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
        return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None


class Trainer:
    """One model, its optimizer and a fixed batch; .round() times args.steps steps."""

    def __init__(self, make, args):
        torch.manual_seed(0)
        self.model = make().train()
        self.hf = not isinstance(self.model, GPT)
        # our optimizer for both models (train.configure_optimizers only needs .parameters())
        self.optimizer = configure_optimizers(self.model, 0.1, 1e-3, (0.9, 0.99), "cpu")
        self.x = torch.randint(SHAPE["vocab_size"], (args.batch_size, SHAPE["block_size"]))
        self.y = torch.randint(SHAPE["vocab_size"], (args.batch_size, SHAPE["block_size"]))
        self.args = args

    def step(self, dtype):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            # HF shifts the labels inside the model: it gets x as labels, the same work as ours with y
            loss = self.model(input_ids=self.x, labels=self.x).loss if self.hf else self.model(self.x, self.y)[1]
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def round(self, dtype):
        """Tokens/s of one round: warmup steps, then the mean of args.steps timed steps."""
        for _ in range(self.args.warmup):
            self.step(dtype)
        t0 = time.perf_counter()
        for _ in range(self.args.steps):
            self.step(dtype)
        return self.args.steps * self.x.numel() / (time.perf_counter() - t0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before each round")
    parser.add_argument("--rounds", type=int, default=3, help="each model's best round is reported")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model 32 wide: a smoke run")
    args = parser.parse_args()
    if args.tiny:
        SHAPE.update(TINY)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import transformers
    transformers.logging.set_verbosity_error()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} threads, batch "
          f"{args.batch_size} x {SHAPE['block_size']} tokens, {SHAPE['n_layer']} layers, {SHAPE['n_head']} heads, "
          f"{SHAPE['n_embd']} wide, vocab {SHAPE['vocab_size']}; best of {args.rounds} rounds of {args.steps} steps")
    precisions = {"fp32": torch.float32}
    if cpu_has_bf16():
        precisions["bf16 autocast"] = torch.bfloat16
    else:
        print("this CPU has no native bf16: fp32 only")
    busy0, t0 = busy_cpu_seconds(), time.time()
    for precision, dtype in precisions.items():
        trainers = {name: Trainer(make, args) for name, make in MODELS.items()}
        best = dict.fromkeys(trainers, 0.0)
        for _ in range(args.rounds):  # take turns, so that a busy moment does not hit one model only
            for name, trainer in trainers.items():
                best[name] = max(best[name], trainer.round(dtype))
        hf_default, hf_tanh = best["HF GPT2LMHeadModel (gelu_new)"], best["HF GPT2LMHeadModel (gelu_pytorch_tanh)"]
        print(f"\n{precision}:{'tokens/s':>33} {'/ HF gelu_new':>14} {'/ HF tanh':>10}")
        for name, tokens_per_sec in best.items():
            print(f"  {name:38s} {tokens_per_sec:7.0f} {tokens_per_sec / hf_default:13.2f}x {tokens_per_sec / hf_tanh:9.2f}x")
        del trainers
    busy1 = busy_cpu_seconds()
    if busy0 is not None:
        ours = time.process_time()
        others = (busy1 - busy0) - ours
        print(f"\nother processes used {max(0.0, others):.0f} CPU-s during these {time.time() - t0:.0f} s"
              + (" (a busy machine: figures may be low and noisy)" if others > 0.05 * (time.time() - t0) else ""))


if __name__ == "__main__":
    main()
