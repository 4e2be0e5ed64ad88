"""
The trust boundary of grading. Student code runs only in the jail; the graded tests run in the trusted
process (instructor/runner.py) against proxies of the student modules.

Design: `import gpt` in the trusted process gives a RemoteModule. Reading its attributes, calling what
they hold, indexing and iterating are requests to the jail; tensors and plain values come back by value
(instructor/wire.py: JSON and safetensors, never pickle), everything else stays in the jail and comes
back as a Remote handle. Each request carries the trusted process's torch RNG state, grad mode, default
device and the torch functions the test monkeypatched, and the jail's RNG state comes back, so a test
runs exactly as it does in-process under `pytest unittests.py`. The assertions, reference values and
hidden tests never leave the trusted process; the jail only ever answers questions.

The jail: one process per grading run (restarted after any anomaly) that has imported torch and forks a
fresh child for each test. It runs as an unprivileged user when the grader is root (`nobody` unless
told otherwise; the same user otherwise, with a warning), in its own scratch folder, in a mount namespace
that hides the given paths where the kernel allows it, with limits on memory, processes, file size, CPU
time and open files, and the kernel's OOM killer pointed at it first. The trusted process is a child
subreaper, so every process the jail starts stays its descendant (setsid and double forks included),
and procs.kill_tree() ends them all after each test. A late, oversized, malformed or missing answer raises
JailError: that test fails, the child is killed, and the grading goes on.
"""

import ctypes
import importlib.abc
import importlib.machinery
import os
import pwd
import resource
import shutil
import socket
import struct
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import types

import torch
from torch.nn import functional as F

from instructor import procs, wire

HERE = os.path.dirname(os.path.abspath(__file__))
JAIL_FILES = ("jailed.py", "wire.py")
START_TIMEOUT = 120.0  # seconds for the jail to start python and import torch
OUTPUT_KEEP = 8000  # bytes of the student's printed output kept per test (head and tail)
MEMORY = 4 << 30  # bytes of data (heap, anonymous maps) per jail process
PROCESSES = 128  # processes and threads the jail user may add
FILE_SIZE = 64 << 20  # bytes of one file the jail writes
OPEN_FILES = 256
EXCEPTIONS = {e.__name__: e for e in (
    ArithmeticError, AssertionError, AttributeError, ImportError, IndexError, KeyError, LookupError, MemoryError,
    ModuleNotFoundError, NameError, NotImplementedError, OverflowError, RecursionError, RuntimeError, SyntaxError,
    TypeError, UnboundLocalError, ValueError, ZeroDivisionError)}
WATCHED = (torch, F)  # modules whose functions a test may monkeypatch, forwarded to the jail

libc = ctypes.CDLL(None, use_errno=True)
PR_SET_NO_NEW_PRIVS, CLONE_NEWNS = 38, 0x20000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 4096, 16384, 1 << 18


class JailError(Exception):
    """The jail did not answer properly: this test fails, the grading goes on."""


# ----------------------------------------------------------------------------- the jail process

def jail_user(name):
    """(uid, gid, name) the jail runs as: name, or None for this process's own user."""
    if name is None:
        return os.getuid(), os.getgid(), pwd.getpwuid(os.getuid()).pw_name
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise JailError(f"there is no user {name!r} to run student code as; create one or name another") from None
    if entry.pw_uid == 0:
        raise JailError(f"user {name!r} is root: student code must run as an unprivileged user")
    if os.geteuid() != 0 and entry.pw_uid != os.getuid():
        raise JailError(f"only root can run student code as user {name!r}")
    return entry.pw_uid, entry.pw_gid, name


def task_count(uid):
    """Processes and threads that uid runs now (RLIMIT_NPROC counts them all)."""
    count = 0
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.stat(f"/proc/{name}").st_uid == uid:
                    count += len(os.listdir(f"/proc/{name}/task"))
            except OSError:
                pass
    return count


SYSTEM = ("/usr", "/lib", "/lib32", "/lib64", "/libx32", "/bin", "/sbin", "/etc", "/dev", "/proc", "/sys")
SCRATCH = ("/tmp", "/dev/shm")  # in the jail: empty, writable, private (the jail's scratch folder put back)


def in_sight():
    """What the jail sees of the file system: the system's folders and those of this Python installation."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(sys.executable),
             *sysconfig.get_paths().values()}
    return {os.path.normpath(p) for p in paths} | {os.path.realpath(p) for p in paths} | set(SYSTEM)


def out_of_sight(keep):
    """The paths to cover so that only keep stays in sight: everything beside the way to a kept path
    (symbolic links are left: what they point to is covered or kept where it lies)."""
    out = []

    def walk(folder):
        try:
            entries = list(os.scandir(folder))
        except OSError:
            return
        for e in entries:
            if e.path in keep or e.path in SCRATCH or e.is_symlink():
                continue
            if any(k.startswith(e.path + "/") for k in keep):
                if e.is_dir(follow_symlinks=False):
                    walk(e.path)
            else:
                out.append((e.path, e.is_dir(follow_symlinks=False)))
    walk("/")
    return out


def mount(source, target, kind, flags, data=None):
    libc.mount(source and os.fsencode(source), os.fsencode(target), kind and os.fsencode(kind), flags,
               data and os.fsencode(data))


def seclude(covered, scratch):
    """In a new mount namespace (as root, before dropping privileges): cover every path of covered (folders with
    an empty read-only tmpfs, files with /dev/null), give the jail its own empty /tmp and /dev/shm with its
    scratch folder back in place, and show it only its own processes in /proc. Best effort: where the kernel
    refuses (unprivileged containers), nothing changes and file permissions alone keep things out of sight."""
    if libc.unshare(CLONE_NEWNS) != 0:
        return
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    fd = os.open(scratch, os.O_RDONLY | os.O_DIRECTORY)
    for path, is_dir in covered:
        if is_dir:
            mount("tmpfs", path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,mode=0")
        else:
            mount("/dev/null", path, None, MS_BIND)
    for path in SCRATCH:
        mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, "size=64m,mode=1777")
    os.makedirs(scratch)
    mount(f"/proc/self/fd/{fd}", scratch, None, MS_BIND)
    os.close(fd)
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "hidepid=2")


class Jail:
    """The jail of one grading run: a scratch folder with the student's modules and a process that forks a
    child per test. start() again after any anomaly gives a fresh scratch folder and process."""

    def __init__(self, modules, user=None, cpu_seconds=600):
        self.modules, self.cpu_seconds = modules, cpu_seconds
        self.uid, self.gid, self.user = jail_user(user)
        self.proc = self.control = self.scratch = self.output = None

    def preexec(self):
        """In the jail process, between fork and exec (as root when the grader is)."""
        for limit, value in ((resource.RLIMIT_DATA, MEMORY), (resource.RLIMIT_FSIZE, FILE_SIZE),
                             (resource.RLIMIT_CPU, self.cpu_seconds), (resource.RLIMIT_NOFILE, OPEN_FILES),
                             (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NPROC, self.nproc)):
            resource.setrlimit(limit, (value, value))
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")  # when memory runs out, the jail goes first
        if os.geteuid() == 0:
            seclude(self.covered, self.scratch)
            os.setgroups([])
            os.setgid(self.gid)
            os.setuid(self.uid)
        libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)  # no setuid program gives the privileges back

    def start(self):
        self.stop()
        self.scratch = tempfile.mkdtemp(prefix="jail-", dir="/tmp")
        for name in os.listdir(self.modules):
            shutil.copyfile(os.path.join(self.modules, name), os.path.join(self.scratch, name))
        for name in JAIL_FILES:
            shutil.copyfile(os.path.join(HERE, name), os.path.join(self.scratch, name))
        for path in [self.scratch] + [os.path.join(self.scratch, n) for n in os.listdir(self.scratch)]:
            os.chown(path, self.uid, self.gid)
        self.nproc = task_count(self.uid) + PROCESSES
        self.covered = out_of_sight(in_sight()) if os.geteuid() == 0 else []
        ours, theirs = socket.socketpair()
        read_end, write_end = os.pipe()
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": self.scratch, "LANG": "C.UTF-8",
               "OMP_NUM_THREADS": "1", "TMPDIR": self.scratch}
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-u", "-B", os.path.join(self.scratch, "jailed.py"), str(theirs.fileno())],
                cwd=self.scratch, env=env, stdin=subprocess.DEVNULL, stdout=write_end, stderr=write_end,
                pass_fds=(theirs.fileno(),), start_new_session=True, preexec_fn=self.preexec)
        finally:
            theirs.close()
            os.close(write_end)
        self.control, self.output, self.ready = ours, Output(read_end), False

    def wait_ready(self):
        """Wait for the jail's "ready" (python started, torch imported): start() returns without waiting so that
        the trusted process prepares its tests meanwhile."""
        if self.ready:
            return
        ours = self.control
        try:
            ours.settimeout(START_TIMEOUT)
            ready = ours.recv(1)
        except OSError:
            ready = b""
        if ready != b"R":
            self.stop()
            raise JailError(f"the jail could not start python as user {self.user}: "
                            f"{self.output.text().strip()[-600:] or 'no output'}")
        self.ready = True

    def secluded(self):
        """Whether the jail has a mount namespace of its own (False: file permissions alone hide files)."""
        return os.readlink(f"/proc/{self.proc.pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def session(self, deadline):
        """A fresh child for one test."""
        if not self.alive():
            self.start()
        self.wait_ready()
        ours, theirs = socket.socketpair()
        try:
            socket.send_fds(self.control, [b"F"], [theirs.fileno()])
        except OSError:
            self.start()
            self.wait_ready()
            socket.send_fds(self.control, [b"F"], [theirs.fileno()])
        finally:
            theirs.close()
        self.output.take(settle=0)
        return Session(self, ours, deadline)

    def end_child(self):
        """Kill the current test's child and everything it started. -> its exit code as the jail saw it, or None."""
        if self.alive():
            procs.kill_tree(os.getpid(), keep={self.proc.pid})
        try:
            return struct.unpack("<i", wire.recv_exactly(self.control, 4, time.monotonic() + 2))[0]
        except (OSError, EOFError, TimeoutError, struct.error):
            self.stop()  # out of step: start afresh for the next test
            return None

    def end(self, session):
        """The end of a test. -> what its child printed."""
        session.close()
        if not session.dead:
            session.code = self.end_child()
        return self.output.take()

    def stop(self):
        if self.proc is not None:
            procs.kill_tree(os.getpid())
            self.proc.wait()
            self.control.close()
            self.output.close()
            self.proc = None
        if self.scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch = None


class Output:
    """Drains the jail's stdout and stderr so that it never blocks on a full pipe; keeps each test's head
    and tail."""

    def __init__(self, fd):
        self.fd, self.lock = fd, threading.Lock()
        self.head, self.tail, self.dropped = bytearray(), bytearray(), 0
        self.thread = threading.Thread(target=self.drain, daemon=True)
        self.thread.start()

    def drain(self):
        while True:
            try:
                data = os.read(self.fd, 1 << 16)
            except OSError:
                return
            if not data:
                return
            with self.lock:
                room = OUTPUT_KEEP // 2 - len(self.head)
                self.head += data[:max(room, 0)]
                self.tail = (self.tail + data[max(room, 0):])
                if len(self.tail) > OUTPUT_KEEP // 2:
                    self.dropped += len(self.tail) - OUTPUT_KEEP // 2
                    self.tail = self.tail[-(OUTPUT_KEEP // 2):]

    def take(self, settle=0.01):
        time.sleep(settle)  # what was written just before the end
        with self.lock:
            text = self.head.decode("utf-8", "replace")
            if self.dropped:
                text += f"\n... [{self.dropped} characters cut] ...\n"
            text += self.tail.decode("utf-8", "replace")
            self.head, self.tail, self.dropped = bytearray(), bytearray(), 0
        return text

    def text(self):
        self.thread.join(5)
        return self.take()

    def close(self):
        self.thread.join(1)
        try:
            os.close(self.fd)
        except OSError:
            pass


# ----------------------------------------------------------------------------- requests and proxies

def monkeypatched():
    """The functions of WATCHED modules that the test replaced, as dotted names."""
    return [f"{module.__name__}.{name}" for module, originals in ORIGINALS for name, original in originals.items()
            if getattr(module, name, original) is not original]


ORIGINALS = [(m, {n: v for n, v in vars(m).items() if callable(v) and not n.startswith("_")}) for m in WATCHED]


class Session:
    """One test's child in the jail."""

    def __init__(self, jail, sock, deadline):
        self.jail, self.sock, self.deadline, self.dead, self.code = jail, sock, deadline, None, None

    def handle(self, value):
        if isinstance(value, Remote):
            if object.__getattribute__(value, "_session") is not self:
                raise TypeError("an object of your code from another test")
            return {"handle": object.__getattribute__(value, "_handle")}
        raise TypeError(f"a {type(value).__name__} cannot be passed to your code")

    def remote(self, h):
        if type(h.get("handle")) is not int or len(h) != 2 or type(h.get("type")) is not str:
            raise wire.WireError("malformed handle")
        return Remote(self, h["handle"], h["type"][:80])

    def request(self, op, target=None, **fields):
        __tracebackhide__ = True  # pytest shows the test's line, not the grader's
        if self.dead:
            raise JailError(self.dead)
        generators = [v for v in list(fields.get("args", ())) + list(fields.get("kwargs", {}).values())
                      if type(v) is torch.Generator]
        message = {"op": op, "target": target, **fields, "rng": torch.get_rng_state(),
                   "grad": torch.is_grad_enabled(), "device": str(torch.get_default_device()),
                   "forbid": monkeypatched()}
        data = wire.pack(message, self.handle)  # TypeError / WireError: the test's own fault, not the jail's
        try:
            wire.send(self.sock, data)
            reply = wire.unpack(wire.recv(self.sock, self.deadline), self.remote)
            if type(reply) is not dict:
                raise wire.WireError("an answer that is not a dict")
            if "error" in reply:
                error = remote_error(reply["error"])
            else:
                rng, states = reply["rng"], reply["generators"]
                if not torch.is_tensor(rng) or rng.shape != torch.get_rng_state().shape or rng.dtype != torch.uint8:
                    raise wire.WireError("a malformed RNG state")
                torch.set_rng_state(rng)
                if type(states) is not list or len(states) != len(generators):
                    raise wire.WireError("malformed generator states")
                for g, state in zip(generators, states):
                    g.set_state(state)
                return reply["ok"]
        except TimeoutError:
            self.kill("timed out: still running after the test's time limit, stopped")
        except (EOFError, OSError):
            self.kill("the process running your code died during this test")
        except (wire.WireError, KeyError, TypeError, RuntimeError) as e:
            self.kill(f"your code sent an answer that cannot be checked: {e}")
        if self.dead:
            raise JailError(self.dead)
        raise error

    def kill(self, why):
        """End the child: nothing it says from now on counts."""
        self.close()
        self.code = self.jail.end_child()
        self.dead = why + (f" ({describe(self.code)})" if self.code not in (None, 0) else "")

    def close(self):
        self.sock.close()


def describe(code):
    return f"killed by signal {-code}" if code < 0 else f"exit code {code}"


def remote_error(error):
    """The exception to raise for an error the jail reports: a builtin type by name, else JailError."""
    if type(error) is not dict or type(error.get("message")) is not str or type(error.get("type")) is not str:
        raise wire.WireError("a malformed error")
    kind, message, where = error["type"][:80], error["message"][:4000], str(error.get("where", ""))[:200]
    base = EXCEPTIONS.get(str(error.get("base")))
    if base is None:
        base, message = JailError, f"{kind}: {message}"
    e = type(kind if kind.isidentifier() else base.__name__, (base,), {})(message)
    e.location = where or None  # where in the student's files (conftest.py shows it)
    return e


class Remote:
    """An object that lives in the jail: attribute reads, calls, indexing and iteration are requests."""

    __slots__ = ("_session", "_handle", "_type")

    def __init__(self, session, handle, kind):
        object.__setattr__(self, "_session", session)
        object.__setattr__(self, "_handle", handle)
        object.__setattr__(self, "_type", kind)

    def _request(self, op, **fields):
        __tracebackhide__ = True
        return object.__getattribute__(self, "_session").request(op, {"handle": object.__getattribute__(
            self, "_handle")}, **fields)

    def __getattr__(self, name):
        __tracebackhide__ = True
        if name.startswith("__"):
            raise AttributeError(name)
        return self._request("getattr", name=name)

    def __setattr__(self, name, value):
        __tracebackhide__ = True
        self._request("setattr", name=name, value=value)

    def __call__(self, *args, **kwargs):
        __tracebackhide__ = True
        return self._request("call", args=list(args), kwargs=kwargs)

    def __getitem__(self, key):
        __tracebackhide__ = True
        return self._request("getitem", key=key)

    def __len__(self):
        n = self._request("len")
        if type(n) is not int or n < 0:
            raise TypeError("len() of your object is not a non-negative int")
        return n

    def __iter__(self):
        items = self._request("list")
        if type(items) is not list:
            raise TypeError("iterating over your object gave no list")
        return iter(items)

    def __repr__(self):
        return f"<{object.__getattribute__(self, '_type')} object of your code>"


class RemoteModule(types.ModuleType):
    """A student module in the trusted process: its attributes are read from the jail."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.__dict__["_remote"], name)


class RemoteImporter(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """`import gpt` (for the student module names) imports it in the current test's jail child."""

    def __init__(self, names):
        self.names, self.session = set(names), None

    def find_spec(self, name, path=None, target=None):
        return importlib.machinery.ModuleSpec(name, self) if name in self.names else None

    def create_module(self, spec):
        if self.session is None:
            raise ImportError(f"{spec.name} is imported outside a test")
        module = RemoteModule(spec.name)
        module.__dict__["_remote"] = self.session.request("import", name=spec.name)
        return module

    def exec_module(self, module):
        pass

    def begin(self, session):
        """A new test: the modules are imported afresh, in its child."""
        self.session = session
        for name in self.names:
            sys.modules.pop(name, None)
