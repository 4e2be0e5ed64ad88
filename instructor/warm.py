"""
The warm start of class grading: this process imports what the trusted side of grading needs (torch, pytest, the
grader) once, then forks one grading (`python -m instructor.grade`'s main) per submission, which forks its trusted
test process from that warm state in turn (grade.WARM). A class of 300 pays that start-up once, not 300 times.
The jail still starts fresh for every submission: its own sandbox, so nothing of one student's run (processes,
loopback network, /tmp, IPC) is ever shared with another's.

grade-all (instructor/grade_all.py) talks to it over its stdin and stdout, one JSON line each way:
    {"id": N, "argv": [grade's arguments], "log": path}   in: grade one submission, its stderr to path
    {"id": N, "pid": PID}                                 out: started, in a session of its own (PID's group)
    {"id": N, "exit": CODE}                               out: ended
When its stdin closes (grade-all ended or died), it kills the gradings still running and exits.
"""

import contextlib
import json
import os
import selectors
import signal
import sys
import traceback

import pytest  # noqa: F401 (imported once here: every grading forked from this process has it)
import torch  # noqa: F401

from instructor import grade, make_reference, remote, runner  # noqa: F401


def send(message):
    os.write(1, (json.dumps(message) + "\n").encode())


def graded(request, closing):
    """In the forked child: one grading. Never returns."""
    code = 1
    try:
        os.setsid()  # a session of its own: grade-all stops it with its whole group
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for fd in closing:
            os.close(fd)
        null = os.open(os.devnull, os.O_RDWR)
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        for fd, target in ((null, 0), (null, 1), (log, 2)):
            os.dup2(fd, target)
        code = grade.main(request["argv"])
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stderr.flush()
        os._exit(code)


def main():
    grade.WARM = True
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_read, False)
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes select() through the wakeup fd
    selector = selectors.DefaultSelector()
    selector.register(0, selectors.EVENT_READ)
    selector.register(wake_read, selectors.EVENT_READ)
    running, pending = {}, b""  # {pid: request id}
    while True:
        for key, _ in selector.select():
            if key.fd == wake_read:
                while os.read(wake_read, 512) == 512:
                    pass
                continue
            data = os.read(0, 1 << 16)
            if not data:
                for pid in running:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(pid, signal.SIGKILL)
                return 0
            *lines, pending = (pending + data).split(b"\n")
            for line in filter(None, lines):
                request = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    graded(request, (wake_read, wake_write))
                running[pid] = request["id"]
                send({"id": request["id"], "pid": pid})
        while running:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            if pid in running:
                send({"id": running.pop(pid), "exit": os.waitstatus_to_exitcode(status)})


if __name__ == "__main__":
    sys.exit(main())
