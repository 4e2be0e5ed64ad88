"""
How OpenMP's wait policy changes the quick CPU run, on an idle machine and on a busy one (another process
spinning on one core, as a browser or an editor does on a laptop). Prints the wall time of a short training
run (startup and evaluation included) under OpenMP's own default ("unset": torch is imported before train.py,
which sets PASSIVE unless told otherwise), PASSIVE and ACTIVE (or the OpenMP settings given), taking turns.

    python benchmarks/omp_wait_policy.py                       # 80 steps of the cpu-speedrun preset, 2 rounds
    python benchmarks/omp_wait_policy.py --steps 40 --rounds 3 --txt_file data/tinyshakespeare.txt
    python benchmarks/omp_wait_policy.py --settings unset GOMP_SPINCOUNT=10000 OMP_NUM_THREADS=1
"""

import argparse
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = ("unset", "OMP_WAIT_POLICY=PASSIVE", "OMP_WAIT_POLICY=ACTIVE")
OPENMP = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "OMP_NUM_THREADS")
UNSET = "import runpy, sys, torch; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"


def spin():
    while True:
        pass


def run(setting, steps, txt_file):
    env = {k: v for k, v in os.environ.items() if k not in OPENMP}
    env.update(kv.split("=", 1) for kv in setting.split(",") if kv != "unset")
    # unset: OpenMP starts with torch, before train.py could choose its policy
    python = [sys.executable, "-c", UNSET] if "unset" in setting.split(",") else [sys.executable]
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        subprocess.run([*python, "train.py", "--preset", "cpu-speedrun", "--max_steps", str(steps),
                        "--eval_interval", str(steps), "--txt_file", txt_file, "--out_dir", out, "--no-resume"],
                       cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--settings", nargs="+", default=SETTINGS,
                        help="environments to compare: unset, or NAME=VALUE[,NAME=VALUE]")
    parser.add_argument("--txt_file", default=os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare.txt"))
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores; {args.steps} steps of --preset cpu-speedrun, {args.rounds} rounds")
    for load in ("idle", "busy"):
        spinner = multiprocessing.Process(target=spin, daemon=True) if load == "busy" else None
        if spinner:
            spinner.start()
        times = {s: [] for s in args.settings}
        try:
            for _ in range(args.rounds):
                for setting in args.settings:
                    times[setting].append(run(setting, args.steps, args.txt_file))
        finally:
            if spinner:
                spinner.terminate()
        first = min(times[args.settings[0]])
        for setting in args.settings:
            shown = ", ".join(f"{t:.1f}" for t in times[setting])
            print(f"{load}: {setting:<26} {shown} s (best {min(times[setting]) / first:.2f}x {args.settings[0]})",
                  flush=True)


if __name__ == "__main__":
    main()
