"""
The checks to run once on your cluster's GPUs before releasing the assignment: what the test suite, which
runs on CPUs, cannot show. About 5 minutes on an A100 or H100 (mostly torch.compile), in a GPU job:

    srun --gpus=1 --time=00:30:00 python benchmarks/gpu_check.py     # two GPUs (--gpus=2) add check 3
    python benchmarks/gpu_check.py --help                            # options; train.py options after --

1. speed: the default recipe for --steps steps in bf16 and in fp16, each with and without --compile: the
   loss falls and stays finite; tokens/s and MFU (model FLOPs utilisation) of the last half of the steps.
2. resume: a run stopped half way by SIGUSR1 (what Slurm sends before a time limit) and run again ends
   with the parameters of the uninterrupted run (bitwise, or within --tolerance in validation loss where
   the GPU's kernels are not deterministic).
3. DDP: torchrun with 2 processes at half the batch each ends where 1 process ends (within --tolerance).
4. sampling: greedy text with the KV cache equals the text recomputed from the whole context.

Prints one PASS, FAIL or SKIP line per check; exit code 0 when none failed, 1 when one did, 2 without a
CUDA GPU (--device cpu runs the same checks on the CPU, in fp32: what the test suite does).
"""

import argparse
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from cfg import EXIT_INTERRUPTED, TrainConfig  # noqa: E402

LOG_LINE = re.compile(r"step (\d+) loss (\S+) .*tok/s (\d+)(?: mfu ([\d.]+)%)?")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per run (default: 300)")
    p.add_argument("--precisions", nargs="+", default=["bf16", "fp16"], choices=["bf16", "fp16", "fp32"])
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the --compile runs")
    p.add_argument("--tolerance", type=float, default=0.02, help="validation loss difference allowed where "
                   "results cannot be bitwise equal (default: 0.02)")
    p.add_argument("--out_dir", help="folder for the runs (default: a new temporary folder)")
    p.add_argument("train_args", nargs="*", help="train.py options after --, e.g. -- --model_type small")
    return p.parse_args()


class Checks:
    def __init__(self):
        self.failed = 0

    def report(self, outcome, what):
        self.failed += outcome == "FAIL"
        print(f"{outcome:4} {what}", flush=True)


def train_command(args, out_dir, precision, *extra, processes=1):
    launcher = [sys.executable, "train.py"] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", "train.py"]
    return [*launcher, "--out_dir", out_dir, "--device", args.device, "--precision", precision,
            "--max_steps", str(args.steps), "--eval_interval", str(args.steps), "--checkpoint_interval",
            str(args.steps), "--log_interval", "10", "--sample_length", "0", *args.train_args, *extra]


def train(command, timeout=3600):
    """Run train.py; (exit code, the last line of its errors)."""
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    return done.returncode, errors[-1] if errors else ""


def read_log(out_dir):
    with open(os.path.join(out_dir, "train.log"), encoding="utf-8") as f:
        text = f.read()
    rows = [(int(s), float(loss), int(tok), float(mfu) if mfu else None) for s, loss, tok, mfu in LOG_LINE.findall(text)]
    val = re.findall(r"val loss ([\d.]+)", text)
    return rows, float(val[-1]) if val else math.nan


def parameters(out_dir):
    return torch.load(os.path.join(out_dir, "last.pt"), map_location="cpu", weights_only=True)["model"]


def compare(checks, name, a_dir, b_dir, tolerance):
    """PASS when the two runs' parameters are bitwise equal, or their validation losses within tolerance."""
    a, b = parameters(a_dir), parameters(b_dir)
    diff = max((x.double() - b[k].double()).abs().max().item() for k, x in a.items())
    (_, val_a), (_, val_b) = read_log(a_dir), read_log(b_dir)
    detail = f"val loss {val_a:.4f} vs {val_b:.4f}, largest parameter difference {diff:.2e}"
    if diff == 0:
        checks.report("PASS", f"{name}: bitwise equal ({detail})")
    else:
        checks.report("PASS" if abs(val_a - val_b) <= tolerance else "FAIL", f"{name}: {detail}")


def speed(args, checks, runs):
    """Check 1; the folder of each finished run, by (precision, compile)."""
    finished = {}
    for precision in args.precisions:
        for compiled in (False, True) if args.compile else (False,):
            name = f"speed {precision}{' --compile' if compiled else ''}"
            out_dir = os.path.join(runs, f"{precision}{'-compile' if compiled else ''}")
            start = time.time()
            code, error = train(train_command(args, out_dir, precision, *(["--compile"] if compiled else [])))
            if code != 0:
                skip = code == 2 and precision in error  # e.g. bf16 on a GPU older than compute capability 8.0
                checks.report("SKIP" if skip else "FAIL", f"{name}: train.py exited with {code}: {error}")
                continue
            rows, val = read_log(out_dir)
            losses = [loss for _, loss, _, _ in rows]
            late = rows[len(rows) // 2:]
            tokens = statistics.median(tok for _, _, tok, _ in late)
            mfu = [m for _, _, _, m in late if m is not None]
            ok = all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0]
            checks.report("PASS" if ok else "FAIL",
                          f"{name}: loss {losses[0]:.3f} -> {losses[-1]:.3f}, val loss {val:.4f}, "
                          f"{tokens:,.0f} tokens/s{f', MFU {statistics.median(mfu):.1f}%' if mfu else ''}, "
                          f"{time.time() - start:.0f} s in all")
            finished[precision, compiled] = out_dir
    return finished


def resume(args, checks, runs, precision, reference):
    """Check 2: stopped by SIGUSR1 once half the steps are logged, then the same command again."""
    out_dir = os.path.join(runs, f"resume-{precision}")
    command = train_command(args, out_dir, precision)
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = os.path.join(out_dir, "train.log")
    while process.poll() is None:
        if os.path.exists(log) and any(s >= args.steps // 2 for s, *_ in read_log(out_dir)[0]):
            process.send_signal(signal.SIGUSR1)
            break
        time.sleep(0.02)  # small runs (the tests' on the CPU) take a fraction of a second for their second half
    _, errors = process.communicate(timeout=3600)
    stopped = re.search(r"stopped by SIGUSR1 at step (\d+)", open(log, encoding="utf-8").read())
    if process.returncode != EXIT_INTERRUPTED or not stopped:
        last = errors.strip().splitlines()[-1:] or [""]
        return checks.report("FAIL", f"resume {precision}: the stopped run exited with {process.returncode}: {last[0]}")
    code, error = train(command)
    if code != 0:
        return checks.report("FAIL", f"resume {precision}: the resumed run exited with {code}: {error}")
    compare(checks, f"resume {precision} (stopped at step {stopped.group(1)})", out_dir, reference, args.tolerance)


def data_parallel(args, checks, runs, precision, reference):
    """Check 3: 2 processes with half the batch each, against 1 process."""
    if args.device.startswith("cuda") and torch.cuda.device_count() < 2:
        return checks.report("SKIP", "DDP: one GPU visible; run with 2 (srun --gpus=2) to compare")
    batch = next((int(v) for k, v in zip(args.train_args, args.train_args[1:]) if k == "--batch_size"),
                 TrainConfig.batch_size)
    if batch % 2:
        return checks.report("SKIP", f"DDP: --batch_size {batch} is odd; 2 processes need half of it each")
    out_dir = os.path.join(runs, f"ddp-{precision}")
    code, error = train(train_command(args, out_dir, precision, "--batch_size", str(batch // 2), processes=2))
    if code != 0:
        return checks.report("FAIL", f"DDP: torchrun exited with {code}: {error}")
    compare(checks, f"DDP {precision}: 2 processes x batch {batch // 2} vs 1 x {batch}", out_dir, reference,
            args.tolerance)


def sampling(args, checks, reference):
    """Check 4: greedy samples with and without the KV cache (fp32, so that the two are the same sums)."""
    samples = []
    for cache in ("--kv_cache", "--no-kv_cache"):
        done = subprocess.run([sys.executable, "generate.py", "--checkpoint", reference, "--device", args.device,
                               "--precision", "fp32", "--temperature", "0", "--max_new_tokens", "300", cache],
                              cwd=ROOT, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            return checks.report("FAIL", f"sampling {cache}: generate.py exited with {done.returncode}")
        samples.append(done.stdout)
    same = samples[0] == samples[1]
    where = next((i for i, (a, b) in enumerate(zip(*samples)) if a != b), min(map(len, samples)))
    checks.report("PASS" if same else "FAIL", "sampling: greedy text with the KV cache "
                  + ("equals the text without it (300 tokens)" if same else f"differs from position {where}"))


def main():
    args = parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here (torch.cuda.is_available() is False): run it in a GPU job, e.g. "
              "srun --gpus=1 --time=00:30:00 python benchmarks/gpu_check.py (--device cpu checks the CPU)",
              file=sys.stderr)
        sys.exit(2)
    runs = args.out_dir or tempfile.mkdtemp(prefix="gpu-check-")
    name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    print(f"gpu_check on {name}, torch {torch.__version__}: {args.steps} steps per run, runs in {runs}", flush=True)
    checks = Checks()
    finished = speed(args, checks, runs)
    if finished:  # checks 2-4 on the first precision that trained, without --compile
        precision, _ = next(iter(finished))
        reference = finished.get((precision, False)) or finished[precision, True]
        resume(args, checks, runs, precision, reference)
        data_parallel(args, checks, runs, precision, reference)
        sampling(args, checks, reference)
    print(f"gpu_check: {'all checks passed' if not checks.failed else f'{checks.failed} check(s) FAILED'}")
    sys.exit(1 if checks.failed else 0)


if __name__ == "__main__":
    main()
