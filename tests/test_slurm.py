"""
The job scripts in slurm/, run by a real Slurm: a private single-node cluster started for this module
(tests/slurm_cluster.py; it installs Debian's slurm-wlm and munge when they are missing). The jobs run
the shipped scripts unchanged, made CPU-only the way the README tells users of a CPU partition:
sbatch options on the command line (--partition, --gpus=0, --cpus-per-task) and NPROC_PER_NODE for the
multi-process scripts; train.py options after the script name (a tiny model on a small generated text).

The jobs run in a temporary folder holding links to the repository's files (train.py, slurm/, ...), so
that their run folders and log files land there, not in the repository.
"""

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from slurm_cluster import SlurmCluster, apt_install, free_ports  # tests/slurm_cluster.py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(os.path.join("slurm", f) for f in os.listdir(os.path.join(ROOT, "slurm"))
                 if f.endswith((".job", ".sh")))
EXIT_INTERRUPTED = 75

# a tiny model and deterministic settings: dozens of steps per second on one core
TINY = ["--txt_file", "corpus.txt", "--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "32",
        "--dropout", "0", "--precision", "fp32", "--device", "cpu", "--eval_iters", "5", "--sample_length", "20",
        "--log_interval", "5", "--batch_size", "8"]
# the README's overrides for a CPU-only partition (the test cluster's partition is called cpu)
CPU_ONE = ["--partition=cpu", "--gpus=0", "--cpus-per-task=1"]
CPU_NODE = ["--partition=cpu", "--gpus-per-node=0", "--cpus-per-task=2"]  # with NPROC_PER_NODE=2
DONE_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
               "DEADLINE", "PREEMPTED")

pytestmark = pytest.mark.slow  # minutes, and apt installs: runs with --full


@pytest.fixture(scope="module")
def cluster():
    with SlurmCluster() as c:  # stops every daemon and job process it started, also when a test fails
        yield c


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder that looks like the repository to the job scripts (links to its files) and holds the corpus."""
    folder = tmp_path_factory.mktemp("jobs")
    for name in os.listdir(ROOT):
        if name.endswith(".py") or name == "slurm":
            os.symlink(os.path.join(ROOT, name), folder / name)
    words = ("to be or not that is the question whether tis nobler in mind suffer slings and arrows of "
             "outrageous fortune take arms against a sea troubles").split()
    rng = random.Random(0)
    lines = (" ".join(rng.choice(words) for _ in range(10)) for _ in range(3000))
    (folder / "corpus.txt").write_text("\n".join(lines) + "\n")
    return folder


def job_env(cluster, **extra):
    """The submitting shell's environment: this Python first on PATH, and VENV pointing at its environment
    (slurm/site.sh activates it), as a student's shell with the venv active would have."""
    env = dict(cluster.env, PATH=os.path.dirname(sys.executable) + os.pathsep + cluster.env.get("PATH", ""))
    if os.path.exists(os.path.join(sys.prefix, "bin", "activate")):
        env["VENV"] = sys.prefix
    env.update(extra)
    return env


def report(cluster, job_id, *paths):
    """Everything worth reading when an assertion fails: Slurm's view, the daemons' logs, the job's files."""
    parts = [cluster.diagnostics(job_id)]
    for path in paths:
        if os.path.exists(path):
            with open(path, errors="replace") as f:
                parts.append(f"--- {path}\n{f.read()[-4000:]}")
    return "\n".join(parts)


def wait_for_line(path, pattern, timeout, cluster, job_id):
    """Wait until the file has a line matching pattern (the job is then mid-run); the match."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            with open(path, errors="replace") as f:
                match = re.search(pattern, f.read(), re.M)
            if match:
                return match
        info = cluster.job(job_id)
        assert info.get("JobState") not in DONE_STATES, \
            f"job ended before {pattern!r} appeared in {path}\n" + report(cluster, job_id, path)
        time.sleep(0.1)
    pytest.fail(f"no {pattern!r} in {path} after {timeout} s\n" + report(cluster, job_id, path))


def finish(cluster, job_id, files, timeout=180):
    """Wait for the job to end (a requeued job starts again after a few seconds, see CRED_EXPIRE in
    tests/slurm_cluster.py); assert it COMPLETED with exit code 0; its scontrol info."""
    info = cluster.wait_state(job_id, DONE_STATES, timeout=timeout)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", report(cluster, job_id, *files)
    return info


def read(path):
    with open(path, errors="replace") as f:
        return f.read()


def params(run_dir):
    ckpt = torch.load(os.path.join(run_dir, "last.pt"), map_location="cpu", weights_only=True)
    return ckpt["step"], ckpt["model"]


def assert_bitwise_equal(a, b, what):
    diff = {k: (a[k].double() - b[k].double()).abs().max().item() for k in a if not torch.equal(a[k], b[k])}
    assert a.keys() == b.keys() and not diff, f"{what}: parameters differ (max abs difference {diff})"


class Reference:
    """The same training run directly (no Slurm, no interruption), in the background: the run to compare with."""

    def __init__(self, command, cwd, out_dir):
        self.out_dir, self.stderr = str(out_dir), ""
        env = dict(os.environ, OMP_NUM_THREADS="1")  # the threads the jobs get (--cpus-per-task per process)
        self.process = subprocess.Popen([*command, "--out_dir", self.out_dir], cwd=cwd, env=env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def params(self, timeout=180):
        """(step, parameters) of its last.pt, once it has finished."""
        if self.process.returncode is None:
            _, self.stderr = self.process.communicate(timeout=timeout)
        assert self.process.returncode == 0, f"the reference run failed:\n{self.stderr[-3000:]}"
        return params(self.out_dir)

    def kill(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def preempt_and_finish(cluster, job, run_dir, files, max_steps):
    """Once the job is mid-run (its first evaluation is logged, no checkpoint yet), send its batch script the
    signal Slurm sends before a time limit. The job must ask the training to save, requeue itself, wait
    (Slurm holds a requeued job a few seconds), resume from the checkpoint and finish. Its scontrol info."""
    log = os.path.join(run_dir, "train.log")
    wait_for_line(log, r"step 50: train loss", 120, cluster, job)
    cluster.run("scancel", "--signal=USR1", "--batch", job)
    info = finish(cluster, job, [*files, log])
    why = report(cluster, job, *files, log)
    assert info["Restarts"] == "1", why
    out = read(files[0])
    assert "got SIGUSR1" in out and "requeueing the job" in out and "restart 1" in out, why
    stopped = re.search(r"stopped by SIG\w+ at step (\d+); last\.pt written", read(log))
    resumed = re.search(r"resuming \S+last\.pt at step (\d+)", read(log))
    assert stopped and resumed and stopped.group(1) == resumed.group(1), why
    assert 50 <= int(stopped.group(1)) < max_steps, why
    return info


def output_files(workdir, name, job):
    return [str(workdir / f"slurm-{name}-{job}.{ext}") for ext in ("out", "err")]


# ---------------------------------------------------------------------------------------------- one GPU

@pytest.fixture(scope="module")
def train_job(cluster, workdir):
    """train.job on the CPU partition, uninterrupted: (job id, its info, run folder, .out, .err)."""
    job = cluster.sbatch("slurm/train.job", *TINY, "--max_steps", "40", "--eval_interval", "20",
                         options=CPU_ONE, env=job_env(cluster), cwd=workdir)
    out, err = output_files(workdir, "train", job)
    info = finish(cluster, job, [out, err])
    return job, info, str(workdir / "runs" / f"train-{job}"), out, err


def test_train_job_trains_and_fills_its_run_folder(cluster, train_job):
    job, info, run_dir, out, err = train_job
    why = report(cluster, job, out, err)
    assert info["Restarts"] == "0", why
    for name in ("last.pt", "best.pt", "config.json", "tokenizer.json", "train.log"):
        assert os.path.isfile(os.path.join(run_dir, name)), f"no {name} in {run_dir}\n{why}"
    step, _ = params(run_dir)
    assert step == 40, why
    assert "done: best val loss" in read(os.path.join(run_dir, "train.log")), why
    # Slurm's output file: the job script's lines and train.py's log; the error file: the progress bar
    text = read(out)
    assert f"run folder: runs/train-{job}" in text and "training done" in text and "val loss" in text, why
    assert "40/40" in read(err), why
    events = [f for f in os.listdir(run_dir) if f.startswith("events.out.tfevents")]
    assert events, f"no TensorBoard events in {run_dir}\n{why}"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    accumulator = EventAccumulator(run_dir)
    accumulator.Reload()
    assert {"train/loss", "val/loss", "lr"} <= set(accumulator.Tags()["scalars"]), why
    assert [e.step for e in accumulator.Scalars("val/loss")] == [20, 40], why


def test_generate_job_samples_from_the_trained_run(cluster, workdir, train_job):
    run_dir = os.path.relpath(train_job[2], workdir)
    job = cluster.sbatch("slurm/generate.job", "--checkpoint", run_dir, "--prompt", "to be", "--max_new_tokens",
                         "40", "--device", "cpu", options=CPU_ONE, env=job_env(cluster), cwd=workdir)
    out, err = output_files(workdir, "generate", job)
    finish(cluster, job, [out, err], timeout=120)
    # the sample: the prompt and 40 characters, between generate.py's separator and the job's last line
    sample = re.search(r"-+ sample 1 of 1 -+\n(.*)\n\d{4}-\d\d-\d\d [\d:]+ job \d+: generate.py exited with code 0",
                       read(out), re.S)
    assert sample and sample.group(1).startswith("to be") and len(sample.group(1)) >= 45, \
        report(cluster, job, out, err)


def test_train_job_preempted_requeues_itself_and_resumes_bitwise(cluster, workdir, tmp_path):
    args = [*TINY, "--max_steps", "300", "--eval_interval", "50", "--checkpoint_interval", "1000"]
    reference = Reference([sys.executable, "train.py", *args], workdir, tmp_path / "reference")
    try:
        job = cluster.sbatch("slurm/train.job", *args, options=CPU_ONE, env=job_env(cluster), cwd=workdir)
        run_dir = str(workdir / "runs" / f"train-{job}")
        preempt_and_finish(cluster, job, run_dir, output_files(workdir, "train", job), 300)
        step, resumed = params(run_dir)
        reference_step, uninterrupted = reference.params()
    finally:
        reference.kill()
    assert step == reference_step == 300
    assert_bitwise_equal(resumed, uninterrupted, "preempted job vs uninterrupted run")


# ---------------------------------------------------------------------------------------- several processes

# 2 processes x batch 4: the same global batch of 8 as the single-process jobs (the last --batch_size wins)
MULTI = [*TINY, "--batch_size", "4", "--max_steps", "300", "--eval_interval", "50", "--checkpoint_interval", "1000"]


@pytest.fixture(scope="module")
def ddp_reference(workdir, tmp_path_factory):
    """The 2-process training of the multi-process jobs, run directly with torchrun (gloo), uninterrupted."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
               *MULTI]
    reference = Reference(command, workdir, tmp_path_factory.mktemp("ddp") / "reference")
    yield reference
    reference.kill()


def test_multigpu_job_runs_two_processes_preempted_and_resumes_bitwise(cluster, workdir, ddp_reference):
    """train_multigpu.job with 2 CPU processes (torchrun --standalone, DDP over gloo): preempted, torchrun
    passes the SIGTERM on to both processes, process 0 writes last.pt, the job requeues itself and ends
    with the parameters of the uninterrupted run."""
    job = cluster.sbatch("slurm/train_multigpu.job", *MULTI, options=CPU_NODE,
                         env=job_env(cluster, NPROC_PER_NODE="2"), cwd=workdir)
    run_dir = str(workdir / "runs" / f"train-multigpu-{job}")
    files = output_files(workdir, "train-multigpu", job)
    preempt_and_finish(cluster, job, run_dir, files, 300)
    assert "2 processes x 1 threads" in read(files[0]), report(cluster, job, *files)
    assert "cpu fp32 x 2 | global batch 8 x 32" in read(os.path.join(run_dir, "train.log")), \
        report(cluster, job, *files)
    step, resumed = params(run_dir)
    reference_step, uninterrupted = ddp_reference.params()
    assert step == reference_step == 300
    assert_bitwise_equal(resumed, uninterrupted, "preempted multigpu job vs uninterrupted torchrun")


def test_multinode_job_warned_then_preempted_resumes_bitwise(cluster, workdir, ddp_reference):
    """train_multinode.job (srun + torchrun, c10d rendezvous on the first node; here the only one) with the
    same 2 processes, interrupted twice. First the time-limit warning: the script has Slurm send SIGUSR1 to
    every process of the srun step (scancel --signal=USR1); torchrun ignores it, the train.py processes save
    and exit, the job requeues itself. Then, once resumed, a preemption that requeues the job (`scontrol
    requeue`, what PreemptMode=REQUEUE does): Slurm sends SIGTERM to every process of the job, srun and
    torchrun included; train.py still writes last.pt, the script leaves the requeue to Slurm, and the job
    ends with the parameters of the uninterrupted run. What only a real cluster shows: a checkpoint that
    takes longer to write than the preemption's grace time (KillWait, GraceTime) is lost."""
    # RDZV_PORT: the script's override of its rendezvous port, here one that is free right now
    job = cluster.sbatch("slurm/train_multinode.job", *MULTI, options=["--nodes=1", *CPU_NODE],
                         env=job_env(cluster, NPROC_PER_NODE="2", RDZV_PORT=str(free_ports(1)[0])), cwd=workdir)
    run_dir = str(workdir / "runs" / f"train-multinode-{job}")
    files = output_files(workdir, "train-multinode", job)
    log = os.path.join(run_dir, "train.log")
    wait_for_line(log, r"step 50: train loss", 120, cluster, job)
    cluster.run("scancel", "--signal=USR1", "--batch", job)
    wait_for_line(log, r"resuming .*\n(.*\n)*?.*step \d+: train loss", 120, cluster, job)  # an evaluation since
    cluster.scontrol("requeue", job)
    info = finish(cluster, job, [*files, log])
    why = report(cluster, job, *files, log)
    out, text = read(files[0]), read(log)
    assert info["Restarts"] == "2" and "1 nodes x 2 processes x 1 threads, rendezvous" in out, why
    assert "got SIGUSR1" in out and "requeueing the job" in out and "restart 2" in out, why
    assert "got SIGTERM" in out and "Slurm ends the job" in out, why
    stopped = re.findall(r"stopped by (SIG\w+) at step (\d+); last\.pt written", text)
    resumed = re.findall(r"resuming \S+last\.pt at step (\d+)", text)
    assert [signal for signal, _ in stopped] == ["SIGUSR1", "SIGTERM"], why
    assert [step for _, step in stopped] == resumed and 50 <= int(resumed[0]) < int(resumed[1]) < 300, why
    step, resumed = params(run_dir)
    reference_step, uninterrupted = ddp_reference.params()
    assert step == reference_step == 300
    assert_bitwise_equal(resumed, uninterrupted, "interrupted multinode job vs uninterrupted torchrun")


# ---------------------------------------------------------------------------------------------- the scripts

FAKE_TRAINING = r"""
import os, signal, sys, time
folder = os.environ["DIR"]
def log(line):
    with open(os.path.join(folder, "log"), "a") as f:
        f.write(line + "\n")
stop = []
for s in (signal.SIGUSR1, signal.SIGTERM):  # like train.py's handlers (the USR1 one replaces an inherited ignore)
    signal.signal(s, lambda n, _: (log("got " + signal.Signals(n).name[3:]), stop.append(1)))
with open(os.path.join(folder, "pid"), "w") as f:
    f.write(str(os.getpid()))
log("started")
while not stop and not os.path.exists(os.path.join(folder, "finish")):
    time.sleep(0.05)
if not stop:
    sys.exit(int(os.environ["EXIT_CODE"]))
time.sleep(1)  # writing the checkpoint takes a while: the job must wait for it
log("saved")
sys.exit(75)
"""
STUB = '#!/bin/bash\necho "$(basename "$0") $*" >> "$DIR/log"\n'
STUBS = {  # stand-ins for Slurm's commands and torchrun
    "scontrol": 'if [ "$1" = show ]; then echo "JobId=$SLURM_JOB_ID JobState=$JOB_STATE Reason=None"; exit 0; fi\n'
                'exit "$REQUEUE_CODE"\n',
    "scancel": 'kill -USR1 "$(cat "$DIR/pid")"\n',  # scancel --signal=USR1 JOBID: Slurm signals the step's processes
    "torchrun": '"$PYTHON" "$DIR/fake_training.py" || exit 1\n',  # torchrun reports a failed process with 1
}


@pytest.mark.parametrize("case", ["signal", "signal-torchrun", "signal-srun", "cancelled", "requeue-refused",
                                  "done", "failed"])
def test_run_resumable_waits_for_the_checkpoint_then_requeues(tmp_path, case):
    """slurm/resumable.sh alone, with a stand-in for the training and for scontrol/scancel/torchrun: on
    SIGUSR1 (the time-limit warning) it asks the training to stop with SIGUSR1 (to the training itself, to
    torchrun's processes, or through scancel to the srun steps; torchrun and srun must ignore it), waits
    for it to really end (bash's `wait` returns early on a trapped signal), requeues only a stopped training
    of a job Slurm still runs (not a cancelled one: SIGTERM to every process) and ends with the right exit
    status."""
    (tmp_path / "fake_training.py").write_text(FAKE_TRAINING)
    (tmp_path / "bin").mkdir()
    for name, body in STUBS.items():
        (tmp_path / "bin" / name).write_text(STUB + body)
        os.chmod(tmp_path / "bin" / name, 0o755)
    env = dict(os.environ, DIR=str(tmp_path), SLURM_JOB_ID="4242", PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}",
               PYTHON=sys.executable, EXIT_CODE="2" if case == "failed" else "0",
               JOB_STATE="COMPLETING" if case == "cancelled" else "RUNNING",
               REQUEUE_CODE="1" if case == "requeue-refused" else "0")
    training = {"signal-torchrun": "torchrun", "signal-srun": "--srun torchrun"}.get(case, sys.executable)
    command = f"source slurm/resumable.sh; run_resumable {training} {tmp_path}/fake_training.py"
    job = subprocess.Popen(["bash", "-c", command], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 20
        while not (tmp_path / "pid").exists() or "started" not in (tmp_path / "log").read_text():
            assert time.monotonic() < deadline and job.poll() is None, "the stand-in training did not start"
            time.sleep(0.05)
        if case in ("done", "failed"):
            (tmp_path / "finish").touch()
        elif case == "cancelled":  # scancel: Slurm sends SIGTERM to every process of the job
            job.send_signal(signal.SIGTERM)
            os.kill(int((tmp_path / "pid").read_text()), signal.SIGTERM)
        else:  # what Slurm sends the job script before the time limit (--signal=B:USR1@...)
            job.send_signal(signal.SIGUSR1)
        output, _ = job.communicate(timeout=20)
    finally:
        if job.poll() is None:
            job.kill()
    log = [line for line in (tmp_path / "log").read_text().split("\n") if line]
    launched = {"signal-torchrun": ["torchrun " + str(tmp_path / "fake_training.py")],
                "signal-srun": ["torchrun " + str(tmp_path / "fake_training.py")]}.get(case, [])
    stopped = ["got USR1", "saved", "scontrol show job 4242"]
    expected = {"signal": (0, ["started", *stopped, "scontrol requeue 4242"]),
                "signal-torchrun": (0, [*launched, "started", *stopped, "scontrol requeue 4242"]),
                "signal-srun": (0, [*launched, "started", "scancel --signal=USR1 4242", *stopped,
                                    "scontrol requeue 4242"]),
                "cancelled": (EXIT_INTERRUPTED, ["started", "got TERM", *stopped[1:]]),
                "requeue-refused": (EXIT_INTERRUPTED, ["started", *stopped, "scontrol requeue 4242"]),
                "done": (0, ["started"]),
                "failed": (2, ["started"])}[case]
    assert (job.returncode, log) == expected, output


def test_scripts_pass_bash_n_and_shellcheck():
    apt_install(["shellcheck"], ["shellcheck"])
    assert {"slurm/train.job", "slurm/train_multigpu.job", "slurm/train_multinode.job",
            "slurm/generate.job"} <= set(SCRIPTS)
    for script in SCRIPTS:
        syntax = subprocess.run(["bash", "-n", script], cwd=ROOT, capture_output=True, text=True)
        assert syntax.returncode == 0 and not syntax.stderr, f"bash -n {script}:\n{syntax.stderr}"
    lint = subprocess.run([shutil.which("shellcheck"), *SCRIPTS], cwd=ROOT, capture_output=True, text=True)
    assert lint.returncode == 0 and not lint.stdout and not lint.stderr, f"shellcheck:\n{lint.stdout}{lint.stderr}"


@pytest.mark.parametrize("script", ["slurm/train.job", "slurm/train_multigpu.job", "slurm/train_multinode.job"])
def test_training_scripts_ask_for_the_warning_signal_and_requeue(script):
    text = read(os.path.join(ROOT, script))
    for directive in ("#SBATCH --signal=B:USR1@", "#SBATCH --requeue", "#SBATCH --open-mode=append",
                      "#SBATCH --output=slurm-%x-%j.out", "#SBATCH --error=slurm-%x-%j.err",
                      "source slurm/site.sh", "source slurm/resumable.sh", "run_resumable "):
        assert directive in text, f"{script} lacks {directive!r}"
    # the site-specific settings come first, in one marked block
    assert text.index("YOUR SITE") < text.index("#SBATCH --partition") < text.index("#SBATCH --job-name")
