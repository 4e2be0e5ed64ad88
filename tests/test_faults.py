"""Faults and bad input, for real: a full disk (a small tmpfs, as root), a read-only file system, a file size
limit, kill -9 in the middle of a save, Ctrl-C twice, damaged checkpoints, unwritable outputs. Every case checks
the documented exit code, exactly one `error:` line and no traceback, no temporary file left behind, and that
the checkpoints written before are intact: they load with weights_only=True and the run resumes from them."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import cfg
import corpus
import generate
import train
from test_train import ENV, ROOT, TRAIN, tiny

GENERATE = os.path.join(ROOT, "generate.py")
CHECKPOINT_BYTES = 1_200_000  # a tiny run's checkpoint is about 1.1 MB


def run(script, args, timeout=120, **kwargs):
    return subprocess.run([sys.executable, script, *args], env=ENV, capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def train_here(capsys, args):
    """train.py in this process, for runs that must stop before training starts."""
    with pytest.raises(SystemExit) as exit_:
        train.main(list(map(str, args)))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, exit_.value.code, out, err)


def assert_fails(result, code, expected):
    """Exit code `code`, one `error:` line holding `expected`, no traceback."""
    everything = result.stdout + result.stderr
    assert result.returncode == code, everything[-3000:]
    errors = [line for line in re.split(r"[\r\n]", result.stderr) if line.startswith("error: ")]  # \r: progress bar
    assert len(errors) == 1 and expected in errors[0], everything[-3000:]
    assert "Traceback" not in everything and "Exception" not in everything, everything[-3000:]


def temporaries(folder):
    return [name for name in os.listdir(folder) if name.endswith(".tmp")]


def steps(run_dir):
    """{'last.pt': step, 'best.pt': step}: each checkpoint loads without unpickling."""
    return {name: torch.load(run_dir / name, map_location="cpu", weights_only=True)["step"]
            for name in ("last.pt", "best.pt") if (run_dir / name).exists()}


def assert_resumes(corpus, run_dir, max_steps, *extra):
    result = run(TRAIN, tiny(corpus, run_dir, "--max_steps", str(max_steps), *extra))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming" in result.stdout and steps(run_dir)["last.pt"] == max_steps
    assert not temporaries(run_dir)


@pytest.fixture(scope="module")
def base_run(corpus, tmp_path_factory):
    """A finished tiny run of 20 steps: last.pt and best.pt of step 20."""
    run_dir = tmp_path_factory.mktemp("base") / "run"
    result = run(TRAIN, tiny(corpus, run_dir, "--max_steps", "20", "--eval_interval", "10"))
    assert result.returncode == 0, result.stderr
    assert steps(run_dir) == {"last.pt": 20, "best.pt": 20}
    return run_dir


@pytest.fixture
def previous(base_run, tmp_path):
    """A copy of base_run to spoil."""
    return shutil.copytree(base_run, tmp_path / "run")


def require_root():
    if os.geteuid() != 0:
        if os.environ.get("MICROGPT_REQUIRE_ROOT") == "1":
            pytest.fail("MICROGPT_REQUIRE_ROOT=1 but not root: cannot mount a tmpfs")
        pytest.skip("mounting a small tmpfs (a disk that fills up, a read-only one) needs root")


@pytest.fixture
def small_disk(tmp_path):
    """mount(size) -> a folder on a fresh tmpfs of that many bytes; unmounted at the end."""
    require_root()
    mounted = []

    def mount(size, name="disk"):
        folder = tmp_path / name
        folder.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder, leave=0):
    """Fill the file system of folder up to `leave` free bytes."""
    with open(folder / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    if leave:
        os.truncate(folder / "filler", max(0, os.path.getsize(folder / "filler") - leave))


def half_a_checkpoint_at_most():
    """Like `ulimit -f`: writes past half a checkpoint fail with EFBIG (SIGXFSZ ignored, as shells do)."""
    import resource  # POSIX only: imported here so that the quick tests run on Windows too

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (CHECKPOINT_BYTES // 2, CHECKPOINT_BYTES // 2))


def wait_for(condition, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.005)
    raise AssertionError("timed out")


def logged(run_dir, text):
    log = run_dir / "train.log"
    return log.exists() and text in log.read_text()


# ----------------------------------------------------------------------------- the run folder cannot be written

def test_out_dir_under_proc(corpus, capsys):
    assert_fails(train_here(capsys, tiny(corpus, "/proc/micro-gpt-run")), cfg.EXIT_IO, "cannot write /proc/micro-gpt-run")


def test_out_dir_under_a_regular_file(corpus, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert_fails(train_here(capsys, tiny(corpus, tmp_path / "file" / "run")), cfg.EXIT_IO,
                 f"{tmp_path}/file is a file, not a folder; pass another --out_dir")
    assert os.listdir(tmp_path) == ["file"]


def test_read_only_file_system_fresh_run(corpus, small_disk, capsys):
    disk = small_disk("16m")
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    assert_fails(train_here(capsys, tiny(corpus, disk / "run")), cfg.EXIT_IO, "read-only")


@pytest.mark.slow
def test_read_only_file_system_resumed_run_keeps_its_checkpoints(corpus, base_run, small_disk):
    disk = small_disk("16m")
    run_dir = shutil.copytree(base_run, disk / "run")
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    assert_fails(run(TRAIN, tiny(corpus, run_dir, "--max_steps", "30")), cfg.EXIT_IO, "read-only")
    assert steps(run_dir) == {"last.pt": 20, "best.pt": 20}
    subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)
    assert_resumes(corpus, run_dir, 30)


def test_no_room_for_the_checkpoints_is_found_before_training(corpus, small_disk, capsys):
    disk = small_disk("2m")  # a checkpoint is ~1.1 MB: best.pt, last.pt and a temporary copy do not fit
    result = train_here(capsys, tiny(corpus, disk / "run"))
    assert_fails(result, cfg.EXIT_IO, "MB free where this run's checkpoints need about")
    assert "free some space or pass another --out_dir" in result.stderr
    assert os.listdir(disk) == []  # nothing written, not even the folder


@pytest.mark.slow
@pytest.mark.parametrize("leave", [256 * 1024, 0], ids=["checkpoint-does-not-fit", "nothing-fits"])
def test_disk_fills_up_during_training(corpus, small_disk, leave):
    disk = small_disk("8m")
    run_dir = disk / "run"
    process = subprocess.Popen([sys.executable, TRAIN, *tiny(corpus, run_dir, "--max_steps", "100000",
                                                             "--checkpoint_interval", "10", "--eval_interval", "10")],
                               env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: logged(run_dir, " step 20 loss"))
        process.send_signal(signal.SIGSTOP)  # fill the disk while the run is frozen
        before = steps(run_dir)
        fill(disk, leave)
    finally:
        process.send_signal(signal.SIGCONT)
    stdout, stderr = process.communicate(timeout=60)
    assert_fails(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr), cfg.EXIT_IO,
                 "No space left on device; free some space or pass another --out_dir")
    assert steps(run_dir) == before and not temporaries(run_dir)
    if leave:  # room for a line of log, not for a checkpoint; then space again: the run resumes
        assert "error: cannot write" in (run_dir / "train.log").read_text()
        os.unlink(disk / "filler")
        assert_resumes(corpus, run_dir, before["last.pt"] + 10)


@pytest.mark.slow
def test_checkpoint_over_the_file_size_limit(corpus, previous):
    result = run(TRAIN, tiny(corpus, previous, "--max_steps", "40", "--checkpoint_interval", "10"),
                 preexec_fn=half_a_checkpoint_at_most)
    assert_fails(result, cfg.EXIT_IO, "larger than the file size limit")
    assert steps(previous) == {"last.pt": 20, "best.pt": 20} and not temporaries(previous)
    assert "error: cannot write" in (previous / "train.log").read_text()
    assert_resumes(corpus, previous, 40)


@pytest.mark.slow
def test_a_failed_save_stops_every_ddp_process_with_74(corpus, tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             TRAIN, *tiny(corpus, run_dir, "--max_steps", "30", "--batch_size", "4")],
                            env=ENV, capture_output=True, text=True, timeout=120,
                            preexec_fn=half_a_checkpoint_at_most)
    # process 0 could not write best.pt: both processes stop together (none waits for the other), exit 74
    assert result.returncode != 0 and result.stderr.count("exitcode  : 74") == 2, result.stderr[-3000:]
    assert result.stderr.count("error: cannot write") == 1 and not temporaries(run_dir)
    assert "error: cannot write" in (run_dir / "train.log").read_text()


# ----------------------------------------------------------------------------- killed and interrupted

@pytest.mark.slow
def test_kill_9_during_a_save_leaves_a_temporary_file_that_the_next_run_removes(corpus, tmp_path):
    run_dir = tmp_path / "run"
    process = subprocess.Popen([sys.executable, TRAIN, *tiny(corpus, run_dir, "--max_steps", "100000",
                                                             "--checkpoint_interval", "1")],
                               env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:  # kill it while it writes a checkpoint over an earlier one (it writes one every step)
        wait_for(lambda: process.poll() is not None or (
            (run_dir / "last.pt").exists() and any(name.startswith(".last.pt.") for name in temporaries(run_dir))),
            timeout=60)
    finally:
        process.kill()
        process.wait()
    stale = temporaries(run_dir)
    assert len(stale) == 1 and stale[0].startswith(".last.pt."), stale
    killed_at = steps(run_dir)["last.pt"]  # the checkpoint beside the half-written one is whole
    result = run(TRAIN, tiny(corpus, run_dir, "--max_steps", str(killed_at + 5)))
    assert result.returncode == 0, result.stderr
    assert f"removed 1 temporary file(s) of an interrupted save: {stale[0]}" in result.stdout
    assert f"resuming {run_dir}/last.pt at step {killed_at}" in result.stdout and not temporaries(run_dir)


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once_with_130(corpus, tmp_path):
    run_dir = tmp_path / "run"
    larger = ["--model_type", "gpt-micro", "--checkpoint_interval", "10"]  # 0.8M parameters: slower steps and saves
    process = subprocess.Popen([sys.executable, TRAIN, *tiny(corpus, run_dir, "--max_steps", "100000", *larger)],
                               env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: logged(run_dir, " step 20 loss"))
    process.send_signal(signal.SIGINT)
    time.sleep(0.005)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    assert_fails(result, cfg.EXIT_ABORTED, "stopped at once by a second Ctrl-C")
    assert steps(run_dir)["last.pt"] >= 10 and not temporaries(run_dir)  # step 10's or a later one
    assert_resumes(corpus, run_dir, steps(run_dir)["last.pt"] + 5, *larger)


# ----------------------------------------------------------------------------- damaged or foreign checkpoints

@pytest.mark.slow
def test_truncated_last_pt_points_at_the_intact_best_pt(corpus, previous):
    with open(previous / "last.pt", "r+b") as f:
        f.truncate(1000)
    result = run(TRAIN, tiny(corpus, previous, "--max_steps", "30"))
    assert_fails(result, cfg.EXIT_USAGE, f"cannot read {previous}/last.pt")
    assert f"{previous}/best.pt (step 20) is intact: `cp {previous}/best.pt {previous}/last.pt`" in result.stderr
    shutil.copy(previous / "best.pt", previous / "last.pt")
    assert_resumes(corpus, previous, 30)


def test_truncated_last_pt_without_best_pt(corpus, previous, capsys):
    os.unlink(previous / "best.pt")
    with open(previous / "last.pt", "r+b") as f:
        f.truncate(1000)
    assert_fails(train_here(capsys, tiny(corpus, previous)), cfg.EXIT_USAGE, "or pass --no-resume to start afresh")


def test_last_pt_of_another_text(corpus, previous, tmp_path, capsys):
    other = tmp_path / "other.txt"
    other.write_text(open(corpus).read() + "\nZebras? Quixotic!\n")
    assert_fails(train_here(capsys, tiny(str(other), previous)), cfg.EXIT_USAGE,
                 f"{previous}/last.pt was trained on another text ({corpus}): this one has unknown character(s)")


@pytest.mark.slow
def test_loss_turns_nan_before_any_checkpoint(corpus, tmp_path):
    result = run(TRAIN, tiny(corpus, tmp_path / "run", "--max_steps", "40", "--learning_rate", "1e30", "--min_lr",
                             "0", "--warmup_steps", "0", "--grad_clip", "0"))
    assert_fails(result, cfg.EXIT_FAILED, "stopped without saving (no checkpoint was written)")
    assert "error: the training loss became" in (tmp_path / "run" / "train.log").read_text()


# ----------------------------------------------------------------------------- the first run

@pytest.mark.slow
def test_text_without_a_newline_samples_from_its_first_character(tmp_path):
    text = tmp_path / "one-line.txt"
    text.write_text("to_be_or_not_to_be_that_is_the_question_" * 200)
    result = run(TRAIN, tiny(str(text), tmp_path / "run", "--max_steps", "5", "--eval_interval", "5"))
    assert result.returncode == 0, result.stderr
    assert "sample at step 5:\n_" in result.stdout  # "_" sorts first
    sampled = run(GENERATE, ["--checkpoint", str(tmp_path / "run"), "--max_new_tokens", "5"])  # the same default
    assert sampled.returncode == 0 and "sample 1 of 1 ------------------------------\n_" in sampled.stdout, sampled.stderr


def test_default_corpus_and_its_run_folder_follow_one_rule(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "DATA_DIR", str(tmp_path))
    (tmp_path / "shakespeare_gutenberg.txt").write_text("Shakespeare's works, the fallback\n" * 50)
    small = ["--model_type", "gpt-nano", "--block_size", "16", "--batch_size", "4", "--device", "cpu"]
    found = train.setup(small)
    assert found.cfg.out_dir == os.path.join("runs", "shakespeare_gutenberg-gpt-nano") and "offline fallback" in found.text
    (tmp_path / "tinyshakespeare.txt").write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 50)
    found = train.setup(small)
    assert found.cfg.out_dir == os.path.join("runs", "tinyshakespeare-gpt-nano") and "tiny shakespeare" in found.text


def test_files_are_created_with_the_umask_modes(base_run):
    modes = {name: os.stat(base_run / name).st_mode & 0o777 for name in ("config.json", "tokenizer.json", "last.pt")}
    umask = os.umask(0)
    os.umask(umask)
    assert set(modes.values()) == {0o666 & ~umask}, modes


@pytest.mark.slow
def test_epochs_alias_and_log_of_passes(tmp_path):
    text = tmp_path / "short.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 100)  # 4400 characters: 15 steps an epoch
    result = run(TRAIN, tiny(str(text), tmp_path / "run", "--num_epochs", "1", "--train_batch_size", "256",
                             "--clip_grad_norm", "0.5", "--no_resume", "--eval_iters", "1", "--sample_length", "0"))
    assert result.returncode == 0, result.stderr
    config = cfg.parse_config(["--num_epochs", "1", "--no_resume", "--device", "cpu"])
    assert (config.epochs, config.resume) == (1, False)
    # one pass over the 3960 - 32 training windows of 32 characters: 15 x 256 x 32 characters, 31 times the text
    assert "15 steps = 1.00 epochs (passes over every window) = 31.0 passes over the text" in result.stdout


# ----------------------------------------------------------------------------- generate.py (run in this process)

def sample(capsys, *args):
    code = generate.main(list(map(str, args)))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def test_each_tool_lists_its_own_exit_codes(capsys):
    for tool, codes in ((train, "74 a file could not be written"), (generate, "74 --output or --attention_map could not be written")):
        with pytest.raises(SystemExit):
            tool.main(["--help"])
        help_text = capsys.readouterr().out
        assert codes in help_text and "130" in help_text and "Ctrl-C" in help_text
        assert ("--preset cpu-speedrun:" in help_text) == (tool is train)


def test_generate_says_which_checkpoint_it_samples_from(base_run, capsys):
    result = sample(capsys, "--checkpoint", base_run, "--max_new_tokens", "5")
    assert result.returncode == 0, result.stderr
    assert f"sampling from {base_run}/best.pt (step 20, best val loss" in result.stderr


def test_generate_falls_back_on_last_pt_when_best_pt_is_damaged(previous, capsys):
    (previous / "best.pt").write_bytes(b"not a checkpoint")
    result = sample(capsys, "--checkpoint", previous, "--max_new_tokens", "5")
    assert result.returncode == 0, result.stderr
    assert f"warning: cannot read {previous}/best.pt" in result.stderr
    assert f"sampling from {previous}/last.pt (step 20" in result.stderr


@pytest.mark.parametrize("where", ["/proc/samples.txt", "{tmp}/file/samples.txt"])
def test_generate_checks_output_before_sampling(base_run, tmp_path, capsys, where):
    (tmp_path / "file").write_text("x")
    result = sample(capsys, "--checkpoint", base_run, "--output", where.format(tmp=tmp_path))
    assert_fails(result, cfg.EXIT_IO, "cannot write --output")
    assert result.stdout == ""  # nothing sampled


def test_generate_makes_the_output_folder(base_run, tmp_path, capsys):
    result = sample(capsys, "--checkpoint", base_run, "--output", tmp_path / "new" / "samples.txt", "--max_new_tokens", 5)
    assert result.returncode == 0 and (tmp_path / "new" / "samples.txt").read_text() == result.stdout


def test_generate_output_on_a_read_only_file_system(base_run, small_disk, capsys):
    disk = small_disk("1m")
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    result = sample(capsys, "--checkpoint", base_run, "--output", disk / "samples.txt")
    assert_fails(result, cfg.EXIT_IO, "Read-only file system")
    assert result.stdout == ""


def test_generate_output_on_a_full_disk(base_run, small_disk, capsys):
    disk = small_disk("256k")
    fill(disk)
    result = sample(capsys, "--checkpoint", base_run, "--output", disk / "samples.txt", "--max_new_tokens", "50")
    assert_fails(result, cfg.EXIT_IO, "No space left on device; the samples are printed above")
    assert "sample 1 of 1" in result.stdout and os.listdir(disk) == ["filler"]


@pytest.mark.parametrize("args, expected", [
    (["--top_k", "1000"], "--top_k 1000 is more than the model's vocabulary of"),
    (["--temperature", "inf"], "--temperature must be a finite number"),
    (["--temperature", "nan"], "--temperature must be a finite number"),
    (["--prompt", "FILE:/nonexistent/prompt.txt"], "--prompt FILE:/nonexistent/prompt.txt does not exist"),
    (["--prompt", "FILE:{bin}"], "is a binary file, not text"),
])
def test_generate_bad_values(base_run, tmp_path, capsys, args, expected):
    (tmp_path / "bin").write_bytes(bytes(range(256)))
    args = [a.format(bin=tmp_path / "bin") for a in args]
    assert_fails(sample(capsys, "--checkpoint", base_run, *args), cfg.EXIT_USAGE, expected)


def test_generate_both_spellings_of_a_negative_switch_and_old_names(base_run, capsys):
    outputs = [sample(capsys, "--model_weights_folder", base_run, "--num_generated_tokens", "30", flag)
               for flag in ("--no-kv_cache", "--no_kv_cache", "--kv_cache")]
    assert all(r.returncode == 0 for r in outputs), outputs[0].stderr
    assert outputs[0].stdout == outputs[1].stdout == outputs[2].stdout and len(outputs[0].stdout) > 30


def test_pretrained_folder_with_a_bad_config_names_the_file(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{ not json")
    assert_fails(sample(capsys, "--pretrained", tmp_path), cfg.EXIT_USAGE,
                 f"{tmp_path}/config.json is not the config.json of a GPT-2 model")


@pytest.mark.slow
def test_pretrained_offline_suggests_a_local_folder(tmp_path):
    env = dict(ENV, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))  # read when huggingface_hub is imported
    result = subprocess.run([sys.executable, GENERATE, "--pretrained", "gpt2"], env=env, capture_output=True,
                            text=True, timeout=120)
    assert_fails(result, cfg.EXIT_USAGE, "cannot download gpt2 from Hugging Face")
    assert "pass a local folder instead" in result.stderr


@pytest.mark.slow
def test_ctrl_c_during_sampling_is_one_line(base_run):
    process = subprocess.Popen([sys.executable, GENERATE, "--checkpoint", str(base_run), "--max_new_tokens",
                                "1000000", "--stream"], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    while "sample 1 of 1" not in process.stdout.readline():  # sampling has started
        pass
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert_fails(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr), cfg.EXIT_ABORTED,
                 "stopped by Ctrl-C")
