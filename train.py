"""
Train the character-level GPT of gpt.py on a text file, in plain PyTorch, top to bottom.

    python train.py                                   # GPU default: baby GPT on tiny shakespeare
    python train.py --txt_file my.txt --out_dir runs/mine --max_steps 2000
    torchrun --standalone --nproc_per_node 4 train.py # DDP: one process per GPU (gloo on CPU)

All options: `python train.py --help` (cfg.py). Everything goes into one run folder (--out_dir):
last.pt, best.pt (checkpoints), config.json (the resolved configuration), tokenizer.json, train.log
and the TensorBoard events (`tensorboard --logdir runs`).

Resuming: when out_dir already holds last.pt, the same command continues that run exactly where it
stopped (same data order, RNG streams and learning-rate schedule; bitwise the same on CPU).

Global batch: --batch_size is per process and micro-batch. One optimizer step averages the loss over
batch_size x grad_accum x world_size sequences, taken from one global permutation of the training
windows, so `torchrun --nproc_per_node 2 ... --batch_size 32` takes the same steps as one process
with `--batch_size 64` or with `--batch_size 32 --grad_accum 2` (up to float rounding).

Exit codes (cfg.py): 0 done; 1 the loss became NaN/inf (the last good checkpoint is kept); 2 bad option,
text or checkpoint (nothing is written); 74 a file could not be written (disk full, read-only, no
permission: the checkpoints written before stay intact); 75 stopped by Ctrl-C, or by SIGUSR1 or SIGTERM
(SLURM's signal before a time limit or preemption), after finishing the step and writing last.pt: run
the same command again, or requeue the job, to continue; 130 a second Ctrl-C stopped it at once.
"""

import datetime
import errno
import inspect
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import time
from contextlib import nullcontext, suppress
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from tqdm import tqdm

from cfg import (CPU_QUICK_RUN, DEFAULT_MAX_STEPS, EXIT_ABORTED, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_IO, EXIT_USAGE,
                 cpu_has_bf16, cpu_has_fp16, parse_config)
from dataset import (CharTokenizer, DataError, GPT2Tokenizer, TextDataset, atomic_write, check_writable, default_corpus,
                     read_text, remove_stale_temporaries, tokenizer_from_dict, train_val_split)
from gpt import GPT, GPTConfig
from pretrained import pretrained_folder

# dense bf16/fp16 tensor-core peaks, for MFU: a model name is one word of the GPU's name ("NVIDIA L40S",
# "NVIDIA A100-SXM4-80GB"), so L40 is not L4 and A10G (no published peak) is not A10; the PCIe and NVL
# H100s are slower than the SXM one
PEAK_FLOPS = {"H100 PCIE": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "GH200": 989e12,
              "A100": 312e12, "L40S": 362e12, "L40": 181e12, "L4": 121e12, "A10": 125e12, "4090": 165e12,
              "3090": 71e12, "V100": 125e12, "T4": 65e12}


def peak_flops(gpu_name):
    """The PEAK_FLOPS entry whose words all occur in gpu_name (the first such entry), else None."""
    words = set(re.split(r"[^A-Z0-9]+", gpu_name.upper()))
    return next((peak for key, peak in PEAK_FLOPS.items() if set(key.split()) <= words), None)


def lr_at(step, cfg, max_steps):
    """Linear warmup (never 0, even at step 0), then cosine decay from learning_rate to min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


def micro_batches(ds, cfg, epoch, epoch_step, rank, world_size, pin_memory):
    """This process's micro-batches from data position (epoch, epoch_step) on, forever. Yields
    (epoch, epoch_step, x, y), x and y (batch_size, block_size). Every process draws the same permutation
    of the windows (seeded by seed + epoch, so it never depends on a worker's RNG); optimizer step s of the
    epoch uses windows perm[s*G : (s+1)*G] of it, G = batch_size * grad_accum * world_size, and micro-step a
    of process r takes the batch_size of them at offset (a * world_size + r) * batch_size."""
    B, A = cfg.batch_size, cfg.grad_accum
    while True:
        perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(cfg.seed + epoch))
        steps = len(ds) // (B * A * world_size)  # the last incomplete global batch is dropped
        order = perm[:steps * B * A * world_size].view(steps, A, world_size, B)[epoch_step:, :, rank]
        # its own generator: creating the loader's iterator must not draw from the global RNG (dropout's)
        loader = DataLoader(ds, batch_sampler=(b.tolist() for b in order.reshape(-1, B)), num_workers=cfg.num_workers,
                            pin_memory=pin_memory, generator=torch.Generator().manual_seed(cfg.seed + epoch))
        for i, (x, y) in enumerate(loader):
            yield epoch, epoch_step + i // A, x, y
        epoch, epoch_step = epoch + 1, 0


def rng_state(device):
    """Every RNG stream of this process, as plain lists and tensors (loadable with weights_only=True): Python's,
    NumPy's, the CPU generator and the generator of this process's own GPU (or Apple GPU), none of the others."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    kind = device.split(":")[0]
    return {"python": [version, list(mt), gauss], "numpy": [name, keys.tolist(), pos, has_gauss, cached],
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if kind == "cuda" else None,
            "mps": torch.mps.get_rng_state() if kind == "mps" else None}


def set_rng_state(s, device):
    """Restore rng_state()'s streams; a device generator only on the same kind of device (a run resumed on
    another machine, with fewer GPUs or none, keeps going, reproducibly but not bitwise)."""
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
    name, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(s["torch"])
    kind = device.split(":")[0]
    if kind == "cuda" and torch.is_tensor(s.get("cuda")):
        torch.cuda.set_rng_state(s["cuda"], device)
    if kind == "mps" and torch.is_tensor(s.get("mps")):
        torch.mps.set_rng_state(s["mps"])


def fail(message, code=EXIT_USAGE):
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def write_error(e, folder):
    """A failed write (OSError) in the run folder -> one line naming the file, the cause and the fix."""
    fix = {errno.ENOSPC: "free some space or pass another --out_dir",
           errno.EDQUOT: "free some space (your disk quota is full) or pass another --out_dir",
           errno.EFBIG: "a checkpoint is larger than the file size limit (`ulimit -f`); raise it",
           errno.EROFS: "the file system is read-only; pass another --out_dir",
           errno.ENOTDIR: "pass another --out_dir"}.get(
        e.errno, "pass an --out_dir you can write to")
    return f"cannot write {e.filename or folder}: {e.strerror or e}; {fix}"


RESUME_KEYS = {"model", "optimizer", "scaler", "step", "epoch", "epoch_index", "best_val_loss", "config", "model_config",
               "tokenizer", "rng"}  # what checkpoint() saves


def load_checkpoint(path, keys=("model", "model_config", "tokenizer")):
    """A checkpoint written by train.py, loaded without unpickling; ValueError naming the file when unreadable."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a zip, or holding objects weights_only refuses
        raise ValueError(f"cannot read {path} ({type(e).__name__}: it is damaged or not written by train.py)") \
            from None
    missing = sorted(set(keys) - set(ckpt)) if isinstance(ckpt, dict) else ["everything"]
    if missing:
        raise ValueError(f"{path} is not a checkpoint of train.py (it lacks {', '.join(missing)})")
    return ckpt


def resume_checkpoint(out_dir):
    """last.pt of out_dir; when it is damaged, the error says whether best.pt can take its place."""
    last, best = os.path.join(out_dir, "last.pt"), os.path.join(out_dir, "best.pt")
    try:
        return load_checkpoint(last, RESUME_KEYS)
    except ValueError as e:
        try:
            step = load_checkpoint(best, RESUME_KEYS)["step"]
            fallback = f"{best} (step {step}) is intact: `cp {best} {last}` resumes from it, "
        except ValueError:
            fallback = ""
        raise ValueError(f"{e}; {fallback}or pass --no-resume to start afresh") from None


def text_description(txt_file, default):
    """What the log says of the text: the default corpus names itself, and the fallback says so."""
    if not default:
        return txt_file
    if os.path.basename(txt_file) == "tinyshakespeare.txt":
        return f"{txt_file} (the default corpus, tiny shakespeare)"
    return f"{txt_file} (the default corpus's offline fallback: Shakespeare's complete works, not tiny shakespeare)"


def setup(argv):
    """Everything that can be wrong with the options or the data is found here, before anything is written."""
    cfg = parse_config(argv)
    default = cfg.txt_file is None
    txt_file = cfg.txt_file = cfg.txt_file or default_corpus()
    text_name = text_description(txt_file, default)
    stem = os.path.splitext(os.path.basename(txt_file))[0]
    model_name = os.path.basename(os.path.normpath(cfg.pretrained)) if cfg.pretrained else cfg.model_type
    cfg.out_dir = cfg.out_dir or os.path.join("runs", f"{stem}-{model_name}")  # stable: a requeued job resumes
    last_path = os.path.join(cfg.out_dir, "last.pt")
    resume = os.path.exists(last_path) if cfg.resume is None else cfg.resume
    if resume and not os.path.exists(last_path):
        raise ValueError(f"--resume: there is no {last_path}; check --out_dir or drop --resume")
    ckpt = resume_checkpoint(cfg.out_dir) if resume else None
    if ckpt and ckpt["config"].get("pretrained") != cfg.pretrained:
        raise ValueError(f"{cfg.out_dir} holds a run with --pretrained {ckpt['config'].get('pretrained')}, not "
                         f"{cfg.pretrained}; pass the same, another --out_dir, or --no-resume")
    text = read_text(txt_file)
    pretrained = None  # GPT-2 with its weights, when fine-tuning starts
    if ckpt:
        tokenizer = tokenizer_from_dict(ckpt["tokenizer"])
        model_config = GPTConfig.from_dict(ckpt["model_config"]) if cfg.pretrained else cfg.model_config(tokenizer.vocab_size)
    elif cfg.pretrained:
        folder = pretrained_folder(cfg.pretrained)
        pretrained, tokenizer = GPT.from_pretrained(folder, dropout=cfg.dropout), GPT2Tokenizer(folder)
        model_config = pretrained.config
    else:
        tokenizer = CharTokenizer(text)
        model_config = cfg.model_config(tokenizer.vocab_size)
    if cfg.block_size > model_config.block_size:
        raise ValueError(f"--block_size {cfg.block_size} is more than {cfg.pretrained} can attend to "
                         f"({model_config.block_size} positions); pass --block_size {model_config.block_size} or less")
    try:
        data = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    except DataError:  # only a resumed character model can meet characters it does not know
        raise DataError(f"{last_path} was trained on another text ({ckpt['config'].get('txt_file')}): this one "
                        f"has {tokenizer.unknown(text)}; pass that text, another --out_dir, or --no-resume") from None
    splits = {}
    for name, part in zip(("training", "validation"), train_val_split(data, cfg.val_fraction)):
        try:
            splits[name] = TextDataset(part, cfg.block_size)
        except DataError as e:
            raise DataError(f"{name} split: {e}") from None
    if cfg.sample_prompt is None:
        cfg.sample_prompt = tokenizer.default_prompt() if isinstance(tokenizer, CharTokenizer) else "\n"
    try:
        prompt = tokenizer.encode(cfg.sample_prompt)
    except DataError:
        raise DataError(f"--sample_prompt has {tokenizer.unknown(cfg.sample_prompt)}, which the text does not "
                        f"contain; use characters that occur in {txt_file}") from None
    saved = asdict(GPTConfig.from_dict(ckpt["model_config"])) if ckpt else None
    if ckpt and saved != asdict(model_config):
        diff = {k: (v, saved[k]) for k, v in asdict(model_config).items() if saved[k] != v}
        raise ValueError(f"{cfg.out_dir} holds a run of another model ({', '.join(f'{k} {b} there, {a} asked' for k, (a, b) in diff.items())}); "
                         f"pass matching options, another --out_dir, or --no-resume")
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    global_batch = cfg.batch_size * cfg.grad_accum * world_size
    steps_per_epoch = len(splits["training"]) // global_batch
    if steps_per_epoch == 0:
        raise DataError(f"the training split has {len(splits['training'])} windows, fewer than one global batch "
                        f"of {global_batch}; use a longer text or a smaller --batch_size")
    cfg.max_steps = cfg.epochs * steps_per_epoch if cfg.epochs else cfg.max_steps or DEFAULT_MAX_STEPS
    return cfg, ckpt, tokenizer, splits["training"], splits["validation"], prompt, model_config, pretrained, \
        steps_per_epoch, text_name


class Signals:
    """The stop signals received: SLURM sends SIGUSR1 (sbatch --signal) before the time limit and SIGTERM on
    preemption; Ctrl-C is SIGINT. Installed before setup, as SIGUSR1's default action would kill the process."""

    def __init__(self):
        self.received, self.training = [], False
        for s in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self.on_signal)

    def on_signal(self, signum, frame):  # training: finish the step, write last.pt, exit with EXIT_INTERRUPTED
        if not self.training:  # still setting up: nothing to save (every file is written atomically)
            fail(f"interrupted by {signal.Signals(signum).name} before training started", code=EXIT_INTERRUPTED)
        self.received.append(signum)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once


def check_run_folder(out_dir, checkpoint_bytes):
    """Before anything is written: the run folder can be created and written, and has room for the
    checkpoints still to come (best.pt, last.pt and the temporary copy of the one being saved)."""
    existing = check_writable(out_dir)
    present = sum(os.path.isfile(os.path.join(out_dir, name)) for name in ("best.pt", "last.pt"))
    needed, free = (3 - present) * checkpoint_bytes, shutil.disk_usage(existing).free
    if free < needed:
        raise OSError(errno.ENOSPC, f"{free / 1e6:.1f} MB free where this run's checkpoints need about "
                      f"{needed / 1e6:.1f} MB ({3 - present} x {checkpoint_bytes / 1e6:.1f} MB)", out_dir)


def main(argv=None):
    signals = Signals()
    try:
        cfg, *rest = setup(argv)
    except ValueError as e:  # DataError is a ValueError too
        fail(e)
    try:
        return train(cfg, *rest, signals)
    except OSError as e:  # a write failed: files written before are intact (every write is atomic)
        message = write_error(e, cfg.out_dir)
        if int(os.environ.get("RANK", 0)) == 0:
            with suppress(OSError):  # into train.log too, when the disk lets us
                with open(os.path.join(cfg.out_dir, "train.log"), "a", encoding="utf-8") as f:
                    f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} error: {message}\n")
        fail(message, EXIT_IO)
    except KeyboardInterrupt:
        fail("stopped at once by a second Ctrl-C; the last checkpoint is kept: run the same command again to resume",
             EXIT_ABORTED)


def configure_optimizers(model, weight_decay, learning_rate, betas, device_type):
    """AdamW with weight decay on matrices (Linear weights, embeddings) only, not on biases and norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # the fused kernel updates every parameter in one pass instead of ~10 operations per tensor
    # (on a CPU, 5 ms per step instead of 15-30 for the default model)
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type in ("cuda", "cpu"))


def start_processes(device):
    """(rank, world size, device, control group) of this process. Under torchrun: join the others, each
    on its own GPU; the control group, on the CPU, carries stop flags, save results and RNG states: no GPU
    synchronisation each step, and others may wait for process 0's save (GBs for GPT-2 xl) longer than the
    NCCL timeout that catches hangs. A single process: (0, 1, device, None)."""
    if "RANK" not in os.environ:  # not launched by torchrun
        return 0, 1, device, None
    if device.startswith("cuda"):
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    control = dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=2))
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), device, control


def data_parallel(model, device_type):
    """The model under DDP. Its buffers (causal mask, rotary tables) never change: no broadcast of them before
    every step (under the option's newer name where torch has it: the older one warns there)."""
    sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters else "broadcast_buffers"
    return DDP(model, device_ids=[torch.cuda.current_device()] if device_type == "cuda" else None, **{sync: False})


def train(cfg, ckpt, tokenizer, train_ds, val_ds, prompt, model_config, pretrained, steps_per_epoch, text, signals):
    # -------------------------------------------------------------------------------- processes and devices
    rank, world_size, device, control = start_processes(cfg.device)
    ddp = control is not None
    master = rank == 0  # only process 0 writes the log, TensorBoard and checkpoints
    device_type = device.split(":")[0]
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 tensor cores for the fp32 matmuls that remain
        torch.backends.cudnn.allow_tf32 = True
    autocast = nullcontext() if cfg.precision == "fp32" else torch.autocast(
        device_type, dtype=torch.bfloat16 if cfg.precision == "bf16" else torch.float16)
    B, T, A = cfg.batch_size, cfg.block_size, cfg.grad_accum
    tokens_per_step = B * A * world_size * T

    def on_every_process(flag):
        """Whether the flag is up in any process (a failure, a stop signal): all of them then act together."""
        if not ddp:
            return flag
        flags = torch.tensor([float(flag)])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=control)
        return flags.item() > 0

    # -------------------------------------------------------------------------------- model and optimizer
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed + rank)  # each process its own dropout; DDP copies process 0's initial weights
    raw_model = (pretrained or GPT(model_config)).to(device)  # the plain module: what checkpoints and sampling use
    optimizer = configure_optimizers(raw_model, cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device_type)
    scaler = torch.amp.GradScaler(device_type, enabled=cfg.precision == "fp16")  # fp16 needs loss scaling
    step, epoch, epoch_step, best_val_loss = 0, 0, 0, float("inf")
    if ckpt:
        raw_model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt["scaler"] is not None:
            scaler.load_state_dict(ckpt["scaler"])
        step, epoch, best_val_loss = ckpt["step"], ckpt["epoch"], ckpt["best_val_loss"]
        epoch_step = ckpt["epoch_index"] // (tokens_per_step // T)
        if len(ckpt["rng"]) == world_size:
            set_rng_state(ckpt["rng"][rank], device)
    saved_step = step if ckpt else None  # the step of the newest last.pt on disk

    # -------------------------------------------------------------------------------- run folder and log
    writer = log_file = None
    error = None
    if master:
        # weights, buffers and AdamW's two moments, all in fp32 (estimated: nothing is written yet)
        state_bytes = sum(t.numel() * t.element_size() for t in raw_model.state_dict().values())
        try:
            check_run_folder(cfg.out_dir, state_bytes + 8 * raw_model.num_params() + 2 ** 20)
        except OSError as e:
            error = e
    if on_every_process(error is not None):
        raise error or OSError(errno.EIO, "process 0 cannot write the run folder", cfg.out_dir)
    if master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        stale = remove_stale_temporaries(cfg.out_dir)
        atomic_write(os.path.join(cfg.out_dir, "config.json"), json.dumps(cfg.to_dict(), indent=2) + "\n")
        tokenizer.save(os.path.join(cfg.out_dir, "tokenizer.json"))
        log_file = open(os.path.join(cfg.out_dir, "train.log"), "a", encoding="utf-8")
        from torch.utils.tensorboard import SummaryWriter  # slow import: only where it is used
        # purge_step drops the events an interrupted run logged after its last checkpoint
        writer = SummaryWriter(cfg.out_dir, purge_step=ckpt["step"] if ckpt else None)

    def log(message, echo=True):  # to train.log, and to the terminal unless echo=False
        if master:
            if echo:
                tqdm.write(message)
            try:
                log_file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")
                log_file.flush()
            except OSError as e:
                raise OSError(e.errno, e.strerror, log_file.name) from None

    log(f"text {text}: {len(train_ds.data) + len(val_ds.data):,} tokens, vocabulary {tokenizer.vocab_size}")
    if master and stale:
        log(f"removed {len(stale)} temporary file(s) of an interrupted save: {', '.join(stale)}")
    if ckpt:
        log(f"resuming {cfg.out_dir}/last.pt at step {step} (epoch {epoch}); best val loss so far {best_val_loss:.4f}"
            + ("" if len(ckpt["rng"]) == world_size else "; the number of processes changed: RNG streams reseeded"))
        changed = {k: (v, cfg.to_dict()[k]) for k, v in ckpt["config"].items() if cfg.to_dict().get(k) != v and k != "resume"}
        if changed:
            log("options changed since the checkpoint: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
    model = torch.compile(raw_model) if cfg.compile else raw_model  # shares raw_model's parameters
    eval_model = model
    if ddp:
        model = data_parallel(model, device_type)

    n_params = raw_model.num_params()
    flops_per_token = 6 * n_params + 12 * model_config.n_layer * model_config.n_embd * T  # PaLM appendix B
    peak = peak_flops(torch.cuda.get_device_name(device)) if device_type == "cuda" else None
    text_passes = cfg.max_steps * tokens_per_step / len(train_ds.data)
    log(f"model {n_params / 1e6:.2f}M parameters ({model_config.n_layer} layers, {model_config.n_head} heads, "
        f"{model_config.n_embd} wide, {'absolute' if model_config.abs_emb else 'rotary'} positions) | {device} "
        f"{cfg.precision} x {world_size} | global batch {tokens_per_step // T} x {T} tokens | {cfg.max_steps} steps "
        f"= {cfg.max_steps / steps_per_epoch:.2f} epochs (passes over every window) = {text_passes:.1f} passes over "
        f"the text | {cfg.out_dir}")
    # the GPU configuration on a CPU: once the speed is known (the first steps are slower), say how long it takes
    hint_at = step + 2 * cfg.log_interval if master and device_type == "cpu" and n_params > 5e6 and not cfg.pretrained \
        else None
    if master and device_type == "cpu" and cfg.precision == "fp16" and not cpu_has_fp16():
        # fp16 stays allowed (it exercises the GradScaler path without a GPU), but nobody should wait for it
        print("hint: this CPU has no native fp16, so fp16 training runs many times slower than fp32; "
              "use --precision bf16 (on CPUs with native bf16) or fp32", file=sys.stderr)

    # -------------------------------------------------------------------------------- evaluation and samples
    # a fixed set of validation windows (the same at every evaluation: comparable numbers), split over processes
    n_val = min(len(val_ds), cfg.eval_iters * tokens_per_step // T)  # eval_iters global batches
    val_windows = torch.randperm(len(val_ds), generator=torch.Generator().manual_seed(cfg.seed))[:n_val]
    val_batches = val_windows[rank::world_size].split(B)
    n_val_here = float(len(val_windows[rank::world_size]))  # this process's share

    @torch.no_grad()
    def evaluate():
        """Mean validation loss over the fixed windows, across all processes."""
        eval_model.eval()
        loss_sum = torch.zeros((), device=device)  # read back once, at the end
        for idx in val_batches:
            x, y = (torch.stack(t).to(device) for t in zip(*(val_ds[i] for i in idx.tolist())))  # (b, T) each
            with autocast:
                _, loss = eval_model(x, y)
            loss_sum += loss.float() * len(idx)
        total = torch.stack([loss_sum, torch.tensor(n_val_here, device=device)])
        if ddp:
            dist.all_reduce(total)  # (sum of losses, number of windows) over all processes
        eval_model.train()
        return (total[0] / total[1]).item()

    @torch.no_grad()
    def sample():
        raw_model.eval()
        generator = torch.Generator(device=device).manual_seed(cfg.seed)  # its own RNG: training's streams untouched
        idx = torch.tensor([prompt], dtype=torch.long, device=device)  # (1, len(prompt))
        with autocast:
            out = raw_model.generate(idx, cfg.sample_length, temperature=cfg.sample_temperature, generator=generator)
        raw_model.train()
        return tokenizer.decode(out[0].tolist())

    # -------------------------------------------------------------------------------- checkpoints
    def checkpoint():
        """The whole training state; every process takes part (RNG states are gathered), process 0 writes."""
        rng = [None] * world_size
        if ddp:
            dist.all_gather_object(rng, rng_state(device), group=control)
        else:
            rng = [rng_state(device)]
        return {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else None, "step": step, "epoch": epoch,
                "epoch_index": epoch_step * tokens_per_step // T, "best_val_loss": best_val_loss,
                "config": cfg.to_dict(), "model_config": asdict(model_config), "tokenizer": tokenizer.to_dict(),
                "rng": rng}

    def save(name, state):
        """Process 0 writes; if that fails, every process stops (exit EXIT_IO) and the earlier file stays."""
        error = None
        if master:
            try:
                atomic_write(os.path.join(cfg.out_dir, name), lambda f: torch.save(state, f))
            except OSError as e:
                error = e
        if on_every_process(error is not None):
            raise error or OSError(errno.EIO, "process 0 could not save", name)

    # -------------------------------------------------------------------------------- the training loop
    batches = micro_batches(train_ds, cfg, epoch, epoch_step, rank, world_size, pin_memory=device_type == "cuda")
    sample_interval = cfg.sample_interval or cfg.eval_interval
    loss_sum, grad_norm = torch.zeros((), device=device), torch.zeros(())
    t_log, step_log = time.time(), step
    # closed on the way out, also by an exception: an error message then starts on a line of its own
    with tqdm(total=cfg.max_steps, initial=step, disable=not master, dynamic_ncols=True, unit="step") as bar:
        signals.training = True
        stop = False
        if step >= cfg.max_steps:
            log(f"the run is complete ({step} steps): nothing to do; raise --max_steps to train on")
        while step < cfg.max_steps:
            lr = lr_at(step, cfg, cfg.max_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            for micro_step in range(A):
                epoch, epoch_step, x, y = next(batches)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)  # (B, T) each
                # DDP: all-reduce the gradients only once per step, on the last micro-batch
                with model.no_sync() if ddp and micro_step < A - 1 else nullcontext():
                    with autocast:
                        _, loss = model(x, y)
                    scaler.scale(loss / A).backward()  # / A: the step's loss is the mean over its micro-batches
                loss_sum += loss.detach().float() / A
            scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip or float("inf"))
            scaler.step(optimizer)  # with fp16, skipped when the gradients overflowed
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step, epoch_step = step + 1, epoch_step + 1
            bar.update()

            # processes stop at the same step, the first after a signal
            stop, last = on_every_process(bool(signals.received)), step == cfg.max_steps
            # read the loss back only every log_interval steps (it waits for the GPU), and before anything is written
            if last or stop or any(step % n == 0 for n in (cfg.log_interval, cfg.eval_interval, cfg.checkpoint_interval)):
                stats = torch.stack([loss_sum / (step - step_log), grad_norm.float().to(device)])
                if ddp:
                    dist.all_reduce(stats, op=dist.ReduceOp.AVG)
                train_loss, norm = stats.tolist()
                if not math.isfinite(train_loss):  # the weights are spoilt: keep the last good checkpoint as it is
                    bar.close()
                    kept = f"last.pt of step {saved_step} is kept" if saved_step is not None else "no checkpoint was written"
                    message = (f"the training loss became {train_loss} by step {step}; stopped without saving ({kept}). "
                               f"Lower --learning_rate, keep --grad_clip on, or use --precision bf16/fp32")
                    log("error: " + message, echo=False)
                    fail(message, code=EXIT_FAILED)
                dt, t_log = time.time() - t_log, time.time()
                tokens_per_sec = (step - step_log) * tokens_per_step / dt
                mfu = flops_per_token * tokens_per_sec / (peak * world_size) if peak else None
                bar.set_postfix(loss=f"{train_loss:.4f}", tok_s=f"{tokens_per_sec:,.0f}", refresh=False)
                if hint_at is not None and step >= hint_at:
                    hint_at, hours = None, (cfg.max_steps - step) * tokens_per_step / tokens_per_sec / 3600
                    quick = CPU_QUICK_RUN if cpu_has_bf16() else CPU_QUICK_RUN.replace("bf16", "fp32")
                    tqdm.write(f"hint: this is the GPU configuration; at {tokens_per_sec:,.0f} tokens/s it needs about "
                               f"{hours:.1f} more hours on this CPU. A quick CPU run: python train.py {quick}", file=sys.stderr)
                if master:
                    for name, value in (("train/loss", train_loss), ("lr", lr), ("grad_norm", norm),
                                        ("tokens_per_sec", tokens_per_sec), ("mfu", mfu)):
                        if value is not None:
                            writer.add_scalar(name, value, step)
                log(f"step {step} loss {train_loss:.4f} lr {lr:.3e} grad_norm {norm:.3f} tok/s {tokens_per_sec:.0f}"
                    + (f" mfu {mfu:.1%}" if mfu else ""), echo=False)
                loss_sum.zero_()
                step_log = step

            if step % cfg.eval_interval == 0 or last:
                val_loss = evaluate()
                improved = val_loss < best_val_loss
                best_val_loss = min(best_val_loss, val_loss)
                log(f"step {step}: train loss {train_loss:.4f} | val loss {val_loss:.4f} | val bpc "
                    f"{val_loss / math.log(2):.4f}" + (" | best so far" if improved else ""))
                if master:
                    writer.add_scalar("val/loss", val_loss, step)
                    writer.add_scalar("val/bpc", val_loss / math.log(2), step)  # bits per character
                if improved:
                    save("best.pt", checkpoint())
            if master and cfg.sample_length and (step % sample_interval == 0 or last):
                text = sample()
                log(f"sample at step {step}:\n{text}")
                writer.add_text("sample", "    " + text.replace("\n", "\n    "), step)  # markdown code block
            if step % cfg.checkpoint_interval == 0 or last or stop:
                save("last.pt", checkpoint())
                saved_step = step
            if any(step % n == 0 for n in (cfg.eval_interval, sample_interval, cfg.checkpoint_interval)):
                t_log = time.time()  # tokens/s counts training steps only
            if stop:
                bar.close()
                names = "/".join(signal.Signals(s).name for s in sorted(set(signals.received))) or "another process"
                log(f"stopped by {names} at step {step}; last.pt written. Run the same command again to resume.")
                break

    if master:
        writer.close()
        if not stop:
            log(f"done: best val loss {best_val_loss:.4f} ({best_val_loss / math.log(2):.4f} bpc)")
    if ddp:
        dist.destroy_process_group()
    return EXIT_INTERRUPTED if stop else 0


if __name__ == "__main__":
    if "RANK" not in os.environ:
        sys.exit(main())
    # A torchrun process leaves without the interpreter's teardown: DDP keeps PyTorch's gloo worker threads alive
    # past destroy_process_group(), and one that frees a finished collective's tensors while the interpreter shuts
    # down aborts the process (SIGABRT), turning a run that succeeded into a failed job.
    try:
        code = main()
    except SystemExit as e:  # fail() and argparse
        code = e.code
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)
