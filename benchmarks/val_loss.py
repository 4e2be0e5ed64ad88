"""
The full validation loss of a checkpoint: the mean loss over every non-overlapping window of the model's
block size in the held-out part of the text (the last --val_fraction of it, as train.py splits it), in
fp32. train.py's own figure averages a fixed random subset of windows (--eval_iters batches): quick, but
an estimate; this is the number recipes are compared by.

    python benchmarks/val_loss.py RUN_FOLDER_OR_CHECKPOINT [--txt_file ../shared/data/tinyshakespeare.txt]
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from dataset import read_text, train_val_split  # noqa: E402
from pretrained import tokenizer_from_dict  # noqa: E402
from generate import load_run  # noqa: E402
from gpt import GPT, GPTConfig  # noqa: E402


@torch.no_grad()
def full_val_loss(model, data, batch_size=64):
    """Mean next-token loss over data cut into non-overlapping windows of block_size (the last, incomplete
    window is dropped), every position of every window counted once."""
    T = model.config.block_size
    n = (len(data) - 1) // T
    x = data[:n * T].view(n, T)  # (n, T)
    y = data[1:n * T + 1].view(n, T)  # (n, T): the next token at every position
    total = 0.0
    for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
        _, loss = model(xb, yb)
        total += loss.item() * len(xb)
    return total / n


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("checkpoint", help="a run folder of train.py (its best.pt, else last.pt) or a .pt file")
    parser.add_argument("--txt_file", default=None, help="the text it was trained on (default: the run's own)")
    args = parser.parse_args()
    path, ckpt = load_run(args.checkpoint)
    config = ckpt.get("config", {})
    txt_file = args.txt_file or config.get("txt_file")
    if txt_file is None:
        sys.exit("val_loss: the run records no text file; pass --txt_file")
    tokenizer = tokenizer_from_dict(ckpt["tokenizer"])
    data = torch.tensor(tokenizer.encode(read_text(txt_file)), dtype=torch.long)
    _, val = train_val_split(data, config.get("val_fraction", 0.1))
    model = GPT(GPTConfig.from_dict(ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    print(f"{full_val_loss(model.eval(), val):.4f}")


if __name__ == "__main__":
    main()
