"""
The jail's side: the jail process, started by instructor/jail.py (sealed: inside bubblewrap, as root of
its namespaces; unsealed: as the jail user), with this file and wire.py in a read-only folder of their own.

    python jailed.py CONTROL_FD MODULES UID GID NPROC sealed|unsealed

It imports torch once and says "ready" on the control socket. For each test it receives a fresh socket
and forks a child that makes a new PID and IPC space (sealed) and forks the test's process: process 1
of that PID space, with its own /proc and /dev/shm, as user UID under no_new_privs, serving the
grader's requests on the socket (import a student module from MODULES, read or set an attribute, call,
index, iterate). On "K" from the grader it kills that process, which takes every process of the test
with it, and reports its exit code. Student code runs only in those processes; nothing here is trusted.
"""

import ctypes
import importlib
import os
import resource
import signal
import socket
import struct
import sys
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [HERE] + [p for p in sys.path if os.path.abspath(p or ".") != HERE]

import torch  # noqa: E402 (after the sys.path change)
import torch.nn.functional  # noqa: E402,F401 (what the student modules import, loaded once before forking)

import wire  # noqa: E402

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWPID = 0x20000, 0x08000000, 0x20000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 2, 4, 8, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
libc = ctypes.CDLL(None, use_errno=True)
MODULES = os.path.abspath(sys.argv[2]) if __name__ == "__main__" else HERE


def forbidding(name):
    def forbidden(*args, **kwargs):
        raise AssertionError(f"{name} is replaced by the test here: compute it yourself")
    return forbidden


class Server:
    """Serves one test: objects made for the grader stay here, named by handles."""

    def __init__(self, sock):
        self.sock, self.objects, self.patched, self.tracer = sock, [], {}, None
        self.written = []  # [position, tensor] of the last call's tensor arguments that it changed in place

    def handle(self, obj):
        self.objects.append(obj)
        return {"handle": len(self.objects) - 1, "type": type(obj).__name__[:80]}

    def lookup(self, h):
        i = h.get("handle")
        if type(i) is not int or not 0 <= i < len(self.objects):
            raise wire.WireError("unknown handle")
        return self.objects[i]

    def forbid(self, names):
        """Replace the torch functions the grader's test replaced (monkeypatched), and only those."""
        if sorted(names) == sorted(self.patched):
            return
        for name, (module, attr, original) in self.patched.items():
            setattr(module, attr, original)
        self.patched = {}
        for name in names:
            module_name, attr = name.rsplit(".", 1)
            module = importlib.import_module(module_name)
            self.patched[name] = (module, attr, getattr(module, attr))
            setattr(module, attr, forbidding(name))

    def run(self, request):
        op, h = request["op"], request.get("target")
        obj = self.lookup(h) if h is not None else None
        if op == "import":
            return importlib.import_module(request["name"])
        if op == "getattr":
            return getattr(obj, request["name"])
        if op == "setattr":
            return setattr(obj, request["name"], request["value"])
        if op == "call":
            args, kwargs = request["args"], request["kwargs"]
            tensors = [(at, t) for at, t in [*enumerate(args), *kwargs.items()] if isinstance(t, torch.Tensor)]
            versions = [t._version for _, t in tensors]  # counts the in-place writes to each
            value = obj(*args, **kwargs)
            self.written = [[at, t] for (at, t), version in zip(tensors, versions) if t._version != version]
            return value
        if op == "getitem":
            return obj[request["key"]]
        if op == "len":
            return len(obj)
        if op == "list":
            return list(obj)
        if op == "mkdtemp":
            import tempfile
            return tempfile.mkdtemp(dir=SCRATCH)
        if op == "trace":
            self.tracer = LineTracer(request["files"])
            return self.tracer.start()
        if op == "untrace":
            return self.tracer.stop() if self.tracer else {}
        raise wire.WireError(f"unknown request {op!r}")

    def serve(self):
        while True:
            try:
                request = wire.unpack(wire.recv(self.sock), self.lookup)
            except EOFError:
                return
            try:
                if request["rng"] is not None:  # the test drew or seeded: its stream is ours from here
                    torch.set_rng_state(request["rng"])
                self.forbid(request["forbid"])
                autocast = wire.DTYPES.get(request["autocast"])
                with torch.set_grad_enabled(request["grad"]), \
                        torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
                    if request["device"] != "cpu":
                        with torch.device(request["device"]):
                            value = self.run(request)
                    else:
                        value = self.run(request)
                reply = {"ok": value, "written": self.written}
                self.written = []
            except BaseException as e:  # SystemExit and KeyboardInterrupt from student code too
                base = next(c for c in type(e).__mro__ if c.__module__ == "builtins")  # DataError -> ValueError
                reply = {"error": {"type": type(e).__name__[:80], "base": base.__name__, "message": str(e)[:4000],
                                   "where": where(e)}}
            sys.stdout.flush()
            sys.stderr.flush()
            try:
                data = wire.pack(reply, self.handle, track=True)
            except Exception as e:
                data = wire.pack({"error": {"type": "TypeError", "where": "",
                                            "message": f"your code returned a value that cannot be checked: {e}"}},
                                 self.handle)
            wire.send(self.sock, data)


def where(error):
    """'gpt.py:212 in forward': the innermost frame of the student's files."""
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if f.filename.startswith(MODULES + os.sep)]
    if not frames:
        return ""
    f = frames[-1]
    return f"{os.path.relpath(f.filename, MODULES)}:{f.lineno} in {f.name}"


class LineTracer:
    """The lines executed in some files, through sys.settrace (for `python -m instructor check`)."""

    def __init__(self, files):
        self.files = {os.path.join(MODULES, f): f for f in files}
        self.lines = {}

    def start(self):
        sys.settrace(self.on_call)

    def stop(self):
        sys.settrace(None)
        return {f: sorted(lines) for f, lines in self.lines.items()}

    def on_call(self, frame, event, arg):
        name = self.files.get(frame.f_code.co_filename)
        if name is None:
            return None
        lines = self.lines.setdefault(name, set())

        def on_line(frame, event, arg):
            if event == "line":
                lines.add(frame.f_lineno)
            return on_line
        return on_line


def isolate(uid, gid, nproc, sealed):
    """In the test's process, before any student code: (sealed) process 1 of its PID space gets its own /proc
    and /dev/shm; then it becomes the jail user for good, and dies with its parent."""
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if sealed:
        if libc.unshare(CLONE_NEWNS) != 0:
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
        libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None)
        libc.mount(b"tmpfs", b"/dev/shm", b"tmpfs", MS_NOSUID | MS_NODEV, b"size=64m,mode=1777")
        libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
    if os.geteuid() == 0:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)  # every capability goes with it
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)  # no setuid program gives privileges back
    sys.path.insert(0, MODULES)
    os.chdir(MODULES)


def run_test(sock, control, uid, gid, nproc, sealed):
    """Fork the test's process (in a new PID and IPC space when sealed). -> (the forked child, the test's pid,
    a pipe that gives the test's exit code once it ended)."""
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            control.close()
            os.close(read_end)
            if sealed and libc.unshare(CLONE_NEWPID | CLONE_NEWIPC) != 0:
                raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWPID | CLONE_NEWIPC)")
            test = os.fork()
            if test == 0:
                os.close(write_end)
                isolate(uid, gid, nproc, sealed)
                Server(sock).serve()
                os._exit(0)
            sock.close()
            os.write(write_end, struct.pack("<i", test))
            _, status = os.waitpid(test, 0)  # process 1 ends only when every process of its PID space has
            os.write(write_end, struct.pack("<i", os.waitstatus_to_exitcode(status)))
        finally:
            os._exit(0)
    os.close(write_end)
    sock.close()
    test = os.read(read_end, 4)
    return child, struct.unpack("<i", test)[0] if len(test) == 4 else None, read_end


def main():
    control = socket.socket(fileno=int(sys.argv[1]))
    uid, gid, nproc, sealed = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6] == "sealed"
    control.sendall(b"R")  # ready: torch imported
    while True:
        try:
            _, fds, _, _ = socket.recv_fds(control, 1, 1)
        except OSError:
            return
        if not fds:
            return  # the grader closed the control socket
        child, test, codes = run_test(socket.socket(fileno=fds[0]), control, uid, gid, nproc, sealed)
        end = control.recv(1)  # "K": the test is over
        if test is not None:
            try:
                os.kill(test, signal.SIGKILL)
            except ProcessLookupError:
                pass
        os.waitpid(child, 0)
        code = os.read(codes, 4)
        os.close(codes)
        control.sendall(code if len(code) == 4 else struct.pack("<i", -signal.SIGKILL))
        if not end:
            return


if __name__ == "__main__":
    SCRATCH = "/tmp" if sys.argv[6] == "sealed" else MODULES
    main()
