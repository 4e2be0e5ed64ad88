"""
The configuration of train.py: one typed dataclass, TrainConfig, and the one ArgumentParser that fills it.
Every field is a command-line flag of the same name (`--n_layer 4 --learning_rate 3e-3`); booleans
come as `--bias / --no-bias` (or `--no_bias`); the option names of the course's earlier templates
(`--num_epochs`, `--train_batch_size`, `--clip_grad_norm`, ...) are accepted as aliases. The defaults
are the GPU configuration: nanoGPT's "baby GPT" on tiny shakespeare (6 layers, 6 heads, 384 wide,
block 256, batch 64, 5000 steps).
"""

import argparse
import math
import os
import re
import subprocess
import sys
import traceback
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Optional

import torch

from gpt import GPTConfig

EXIT_FAILED = 1  # the training loss became NaN/inf
EXIT_USAGE = 2  # a bad option, text or checkpoint: nothing was written
EXIT_IO = 74  # EX_IOERR: a file could not be written (disk full, read-only, permissions); earlier files are intact
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: stopped by Ctrl-C/SIGUSR1/SIGTERM after saving last.pt; run again to resume
EXIT_ABORTED = 130  # a second Ctrl-C: stopped at once, without saving (the last checkpoint is intact)
TODO = re.compile(r"TODO\[([a-z0-9_]+)\]")  # a stub's NotImplementedError names its TODO region


def unfinished(e):
    """A TODO stub's NotImplementedError -> one line: which TODO to write first, where, and the tests that check
    it (exit EXIT_USAGE). None for any other error."""
    todo = TODO.search(str(e))
    if not isinstance(e, NotImplementedError) or not todo:
        return None
    frame = traceback.extract_tb(e.__traceback__)[-1]  # the stub's own line
    return (f"{todo.group(0)} is not written yet ({os.path.relpath(frame.filename)}:{frame.lineno} in "
            f"{frame.name}): write it first; `pytest unittests.py -k {todo.group(1)}` checks it")


def console():
    """A console that cannot show a character (Windows' cp1252 into a pipe or file) shows its escape instead of
    stopping the program."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")

DEFAULT_MAX_STEPS = 5000

MODEL_PRESETS = {  # --model_type -> shape; --n_layer / --n_head / --n_embd override single fields
    "gpt-nano": dict(n_layer=3, n_head=3, n_embd=48),
    "gpt-micro": dict(n_layer=4, n_head=4, n_embd=128),
    "gpt-mini": dict(n_layer=6, n_head=6, n_embd=192),
    "baby": dict(n_layer=6, n_head=6, n_embd=384),  # nanoGPT's shakespeare_char model, 10.7M parameters
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # GPT-2 small's shape
}

# Named recipes, `--preset NAME`: its flags come first, so flags on the command line override them. Both train
# the same model for 2 CPU cores (3 layers, 4 heads, 192 wide; the manual attention path is faster than SDPA's
# CPU kernel at this size), in bf16 where the CPU has it natively, else fp32; they evaluate every eighth to tenth
# of the run (a validation curve) and sample at the end. The README gives their losses and times.
CPU_MODEL = ("--model_type gpt-micro --n_layer 3 --n_embd 192 --block_size 96 --batch_size 16 --dropout 0 "
             "--no-use_flash_attn --precision bf16 --device cpu")
# the earlier quick run: AdamW, cosine decay
CPU_QUICK_RUN = (CPU_MODEL + " --learning_rate 3e-3 --min_lr 3e-4 --warmup_steps 100 --max_steps 1150 "
                 "--eval_interval 115 --sample_interval 1150")
# the lowest validation loss found in CPU_QUICK_RUN's time: Muon, warmup-stable-decay to 0, AdamW (embeddings, norms,
# biases) at 6x Muon's rate, no weight decay (as good in this short run, and a step faster); a validation estimate
# of 160 windows (eval_iters 10) instead of 800 leaves time to step
CPU_SPEEDRUN = (CPU_MODEL + " --optimizer muon --learning_rate 3e-3 --adamw_lr_scale 6 --weight_decay 0 --min_lr 0 "
                "--warmup_steps 50 --cooldown 0.5 --max_steps 1000 --eval_interval 125 --eval_iters 10 "
                "--sample_interval 1000")
PRESETS = {"cpu-speedrun": CPU_SPEEDRUN, "cpu-quick": CPU_QUICK_RUN}


def preset_flags(name):
    """The flags of a preset for this machine: --precision bf16 becomes fp32 on a CPU without native bf16."""
    flags = PRESETS[name].split()
    return flags if cpu_has_bf16() else ["fp32" if f == "bf16" else f for f in flags]


def arg(default, help, group, **argparse_kwargs):
    """A config field, with the help text and argument group of its command-line flag."""
    return field(default=default, metadata=dict(help=help, group=group, kwargs=argparse_kwargs))


@dataclass
class TrainConfig:
    preset: Optional[str] = arg(None, "start from a named recipe (its flags are listed below); flags given "
                                "with it override its own", "recipe", choices=list(PRESETS))
    # data
    txt_file: Optional[str] = arg(None, "training text, any UTF-8 file (default: tiny shakespeare, "
                                  "downloaded into data/ on first use)", "data")
    val_fraction: float = arg(0.1, "the last fraction of the text held out for validation", "data")
    block_size: int = arg(256, "context length in characters", "data")
    # model
    model_type: str = arg("baby", "shape preset (layers/heads/width): " + ", ".join(
        f"{k} {v['n_layer']}/{v['n_head']}/{v['n_embd']}" for k, v in MODEL_PRESETS.items()),
        "model", choices=list(MODEL_PRESETS))
    n_layer: Optional[int] = arg(None, "number of transformer blocks (default: from --model_type)", "model")
    n_head: Optional[int] = arg(None, "attention heads per block (default: from --model_type)", "model")
    n_embd: Optional[int] = arg(None, "embedding width, divisible by n_head (default: from --model_type)", "model")
    dropout: float = arg(0.2, "dropout probability (0 for short runs, ~0.2 against overfitting)", "model")
    bias: bool = arg(True, "biases in Linear layers and norms, as in GPT-2", "model")
    abs_emb: bool = arg(False, "learned absolute position embeddings (GPT-2) instead of rotary (RoPE)", "model")
    use_flash_attn: bool = arg(True, "fused F.scaled_dot_product_attention instead of the manual path", "model")
    norm: str = arg("layernorm", "normalisation layer", "model", choices=["layernorm", "rmsnorm"])
    fused_norm: bool = arg(True, "PyTorch's fused norm kernel (--no-fused_norm: the hand-written one, slower)",
                           "model")
    rope_base: float = arg(GPTConfig.rope_base, "rotary embedding base: the slowest-turning channel pair "
                           "turns once in about 2 pi x base positions", "model")
    pretrained: Optional[str] = arg(None, "fine-tune OpenAI's GPT-2 instead of training from scratch: gpt2, "
                                    "gpt2-medium, gpt2-large, gpt2-xl or a local folder in Hugging Face layout; the "
                                    "text is encoded with its BPE and the shape options above are ignored", "model")
    # optimisation
    batch_size: int = arg(64, "sequences per micro-batch per process; one step sees batch_size x "
                          "grad_accum x processes sequences (the global batch)", "optimisation",
                          aliases=["--train_batch_size"])
    grad_accum: int = arg(1, "micro-batches accumulated per optimizer step", "optimisation")
    optimizer: str = arg("adamw", "adamw; or muon: Muon for the blocks' matrices, AdamW for the rest (one "
                         "--learning_rate for both, times --adamw_lr_scale for AdamW's)", "optimisation",
                         choices=["adamw", "muon"])
    adamw_lr_scale: float = arg(1.0, "with --optimizer muon: AdamW's learning rate (embeddings, norms, biases) as "
                                "a multiple of Muon's", "optimisation")
    learning_rate: float = arg(1e-3, "peak learning rate", "optimisation")
    min_lr: float = arg(1e-4, "learning rate at the end of the decay", "optimisation")
    warmup_steps: int = arg(100, "steps of linear warmup from learning_rate/warmup_steps to learning_rate",
                            "optimisation")
    cooldown: float = arg(0.0, "0: cosine decay from the warmup on; F > 0: hold --learning_rate, then decay "
                          "linearly over the last F of the steps (warmup-stable-decay)", "optimisation")
    max_steps: Optional[int] = arg(None, f"optimizer steps in total, where the decay ends (default: "
                                   f"{DEFAULT_MAX_STEPS})", "optimisation", aliases=["--max_iters"])
    epochs: Optional[int] = arg(None, "train for this many passes over the training windows instead of "
                                "--max_steps", "optimisation", aliases=["--num_epochs"])
    weight_decay: float = arg(0.1, "weight decay on matrices (not on biases and norms)", "optimisation")
    beta1: float = arg(0.9, "AdamW beta1", "optimisation")
    beta2: float = arg(0.99, "AdamW beta2 (0.99 suits small batches of characters)", "optimisation")
    grad_clip: float = arg(1.0, "clip the gradient norm to this (0: no clipping)", "optimisation",
                           aliases=["--clip_grad_norm"])
    # evaluation and sampling
    eval_interval: int = arg(250, "evaluate on the validation split every this many steps (and at the end)",
                             "evaluation")
    eval_iters: int = arg(50, "validation batches (of the global batch size) per evaluation, always the same "
                          "windows", "evaluation")
    log_interval: int = arg(10, "log training loss, tokens/s, lr and grad norm every this many steps", "evaluation")
    sample_interval: Optional[int] = arg(None, "print a text sample every this many steps "
                                         "(default: at every evaluation)", "evaluation",
                                         aliases=["--generate_every_n_steps"])
    sample_prompt: Optional[str] = arg(None, "the fixed prompt of the samples (default: a newline; for a text "
                                       "without newlines, its vocabulary's first character)", "evaluation")
    sample_length: int = arg(200, "tokens (characters, or GPT-2's BPE tokens) per sample (0: no samples)",
                             "evaluation")
    sample_temperature: float = arg(0.8, "sampling temperature (0: greedy)", "evaluation")
    # checkpoints
    out_dir: Optional[str] = arg(None, "run folder: last.pt, best.pt, config.json, tokenizer.json, train.log, "
                                 "TensorBoard events (default: runs/<text file name>-<model_type or pretrained name>)",
                                 "checkpoints", aliases=["--log_dir"])
    checkpoint_interval: int = arg(250, "write last.pt every this many steps (and at exit)", "checkpoints")
    resume: Optional[bool] = arg(None, "continue the run in out_dir from last.pt (default: yes if it exists; "
                                 "--no-resume starts afresh and overwrites it)", "checkpoints")
    # system
    device: str = arg("auto", "auto (cuda > mps > cpu), cuda, cuda:N, mps or cpu", "system")
    precision: str = arg("auto", "autocast precision; auto: bf16 on GPUs that have it, else fp16 on GPUs, "
                         "fp32 on CPU/MPS", "system", choices=["auto", "fp32", "bf16", "fp16"])
    compile: bool = arg(False, "torch.compile the model (faster steps on GPU after a slow first one)", "system")
    seed: int = arg(1337, "seed of the initialisation, data order, dropout and samples", "system")
    num_workers: int = arg(0, "DataLoader worker processes (0: load in the main process)", "system")

    def model_config(self, vocab_size):
        """The GPTConfig this training configuration asks for: every field of GPTConfig is an option here."""
        return GPTConfig(vocab_size=vocab_size, **{f.name: getattr(self, f.name) for f in fields(GPTConfig)
                                                   if f.name != "vocab_size"})

    def to_dict(self):
        return asdict(self)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's multi-line usage dump
        self.exit(EXIT_USAGE, f"error: {message} (see --help)\n")


class Switch(argparse.BooleanOptionalAction):
    """--flag / --no-flag, and --no_flag as well (both spellings are in use)."""

    def __init__(self, option_strings, **kwargs):
        super().__init__(option_strings, **kwargs)
        self.option_strings += ["--no_" + s[2:] for s in option_strings]

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, not option_string.startswith(("--no-", "--no_")))


TRAIN_EPILOG = ("presets, for a quick run on 2 CPU cores (--precision bf16 is fp32 on CPUs without native bf16):\n"
                + "".join(f"  --preset {name}: {flags}\n" for name, flags in PRESETS.items()) +
                f"exit codes: 0 done; {EXIT_FAILED} the loss became NaN/inf; {EXIT_USAGE} bad option, text or "
                f"checkpoint; {EXIT_IO} a file could not be written (disk full, permissions); {EXIT_INTERRUPTED} "
                f"stopped by Ctrl-C, SIGUSR1 or SIGTERM after writing last.pt: run the same command again (or "
                f"requeue) to resume; {EXIT_ABORTED} a second Ctrl-C stopped it at once (the last checkpoint is "
                f"kept)")
SAMPLE_EPILOG = (f"exit codes: 0 done; {EXIT_USAGE} bad option, prompt or checkpoint; {EXIT_IO} --output or "
                 f"--attention_map could not be written; {EXIT_ABORTED} stopped by Ctrl-C")
PLOT_EPILOG = (f"exit codes: 0 done; {EXIT_USAGE} bad option or run folder, or no matplotlib; {EXIT_IO} the picture "
               f"could not be written")


def build_parser(config_class=TrainConfig, description="Train a character-level GPT.", epilog=TRAIN_EPILOG):
    """The ArgumentParser of a config dataclass: one --flag per field, grouped, with its help text; a field without
    a default is a positional argument."""
    parser = Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=epilog)
    groups = {}
    for f in fields(config_class):
        meta = f.metadata
        group = groups.get(meta["group"]) or groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        typ = [t for t in typing.get_args(f.type) if t is not type(None)][0] if typing.get_args(f.type) else f.type
        if f.default is MISSING:
            group.add_argument(f.name, type=typ, metavar=f.name.upper(), help=meta["help"])
            continue
        kwargs = dict(default=f.default, help=meta["help"] + (" (default: %(default)r)" if f.default is not None else ""))
        if typ is bool:
            kwargs["action"] = Switch
        else:
            kwargs["type"] = typ
            kwargs["metavar"] = typ.__name__.upper()
        kwargs.update(meta["kwargs"])
        if "choices" in kwargs:
            kwargs.pop("metavar", None)
        group.add_argument("--" + f.name, *kwargs.pop("aliases", []), **kwargs)
    return parser


def parse_config(argv=None):
    """Command line -> resolved, validated TrainConfig. Raises ValueError with a one-line message."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    preset = parser.parse_args(argv).preset
    cfg = TrainConfig(**vars(parser.parse_args((preset_flags(preset) if preset else []) + argv)))
    for name, value in MODEL_PRESETS[cfg.model_type].items():
        if getattr(cfg, name) is None:  # explicit flags win over the preset
            setattr(cfg, name, value)
    cfg.device = resolve_device(cfg.device)
    cfg.precision = resolve_precision(cfg.precision, cfg.device)
    validate(cfg)
    return cfg


def check(ok, message):
    if not ok:  # conditions are written so that NaN fails them
        raise ValueError(message)


def check_finite(cfg, names):
    for name in names:
        value = getattr(cfg, name)
        check(value is None or math.isfinite(value), f"--{name} must be a finite number, got {value}")


def validate(cfg):
    for name in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "grad_accum", "max_steps", "eval_interval",
                 "eval_iters", "log_interval", "checkpoint_interval", "sample_interval", "epochs"):
        value = getattr(cfg, name)
        check(value is None or value > 0, f"--{name} must be a positive integer, got {value}")
    check(cfg.epochs is None or cfg.max_steps is None,
          f"--epochs {cfg.epochs} and --max_steps {cfg.max_steps} both set the length of the run; pass one of them")
    for name in ("warmup_steps", "sample_length", "num_workers", "seed"):
        check(getattr(cfg, name) >= 0, f"--{name} must be >= 0, got {getattr(cfg, name)}")
    check_finite(cfg, ("rope_base", "val_fraction", "dropout", "learning_rate", "min_lr", "cooldown", "weight_decay",
                       "beta1", "beta2", "grad_clip", "sample_temperature"))
    check(0 < cfg.val_fraction < 1, f"--val_fraction must be between 0 and 1 (e.g. 0.1), got {cfg.val_fraction}")
    check(cfg.learning_rate > 0, f"--learning_rate must be positive, got {cfg.learning_rate}")
    check(0 <= cfg.min_lr <= cfg.learning_rate,
          f"--min_lr must be between 0 and --learning_rate ({cfg.learning_rate}), got {cfg.min_lr}")
    check(0 <= cfg.cooldown <= 1, f"--cooldown must be between 0 and 1 (a fraction of the steps), got {cfg.cooldown}")
    check(cfg.weight_decay >= 0, f"--weight_decay must be >= 0, got {cfg.weight_decay}")
    for name in ("beta1", "beta2"):
        check(0 <= getattr(cfg, name) < 1, f"--{name} must be in [0, 1), got {getattr(cfg, name)}")
    check(cfg.grad_clip >= 0, f"--grad_clip must be >= 0 (0 turns clipping off), got {cfg.grad_clip}")
    check(cfg.sample_temperature >= 0, f"--sample_temperature must be >= 0 (0 is greedy), got {cfg.sample_temperature}")
    check(cfg.out_dir is None or not os.path.isfile(cfg.out_dir), f"--out_dir {cfg.out_dir} is a file; pass a folder")
    try:
        cfg.model_config(vocab_size=1)  # shape checks (positive sizes, n_embd divisible by n_head, ...)
    except ValueError as e:
        raise ValueError(f"invalid model: {e}") from None


def resolve_device(device):
    """'auto' -> the best device here; an explicit one must exist."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    kind, _, index = device.partition(":")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA GPU is visible to PyTorch; use --device cpu (or auto)")
        if index and not (index.isdigit() and int(index) < torch.cuda.device_count()):
            raise ValueError(f"--device {device}: there are {torch.cuda.device_count()} GPUs (cuda:0 ...)")
    elif kind == "mps" and not index:
        if not torch.backends.mps.is_available():
            raise ValueError("--device mps: Apple's Metal backend is not available here; use --device cpu (or auto)")
    elif device != "cpu":
        raise ValueError(f"--device must be auto, cuda, cuda:N, mps or cpu, got {device!r}")
    return device


def cpu_flags():
    """The CPU's feature flags in Linux's names: /proc/cpuinfo; on macOS, Apple silicon's FEAT_BF16 and FEAT_FP16
    (sysctl); elsewhere (Windows), what oneDNN finds on an x86 CPU."""
    try:
        with open("/proc/cpuinfo") as f:
            return set(f.read().split())
    except OSError:
        pass
    if sys.platform == "darwin":
        names = {"hw.optional.arm.FEAT_BF16": "bf16", "hw.optional.arm.FEAT_FP16": "fphp"}
        found = subprocess.run(["sysctl", *names], capture_output=True, text=True).stdout.splitlines()
        return {names[k] for k, _, v in (line.partition(": ") for line in found) if k in names and v.strip() == "1"}
    mkldnn = torch.ops.mkldnn
    return {flag for flag, ok in (("avx512_bf16", mkldnn._is_mkldnn_bf16_supported),
                                  ("avx512_fp16", mkldnn._is_mkldnn_fp16_supported)) if ok()}


def cpu_has_bf16():
    """True when the CPU computes in bf16 natively (x86 avx512_bf16 / amx_bf16, ARM bf16). Without it,
    bf16 autocast on CPU runs in slow emulation, so we refuse it."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"})


def cpu_has_fp16():
    """True when the CPU multiplies fp16 matrices natively (x86 avx512_fp16 / amx_fp16, ARM fphp). Without it,
    PyTorch's fp16 matrix products on CPU (the backward pass's above all) take a slow generic path."""
    return bool(cpu_flags() & {"avx512_fp16", "amx_fp16", "fphp"})


def gpu_has_bf16(device):
    """Native bf16 on this process's GPU (compute capability 8.0, Ampere, or newer). Read from the device's
    properties: no CUDA context is made (torchrun's processes must not all open one on GPU 0), and GPUs that
    only emulate bf16 (V100, T4: torch.cuda.is_bf16_supported() says True there) count as without."""
    index = device.partition(":")[2] or os.environ.get("LOCAL_RANK", "0")  # torchrun: the process's own GPU
    return torch.version.hip is not None or torch.cuda.get_device_capability(int(index)) >= (8, 0)


def resolve_precision(precision, device):
    """'auto' -> bf16 on GPUs with bf16, fp16 on older GPUs, fp32 elsewhere; bf16 must be supported."""
    kind = device.split(":")[0]
    if precision == "auto":
        if kind == "cuda":
            return "bf16" if gpu_has_bf16(device) else "fp16"
        return "fp32"
    if precision == "bf16" and kind == "cuda" and not gpu_has_bf16(device):
        raise ValueError("--precision bf16: this GPU has no bf16 (needs compute capability >= 8.0); "
                         "use --precision fp16 or fp32")
    if precision == "bf16" and kind == "mps" and not torch.backends.mps.is_macos_or_newer(14, 0):
        raise ValueError("--precision bf16 on an Apple GPU needs macOS 14 or newer; use --precision fp16 or fp32")
    if precision == "bf16" and kind == "cpu" and not cpu_has_bf16():
        raise ValueError("--precision bf16: this CPU has no native bf16 (avx512_bf16, amx_bf16 or ARM bf16); "
                         "use --precision fp32")
    return precision


@dataclass
class SampleConfig:
    # source
    checkpoint: Optional[str] = arg(None, "a run folder of train.py (its best.pt, else last.pt) or a .pt file "
                                    "(default: the newest run in runs/)", "source", aliases=["--model_weights_folder"])
    pretrained: Optional[str] = arg(None, "OpenAI's GPT-2 instead: gpt2, gpt2-medium, gpt2-large, gpt2-xl "
                                    "(downloaded once) or a local folder in Hugging Face layout", "source")
    # what to generate
    prompt: Optional[str] = arg(None, "text to continue, or FILE:path to read it from a file (default: a newline; "
                                "<|endoftext|> for GPT-2)", "sampling", aliases=["--start"])
    num_samples: int = arg(1, "samples to draw (generated together as one batch)", "sampling")
    max_new_tokens: int = arg(500, "tokens to add to the prompt (characters for a character model)", "sampling",
                              aliases=["--num_generated_tokens"])
    temperature: float = arg(0.8, "divide the logits by this: < 1 safer, > 1 wilder, 0 greedy", "sampling")
    top_k: Optional[int] = arg(None, "sample only among the k most likely tokens", "sampling")
    top_p: Optional[float] = arg(None, "sample only from the smallest set of tokens whose probability "
                                 "reaches p (nucleus sampling), 0 < p <= 1", "sampling")
    stop_at_eot: bool = arg(True, "end a GPT-2 sample at <|endoftext|>", "sampling")
    seed: int = arg(1337, "seed of the sampling: the same seed gives the same samples", "sampling")
    # output and system
    stream: bool = arg(False, "print tokens as they come (samples are then made one after another)", "output")
    output: Optional[str] = arg(None, "also write the samples to this file", "output")
    attention_map: Optional[str] = arg(None, "also draw every head's attention over the prompt into this .png file "
                                       "(needs matplotlib: pip install -r notebooks/requirements.txt)", "output")
    device: str = arg("auto", "auto (cuda > mps > cpu), cuda, cuda:N, mps or cpu", "system")
    precision: str = arg("auto", "weights' precision; auto: bf16 on GPUs that have it, else fp16 on GPUs, "
                         "fp32 on CPU/MPS", "system", choices=["auto", "fp32", "bf16", "fp16"])
    kv_cache: bool = arg(True, "cache keys and values instead of recomputing the context every token "
                         "(same tokens, many times faster)", "system")


def parse_sample_config(argv=None):
    """generate.py's command line -> validated SampleConfig. Raises ValueError with a one-line message."""
    cfg = SampleConfig(**vars(build_parser(SampleConfig, "Sample from a trained Micro-GPT or from GPT-2.", SAMPLE_EPILOG).parse_args(argv)))
    if cfg.checkpoint is not None and cfg.pretrained is not None:
        raise ValueError("pass either --checkpoint RUN_FOLDER_OR_FILE or --pretrained gpt2, not both")
    check(cfg.top_p is None or 0 < cfg.top_p <= 1, f"--top_p must be in (0, 1], got {cfg.top_p}")
    check(cfg.top_k is None or cfg.top_k >= 1, f"--top_k must be a positive integer, got {cfg.top_k}")
    check_finite(cfg, ("temperature",))
    check(cfg.temperature >= 0, f"--temperature must be >= 0 (0 is greedy), got {cfg.temperature}")
    for name in ("num_samples", "max_new_tokens"):
        check(getattr(cfg, name) >= 1, f"--{name} must be a positive integer, got {getattr(cfg, name)}")
    check(not (cfg.output and os.path.isdir(cfg.output)), f"--output {cfg.output} is a folder; pass a file name")
    check_png(cfg.attention_map, "--attention_map")
    cfg.device = resolve_device(cfg.device)
    cfg.precision = resolve_precision(cfg.precision, cfg.device)
    return cfg


def check_png(path, option):
    """A picture's path names a .png file (or is None)."""
    check(path is None or not os.path.isdir(path), f"{option} {path} is a folder; pass a file name ending in .png")
    check(path is None or path.lower().endswith(".png"),
          f"{option} {path} is not a .png file; pass a name ending in .png")


@dataclass
class PlotConfig:
    run: str = arg(MISSING, "a run folder of train.py (its TensorBoard events)", "source")
    output: Optional[str] = arg(None, "the .png file to write (default: RUN/loss.png)", "output")


def parse_plot_config(argv=None):
    """plot.py's command line -> validated PlotConfig. Raises ValueError with a one-line message."""
    cfg = PlotConfig(**vars(build_parser(PlotConfig, "Plot a run's training and validation loss curves into a PNG.",
                                         PLOT_EPILOG).parse_args(argv)))
    check_png(cfg.output, "--output")
    return cfg
