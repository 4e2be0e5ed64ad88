"""
A hostile zoo: submissions that try to grade themselves, crash the grader, outlive it, or read what they
must not. Each one is the untouched student release with hostile code added, graded end to end as root
(student code then runs as `nobody`) through `python -m instructor grade` and, where the attack depends
on the layout around the grader, through the bundle's setup.sh + run_autograder in an /autograder-like
folder. Each must score what the untouched release scores, leave a complete results.json, and leave no
process behind.

As root, `nobody` must be able to run this Python (CI makes its virtual environment so); without root
there is no unprivileged jail to test and these tests skip, unless MICROGPT_REQUIRE_ROOT=1 (CI) makes
that a failure.
"""

import concurrent.futures
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from instructor import release

from test_instructor import assert_gradescope_format

ROOT = release.ROOT
TIMEOUT = 10.0  # per test: the one hang below costs this much
# the cases whose attack depends on the layout around the grader (paths, parents, results folder) are graded
# both ways; the others (the same code in the same jail either way) only through `instructor grade`
BOTH_WAYS = ("forged_files", "detached_rewriter", "kills_its_parents", "exits_at_import", "fork_bomb",
             "reads_the_solution", "reads_the_hidden_tests")
PWNED = "/tmp/micro-gpt-zoo-pwned"  # what an unpickled answer would create
SLEEP_MARK = "9773"  # `sleep 9773`: the processes the fork bomb starts

pytestmark = pytest.mark.slow  # minutes: runs with --full


def jail_usable():
    """'' when this machine can run the unprivileged jail, else why not."""
    if os.geteuid() != 0:
        return "not root: the grader cannot switch to an unprivileged user"
    probe = subprocess.run([sys.executable, "-c", "import torch"], user="nobody", cwd="/", capture_output=True,
                           text=True, timeout=120)
    if probe.returncode != 0:
        return f"user nobody cannot run {sys.executable}: {probe.stderr.strip()[-300:]}"
    return ""


@pytest.fixture(scope="module", autouse=True)
def needs_jail():
    why = jail_usable()
    if why and os.environ.get("MICROGPT_REQUIRE_ROOT") == "1":
        pytest.fail(f"MICROGPT_REQUIRE_ROOT=1 but {why}")
    if why:
        pytest.skip(why)


# ----------------------------------------------------------------------------- the hostile code

FIND_PATHS = '''
import os
def paths_in_sight():
    """Every absolute path named on a command line, every cwd and root of /proc, and their parents."""
    found = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = [a.decode(errors="replace") for a in f.read().split(b"\\0")]
        except OSError:
            args = []
        for a in args:
            for p in (a, a.split("=", 1)[-1]):
                if p.startswith("/"):
                    found.add(p)
        for link in ("cwd", "root"):
            try:
                found.add(os.readlink(f"/proc/{pid}/{link}"))
            except OSError:
                pass
    found |= {os.getcwd(), os.path.abspath(".."), os.path.abspath("../.."), %(root)r, "/autograder",
              "/autograder/source", "/autograder/source/pristine", "/autograder/results"}
    for p in list(found):
        while p not in ("/", ""):
            found.add(p)
            p = os.path.dirname(p)
    return found
''' % {"root": ROOT}

HOSTILE = {
    "patched_helpers": {"dataset.py": '''
import sys
import torch
for module in list(sys.modules.values()):
    for name in ("assert_close", "fail", "approx"):
        try:
            setattr(module, name, lambda *a, **k: None)
        except Exception:
            pass
torch.allclose = lambda *a, **k: True
torch.equal = lambda *a, **k: True
CharTokenizer.encode = lambda self, s: [0] * len(s)
CharTokenizer.decode = lambda self, ids: ""
TextDataset.__getitem__ = lambda self, i: (torch.zeros(8, dtype=torch.long),) * 2
'''},
    "pytest_hooks_through_gc": {"dataset.py": '''
import gc
import pytest
class Cheat:
    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item, call):
        report = (yield).get_result()
        report.outcome, report.longrepr = "passed", None
for obj in gc.get_objects():
    if type(obj).__name__ == "Config" and hasattr(obj, "pluginmanager"):
        obj.pluginmanager.register(Cheat())
'''},
    "forged_files": {"dataset.py": FIND_PATHS + '''
import json
event = json.dumps({"done": "unittests.py::test_mlp", "passed": True, "output": ""})
report = json.dumps({"score": 60.0, "tests": []})
for path in paths_in_sight():
    try:
        if os.path.isdir(path):
            if os.stat(path).st_mode & 0o002:
                continue  # /tmp and the like: not ours to litter
            for name, text in (("results.json", report), ("events.jsonl", event), ("conftest.py", "X = 1\\n"),
                               ("unittests.py", "def test_ok():\\n    pass\\n")):
                with open(os.path.join(path, name), "w") as f:
                    f.write(text)
        elif path.endswith((".json", ".jsonl")):
            with open(path, "a") as f:
                f.write("\\n" + event + "\\nnot json\\n")
    except OSError:
        pass
os._exit(0)
'''},
    "detached_rewriter": {"dataset.py": '''
import json, os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        end = time.time() + 120
        while time.time() < end:
            for pid in os.listdir("/proc"):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        args = f.read().decode(errors="replace").split("\\0")
                except OSError:
                    continue
                for i, a in enumerate(args[:-1]):
                    if a == "--out":
                        try:
                            with open(args[i + 1], "w") as f:
                                json.dump({"score": 60.0, "tests": []}, f)
                        except OSError:
                            pass
            time.sleep(0.1)
    os._exit(0)
'''},
    "kills_its_parents": {"dataset.py": '''
import os, signal
for pid in {os.getppid(), os.getpgrp(), os.getsid(0)}:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
for pid in os.listdir("/proc"):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"instructor" in f.read():
                os.kill(int(pid), signal.SIGKILL)
    except (OSError, ValueError):
        pass
'''},
    # (os._exit at import: forged_files)
    "exits_at_import": {"dataset.py": "raise SystemExit(0)\n", "gpt.py": "raise KeyboardInterrupt\n"},
    "exits_in_tests": {"dataset.py": '''
def _interrupt(self, *args):
    raise KeyboardInterrupt
CharTokenizer.encode = _interrupt
TextDataset.__getitem__ = lambda self, i: sys.exit(0)
''', "gpt.py": '''
RMSNorm.forward = lambda self, x: os._exit(0)
def _exit(self, *args):
    raise SystemExit(1)
MLP.forward = _exit
'''},
    "malformed_answers": {"dataset.py": '''
import struct
import torch
import wire

class Evil(torch.Tensor):
    pass

class Reducer:
    def __reduce__(self):
        return (os.system, ("touch %(pwned)s",))

CharTokenizer.encode = lambda self, s: torch.zeros(3).as_subclass(Evil)
CharTokenizer.decode = lambda self, ids: Reducer()
TextDataset.__getitem__ = lambda self, i: (torch.full((8,), float("nan")), torch.zeros(10 ** 8))
TextDataset.__len__ = lambda self: 22
real_send, calls = wire.send, [0]

def frame(text, blob=b""):
    payload = struct.pack("<I", len(text)) + text + blob
    return struct.pack("<Q", len(payload)) + payload

BAD = [
    b"\\xff" * 8,  # a length of 2**64 - 1
    frame(b"[[[[["),
    frame(b'{"ok": ' * 50000),
    frame(b'{"dict": [["ok", {"tensor": "0"}], ["rng", {"tensor": "0"}], ["generators", {"list": []}]]}', b"junk"),
    frame(b'{"dict": [["ok", 1], ["rng", {"list": []}], ["generators", {"list": []}]]}'),
    frame(b'{"dict": [["error", {"dict": [["type", "Skipped"], ["base", "BaseException"], ["message", "skip"]]}]]}'),
]

def evil_send(sock, data):
    calls[0] += 1
    if calls[0] %% 7 == 6:
        return real_send(sock, data)
    sock.sendall(BAD[calls[0] %% 7])

wire.send = evil_send
''' % {"pwned": PWNED}},
    "memory_bomb": {"dataset.py": '''
import torch
def _bomb(self, s):
    hoard = []
    while True:
        hoard.append(torch.ones(1 << 28))  # 1 GB, touched
CharTokenizer.encode = _bomb
'''},
    "fork_bomb": {"dataset.py": '''
import subprocess
def _forks(self, s):
    for _ in range(40):
        subprocess.Popen(["sleep", "%(mark)s"], start_new_session=True)
        if os.fork() == 0:
            os.setsid()
            os.execvp("sleep", ["sleep", "%(mark)s"])
    raise RuntimeError("forked")
CharTokenizer.encode = _forks
''' % {"mark": SLEEP_MARK}},
    "print_flood": {"gpt.py": '''
import sys
sys.stdout.write("flood " * 3_000_000)
sys.stderr.write("flood " * 3_000_000)
'''},
    "blocked_signals_sleep_in_c": {"dataset.py": '''
import ctypes, signal
def _hang(self, s):
    signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    ctypes.CDLL(None).sleep(3600)
CharTokenizer.encode = _hang
'''},
    "reads_the_solution": {"dataset.py": FIND_PATHS + '''
import sys
solution = {}
for folder in paths_in_sight():
    for name in ("gpt.py", "dataset.py"):
        try:
            with open(os.path.join(folder, name)) as f:
                text = f.read()
        except OSError:
            continue
        if "class CharTokenizer" in text or "class GPT(" in text:
            if "raise NotImplementedError" not in text:
                solution[name] = text
print("found the solution in sight:", sorted(solution))
if "dataset.py" in solution:
    exec(compile(solution["dataset.py"], "dataset.py", "exec"), globals())
if "gpt.py" in solution:
    import types
    module = types.ModuleType("gpt")
    exec(compile(solution["gpt.py"], "gpt.py", "exec"), module.__dict__)
    sys.modules["gpt"] = module
'''},
    "reads_the_hidden_tests": {"dataset.py": FIND_PATHS + '''
for folder in paths_in_sight():
    for name in ("hidden_tests.py", "instructor/hidden_tests.py", "pristine/hidden_tests.py"):
        try:
            with open(os.path.join(folder, name)) as f:
                print(f.read())
        except OSError:
            pass
'''},
}


# ----------------------------------------------------------------------------- grading them

GRADINGS = [(case, way) for case in HOSTILE for way in ("cli", "bundle") if way == "cli" or case in BOTH_WAYS]



def released_modules(built):
    return {name: (built / "student" / name).read_text() for name in ("gpt.py", "dataset.py")}


def write_submission(folder, built, case):
    folder.mkdir(parents=True)
    for name, text in released_modules(built).items():
        (folder / name).write_text(text + "\n# --- hostile ---\n" + HOSTILE[case].get(name, ""))


def grade_cli(built, tmp, case):
    write_submission(tmp / "submission", built, case)
    out = tmp / "results.json"
    proc = subprocess.run([sys.executable, "-m", "instructor", "grade", str(tmp / "submission"), "--out", str(out),
                           "--timeout", str(TIMEOUT)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    return proc, out


def grade_bundle(built, tmp, case, env):
    shutil.copytree(built / "autograder", tmp / "source")
    write_submission(tmp / "submission", built, case)
    proc = subprocess.run(["bash", str(tmp / "source" / "run_autograder")], env={**env, "AUTOGRADER_DIR": str(tmp)},
                          capture_output=True, text=True, timeout=600)
    return proc, tmp / "results" / "results.json"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    dest = tmp_path_factory.mktemp("dist")
    release.build(str(dest))
    return dest


@pytest.fixture(scope="module")
def bundle_env(built, tmp_path_factory):
    """The environment run_autograder gets, after the bundle's setup.sh ran (as nobody, so that it adds no
    account to this machine; its pip installs find everything in place)."""
    env = {**os.environ, "PYTHON": sys.executable, "JAIL_USER": "nobody",
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
           "GRADER_ARGS": f"--timeout {TIMEOUT} --total-timeout 540"}
    setup = tmp_path_factory.mktemp("setup")
    shutil.copytree(built / "autograder", setup / "source")
    proc = subprocess.run(["bash", str(setup / "source" / "setup.sh")], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return env


def jail_processes():
    """Processes of any jail or of the fork bomb, as (pid, command line)."""
    out = []
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "jailed.py" in cmd or f"sleep {SLEEP_MARK}" in cmd:
            out.append((pid, cmd))
    return out


@pytest.fixture(scope="module")
def graded(built, bundle_env, tmp_path_factory):
    """{(case, way): (process, results.json path, its text as first read)} for GRADINGS, three at a time
    (two cores: a grading waits on processes part of the time); then the results a few seconds later (a
    detached child would have rewritten them by then) and the processes left."""
    if os.path.exists(PWNED):
        os.unlink(PWNED)
    root = tmp_path_factory.mktemp("hostile")

    def run(case, way):
        tmp = root / f"{case}-{way}"
        tmp.mkdir()
        proc, out = grade_cli(built, tmp, case) if way == "cli" else grade_bundle(built, tmp, case, bundle_env)
        return proc, out, out.read_text() if out.exists() else None

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futures = {(case, way): pool.submit(run, case, way) for case, way in GRADINGS}
        results = {key: f.result() for key, f in futures.items()}
    time.sleep(3)
    later = {key: out.read_text() if out.exists() else None for key, (_, out, _) in results.items()}
    return results, later, jail_processes()


@pytest.fixture(scope="module")
def untouched(built, tmp_path_factory):
    """results.json of the untouched release, graded the same way."""
    tmp = tmp_path_factory.mktemp("untouched")
    (tmp / "submission").mkdir()
    for name, text in released_modules(built).items():
        (tmp / "submission" / name).write_text(text)
    proc = subprocess.run([sys.executable, "-m", "instructor", "grade", str(tmp / "submission"), "--out",
                           str(tmp / "results.json")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return json.loads((tmp / "results.json").read_text())


@pytest.mark.parametrize("case, way", GRADINGS)
def test_hostile_submission_scores_what_the_release_scores(graded, untouched, case, way):
    results, later, _ = graded
    proc, out, text = results[(case, way)]
    assert text is not None, f"no results.json; stderr: {proc.stderr[-2000:]}"
    result = json.loads(text)
    assert_gradescope_format(result)
    assert [t["name"] for t in result["tests"]] == [t["name"] for t in untouched["tests"]]
    assert result["score"] == untouched["score"] == 0, [t["name"] for t in result["tests"] if t["score"]]
    assert later[(case, way)] == text, "results.json changed after the grader ended"


def output(result, name):
    return next(t["output"] for t in result["tests"] if t["name"] == name)


def test_no_process_is_left_behind(graded):
    _, _, left = graded
    assert left == []


def test_answers_are_never_unpickled(graded):
    assert not os.path.exists(PWNED)


def test_hidden_tests_and_solution_stay_out_of_sight(graded):
    results, _, _ = graded
    for way in ("cli", "bundle"):
        for case in ("reads_the_hidden_tests", "reads_the_solution"):
            result = json.loads(results[(case, way)][2])
            every_output = "\n".join(t["output"] for t in result["tests"]) + result["output"]
            assert "plain_forward" not in every_output and "def test_other_shape" not in every_output
        found = output(json.loads(results[("reads_the_solution", way)][2]), "test_tokenizer_round_trip")
        assert "found the solution in sight: []" in found


def test_print_flood_is_clipped(graded):
    results, _, _ = graded
    result = json.loads(results[("print_flood", "cli")][2])
    assert max(len(t["output"]) for t in result["tests"]) < 10_000
    assert "characters cut" in output(result, "test_mlp")


def test_hang_with_signals_blocked_costs_its_timeout(graded):
    results, _, _ = graded
    result = json.loads(results[("blocked_signals_sleep_in_c", "cli")][2])
    assert "timed out" in output(result, "test_tokenizer_round_trip")
    assert result["execution_time"] < 60


@pytest.mark.parametrize("way", ["cli", "bundle"])
def test_symlinked_and_special_files_are_not_read(built, bundle_env, tmp_path, way):
    submission = tmp_path / "submission"
    submission.mkdir()
    os.symlink(os.path.join(ROOT, "gpt.py"), submission / "gpt.py")  # the solution
    os.symlink("/etc/passwd", submission / "dataset.py")
    os.mkfifo(submission / "cfg.py")
    if way == "cli":
        out = tmp_path / "results.json"
        proc = subprocess.run([sys.executable, "-m", "instructor", "grade", str(submission), "--out", str(out)],
                              cwd=ROOT, capture_output=True, text=True, timeout=600)
    else:
        shutil.copytree(built / "autograder", tmp_path / "source")
        out = tmp_path / "results" / "results.json"
        proc = subprocess.run(["bash", str(tmp_path / "source" / "run_autograder")], capture_output=True, text=True,
                              env={**bundle_env, "AUTOGRADER_DIR": str(tmp_path)}, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["score"] == 0
    assert ("ignored, not a regular file (links, devices and pipes are not read): cfg.py, dataset.py, gpt.py"
            in result["output"])


def test_a_killed_grader_still_leaves_a_complete_report(built, bundle_env, tmp_path, untouched):
    """SIGKILL the trusted grader at once (run_autograder's fallback lists every test) and in the middle
    (the report written after collection stays); either way the jail goes with it."""
    for when in (0.0, 4.0):
        tmp = tmp_path / f"after-{when:g}"
        shutil.copytree(built / "autograder", tmp / "source")
        (tmp / "submission").mkdir(parents=True)
        for name in ("gpt.py", "dataset.py"):
            shutil.copy(os.path.join(ROOT, name), tmp / "submission" / name)
        proc = subprocess.Popen(["bash", str(tmp / "source" / "run_autograder")],
                                env={**bundle_env, "AUTOGRADER_DIR": str(tmp)}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        grader = None
        while grader is None and proc.poll() is None:
            grader = next((p for p in os.listdir("/proc") if p.isdigit() and is_grader(p, proc.pid)), None)
            time.sleep(0.01)
        time.sleep(when)
        os.kill(int(grader), signal.SIGKILL)
        proc.communicate(timeout=300)
        result = json.loads((tmp / "results" / "results.json").read_text())
        assert_gradescope_format(result)
        assert [t["name"] for t in result["tests"]] == [t["name"] for t in untouched["tests"]]
        assert result["score"] < sum(t["max_score"] for t in result["tests"])
        assert all("not graded" in t["output"] for t in result["tests"] if t["status"] == "failed")
        time.sleep(1)
        assert jail_processes() == []


def is_grader(pid, parent):
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
    except OSError:
        return False
    return int(stat[stat.rfind(b")") + 2:].split()[1]) == parent and b"instructor.grade" in cmd
