"""
The jail's side: runs as the unprivileged jail user, in its scratch folder, next to the student's modules.

    python jailed.py CONTROL_FD

It imports torch once, says "ready" on the control socket, then for each test receives a fresh socket,
forks a child that serves the grader's requests on it (import a module, read or set an attribute, call,
index, iterate) and reports the child's exit code when it ends. Student code runs only in those
children. Nothing here is trusted: the grader checks every answer (instructor/jail.py).
"""

import importlib
import os
import socket
import struct
import sys
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [HERE] + [p for p in sys.path if os.path.abspath(p or ".") != HERE]

import torch  # noqa: E402 (after the sys.path change)
import torch.nn.functional  # noqa: E402,F401 (what the student modules import, loaded once before forking)

import wire  # noqa: E402

OWN_FILES = {os.path.join(HERE, name) for name in ("jailed.py", "wire.py")}


def forbidding(name):
    def forbidden(*args, **kwargs):
        raise AssertionError(f"{name} is replaced by the test here: compute it yourself")
    return forbidden


class Server:
    """Serves one test: objects made for the grader stay here, named by handles."""

    def __init__(self, sock):
        self.sock, self.objects, self.patched, self.tracer = sock, [], {}, None

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
            return obj(*request["args"], **request["kwargs"])
        if op == "getitem":
            return obj[request["key"]]
        if op == "len":
            return len(obj)
        if op == "list":
            return list(obj)
        if op == "mkdtemp":
            import tempfile
            return tempfile.mkdtemp(dir=HERE)
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
            generators = [v for v in list(request.get("args", ())) + list(request.get("kwargs", {}).values())
                          if type(v) is torch.Generator]
            try:
                if request["rng"] is not None:  # else unchanged since the last answer
                    torch.set_rng_state(request["rng"])
                before = torch.get_rng_state()
                self.forbid(request["forbid"])
                with torch.set_grad_enabled(request["grad"]):
                    if request["device"] != "cpu":
                        with torch.device(request["device"]):
                            value = self.run(request)
                    else:
                        value = self.run(request)
                after = torch.get_rng_state()
                reply = {"ok": value, "rng": None if torch.equal(after, before) else after,
                         "generators": [g.get_state() for g in generators]}
            except BaseException as e:  # SystemExit and KeyboardInterrupt from student code too
                base = next(c for c in type(e).__mro__ if c.__module__ == "builtins")  # DataError -> ValueError
                reply = {"error": {"type": type(e).__name__[:80], "base": base.__name__, "message": str(e)[:4000],
                                   "where": where(e)}}
            sys.stdout.flush()
            sys.stderr.flush()
            try:
                data = wire.pack(reply, self.handle)
            except Exception as e:
                data = wire.pack({"error": {"type": "TypeError", "where": "",
                                            "message": f"your code returned a value that cannot be checked: {e}"}},
                                 self.handle)
            wire.send(self.sock, data)


def where(error):
    """'gpt.py:212 in forward': the innermost frame of the student's files."""
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if f.filename.startswith(HERE) and f.filename not in OWN_FILES]
    if not frames:
        return ""
    f = frames[-1]
    return f"{os.path.relpath(f.filename, HERE)}:{f.lineno} in {f.name}"


class LineTracer:
    """The lines executed in some files, through sys.settrace (for `python -m instructor check`)."""

    def __init__(self, files):
        self.files = {os.path.join(HERE, f): f for f in files}
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


def main():
    control = socket.socket(fileno=int(sys.argv[1]))
    control.sendall(b"R")  # ready: torch imported
    while True:
        try:
            _, fds, _, _ = socket.recv_fds(control, 1, 1)
        except OSError:
            return
        if not fds:
            return  # the grader closed the control socket
        pid = os.fork()
        if pid == 0:
            control.close()
            try:
                Server(socket.socket(fileno=fds[0])).serve()
            finally:
                os._exit(0)
        os.close(fds[0])
        _, status = os.waitpid(pid, 0)
        control.sendall(struct.pack("<i", os.waitstatus_to_exitcode(status)))


if __name__ == "__main__":
    main()
