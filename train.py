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
from dataclasses import asdict, dataclass, replace
from typing import Optional

# Read once, when torch loads. OpenMP threads that sleep as soon as they wait: spinning ones (ACTIVE, and for a
# while the default) collapse when another program takes a core, as a browser or an editor does on a laptop:
# 80 steps of the CPU preset on 2 cores with one busy took 74-169 s by default, 27-31 s ACTIVE, 16-18 s PASSIVE
# (idle: 10-11 s, PASSIVE 19 s; the README). And an operation Apple's GPUs (MPS) lack runs on the CPU instead of
# failing.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from tqdm import tqdm

from cfg import (DEFAULT_MAX_STEPS, EXIT_ABORTED, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_IO, EXIT_USAGE,
                 TrainConfig, console, cpu_has_fp16, parse_config, unfinished)
from corpus import default_corpus
from dataset import CharTokenizer, DataError, TextDataset, read_text, train_val_split
from files import atomic_write, check_writable, remove_stale_temporaries
from gpt import GPT, GPTConfig
from optim import configure_optimizers, lr_at
from pretrained import GPT2Tokenizer, pretrained_folder, tokenizer_from_dict

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
                            pin_memory=pin_memory, generator=torch.Generator().manual_seed(cfg.seed + epoch),
                            worker_init_fn=ignore_stop_signals)
        held = hasattr(signal, "pthread_sigmask") and signal.pthread_sigmask(signal.SIG_BLOCK, Signals.STOPS)
        try:  # POSIX: workers start with the stop signals held (they inherit the mask); this process gets them after
            batches = iter(loader)
        finally:
            if held is not False:
                signal.pthread_sigmask(signal.SIG_SETMASK, held)
        for i, (x, y) in enumerate(batches):
            yield epoch, epoch_step + i // A, x, y
        epoch, epoch_step = epoch + 1, 0


def ignore_stop_signals(worker_id):
    """In a DataLoader worker: stop signals are the training process's to act on. A terminal's Ctrl-C, Windows'
    console and Slurm signal every process of the job; a worker that died of one would fail the step that saves."""
    for s in Signals.STOPS:
        signal.signal(s, signal.SIG_IGN)


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
           getattr(errno, "EDQUOT", "no quotas on Windows"): "free some space (your disk quota is full) or pass another "
                                                              "--out_dir",
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
    return (f"{txt_file} (the default corpus's offline fallback: Shakespeare's complete works, not tiny shakespeare; "
            f"to get tiny shakespeare back, copy char-rnn's input.txt to {os.path.join(os.path.dirname(txt_file), 'tinyshakespeare.txt')} "
            f"or delete {txt_file} when online: data/README.md)")


@dataclass
class Setup:
    """What setup() found, before anything is written: the options, the data and the model to train."""
    cfg: TrainConfig
    ckpt: Optional[dict]  # last.pt, when the run resumes
    tokenizer: object  # CharTokenizer or GPT2Tokenizer
    train_ds: TextDataset
    val_ds: TextDataset
    prompt: list  # token ids of the samples' prompt
    model_config: GPTConfig
    pretrained: Optional[GPT]  # GPT-2 with its weights, when fine-tuning starts
    steps_per_epoch: int
    text: str  # how the log names the text


def choose_model(cfg, ckpt, text):
    """(tokenizer, model config, GPT-2 with its weights or None): the checkpoint's when resuming, GPT-2's when
    fine-tuning starts, else a character model of the options' shape."""
    if ckpt:
        tokenizer = tokenizer_from_dict(ckpt["tokenizer"])
        return tokenizer, (GPTConfig.from_dict(ckpt["model_config"]) if cfg.pretrained
                           else cfg.model_config(tokenizer.vocab_size)), None
    if cfg.pretrained:
        folder = pretrained_folder(cfg.pretrained)
        pretrained = GPT.from_pretrained(folder, dropout=cfg.dropout)
        return GPT2Tokenizer(folder), pretrained.config, pretrained
    tokenizer = CharTokenizer(text)
    return tokenizer, cfg.model_config(tokenizer.vocab_size), None


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
    if ckpt and ckpt["config"].get("optimizer", "adamw") != cfg.optimizer:
        raise ValueError(f"{cfg.out_dir} holds a run trained with --optimizer {ckpt['config'].get('optimizer', 'adamw')}, "
                         f"not {cfg.optimizer}; pass the same, another --out_dir, or --no-resume")
    if ckpt and ckpt["config"].get("pretrained") != cfg.pretrained:
        raise ValueError(f"{cfg.out_dir} holds a run with --pretrained {ckpt['config'].get('pretrained')}, not "
                         f"{cfg.pretrained}; pass the same, another --out_dir, or --no-resume")
    text = read_text(txt_file)
    tokenizer, model_config, pretrained = choose_model(cfg, ckpt, text)
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
    try_model(model_config, splits["training"], prompt, cfg)
    return Setup(cfg, ckpt, tokenizer, splits["training"], splits["validation"], prompt, model_config, pretrained,
                 steps_per_epoch, text_name)


def try_model(model_config, train_ds, prompt, cfg):
    """Run once, on a one-layer copy of the model, every part of gpt.py that training runs (forward with dropout,
    backward, sampling): a TODO still to be written stops the run here, before anything is written."""
    with torch.random.fork_rng(devices=[]):  # the run's own RNG streams stay untouched
        model = GPT(replace(model_config, n_layer=1))
        x, y = (t[None, :8] for t in train_ds[0])  # (1, 8) each
        model(x, y)[1].backward()
        model.eval().generate(torch.tensor([prompt[-8:]]), 2, temperature=cfg.sample_temperature)


class Signals:
    """The stop signals received: SLURM sends SIGUSR1 (sbatch --signal) before the time limit and SIGTERM on
    preemption; Ctrl-C is SIGINT. Installed before setup, as SIGUSR1's default action would kill the process.
    Windows has no SIGUSR1 (nor Slurm), but Ctrl-Break (SIGBREAK)."""

    STOPS = tuple(getattr(signal, name) for name in ("SIGUSR1", "SIGBREAK", "SIGTERM", "SIGINT") if hasattr(signal, name))

    def __init__(self):
        self.received, self.training = [], False
        for s in self.STOPS:
            signal.signal(s, self.on_signal)

    def on_signal(self, signum, frame):  # training: finish the step, write last.pt, exit with EXIT_INTERRUPTED
        if not self.training:  # still setting up: nothing to save (every file is written atomically)
            fail(f"interrupted by {signal.Signals(signum).name} before training started", code=EXIT_INTERRUPTED)
        self.received.append(signum)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once

    def over(self):
        """Training is over: a stop signal now changes nothing (the interpreter's teardown would otherwise restore
        SIGUSR1's default action, and a time-limit warning arriving then would kill a run that succeeded)."""
        for s in self.STOPS[:-1]:  # Ctrl-C still interrupts the teardown
            signal.signal(s, signal.SIG_IGN)


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
    console()
    signals = Signals()
    try:
        s = setup(argv)
    except ValueError as e:  # DataError is a ValueError too
        fail(e)
    except NotImplementedError as e:
        fail(unfinished(e) or e)
    cfg = s.cfg
    try:
        return train(s, signals)
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
    """The model under DDP. Its buffers (the causal mask) never change: no broadcast of them before every step
    (under the option's newer name where torch has it: the older one warns there)."""
    sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters else "broadcast_buffers"
    return DDP(model, device_ids=[torch.cuda.current_device()] if device_type == "cuda" else None, **{sync: False})


class Run:
    """This process's part of the training: its rank, device and precision, the agreement between processes,
    and (process 0 only) the run folder's log and TensorBoard writer."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.rank, self.world_size, self.device, self.control = start_processes(cfg.device)
        self.ddp, self.master = self.control is not None, self.rank == 0  # process 0 writes every file
        self.device_type = self.device.split(":")[0]
        if self.device_type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # TF32 tensor cores for the fp32 matmuls that remain
            torch.backends.cudnn.allow_tf32 = True
        self.autocast = nullcontext() if cfg.precision == "fp32" else torch.autocast(
            self.device_type, dtype=torch.bfloat16 if cfg.precision == "bf16" else torch.float16)
        self.tokens_per_step = cfg.batch_size * cfg.grad_accum * self.world_size * cfg.block_size
        self.log_file = self.writer = None

    def on_every_process(self, flag):
        """Whether the flag is up in any process (a failure, a stop signal): all of them then act together."""
        if not self.ddp:
            return flag
        flags = torch.tensor([float(flag)])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.control)
        return flags.item() > 0

    def log(self, message, echo=True):
        """To train.log, and to the terminal unless echo=False (process 0 only)."""
        if not self.master:
            return
        if echo:
            tqdm.write(message)
        try:
            self.log_file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")
            self.log_file.flush()
        except OSError as e:
            raise OSError(e.errno, e.strerror, self.log_file.name) from None

    def on_process_0(self, action, failure):
        """Run action on process 0; when it raises OSError, every process raises (all exit with EXIT_IO)."""
        error = None
        if self.master:
            try:
                action()
            except OSError as e:
                error = e
        if self.on_every_process(error is not None):
            raise error or OSError(errno.EIO, f"process 0 {failure}", self.cfg.out_dir)

    def save(self, name, state):
        """Process 0 writes the file (atomically: if that fails, the earlier one stays)."""
        path = os.path.join(self.cfg.out_dir, name)
        self.on_process_0(lambda: atomic_write(path, lambda f: torch.save(state, f)), f"could not save {name}")


@dataclass
class Progress:
    """Where the training is: what a checkpoint records besides the weights and the optimizer."""
    step: int = 0
    epoch: int = 0
    epoch_step: int = 0  # optimizer steps into the epoch
    best_val_loss: float = float("inf")
    saved_step: Optional[int] = None  # the step of the newest last.pt on disk


def build(run, s):
    """The model (on this process's device), the optimizer and the fp16 loss scaler, restored from last.pt when the
    run resumes, and the Progress to continue from."""
    cfg, ckpt = run.cfg, s.ckpt
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed + run.rank)  # each process its own dropout; DDP copies process 0's initial weights
    model = (s.pretrained or GPT(s.model_config)).to(run.device)
    optimizer = configure_optimizers(model, cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), run.device_type,
                                     cfg.optimizer, cfg.adamw_lr_scale)
    scaler = torch.amp.GradScaler(run.device_type, enabled=cfg.precision == "fp16")  # fp16 needs loss scaling
    if not ckpt:
        return model, optimizer, scaler, Progress()
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt["scaler"] is not None:
        scaler.load_state_dict(ckpt["scaler"])
    if len(ckpt["rng"]) == run.world_size:
        set_rng_state(ckpt["rng"][run.rank], run.device)
    epoch_step = ckpt["epoch_index"] // (run.tokens_per_step // cfg.block_size)
    return model, optimizer, scaler, Progress(ckpt["step"], ckpt["epoch"], epoch_step, ckpt["best_val_loss"],
                                              ckpt["step"])


def open_run_folder(run, s, model):
    """Process 0 checks that the run folder takes the checkpoints (all processes stop together if not), then
    writes config.json and tokenizer.json and opens train.log and TensorBoard's events."""
    cfg = run.cfg
    # weights, buffers and at most two optimizer moments (AdamW's), all in fp32 (estimated: nothing is written yet)
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    run.on_process_0(lambda: check_run_folder(cfg.out_dir, state_bytes + 8 * model.num_params() + 2 ** 20),
                     "cannot write the run folder")
    if not run.master:
        return
    os.makedirs(cfg.out_dir, exist_ok=True)
    stale = remove_stale_temporaries(cfg.out_dir)
    atomic_write(os.path.join(cfg.out_dir, "config.json"), json.dumps(cfg.to_dict(), indent=2) + "\n")
    s.tokenizer.save(os.path.join(cfg.out_dir, "tokenizer.json"))
    run.log_file = open(os.path.join(cfg.out_dir, "train.log"), "a", encoding="utf-8")
    from torch.utils.tensorboard import SummaryWriter  # slow import: only where it is used
    # purge_step drops the events an interrupted run logged after its last checkpoint
    run.writer = SummaryWriter(cfg.out_dir, purge_step=s.ckpt["step"] if s.ckpt else None)
    run.log(f"text {s.text}: {len(s.train_ds.data) + len(s.val_ds.data):,} tokens, vocabulary {s.tokenizer.vocab_size}")
    if stale:
        run.log(f"removed {len(stale)} temporary file(s) of an interrupted save: {', '.join(stale)}")


def describe(run, s, model, progress):
    """The log's account of the run: what it resumes, what changed, the model, the devices and the length."""
    cfg, ckpt, mc = run.cfg, s.ckpt, s.model_config
    if ckpt:
        run.log(f"resuming {cfg.out_dir}/last.pt at step {progress.step} (epoch {progress.epoch}); best val loss so "
                f"far {progress.best_val_loss:.4f}" + ("" if len(ckpt["rng"]) == run.world_size
                                                       else "; the number of processes changed: RNG streams reseeded"))
        changed = {k: (v, cfg.to_dict()[k]) for k, v in ckpt["config"].items() if cfg.to_dict().get(k) != v and k != "resume"}
        if changed:
            run.log("options changed since the checkpoint: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
    text_passes = cfg.max_steps * run.tokens_per_step / len(s.train_ds.data)
    run.log(f"model {model.num_params() / 1e6:.2f}M parameters ({mc.n_layer} layers, {mc.n_head} heads, {mc.n_embd} "
            f"wide, {'absolute' if mc.abs_emb else 'rotary'} positions) | {run.device} {cfg.precision} x {run.world_size} "
            f"| global batch {run.tokens_per_step // cfg.block_size} x {cfg.block_size} tokens | {cfg.max_steps} steps "
            f"= {cfg.max_steps / s.steps_per_epoch:.2f} epochs (passes over every window) = {text_passes:.1f} passes "
            f"over the text | {cfg.out_dir}")
    if run.master and run.device_type == "cpu" and not cfg.preset and not cfg.pretrained and model.num_params() > 5e6:
        print(f"hint: this is the GPU recipe ({model.num_params() / 1e6:.1f}M parameters, {cfg.max_steps} steps): "
              f"on a CPU it takes many hours. A quick CPU run (a few minutes): python train.py --preset cpu-speedrun",
              file=sys.stderr)
    if run.master and run.device_type == "cpu" and cfg.precision == "fp16" and not cpu_has_fp16():
        # fp16 stays allowed (it exercises the GradScaler path without a GPU), but nobody should wait for it
        print("hint: this CPU has no native fp16, so fp16 training runs many times slower than fp32; "
              "use --precision bf16 (on CPUs with native bf16) or fp32", file=sys.stderr)


class Evaluator:
    """The validation loss on a fixed set of windows (the same at every evaluation: comparable numbers), split
    over the processes, and the text samples."""

    def __init__(self, run, s):
        self.run, self.ds, self.prompt, self.tokenizer = run, s.val_ds, s.prompt, s.tokenizer
        cfg = run.cfg
        n_val = min(len(self.ds), cfg.eval_iters * run.tokens_per_step // cfg.block_size)  # eval_iters global batches
        windows = torch.randperm(len(self.ds), generator=torch.Generator().manual_seed(cfg.seed))[:n_val]
        self.batches = windows[run.rank::run.world_size].split(cfg.batch_size)
        self.n_here = float(len(windows[run.rank::run.world_size]))  # this process's share

    @torch.no_grad()
    def loss(self, model):
        """Mean validation loss over the fixed windows, across all processes."""
        run = self.run
        model.eval()
        loss_sum = torch.zeros((), device=run.device)  # read back once, at the end
        for idx in self.batches:
            x, y = (torch.stack(t).to(run.device) for t in zip(*(self.ds[i] for i in idx.tolist())))  # (b, T) each
            with run.autocast:
                _, loss = model(x, y)
            loss_sum += loss.float() * len(idx)
        total = torch.stack([loss_sum, torch.tensor(self.n_here, device=run.device)])
        if run.ddp:
            dist.all_reduce(total)  # (sum of losses, number of windows) over all processes
        model.train()
        return (total[0] / total[1]).item()

    @torch.no_grad()
    def sample(self, model):
        run, cfg = self.run, self.run.cfg
        model.eval()
        generator = torch.Generator(device=run.device).manual_seed(cfg.seed)  # its own RNG: training's stay untouched
        idx = torch.tensor([self.prompt], dtype=torch.long, device=run.device)  # (1, len(prompt))
        with run.autocast:
            out = model.generate(idx, cfg.sample_length, temperature=cfg.sample_temperature, generator=generator)
        model.train()
        return self.tokenizer.decode(out[0].tolist())


def checkpoint(run, s, model, optimizer, scaler, progress):
    """The whole training state; every process takes part (RNG states are gathered), process 0 writes it."""
    rng = [None] * run.world_size
    if run.ddp:
        dist.all_gather_object(rng, rng_state(run.device), group=run.control)
    else:
        rng = [rng_state(run.device)]
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None, "step": progress.step,
            "epoch": progress.epoch, "epoch_index": progress.epoch_step * run.tokens_per_step // run.cfg.block_size,
            "best_val_loss": progress.best_val_loss, "config": run.cfg.to_dict(), "model_config": asdict(s.model_config),
            "tokenizer": s.tokenizer.to_dict(), "rng": rng}


def train_step(run, model, raw_model, optimizer, scaler, batches, progress, lr):
    """One optimizer step over grad_accum micro-batches -> the step's mean loss, on the device (not read back)."""
    A = run.cfg.grad_accum
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    step_loss = torch.zeros((), device=run.device)
    for micro_step in range(A):
        progress.epoch, progress.epoch_step, x, y = next(batches)
        x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)  # (B, T) each
        # DDP: all-reduce the gradients only once per step, on the last micro-batch
        with model.no_sync() if run.ddp and micro_step < A - 1 else nullcontext():
            with run.autocast:
                _, loss = model(x, y)
            scaler.scale(loss / A).backward()  # / A: the step's loss is the mean over its micro-batches
        step_loss += loss.detach().float() / A
    scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
    grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), run.cfg.grad_clip or float("inf"))
    scaler.step(optimizer)  # with fp16, skipped when the gradients overflowed
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    progress.step, progress.epoch_step = progress.step + 1, progress.epoch_step + 1
    return step_loss, grad_norm


class Meter:
    """Training loss, gradient norm, tokens/s and MFU, read back from the device only when reported (every
    log_interval steps: reading waits for the GPU), logged and sent to TensorBoard."""

    def __init__(self, run, s, model, step):
        self.run, self.loss_sum, self.step_log, self.t_log = run, torch.zeros((), device=run.device), step, time.time()
        mc, cfg = s.model_config, run.cfg
        self.flops_per_token = 6 * model.num_params() + 12 * mc.n_layer * mc.n_embd * cfg.block_size  # PaLM app. B
        self.peak = peak_flops(torch.cuda.get_device_name(run.device)) if run.device_type == "cuda" else None

    def report(self, step, lr, grad_norm, bar):
        """Mean loss since the last report (all processes), logged -> the training loss (NaN/inf: not logged)."""
        run = self.run
        stats = torch.stack([self.loss_sum / (step - self.step_log), grad_norm.float().to(run.device)])
        if run.ddp:
            dist.all_reduce(stats, op=dist.ReduceOp.AVG)
        train_loss, norm = stats.tolist()
        if not math.isfinite(train_loss):  # the weights are spoilt: the caller stops without saving
            return train_loss
        dt, self.t_log = time.time() - self.t_log, time.time()
        tokens_per_sec = (step - self.step_log) * run.tokens_per_step / dt
        mfu = self.flops_per_token * tokens_per_sec / (self.peak * run.world_size) if self.peak else None
        bar.set_postfix(loss=f"{train_loss:.4f}", tok_s=f"{tokens_per_sec:,.0f}", refresh=False)
        if run.master:
            for name, value in (("train/loss", train_loss), ("lr", lr), ("grad_norm", norm),
                                ("tokens_per_sec", tokens_per_sec), ("mfu", mfu)):
                if value is not None:
                    run.writer.add_scalar(name, value, step)
        run.log(f"step {step} loss {train_loss:.4f} lr {lr:.3e} grad_norm {norm:.3f} tok/s {tokens_per_sec:.0f}"
                + (f" mfu {mfu:.1%}" if mfu else ""), echo=False)
        self.loss_sum.zero_()
        self.step_log = step
        return train_loss


def train(s, signals):
    """The training: a story in named steps. Returns the exit code (0 done, EXIT_INTERRUPTED stopped). Over 60
    lines because the loop reads best in one piece: each step, then what happens at which interval."""
    cfg = s.cfg
    run = Run(cfg)                                               # processes, devices, precision
    raw_model, optimizer, scaler, progress = build(run, s)      # the plain module: checkpoints and samples use it
    open_run_folder(run, s, raw_model)                          # config.json, tokenizer.json, train.log, TensorBoard
    describe(run, s, raw_model, progress)
    eval_model = torch.compile(raw_model) if cfg.compile else raw_model  # shares raw_model's parameters
    model = data_parallel(eval_model, run.device_type) if run.ddp else eval_model  # what trains
    evaluator, meter = Evaluator(run, s), Meter(run, s, raw_model, progress.step)
    batches = micro_batches(s.train_ds, cfg, progress.epoch, progress.epoch_step, run.rank, run.world_size,
                            pin_memory=run.device_type == "cuda")
    sample_interval = cfg.sample_interval or cfg.eval_interval
    stop = False
    # closed on the way out, also by an exception: an error message then starts on a line of its own
    with tqdm(total=cfg.max_steps, initial=progress.step, disable=not run.master, dynamic_ncols=True, unit="step") as bar:
        signals.training = True
        if progress.step >= cfg.max_steps:
            run.log(f"the run is complete ({progress.step} steps): nothing to do; raise --max_steps to train on")
        while progress.step < cfg.max_steps:
            lr = lr_at(progress.step, cfg, cfg.max_steps)
            step_loss, grad_norm = train_step(run, model, raw_model, optimizer, scaler, batches, progress, lr)
            meter.loss_sum += step_loss
            step = progress.step
            bar.update()
            # processes stop at the same step, the first after a signal
            stop, last = run.on_every_process(bool(signals.received)), step == cfg.max_steps
            # the loss is read back at log intervals, and before anything is written
            if last or stop or any(step % n == 0 for n in (cfg.log_interval, cfg.eval_interval, cfg.checkpoint_interval)):
                train_loss = meter.report(step, lr, grad_norm, bar)
                if not math.isfinite(train_loss):  # keep the last good checkpoint as it is
                    bar.close()
                    kept = (f"last.pt of step {progress.saved_step} is kept" if progress.saved_step is not None
                            else "no checkpoint was written")
                    message = (f"the training loss became {train_loss} by step {step}; stopped without saving "
                               f"({kept}). Lower --learning_rate, keep --grad_clip on, or use --precision bf16/fp32")
                    run.log("error: " + message, echo=False)
                    fail(message, code=EXIT_FAILED)
            if step % cfg.eval_interval == 0 or last:
                val_loss = evaluator.loss(eval_model)
                improved, progress.best_val_loss = val_loss < progress.best_val_loss, min(progress.best_val_loss, val_loss)
                run.log(f"step {step}: train loss {train_loss:.4f} | val loss {val_loss:.4f} | val bpc "
                        f"{val_loss / math.log(2):.4f}" + (" | best so far" if improved else ""))
                if run.master:
                    run.writer.add_scalar("val/loss", val_loss, step)
                    run.writer.add_scalar("val/bpc", val_loss / math.log(2), step)  # bits per character
                if improved:
                    run.save("best.pt", checkpoint(run, s, raw_model, optimizer, scaler, progress))
            if run.master and cfg.sample_length and (step % sample_interval == 0 or last):
                text = evaluator.sample(raw_model)
                run.log(f"sample at step {step}:\n{text}")
                run.writer.add_text("sample", "    " + text.replace("\n", "\n    "), step)  # markdown code block
            if step % cfg.checkpoint_interval == 0 or last or stop:
                run.save("last.pt", checkpoint(run, s, raw_model, optimizer, scaler, progress))
                progress.saved_step = step
            if any(step % n == 0 for n in (cfg.eval_interval, sample_interval, cfg.checkpoint_interval)):
                meter.t_log = time.time()  # tokens/s counts training steps only
            if stop:
                bar.close()
                names = "/".join(signal.Signals(n).name for n in sorted(set(signals.received))) or "another process"
                run.log(f"stopped by {names} at step {step}; last.pt written. Run the same command again to resume.")
                break
    signals.over()
    if run.master:
        run.writer.close()
        if not stop:
            run.log(f"done: best val loss {progress.best_val_loss:.4f} ({progress.best_val_loss / math.log(2):.4f} bpc)")
    if run.ddp:
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
