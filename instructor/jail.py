"""
The jail: where student code runs during grading, and nothing else does.

One process per grading run (started again after any anomaly) imports torch and forks a fresh child
for each test (instructor/jailed.py); the trusted test process talks to that child (instructor/remote.py).
When the grader is root, the jail runs as an unprivileged user (`nobody` unless told otherwise; the
grader's own user otherwise, with a warning), in a mount namespace where only the system's folders and
this Python installation are in sight, with an empty /tmp of its own holding its scratch folder and a
/proc showing only its own processes (where the kernel allows namespaces; file permissions otherwise).
It has limits on memory, processes, file size, CPU time and open files, no way back to privileges
(no_new_privs), and the kernel's OOM killer aims at it first. The trusted process is a child subreaper,
so every process the jail starts stays its descendant (setsid and double forks included) and
procs.kill_tree() ends them all after each test.
"""

import ctypes
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

from instructor import procs

HERE = os.path.dirname(os.path.abspath(__file__))
JAIL_FILES = ("jailed.py", "wire.py")
START_TIMEOUT = 120.0  # seconds for the jail to start python and import torch
OUTPUT_KEEP = 8000  # bytes of the student's printed output kept per test (head and tail)
MEMORY = 4 << 30  # bytes of data (heap, anonymous maps) per jail process
PROCESSES = 128  # processes and threads the jail user may add
FILE_SIZE = 64 << 20  # bytes of one file the jail writes
OPEN_FILES = 256
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


def under_scratch(keep):
    """The kept folders inside /tmp or /dev/shm (e.g. a virtual environment in /tmp), outermost only: they are
    put back into the jail's own empty /tmp and /dev/shm."""
    inside = sorted(k for k in keep if os.path.isdir(k) and any(k.startswith(s + "/") for s in SCRATCH))
    return [k for i, k in enumerate(inside) if not any(k.startswith(o + "/") for o in inside[:i])]


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


def seclude(covered, put_back):
    """In a new mount namespace (as root, before dropping privileges): cover every path of covered (folders with
    an empty read-only tmpfs, files with /dev/null), give the jail its own empty /tmp and /dev/shm with the
    folders of put_back (its scratch folder, ...) back in place, and show it only its own processes in /proc.
    Best effort: where the kernel refuses (unprivileged containers), nothing changes and file permissions
    alone keep things out of sight."""
    if libc.unshare(CLONE_NEWNS) != 0:
        return
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    fds = {path: os.open(path, os.O_RDONLY | os.O_DIRECTORY) for path in put_back}
    for path, is_dir in covered:
        if is_dir:
            mount("tmpfs", path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,mode=0")
        else:
            mount("/dev/null", path, None, MS_BIND)
    for path in SCRATCH:
        mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, "size=64m,mode=1777")
    for path, fd in fds.items():
        os.makedirs(path, exist_ok=True)
        mount(f"/proc/self/fd/{fd}", path, None, MS_BIND)
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
            seclude(self.covered, [self.scratch, *under_scratch(self.in_sight)])
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
        self.in_sight = in_sight()
        self.covered = out_of_sight(self.in_sight) if os.geteuid() == 0 else []
        ours, theirs = socket.socketpair()
        read_end, write_end = os.pipe()
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": self.scratch, "LANG": "C.UTF-8",
               "OMP_NUM_THREADS": "1", "TMPDIR": self.scratch}
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-u", "-B", os.path.join(self.scratch, "jailed.py"), str(theirs.fileno())],
                cwd=self.scratch, env=env, stdin=subprocess.DEVNULL, stdout=write_end, stderr=write_end,
                pass_fds=(theirs.fileno(),), start_new_session=True, preexec_fn=self.preexec)
        except OSError as e:
            raise JailError(f"user {self.user} cannot run {sys.executable} ({e.strerror}): grade with a Python "
                            f"installation that user can read, e.g. a virtual environment outside private home "
                            f"folders, or name another user with --jail-user") from None
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

    def child(self):
        """A fresh child for one test. -> the socket to talk to it (instructor/remote.py's Session)."""
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
        return ours

    def end_child(self):
        """Kill the current test's child and everything it started. -> its exit code as the jail saw it, or None."""
        if self.alive():
            procs.kill_tree(os.getpid(), keep={self.proc.pid})
        try:
            self.control.settimeout(2)
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
