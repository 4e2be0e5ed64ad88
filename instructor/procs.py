"""
Process trees: every process under a pid, killed until none is left. The grader's trusted test process
makes itself a child subreaper, so that what the jail starts (setsid and double forks included) stays
under it, where these functions find it.
"""

import ctypes
import os
import signal
import time

PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER, PR_GET_CHILD_SUBREAPER = 1, 36, 37
libc = ctypes.CDLL(None, use_errno=True)


def become_subreaper():
    """Orphans of our descendants come to us, not to init: they stay where kill_tree() finds them."""
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def is_subreaper():
    flag = ctypes.c_int(0)
    libc.prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(flag), 0, 0, 0)
    return bool(flag.value)


def on_parent_death(sig):
    """Have sig sent to this process when its parent dies (and at once if it already has)."""
    parent = os.getppid()
    libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if os.getppid() != parent or parent == 1:
        os.kill(os.getpid(), sig)


def children():
    """{parent pid: [child pids]} of every process, read from /proc."""
    tree = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            fields = stat[stat.rfind(b")") + 2:].split()
            if fields[0] != b"Z":  # zombies are reaped below, not killed
                tree.setdefault(int(fields[1]), []).append(int(name))
    return tree


def descendants(pid):
    tree, out, todo = children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), ()):
            out.append(child)
            todo.append(child)
    return out


def reap():
    """Collect the zombies of orphans that came to us as their subreaper."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def kill_tree(pid, keep=()):
    """SIGKILL every descendant of pid but those in keep (and their own descendants are killed too, unless
    kept), until none is left: a killed process cannot fork, so forks racing the kill run out."""
    for _ in range(1000):
        victims = [p for p in descendants(pid) if p not in keep]
        if not victims:
            return
        for p in victims:
            try:
                os.kill(p, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.005)
        if pid == os.getpid():
            reap()
