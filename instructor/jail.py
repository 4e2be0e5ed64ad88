"""
The jail: where student code runs during grading, and nothing else does.

Sealed (the default, as root): bubblewrap (`bwrap`) starts the jail process in namespaces of its own:
a file system made only of the system's folders and this Python installation (read-only), the
student's modules read-only in /jail and an empty /tmp (the grading's own: the hidden tests run last, and
what they print is never shown); its own PID space (it dies with the grader,
--die-with-parent), its own network (a loopback of its own: no way to the host's ports or abstract
sockets), IPC and host name; a session of its own (no terminal to write into). It keeps only the
capabilities it needs to make one more set of namespaces per test (instructor/jailed.py): each test's
child is process 1 of a new PID space, with a new IPC space, a fresh /dev/shm and /proc, as the
unprivileged jail user, under no_new_privs. When that process 1 ends, the kernel kills every process
of the test, zombies and their threads included, and takes its System V objects with it: nothing of a
test outlives it, and no test sees the jail process, another test or another submission.

What no tool does, and is written here: resource limits (memory, processes, file size, CPU time, open
files; the OOM killer aims at the jail first) and the per-test namespaces. Where bubblewrap is missing
or the kernel refuses namespaces, grading stops with one line naming what is missing, unless the grader
is told that the grade need not be tamper-proof (unsealed: the jail runs as the jail user, or as this
user when not root, and the trusted process kills every process under it after each test).
"""

import os
import pwd
import resource
import shutil
import socket
import stat
import struct
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time

from instructor import procs

HERE = os.path.dirname(os.path.abspath(__file__))
JAIL_FILES = ("jailed.py", "wire.py")
START_TIMEOUT = 120.0  # seconds for the jail to start python and import torch
OUTPUT_KEEP = 8000  # bytes of the student's printed output kept per test (head and tail)
MEMORY = 4 << 30  # bytes of data (heap, anonymous maps) per jail process
PROCESSES = 128  # processes and threads the jail user may add
FILE_SIZE = 64 << 20  # bytes of one file the jail writes
OPEN_FILES = 256
SYSTEM = ("/usr", "/lib", "/lib32", "/lib64", "/libx32", "/bin", "/sbin", "/etc", "/sys")  # read-only in the jail
MODULES, GRADER = "/jail", "/grader"  # where the student's modules and the jail's own files are in the jail
CAPABILITIES = ("CAP_SYS_ADMIN", "CAP_SETUID", "CAP_SETGID", "CAP_KILL")  # what the jail process keeps: namespaces per test
UNSEALED = "--not-tamper-proof"  # the grader's flag that allows grading without the sandbox


class JailError(Exception):
    """The jail did not answer properly: this test fails, the grading goes on."""


class SealError(JailError):
    """The sandbox cannot be made here: nothing is graded (unless unsealed is allowed)."""


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


def python_folders():
    """The folders of this Python installation (and of its virtual environment) outside the system's folders,
    outermost only."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(sys.executable),
             *sysconfig.get_paths().values()}
    paths = {q for p in paths if os.path.isdir(p) for q in (os.path.realpath(p), os.path.normpath(p))}
    outer = sorted(paths | set(SYSTEM))
    outer = [p for i, p in enumerate(outer) if not any(p.startswith(o + "/") for o in outer[:i])]
    return [p for p in outer if p not in SYSTEM]


def blocking_folder(path, uid, gid, root):
    """The first folder from root down to path that user uid cannot enter, or None."""
    for folder in [root] + [os.path.join(root, *parts[:i + 1]) for parts in [os.path.relpath(path, root).split(os.sep)]
                            for i in range(len(parts))]:
        try:
            info = os.stat(folder)
        except OSError:
            return folder
        bit = stat.S_IXUSR if info.st_uid == uid else stat.S_IXGRP if info.st_gid == gid else stat.S_IXOTH
        if stat.S_ISDIR(info.st_mode) and not info.st_mode & bit:
            return folder
    return None


def bwrap_command(scratch, grader):
    """The bubblewrap command line that starts the sealed jail process."""
    command = [shutil.which("bwrap"), "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
               "--unshare-cgroup-try", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
               "--perms", "1777", "--tmpfs", "/tmp"]  # first: a Python installation in /tmp is bound into it
    for cap in CAPABILITIES:
        command += ["--cap-add", cap]
    for path in [p for p in SYSTEM if os.path.exists(p)] + python_folders():
        parents = [os.path.dirname(path)]
        while parents[-1] != "/":
            parents.append(os.path.dirname(parents[-1]))
        for parent in reversed(parents[:-1]):  # made by bwrap: 0755, not 0700 as it makes them as root
            command += ["--perms", "0755", "--dir", parent]
        command += ["--ro-bind", path, path]
    return command + ["--proc", "/proc", "--dev", "/dev", "--ro-bind", scratch, MODULES, "--ro-bind", grader, GRADER,
                      "--chdir", "/"]


class Jail:
    """The jail of one grading run: the student's modules and a process that forks a child per test.
    start() again after any anomaly gives a fresh process."""

    def __init__(self, modules, user=None, sealed=True, cpu_seconds=600):
        self.modules, self.sealed, self.cpu_seconds = modules, sealed, cpu_seconds
        self.uid, self.gid, self.user = jail_user(user)
        if sealed and os.geteuid() != 0:
            raise SealError(f"only root can seal student code in a sandbox: grade as root, or pass {UNSEALED} "
                            f"to grade without one (student code can then tamper with the grade)")
        if sealed and shutil.which("bwrap") is None:
            raise SealError(f"bubblewrap (bwrap) is not installed, and it seals student code: apt-get install "
                            f"bubblewrap, or pass {UNSEALED} to grade without it")
        self.proc = self.control = self.scratch = self.output = None
        self.inside = (MODULES, GRADER)

    def preexec(self):
        """In the jail process, between fork and exec (as root when the grader is)."""
        for limit, value in ((resource.RLIMIT_DATA, MEMORY), (resource.RLIMIT_FSIZE, FILE_SIZE),
                             (resource.RLIMIT_CPU, self.cpu_seconds), (resource.RLIMIT_NOFILE, OPEN_FILES),
                             (resource.RLIMIT_CORE, 0)):
            resource.setrlimit(limit, (value, value))
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")  # when memory runs out, the jail goes first
        if not self.sealed and os.geteuid() == 0:
            os.setgroups([])
            os.setgid(self.gid)
            os.setuid(self.uid)

    def start(self):
        self.stop()
        self.scratch = tempfile.mkdtemp(prefix="jail-")  # root's: the jail sees it read-only, as /jail
        try:
            self.launch()
        except BaseException:
            self.stop()
            raise

    def launch(self):
        modules, grader = (os.path.join(self.scratch, name) for name in ("modules", "grader"))
        os.mkdir(modules)
        os.mkdir(grader)
        for name in os.listdir(self.modules):
            shutil.copyfile(os.path.join(self.modules, name), os.path.join(modules, name))
        for name in JAIL_FILES:
            shutil.copyfile(os.path.join(HERE, name), os.path.join(grader, name))
        for folder in (self.scratch, modules, grader):
            os.chmod(folder, 0o755)
        if not self.sealed:  # the tests' scratch folders go next to the modules
            os.chown(modules, self.uid, self.gid)
        self.check_python()
        if self.sealed:
            command, where = bwrap_command(modules, grader), (MODULES, GRADER)
        else:
            command, where = [], (modules, grader)
        self.inside = where  # the folders of the student's modules and of jailed.py, as the jail sees them
        ours, theirs = socket.socketpair()
        read_end, write_end = os.pipe()
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/tmp", "LANG": "C.UTF-8",
               "OMP_NUM_THREADS": "1", "TMPDIR": "/tmp"}
        jailed = [sys.executable, "-I", "-u", "-B", os.path.join(where[1], "jailed.py"), str(theirs.fileno()),
                  where[0], str(self.uid), str(self.gid), str(task_count(self.uid) + PROCESSES),
                  "sealed" if self.sealed else "unsealed"]
        try:
            self.proc = subprocess.Popen(command + jailed, env=env, stdin=subprocess.DEVNULL, stdout=write_end,
                                         stderr=write_end, pass_fds=(theirs.fileno(),), start_new_session=True,
                                         preexec_fn=self.preexec, cwd="/" if self.sealed else modules)
        except OSError as e:
            raise JailError(f"cannot start the jail: {e.strerror}") from None
        finally:
            theirs.close()
            os.close(write_end)
        self.control, self.output, self.ready = ours, Output(read_end), False

    def check_python(self):
        """The jail user must be able to read this Python installation, or one line names the folder that blocks
        it (sealed, the sandbox binds the installation's folders in place: the folders above them do not matter)."""
        roots = [p for p in SYSTEM if os.path.exists(p)] + python_folders() if self.sealed else ["/"]
        for path in [sys.executable] + [p for p in sysconfig.get_paths().values() if os.path.isdir(p)]:
            path = os.path.realpath(path)
            root = max((r for r in roots if path == r or path.startswith(r.rstrip("/") + "/")), key=len, default="/")
            blocked = blocking_folder(path, self.uid, self.gid, root)
            if blocked:
                raise JailError(f"user {self.user} cannot run {sys.executable}: it cannot enter {blocked}; grade "
                                f"with a Python installation that user can read, or name another user with "
                                f"--jail-user")

    def wait_ready(self):
        """Wait for the jail's "ready" (python started, torch imported): start() returns without waiting so that
        the trusted process prepares its tests meanwhile."""
        if self.ready:
            return
        try:
            self.control.settimeout(START_TIMEOUT)
            ready = self.control.recv(1)
        except OSError:
            ready = b""
        if ready != b"R":
            said = self.output.text().strip()
            self.stop()
            raise self.start_error(said)
        self.ready = True

    def start_error(self, said):
        """Why the jail did not start, in one line."""
        sandbox = [line for line in said.splitlines() if line.startswith("bwrap:")]
        if sandbox:
            return SealError(f"the sandbox cannot start here ({sandbox[-1]}): grade where bubblewrap can make its "
                             f"namespaces, or pass {UNSEALED} to grade without the sandbox")
        return JailError(f"the jail could not start python as user {self.user}: {said[-600:] or 'no output'}")

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def child(self):
        """A fresh child for one test. -> (the socket to talk to it, the read end of the pipe where it writes its
        stacks when a request runs too long, non-blocking) (instructor/remote.py's Session)."""
        if not self.alive():
            self.start()
        self.wait_ready()
        ours, theirs = socket.socketpair()
        stacks, stacks_end = os.pipe()
        try:
            try:
                socket.send_fds(self.control, [b"F"], [theirs.fileno(), stacks_end])
            except OSError:
                self.start()
                self.wait_ready()
                socket.send_fds(self.control, [b"F"], [theirs.fileno(), stacks_end])
        except BaseException:
            ours.close()
            os.close(stacks)
            raise
        finally:
            theirs.close()
            os.close(stacks_end)
        os.set_blocking(stacks, False)
        self.output.take(settle=0)
        return ours, stacks

    def end_child(self):
        """Kill the current test's child and everything it started. -> its exit code as the jail saw it, or None."""
        try:
            self.control.sendall(b"K")
            if not self.sealed:  # no PID space of its own: whatever escaped the child is found by walking /proc
                procs.kill_tree(os.getpid(), keep={self.proc.pid})
            self.control.settimeout(5)
            return struct.unpack("<i", self.control.recv(4, socket.MSG_WAITALL))[0]
        except (OSError, struct.error):
            self.stop()  # out of step: start afresh for the next test
            return None

    def printed(self):
        """What the jail printed since the current test's child started."""
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
