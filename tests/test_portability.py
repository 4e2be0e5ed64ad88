"""Portability: what Windows (cmd, PowerShell) and macOS do differently from Linux, simulated on Linux for real
(the project's code runs unchanged, in subprocesses, as students run it).

A "simulated Windows" Python is Linux's Python with a sitecustomize.py first on PYTHONPATH that removes what
Windows' Python lacks (SIGUSR1, SIGHUP, SIGALRM, SIGKILL and the other POSIX signals, signal.alarm and
pthread_sigmask, os.fchmod, errno.EDQUOT), makes "spawn" the multiprocessing start method (Windows' and macOS's
default: DataLoader workers start a fresh interpreter and re-import train.py) and runs with PYTHONIOENCODING=cp1252
and stdout/stderr as pipes (a console that cannot encode most of Unicode). PYTHONWARNDEFAULTENCODING=1 reports
every open() without an encoding (Windows would read and write such a file in cp1252). Each process of the
simulation writes what it saw (MICROGPT_SIMULATED_WINDOWS) so that the tests check the simulation took effect in
train.py and in its DataLoader workers, not only in a test's own probe.

What only the real systems show is not simulated here: Windows' console code pages and its Ctrl-C/Ctrl-Break
events, its file locking (an editor or a virus scanner holding a checkpoint open), its paths (drive letters,
backslashes, 260-character limits), and macOS's MPS; the GitHub workflow (.github/workflows/ci.yml) runs the
quick tests and the README's commands on windows-latest and macos-latest.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from instructor import release
from test_faults import assert_fails, steps, temporaries, wait_for
from test_train import ENV, ROOT, TRAIN, tiny

# test_instructor.py (the `built` fixture) runs on Linux only (tests/conftest.py): this file's quick tests run on the
# GitHub workflow's Windows and macOS legs too, so it builds the release itself (below).
GENERATE = os.path.join(ROOT, "generate.py")
ODD = "\u2192 \u6771"  # "→ 東": characters cp1252 cannot encode (the console shows their escapes)

SITECUSTOMIZE = '''\
"""A simulated Windows Python (tests/test_portability.py): what Windows' Python lacks, removed from Linux's."""
import errno
import json
import multiprocessing
import os
import signal
import sys

WINDOWS_SIGNALS = {"SIGINT", "SIGTERM", "SIGABRT", "SIGFPE", "SIGILL", "SIGSEGV", "SIGBREAK"}
# Read by PyTorch's DataLoader on Linux (its own check is sys.platform, which stays "linux"), never on Windows:
# removing it would only break PyTorch's Linux code path.
LINUX_PATHS_OF_LIBRARIES = {"SIGCHLD"}
for name in dir(signal):
    if ((name.startswith("SIG") and not name.startswith("SIG_") or name in ("SIG_BLOCK", "SIG_UNBLOCK", "SIG_SETMASK"))
            and name not in WINDOWS_SIGNALS | LINUX_PATHS_OF_LIBRARIES):
        delattr(signal, name)
for name in ("alarm", "pause", "setitimer", "getitimer", "siginterrupt", "pthread_kill", "pthread_sigmask",
             "sigpending", "sigwait", "sigwaitinfo", "sigtimedwait", "ITIMER_REAL", "ITIMER_VIRTUAL", "ITIMER_PROF"):
    if hasattr(signal, name):
        delattr(signal, name)
signal.SIGBREAK = getattr(signal, "SIGBREAK", 21)  # Ctrl-Break (21 is SIGTTIN on Linux: harmless if installed)
# os.getuid, os.fork, os.register_at_fork and os.uname stay: getpass, PyTorch and NumPy use them on Linux
for name in ("fchmod", "lchmod", "fchown", "lchown", "killpg", "getpgid", "setsid", "sync", "getloadavg",
             "sched_getaffinity"):
    if hasattr(os, name):
        delattr(os, name)
if hasattr(errno, "EDQUOT"):
    del errno.EDQUOT
multiprocessing.set_start_method("spawn", force=True)

if os.environ.get("MICROGPT_SIMULATED_WINDOWS"):  # what this process saw, for the tests to check
    with open(os.path.join(os.environ["MICROGPT_SIMULATED_WINDOWS"], f"{os.getpid()}.json"), "w",
              encoding="utf-8") as f:
        json.dump({"argv": sys.orig_argv, "SIGUSR1": hasattr(signal, "SIGUSR1"), "fchmod": hasattr(os, "fchmod"),
                   "EDQUOT": hasattr(errno, "EDQUOT"), "start_method": multiprocessing.get_start_method(),
                   "stdout": sys.stdout.encoding if sys.stdout else None}, f)
'''


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The folder of the simulation's sitecustomize.py."""
    folder = tmp_path_factory.mktemp("simulated-windows")
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE, encoding="utf-8")
    return folder


@pytest.fixture
def windows(site, tmp_path):
    """The environment of a simulated Windows Python; its processes report into windows["reports"]."""
    reports = tmp_path / "reports"
    reports.mkdir()
    env = {k: v for k, v in ENV.items() if k not in ("PYTHONUTF8", "PYTHONLEGACYWINDOWSSTDIO")}
    env.update(PYTHONPATH=os.pathsep.join(p for p in (str(site), ENV.get("PYTHONPATH")) if p),
               PYTHONIOENCODING="cp1252", PYTHONWARNDEFAULTENCODING="1", MICROGPT_SIMULATED_WINDOWS=str(reports))
    return {"env": env, "reports": reports}


def reports(folder):
    """What each process of the simulation saw: [{argv, SIGUSR1, fchmod, EDQUOT, start_method, stdout}]."""
    return [json.loads(path.read_text(encoding="utf-8")) for path in folder.iterdir()]


def script_report(folder, script):
    """The report of the process that ran script (train.py, generate.py)."""
    found = [r for r in reports(folder) if any(os.path.basename(a) == script for a in r["argv"])]
    assert len(found) == 1, reports(folder)
    return found[0]


def finished(process, args, encoding, timeout=120):
    """A Popen's CompletedProcess, its output decoded strictly: a cp1252 console writes nothing cp1252 lacks."""
    stdout, stderr = process.communicate(timeout=timeout)
    try:
        return subprocess.CompletedProcess(args, process.returncode, stdout.decode(encoding), stderr.decode(encoding))
    except UnicodeDecodeError as e:
        raise AssertionError(f"the output is not {encoding}: {e}; {(stdout + stderr)[-3000:]!r}") from None


def start(script, args, env, **kwargs):
    return subprocess.Popen([sys.executable, script, *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **kwargs)


def project_encoding_warnings(stderr):
    """EncodingWarnings (open() without an encoding: Windows would use cp1252) raised in the project's own files."""
    return [line for line in stderr.splitlines() if "EncodingWarning" in line and line.startswith(ROOT)]


def assert_no_traceback(result):
    assert "Traceback" not in result.stdout + result.stderr, (result.stdout + result.stderr)[-3000:]


# ----------------------------------------------------------------------------- the simulation itself

PROBE = f"""
import errno, json, multiprocessing, os, signal, sys, tempfile
import train, files
from cfg import console
saw = {{"SIGUSR1": hasattr(signal, "SIGUSR1"), "SIGHUP": hasattr(signal, "SIGHUP"),
       "SIGKILL": hasattr(signal, "SIGKILL"),
       "SIGALRM": hasattr(signal, "SIGALRM"), "alarm": hasattr(signal, "alarm"), "fchmod": hasattr(os, "fchmod"),
       "EDQUOT": hasattr(errno, "EDQUOT"), "start_method": multiprocessing.get_start_method(),
       "stdout": sys.stdout.encoding, "stops": [int(s) for s in train.Signals.STOPS], "train": train.__file__,
       "quota": train.write_error(OSError(errno.ENOSPC, "No space left on device", "run/last.pt"), "run")}}
with tempfile.TemporaryDirectory() as folder:  # atomic_write without os.fchmod
    files.atomic_write(os.path.join(folder, "x.txt"), "{ODD}")
    saw["written"] = open(os.path.join(folder, "x.txt"), encoding="utf-8").read()
print(json.dumps(saw))
console()
print("{ODD} \\xfc")
"""


def test_the_simulation_takes_effect_and_the_project_imports_under_it(windows):
    """The probe runs where students run train.py (cwd = the repository: its own modules import as they do
    there). Only the real Windows shows its console (a code page chosen by the system, chcp 65001, Windows
    Terminal): the GitHub workflow's windows leg runs the README's commands in cmd and PowerShell."""
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=windows["env"], capture_output=True,
                            timeout=120)
    out, err = result.stdout.decode("cp1252"), result.stderr.decode("cp1252")
    assert result.returncode == 0, err[-3000:]
    saw, printed = out.splitlines()
    saw = json.loads(saw)
    assert not any(saw[name] for name in ("SIGUSR1", "SIGHUP", "SIGKILL", "SIGALRM", "alarm", "fchmod", "EDQUOT")), saw
    assert (saw["start_method"], saw["stdout"]) == ("spawn", "cp1252"), saw
    assert os.path.samefile(os.path.dirname(os.path.abspath(saw["train"])), ROOT)  # the repository's, not another
    assert saw["stops"] == [21, signal.SIGTERM, signal.SIGINT]  # Ctrl-Break, SIGTERM, Ctrl-C; no SIGUSR1 to install
    assert saw["quota"] == ("cannot write run/last.pt: No space left on device; free some space or pass another "
                            "--out_dir")  # no errno.EDQUOT: the message still comes
    assert saw["written"] == ODD
    assert printed == "\\u2192 \\u6771 \xfc"  # console(): escapes instead of a UnicodeEncodeError
    probe, = reports(windows["reports"])
    assert (probe["SIGUSR1"], probe["start_method"], probe["stdout"]) == (False, "spawn", "cp1252")


# ----------------------------------------------------------------------------- train and sample, as on Windows

def test_the_quick_tests_collect_without_the_posix_only_modules(tmp_path):
    """Windows' Python has no pwd, grp, resource, fcntl or termios: with them unimportable, the quick tests (those
    the GitHub workflow runs on Windows) and the graded ones still collect, and train.py and generate.py import.
    Only the real Windows runs them (the workflow's windows leg)."""
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\nfor name in ('pwd', 'grp', 'resource', 'fcntl', 'termios'):\n    sys.modules[name] = None\n",
        encoding="utf-8")
    env = dict(ENV, PYTHONPATH=os.pathsep.join(p for p in (str(tmp_path), ENV.get("PYTHONPATH")) if p))
    result = subprocess.run([sys.executable, "-c", "import resource"], env=env, capture_output=True, text=True)
    assert result.returncode != 0, "the simulation did not take effect"
    result = subprocess.run([sys.executable, "-c", "import train, generate, plot"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and not re.search(r"\d+ errors? in", result.stdout), result.stdout[-3000:]
    collected = re.search(r"(\d+)/\d+ tests collected", result.stdout)
    assert collected and int(collected.group(1)) > 100, result.stdout[-1000:]
    assert "unittests.py::" in result.stdout and "test_portability.py::" in result.stdout


def normalized_log(run_dir, **paths):
    """train.log without what differs between two identical runs: times, tokens/s, and the named paths."""
    text = (run_dir / "train.log").read_text(encoding="utf-8")
    for placeholder, path in paths.items():
        text = text.replace(str(path), f"<{placeholder}>")
    text = re.sub(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ", "", text, flags=re.M)
    return re.sub(r" tok/s \d+", "", text)


@pytest.mark.slow
def test_simulated_windows_trains_on_a_crlf_text_in_an_odd_folder_as_linux_does(windows, corpus, tmp_path):
    """Simulated Windows: 6 training steps on a CRLF text under a folder with a space and a non-ASCII letter, then
    sampling, exit 0 with the same results as on Linux; no carriage return in the vocabulary. Two DataLoader
    workers: spawned (they re-import train.py), where Linux forks them. Only the real Windows shows Notepad's
    and Git's own line-end conversions, drive letters and backslashes in these paths, and its console's code
    page; the GitHub workflow's windows leg trains and samples there."""
    lines = open(corpus, encoding="utf-8").read().split("\n")[:1200]  # about 36 KB
    text = "\n".join(line + (f" {ODD}" if i % 50 == 0 else "") for i, line in enumerate(lines)) + "\n"
    prompt = f"The king {ODD}\nshall"
    folders = {"windows": tmp_path / "my runs \xfc", "linux": tmp_path / "linux"}
    processes = {}
    for system, folder in folders.items():
        folder.mkdir()
        newline = "\r\n" if system == "windows" else "\n"
        for name, content in (("text \xf1.txt", text), ("prompt.txt", prompt)):
            with open(folder / name, "w", encoding="utf-8", newline=newline) as f:
                f.write(content)
        env = windows["env"] if system == "windows" else ENV
        processes[system] = start(TRAIN, tiny(folder / "text \xf1.txt", folder / "run", "--max_steps", "6",
                                              "--num_workers", "2"), env)
    assert b"\r\n" in (folders["windows"] / "text \xf1.txt").read_bytes()
    trained = {system: finished(p, p.args, "cp1252" if system == "windows" else "utf-8")
               for system, p in processes.items()}
    for result in trained.values():
        assert result.returncode == 0, result.stderr[-3000:]
        assert_no_traceback(result)
    processes = {system: start(GENERATE, ["--checkpoint", folder / "run", "--prompt", f"FILE:{folder / 'prompt.txt'}",
                                          "--max_new_tokens", "30", "--seed", "1", "--output", folder / "samples.txt"],
                               windows["env"] if system == "windows" else ENV)
                 for system, folder in folders.items()}
    sampled = {system: finished(p, p.args, "cp1252" if system == "windows" else "utf-8")
               for system, p in processes.items()}
    for result in sampled.values():
        assert result.returncode == 0, result.stderr[-3000:]
        assert_no_traceback(result)

    # the simulation was in force in train.py and in its two workers, which re-imported it
    seen = reports(windows["reports"])
    trainer = script_report(windows["reports"], "train.py")
    assert (trainer["SIGUSR1"], trainer["start_method"], trainer["stdout"]) == (False, "spawn", "cp1252"), trainer
    workers = [r for r in seen if "--multiprocessing-fork" in r["argv"]]
    assert len(workers) >= 2 and not any(r["SIGUSR1"] for r in workers), seen
    # the same training: the same log (losses, sample), weights and vocabulary
    logs = {system: normalized_log(folder / "run", text=folder / "text \xf1.txt", run=folder / "run")
            for system, folder in folders.items()}
    assert logs["windows"] == logs["linux"] and "step 6: train loss" in logs["linux"]
    assert re.search(r"^step 5 loss \d", logs["linux"], flags=re.M), logs["linux"]
    last = {system: torch.load(folder / "run" / "last.pt", map_location="cpu", weights_only=True)
            for system, folder in folders.items()}
    for name, tensor in last["linux"]["model"].items():
        assert torch.equal(tensor, last["windows"]["model"][name]), name
    vocabulary = json.loads((folders["windows"] / "run" / "tokenizer.json").read_text(encoding="utf-8"))["chars"]
    assert "\r" not in vocabulary and {"\n", "\u2192", "\u6771"} <= set(vocabulary)
    tokenizers = {(folder / "run" / "tokenizer.json").read_bytes() for folder in folders.values()}
    assert len(tokenizers) == 1
    # the same samples: in the file, in UTF-8; on the cp1252 console, with escapes for what it cannot show
    samples = {system: (folder / "samples.txt").read_bytes() for system, folder in folders.items()}
    assert samples["windows"] == samples["linux"] and b"\r" not in samples["linux"]
    assert prompt.encode("utf-8") in samples["linux"]
    assert sampled["windows"].stdout == sampled["linux"].stdout.encode("cp1252", "backslashreplace").decode("cp1252")
    assert "The king \\u2192 \\u6771" in sampled["windows"].stdout
    assert "sample at step 6:" in trained["windows"].stdout
    for result in (*trained.values(), *sampled.values()):
        assert not project_encoding_warnings(result.stderr), project_encoding_warnings(result.stderr)


# ----------------------------------------------------------------------------- a checkpoint that cannot be replaced

@pytest.fixture(scope="module")
def base_run(corpus, tmp_path_factory):
    """A finished tiny run of 4 steps, trained by the solution (last.pt and best.pt of step 4)."""
    run_dir = tmp_path_factory.mktemp("base") / "run"
    result = subprocess.run([sys.executable, TRAIN, *tiny(corpus, run_dir, "--max_steps", "4")], env=ENV,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert steps(run_dir) == {"last.pt": 4, "best.pt": 4}
    return run_dir


def chattr(flag, path):
    return subprocess.run(["chattr", flag, str(path)], capture_output=True, text=True)


def require_chattr(folder):
    """Root, chattr and a file system with the immutable flag; else skip (fail with MICROGPT_REQUIRE_ROOT=1)."""
    why = None
    if getattr(os, "geteuid", lambda: -1)() != 0:
        why = "making a file immutable (chattr +i: nobody may replace it) needs root"
    elif shutil.which("chattr") is None:
        why = "chattr is not installed (Debian's e2fsprogs)"
    else:
        probe = folder / "immutable-probe"
        probe.write_bytes(b"")
        made = chattr("+i", probe)
        chattr("-i", probe)
        probe.unlink()
        if made.returncode != 0:
            why = f"the file system of {folder} has no immutable flag ({made.stderr.strip()})"
    if why:
        if os.environ.get("MICROGPT_REQUIRE_ROOT") == "1":
            pytest.fail(f"MICROGPT_REQUIRE_ROOT=1 but {why}")
        pytest.skip(why)


@pytest.fixture
def immutable_last(base_run, tmp_path):
    """A copy of base_run whose last.pt nobody may replace (chattr +i), as Windows refuses to replace a file that
    another program holds open; the flag comes off at the end."""
    require_chattr(tmp_path)
    run_dir = shutil.copytree(base_run, tmp_path / "run")
    assert chattr("+i", run_dir / "last.pt").returncode == 0
    try:
        yield run_dir
    finally:
        chattr("-i", run_dir / "last.pt")


@pytest.mark.slow
def test_a_last_pt_that_cannot_be_replaced_stops_the_run_with_74_and_stays_intact(corpus, immutable_last):
    """os.replace fails (EPERM here; Windows: PermissionError while an editor, a viewer or a virus scanner holds
    the file open), atomic_write retries for about 5 s, then one `error: cannot write .../last.pt` line and exit 74;
    the previous last.pt is untouched and no temporary file is left. Windows' own file locking (sharing modes,
    a file held open rather than flagged) is not simulated here: the GitHub workflow's windows leg runs there."""
    run_dir = immutable_last
    before = (run_dir / "last.pt").read_bytes()
    result = subprocess.run([sys.executable, TRAIN, *tiny(corpus, run_dir, "--max_steps", "8")], env=ENV,
                            capture_output=True, text=True, timeout=120)
    assert_fails(result, 74, f"cannot write {run_dir}/last.pt: ")
    assert "another program holds it open or it is read-only" in result.stderr
    assert (run_dir / "last.pt").read_bytes() == before and steps(run_dir)["last.pt"] == 4
    assert not temporaries(run_dir)
    assert f"error: cannot write {run_dir}/last.pt" in (run_dir / "train.log").read_text(encoding="utf-8")


@pytest.mark.slow
def test_a_last_pt_that_becomes_replaceable_while_retrying_is_written(corpus, immutable_last):
    """The program holding last.pt lets go while atomic_write retries: the write succeeds and training ends
    normally. (Here the immutable flag comes off once a temporary .last.pt.*.tmp has waited 1 s: the
    retries have begun.)"""
    run_dir = immutable_last
    process = start(TRAIN, tiny(corpus, run_dir, "--max_steps", "8"), ENV)
    first_seen = {}

    def retrying():
        now = time.monotonic()
        waiting = [name for name in temporaries(run_dir) if name.startswith(".last.pt.")]
        for name in waiting:
            first_seen.setdefault(name, now)
        return process.poll() is not None or any(now - first_seen[name] >= 1.0 for name in waiting)

    try:
        wait_for(retrying, timeout=90)
    finally:
        chattr("-i", run_dir / "last.pt")
    result = finished(process, process.args, "utf-8")
    assert result.returncode == 0, result.stderr[-3000:]
    assert first_seen, "no temporary last.pt waited to replace the immutable one: the retry was not exercised"
    assert steps(run_dir)["last.pt"] == 8 and not temporaries(run_dir)
    assert_no_traceback(result)


# ----------------------------------------------------------------------------- stop signals without SIGUSR1

@pytest.mark.slow
@pytest.mark.skipif(os.name != "posix", reason="signals a process group (os.killpg): POSIX only")
@pytest.mark.parametrize("signame, to_group, workers", [
    ("SIGINT", True, 0),
    ("SIGTERM", False, 0),
    ("SIGINT", True, 2),
    ("SIGTERM", True, 2),
], ids=["Ctrl-C", "SIGTERM", "Ctrl-C-with-workers", "SIGTERM-to-the-group-with-workers"])
def test_simulated_windows_stops_cleanly_after_the_step_and_writes_last_pt(windows, corpus, tmp_path, signame,
                                                                           to_group, workers):
    """Without SIGUSR1, Ctrl-C (SIGINT, sent to the process group as a terminal does: Windows sends its console's
    Ctrl-C to every process attached to it) and SIGTERM still finish the step, write last.pt and exit 75. With
    DataLoader workers the signal reaches them too (they ignore it: a worker that died of it would fail the step
    that saves); --grad_accum 8 makes the last step need more micro-batches than the workers prefetched. Only the real Windows shows its console's CTRL_C_EVENT and CTRL_BREAK_EVENT (and
    that os.kill(pid, SIGTERM) there is TerminateProcess, which no program can catch)."""
    run_dir, never = tmp_path / "run", "1000000"
    extra = ["--num_workers", str(workers), "--grad_accum", "8"] if workers else []
    process = start(TRAIN, tiny(corpus, run_dir, "--max_steps", never, "--eval_interval", never,
                                "--checkpoint_interval", never, *extra), windows["env"], start_new_session=True)
    try:
        log = run_dir / "train.log"
        wait_for(lambda: process.poll() is not None
                 or (log.exists() and " step 10 loss" in log.read_text(encoding="utf-8")))
        if process.poll() is None:
            (os.killpg if to_group else os.kill)(process.pid, getattr(signal, signame))
        result = finished(process, process.args, "cp1252", timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert result.returncode == 75, (result.stdout + result.stderr)[-3000:]
    assert f"stopped by {signame} at step" in result.stdout and "last.pt written" in result.stdout
    assert_no_traceback(result)
    assert steps(run_dir)["last.pt"] >= 10 and not temporaries(run_dir)
    assert script_report(windows["reports"], "train.py")["SIGUSR1"] is False


# ----------------------------------------------------------------------------- the untouched student release

@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The student release and the autograder bundle, built once for this module (as tests/test_instructor.py
    builds them: that file runs on Linux only)."""
    dest = tmp_path_factory.mktemp("dist")
    release.build(str(dest))
    return dest


TODO_LINE = re.compile(r"error: TODO\[(\w+)\] is not written yet \((\w+\.py):\d+ in \w+\): write it first; "
                       r"`pytest unittests.py -k (\w+)` checks it")


def test_the_student_release_train_py_names_the_first_todo(built, tmp_path):
    """The untouched release: train.py exits 2 with one line naming the first TODO (the tokenizer's), where it is
    and the tests that check it, before writing anything. The same on every system: the GitHub workflow's windows
    and macos legs run this test too."""
    text = tmp_path / "small.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 40, encoding="utf-8")
    student = built / "student"
    result = subprocess.run([sys.executable, "train.py", "--txt_file", str(text)], cwd=student, env=ENV,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    line, = result.stderr.splitlines()
    assert line.startswith("error: TODO[tokenizer_encode] is not written yet (dataset.py:"), line
    assert "`pytest unittests.py -k tokenizer_encode`" in line and TODO_LINE.fullmatch(line), line
    assert result.stdout == "" and not (student / "runs").exists()


@pytest.mark.slow
def test_the_student_release_generate_py_names_a_todo(built, base_run):
    """The untouched release's generate.py, on a checkpoint the solution trained: exit 2, one line naming a TODO
    and the tests that check it."""
    result = subprocess.run([sys.executable, "generate.py", "--checkpoint", str(base_run), "--max_new_tokens", "5"],
                            cwd=built / "student", env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    line, = result.stderr.splitlines()
    todo = TODO_LINE.fullmatch(line)
    assert todo and todo.group(1) == todo.group(3), line
    assert result.stdout == ""
