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

Hangs: with each test's socket comes a pipe. At the test's first request (and again at a request that
comes after it went off), faulthandler's watchdog (a thread of C, which needs neither the GIL nor signals)
is armed to write the stacks of every thread to that pipe shortly before the test's time runs out, so
that the grader can tell where a hung test was. After a hang the grader sends the places where earlier
tests hung ("watch": [file, function, line]); a test that reaches one of them stops there at once and its
reply says which ({"watched": index}) instead of waiting for a timeout.
"""

import ast
import builtins
import ctypes
import faulthandler
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import resource
import signal
import socket
import struct
import sys
import time
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


class Watched(BaseException):
    """Raised where a test reaches a place where an earlier test hung (not an Exception: `except Exception` in
    student code does not stop it, and the reply says "watched" whatever the code does with it)."""


class Watch(importlib.abc.MetaPathFinder):
    """Stops the test where it reaches one of some lines (places where earlier tests hung): the student's modules
    that hold them are compiled with a call before the innermost statement on each of those lines, in the
    function named there, so that nothing else runs slower."""

    CALL = "__grader_hung_here__"  # a builtin of this process: the call put in the student's code

    def __init__(self, server, spots):
        self.server, self.spots = server, {}
        for i, spot in enumerate(spots):
            if type(spot) is list and len(spot) == 3 and all(type(x) is str for x in spot[:2]) \
                    and type(spot[2]) is int:
                self.spots.setdefault(os.path.join(MODULES, spot[0]), []).append((spot[1], spot[2], i))

    def start(self):
        if self.spots:
            setattr(builtins, self.CALL, self.hit)
            sys.meta_path.insert(0, self)

    def hit(self, i):
        self.server.hit = i
        raise Watched()

    def find_spec(self, name, path=None, target=None):
        if path is not None or os.path.join(MODULES, name + ".py") not in self.spots:
            return None  # not a student's module with a watched line: the usual finders
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.origin not in self.spots \
                or type(spec.loader) is not importlib.machinery.SourceFileLoader:
            return None
        spec.loader = Watching(name, spec.origin, self)
        return spec

    def mark(self, tree, path):
        """Put the calls into tree, the parsed module at path."""
        scope, depth, siblings = {tree: "<module>"}, {tree: 0}, {}  # the function (code object) each node runs in
        for node in ast.walk(tree):  # breadth first: a node's scope is known before its children's
            named = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))  # a code object of its own
            inner = node.name if named else scope[node]
            for value in (v for _, v in ast.iter_fields(node)):
                for child in value if type(value) is list else [value]:
                    if isinstance(child, ast.AST):
                        scope[child], depth[child] = inner, depth[node] + 1
                        if type(value) is list and isinstance(child, ast.stmt):
                            siblings[child] = value
        for function, line, i in self.spots[path]:
            inside = [n for n in siblings if n.lineno <= line <= (n.end_lineno or n.lineno)]
            if not inside:
                continue
            stmt = max(inside, key=depth.get)  # the innermost statement on that line
            if scope[stmt] != function:
                continue
            call = ast.Expr(ast.Call(ast.Name(self.CALL, ast.Load()), [ast.Constant(i)], []))
            siblings[stmt].insert(siblings[stmt].index(stmt), ast.fix_missing_locations(ast.copy_location(call, stmt)))


class Watching(importlib.machinery.SourceFileLoader):
    """Compiles a student's module with Watch's calls in it."""

    def __init__(self, name, path, watch):
        super().__init__(name, path)
        self.watch = watch

    def source_to_code(self, data, path, *args, **kwargs):
        try:
            tree = ast.parse(importlib.util.decode_source(data), path)
            self.watch.mark(tree, path)
            return compile(tree, path, "exec", dont_inherit=True)
        except Exception:  # as it is, then: a test that reaches the place hangs again
            return super().source_to_code(data, path, *args, **kwargs)


class Server:
    """Serves one test: objects made for the grader stay here, named by handles."""

    def __init__(self, sock, stacks=None):
        self.sock, self.objects, self.patched, self.tracer = sock, [], {}, None
        self.stacks = stacks  # the pipe where faulthandler writes the stacks when a request runs too long
        self.dump_at = None  # when it does (time.monotonic())
        self.hit = None  # the watched place this test reached
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
        if op == "watch":
            if type(request.get("spots")) is not list:
                raise wire.WireError("malformed watch")
            return Watch(self, request["spots"]).start()
        raise wire.WireError(f"unknown request {op!r}")

    def serve(self):
        while True:
            try:
                request = wire.unpack(wire.recv(self.sock), self.lookup)
            except EOFError:
                return
            dump_in, now = request.get("dump_in"), time.monotonic()
            if self.stacks is not None and type(dump_in) in (int, float) and 0 <= dump_in < 1e6 \
                    and (self.dump_at is None or now >= self.dump_at):  # once per test, unless it went off already
                faulthandler.dump_traceback_later(max(dump_in, 0.001), file=self.stacks)
                self.dump_at = now + dump_in
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
            if self.hit is not None:  # whatever the code did after: the test reached a place that hung before
                reply = {"watched": self.hit}
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


def run_test(sock, stacks, control, uid, gid, nproc, sealed):
    """Fork the test's process (in a new PID and IPC space when sealed), serving sock, its stacks written to the
    pipe stacks (an fd, or None) when a request runs too long. -> (the forked child, the test's pid, a pipe that
    gives the test's exit code once it ended)."""
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
                Server(sock, stacks).serve()
                os._exit(0)
            sock.close()
            if stacks is not None:
                os.close(stacks)
            os.write(write_end, struct.pack("<i", test))
            _, status = os.waitpid(test, 0)  # process 1 ends only when every process of its PID space has
            os.write(write_end, struct.pack("<i", os.waitstatus_to_exitcode(status)))
        finally:
            os._exit(0)
    os.close(write_end)
    sock.close()
    if stacks is not None:
        os.close(stacks)
    test = os.read(read_end, 4)
    return child, struct.unpack("<i", test)[0] if len(test) == 4 else None, read_end


def main():
    control = socket.socket(fileno=int(sys.argv[1]))
    uid, gid, nproc, sealed = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6] == "sealed"
    control.sendall(b"R")  # ready: torch imported
    while True:
        try:
            _, fds, _, _ = socket.recv_fds(control, 1, 2)
        except OSError:
            return
        if not fds:
            return  # the grader closed the control socket
        child, test, codes = run_test(socket.socket(fileno=fds[0]), fds[1] if len(fds) > 1 else None, control, uid,
                                      gid, nproc, sealed)
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
