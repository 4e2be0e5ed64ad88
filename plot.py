"""
Pictures of what a model learned and of how its training went, for the notebook (notebooks/attention.ipynb)
and for the command line, e.g. on a cluster:

    python plot.py runs/tinyshakespeare-gpt-micro                # loss curves -> runs/.../loss.png
    python plot.py runs/mine --output loss.png
    python generate.py --checkpoint RUN --prompt "ROMEO:" --attention_map attn.png   # every head's attention

Figures are matplotlib Figures made without pyplot: nothing is ever shown on a screen (a notebook displays
the figures it is given), and save() writes a PNG atomically. matplotlib is imported only where a picture
is made, so training, grading and sampling work without it. Exit codes of plot.py: 0 done; 2 bad option or
run folder; 74 the PNG cannot be written.
"""

import glob
import io
import os
import sys
from contextlib import contextmanager

import torch

from cfg import EXIT_IO, EXIT_USAGE, TODO, parse_plot_config
from dataset import DataError
from files import atomic_write, check_writable
from gpt import sample_next

LOSSES = {"train/loss": "training", "val/loss": "validation"}  # the TensorBoard tags train.py writes


def require_matplotlib():
    """matplotlib's Figure class; a DataError naming the fix when matplotlib is not installed."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise DataError("pictures need matplotlib, which is not installed: pip install -r notebooks/requirements.txt") \
            from None
    return Figure


def figure(width, height):
    """An empty figure of width x height inches, without pyplot: no window, no global state."""
    return require_matplotlib()(figsize=(width, height), layout="constrained")


def save(fig, path):
    """Write fig to path as a PNG, through a temporary file and a rename. Raises OSError."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    atomic_write(path, buffer.getvalue())


def shown(token):
    """A token as an axis label, its whitespace made visible."""
    return token.replace("\n", "\\n").replace(" ", "\u2423")  # open box: a space


# ----------------------------------------------------------------------------- what the pictures show

@torch.no_grad()
def attention(model, idx):
    """Every head's attention probabilities on idx (1, T) -> (n_layer, n_head, T, T); row i holds how much position
    i attends to each position. A forward pre-hook catches what each block hands its attention module; the module's
    own methods recompute the probabilities (the manual path, even when the model runs the fused kernel)."""
    inputs = []  # (1, T, C) per layer
    hooks = [block.attn.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
             for block in model.transformer.h]
    try:
        model(idx)
    finally:
        for hook in hooks:
            hook.remove()
    maps = []
    for block, x in zip(model.transformer.h, inputs):
        q, k, _ = block.attn.qkv(x)  # (1, nh, T, hs) each
        if block.attn.rotary is not None:
            q, k = block.attn.rotary(q), block.attn.rotary(k)
        maps.append(block.attn.attention_probs(q, k)[0].float())  # (nh, T, T)
    return torch.stack(maps)


def sampled(logits, n=20000, seed=0, **options):
    """What sample_next does with one row of logits (V,) and options (temperature, top_k, top_p): the frequencies
    of n draws (V,), the distribution it samples from to within about 1/sqrt(n)."""
    generator = torch.Generator(logits.device).manual_seed(seed)
    ids = sample_next(logits.expand(n, -1), generator=generator, **options).view(-1)  # (n,)
    return torch.bincount(ids, minlength=logits.size(-1)).float() / n


def losses(run):
    """A run folder's training and validation losses, read from its TensorBoard events -> {tag: (steps, values)}."""
    if not os.path.isdir(run):
        raise DataError(f"{run} is not a folder; pass a run folder of train.py (e.g. runs/tinyshakespeare-gpt-micro)")
    if not glob.glob(os.path.join(run, "events.out.tfevents.*")):
        raise DataError(f"{run} holds no TensorBoard events (events.out.tfevents.*); pass a run folder of train.py")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # slow import: only here
    events = EventAccumulator(run, size_guidance={"scalars": 0}).Reload()  # 0: every point, none dropped
    tags = events.Tags()["scalars"]
    curves = {tag: ([e.step for e in events.Scalars(tag)], [e.value for e in events.Scalars(tag)])
              for tag in LOSSES if tag in tags}
    if "train/loss" not in curves:
        raise DataError(f"{run} holds no training loss yet: train.py logs it every --log_interval steps")
    return curves


# ----------------------------------------------------------------------------- the pictures

def heatmaps(maps, labels, title="layer {row}, head {col}", unit="attention", limits=(0, 1)):
    """maps (rows, cols, T, T) -> a grid of heatmaps, labels (T strings) along both axes: the queries (rows of a
    map) run down, the keys across. Each is titled `title` with its row and column filled in; the colours span
    limits (None: each map's own range)."""
    rows, cols, T = maps.size(0), maps.size(1), maps.size(-1)
    side = max(2.5, 0.15 * T + 1)  # inches per map: room for T labels
    fig = figure(cols * side + 1, rows * side)
    axes = fig.subplots(rows, cols, squeeze=False)
    low, high = limits or (None, None)
    for row in range(rows):
        for col in range(cols):
            ax = axes[row][col]
            image = ax.imshow(maps[row, col].detach().float().cpu().numpy(), vmin=low, vmax=high, cmap="viridis")
            ax.set_title(title.format(row=row, col=col), fontsize=9)
            ax.set_xticks(range(T), labels, fontsize=7, rotation=90)
            ax.set_yticks(range(T), labels, fontsize=7)
            ax.set(xlabel="key" if row == rows - 1 else None, ylabel="query" if col == 0 else None)
    fig.colorbar(image, ax=axes, shrink=0.6, label=unit)
    return fig


def attention_map(model, tokenizer, ids):
    """Every head's attention over a prompt's token ids (its last block_size) -> a figure, one row per layer."""
    ids = ids[-model.config.block_size:]
    idx = torch.tensor([ids], device=model.lm_head.weight.device)  # (1, T)
    return heatmaps(attention(model, idx), [shown(tokenizer.decode([i])) for i in ids])


def bars(distributions, labels, top=None):
    """distributions {title: probabilities (V,)} -> bar charts side by side, over labels (V strings); with top, over
    the top most likely of the first distribution only, most likely first."""
    first = next(iter(distributions.values()))
    order = first.argsort(descending=True)[:top].tolist() if top else range(len(labels))
    fig = figure(3.2 * len(distributions), 2.8)
    axes = fig.subplots(1, len(distributions), sharey=True, squeeze=False)[0]
    for ax, (title, probs) in zip(axes, distributions.items()):
        ax.bar(range(len(order)), [probs[i].item() for i in order])
        ax.set_xticks(range(len(order)), [labels[i] for i in order], fontsize=8)
        ax.set_title(title, fontsize=9)
    axes[0].set_ylabel("probability")
    return fig


def loss_figure(curves, title):
    """{tag: (steps, values)} of losses() -> one plot of the losses against the step."""
    fig = figure(7, 4)
    ax = fig.subplots()
    for tag, (steps, values) in curves.items():
        ax.plot(steps, values, label=LOSSES[tag], marker="o" if len(steps) < 30 else None)
    ax.set(title=title, xlabel="step", ylabel="loss (cross-entropy per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


# ----------------------------------------------------------------------------- the notebook's cells

@contextmanager
def needs(*todos):
    """`with needs("attn_scores", ...):` around a notebook cell's code: while one of the TODOs it needs is still a
    stub (or the trained model it needs is missing), the cell says so in a line instead of a traceback."""
    try:
        yield
    except NotImplementedError as e:
        stub = TODO.search(str(e))
        if stub is None:
            raise
        print(f"This cell needs your code for the TODOs {', '.join(todos)}. {stub.group(0)} is still a stub: write "
              f"it, check it with `pytest unittests.py -k {stub.group(1)}`, then run this cell again.")
    except DataError as e:
        print(f"This cell cannot run: {e}")


# ----------------------------------------------------------------------------- python plot.py RUN

def main(argv=None):
    try:
        cfg = parse_plot_config(argv)
        require_matplotlib()
        curves = losses(cfg.run)
    except ValueError as e:  # DataError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    output = cfg.output or os.path.join(cfg.run, "loss.png")
    try:
        check_writable(os.path.dirname(os.path.abspath(output)))  # its nearest folder, for a clear message
        save(loss_figure(curves, os.path.basename(os.path.normpath(cfg.run))), output)
    except OSError as e:
        print(f"error: cannot write --output {output}: {e.strerror}; pass a path in a folder you can write to",
              file=sys.stderr)
        return EXIT_IO
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
