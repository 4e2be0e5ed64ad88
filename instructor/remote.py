"""
The trusted side of the trust boundary: the student modules as the graded tests see them.

`import gpt` in the trusted test process (instructor/runner.py) gives a RemoteModule. Reading its
attributes, calling what they hold, indexing and iterating are requests to the current test's child in
the jail (instructor/jail.py); tensors and plain values come back by value (instructor/wire.py: JSON and
safetensors, never pickle), everything else stays in the jail and comes back as a Remote handle. Each
request carries the trusted process's grad mode, CPU autocast, default device and the torch functions the
test monkeypatched, and its torch RNG state whenever the test changed it (drew or seeded) since the last
request: otherwise the jail's own stream goes on, as it would in-process. Nothing of the jail's state ever
comes back. A call's in-place writes to the test's tensors are mirrored into them. The assertions,
reference values, grade-time inputs and hidden tests never leave the trusted process; the jail only
answers questions. A late, oversized, malformed or missing answer raises JailError:
that test fails, its child is killed, and the grading goes on.

When a request runs out of time, the stacks its child wrote shortly before (instructor/jailed.py) say where
it hung: parse_stacks keeps, of the thread that serves the requests, only the frames of the student's files
as (file name, line number, function name), each checked against a pattern; the runner tells from them,
with its own copies of the files, which function and TODO region hung (instructor/runner.py). A test that
reaches a place where an earlier test hung stops at once: its child answers "watched" with the index of
one of the places this side sent, and this side says why from its own list.
"""

import importlib.abc
import importlib.machinery
import os
import re
import sys
import time
import types

import torch
from torch.nn import functional as F

from instructor import wire
from instructor.jail import JailError

EXCEPTIONS = {e.__name__: e for e in (
    ArithmeticError, AssertionError, AttributeError, ImportError, IndexError, KeyError, LookupError, MemoryError,
    ModuleNotFoundError, NameError, NotImplementedError, OverflowError, RecursionError, RuntimeError, SyntaxError,
    TypeError, UnboundLocalError, ValueError, ZeroDivisionError)}
WATCHED = (torch, F)  # modules whose functions a test may monkeypatch, forwarded to the jail
TIMED_OUT = "timed out: still running after the test's time limit, stopped"
STACKS_LIMIT = 256 << 10  # bytes of stacks read from a hung child
STACKS_WAIT = 0.5  # seconds to wait for stacks that are not there yet when the time ran out
MAX_FRAMES = 100
THREAD = re.compile(r"(?:Current thread|Thread) 0x[0-9a-f]{1,16}\b.{0,200}\(most recent call first\):")
FRAME = re.compile(r'  File "([^"\n]{1,1000})", line ([0-9]{1,9}) in (\S{1,200})')
FUNCTION = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,99}|<(?:module|lambda|listcomp|setcomp|dictcomp|genexpr)>")
MODULE_FILE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,99}\.py")


def monkeypatched():
    """The functions of WATCHED modules that the test replaced, as dotted names."""
    return [f"{module.__name__}.{name}" for module, originals in ORIGINALS
            if not originals.items() <= vars(module).items()  # all in place (one C loop): the usual case
            for name, original in originals.items() if getattr(module, name, original) is not original]


def manual_seed(seed, _seed=torch.manual_seed):
    """torch.manual_seed in the trusted process: the next request sends the RNG state even when it equals the
    one sent last (the jail's stream went on from there)."""
    Session.reseeded = True
    return _seed(seed)


torch.manual_seed = manual_seed
ORIGINALS = [(m, {n: v for n, v in vars(m).items() if callable(v) and not n.startswith("_")}) for m in WATCHED]


class Session:
    """One test's child in the jail."""

    reseeded = False  # torch.manual_seed was called since the last request

    def __init__(self, jail, sock, deadline, stacks=None, watches=(), on_timeout=None):
        """stacks: the pipe where the child writes its stacks before the deadline (an fd, owned from here on);
        watches: [([file, function, line], why)], the places where earlier tests hung (the child stops there);
        on_timeout(frames, seconds the request ran) -> why the test failed (None: say only that it timed out),
        frames as parse_stacks gives them."""
        self.jail, self.sock, self.deadline, self.dead, self.code = jail, sock, deadline, None, None
        self.sent = None  # the RNG state sent last: the jail's stream went on from it
        self.stacks, self.watches, self.on_timeout = stacks, list(watches), on_timeout
        self.margin = min(1.0, max(0.0, 0.1 * (deadline - time.monotonic())))  # stacks written this long before
        self.stopped = None  # why the test fails whatever it does with the error: it timed out, or reached a hang

    def handle(self, value):
        if isinstance(value, RemoteTensor):  # the jail's own tensor goes back as itself
            value = value.remote
        if isinstance(value, Remote):
            if object.__getattribute__(value, "_session") is not self:
                raise TypeError("an object of your code from another test")
            return {"handle": object.__getattribute__(value, "_handle")}
        raise TypeError(f"a {type(value).__name__} cannot be passed to your code")

    def tracked(self, value, remote):
        return RemoteTensor.of(value, remote)

    def remote(self, h):
        if type(h.get("handle")) is not int or len(h) != 2 or type(h.get("type")) is not str:
            raise wire.WireError("malformed handle")
        return Remote(self, h["handle"], h["type"][:80])

    def request(self, op, target=None, **fields):
        __tracebackhide__ = True  # pytest shows the test's line, not the grader's
        if self.dead:
            raise JailError(self.dead)
        rng = torch.get_rng_state()
        if Session.reseeded or self.sent is None or not torch.equal(rng, self.sent):
            self.sent, Session.reseeded = rng, False
        else:
            rng = None  # unchanged here: the jail's stream goes on
        autocast = str(torch.get_autocast_dtype("cpu")) if torch.is_autocast_enabled("cpu") else None
        left = self.deadline - time.monotonic()
        dump_in = max(left - self.margin, left / 2, 0.0) if self.stacks is not None else None  # the child's stacks
        message = {"op": op, "target": target, **fields, "rng": rng, "grad": torch.is_grad_enabled(),
                   "autocast": autocast, "device": str(torch.get_default_device()), "forbid": monkeypatched(),
                   "dump_in": dump_in}
        data = wire.pack(message, self.handle)  # TypeError / WireError: the test's own fault, not the jail's
        sent = time.monotonic()
        try:
            wire.send(self.sock, data)
            reply = wire.unpack(wire.recv(self.sock, self.deadline), self.remote, self.tracked)
            if type(reply) is not dict or set(reply) not in ({"ok", "written"}, {"error"}, {"watched"}):
                raise wire.WireError("an answer that is neither a value nor an error")
            if "watched" in reply:
                if type(reply["watched"]) is not int or not 0 <= reply["watched"] < len(self.watches):
                    raise wire.WireError("a place where a test hung that the grader did not name")
            elif "error" in reply:
                error = remote_error(reply["error"])
            else:
                written = in_place_writes(reply["written"], fields.get("args", []), fields.get("kwargs", {}))
        except TimeoutError:
            self.timed_out(time.monotonic() - sent)
        except (EOFError, OSError):
            self.kill("the process running your code died during this test")
        except (wire.WireError, KeyError, TypeError, RuntimeError) as e:
            self.kill(f"your code sent an answer that cannot be checked: {e}")
        if self.dead:
            raise JailError(self.dead)
        if "watched" in reply:
            self.stopped = self.watches[reply["watched"]][1]
            self.kill(self.stopped, ours=True)
            raise JailError(self.dead)
        if "error" in reply:
            raise error
        with torch.no_grad():
            for original, value in written:  # what your code wrote into the test's tensors, as it would in-process
                original.copy_(value)
        return reply["ok"]

    def timed_out(self, ran):
        """The request in flight ran out of time (for ran seconds): where its child was, then end it."""
        why = None
        if self.on_timeout is not None:
            try:
                frames = parse_stacks(self.read_stacks(), *self.jail.inside)
                why = self.on_timeout(frames, ran) if frames else None
            except Exception:  # where it hung stays untold; the test fails all the same
                why = None
        self.stopped = why or TIMED_OUT
        self.kill(self.stopped, ours=why is not None)

    def read_stacks(self):
        """What the child wrote to the stacks pipe (waiting a moment when nothing is there yet), bounded."""
        if self.stacks is None:
            return ""
        data, quiet = bytearray(), None
        give_up = time.monotonic() + max(min(self.margin, STACKS_WAIT), 0.05)  # however slowly it trickles in
        while len(data) < STACKS_LIMIT:
            try:
                chunk = os.read(self.stacks, STACKS_LIMIT - len(data))
            except BlockingIOError:
                chunk = None
            except OSError:
                break
            if chunk == b"":
                break  # nobody can write any more
            now = time.monotonic()
            if chunk:
                data += chunk
                quiet = now + 0.05  # a dump is written line by line: wait for its end
            if now >= give_up or (quiet is not None and now >= quiet):
                break
            if not chunk:
                time.sleep(0.01)
        return data.decode("ascii", "replace")

    def kill(self, why, ours=False):
        """End the child: nothing it says from now on counts. ours: this side stops it (how it ended is then no
        news)."""
        self.close()
        self.code = self.jail.end_child()
        self.dead = why + (f" ({describe(self.code)})" if self.code not in (None, 0) and not ours else "")

    def close(self):
        self.sock.close()
        if self.stacks is not None:
            os.close(self.stacks)
            self.stacks = None

    def end(self):
        """The end of the test: its child and what it started are killed. -> what it printed."""
        self.close()
        if not self.dead:
            self.code = self.jail.end_child()
        return self.jail.printed()


def in_place_writes(written, args, kwargs):
    """[(the test's tensor, the value the call left in it)] from the jail's [position, value] list, each checked:
    a tensor argument at that position, of the same shape and dtype."""
    if type(written) is not list:
        raise wire.WireError("malformed in-place writes")
    pairs = []
    for entry in written:
        if type(entry) is not list or len(entry) != 2 or type(entry[0]) not in (int, str):
            raise wire.WireError("malformed in-place writes")
        at, value = entry
        original = (args[at] if type(at) is int and 0 <= at < len(args) else
                    kwargs.get(at) if type(at) is str else None)
        if not torch.is_tensor(original) or not torch.is_tensor(value) or value.shape != original.shape \
                or value.dtype != original.dtype:
            raise wire.WireError("an in-place write that does not fit the argument")
        pairs.append((original, value))
    return pairs


def parse_stacks(text, modules, grader):
    """[(file name, line, function)]: the frames of the student's files (in folder modules) in the thread that
    serves the requests (a frame of run() in grader/jailed.py) of the last dump of faulthandler in text,
    innermost first. Nothing else of the text is kept; each part is checked against a pattern."""
    lines = text.split("\n")
    last = max((i for i, line in enumerate(lines) if line.startswith("Timeout (")), default=-1)
    thread, serving = [], None
    for line in lines[last + 1:] + [""]:
        if THREAD.fullmatch(line) or not line:
            if serving is not None:
                break
            thread = []
            continue
        match = FRAME.fullmatch(line)
        if match is None:
            continue
        path, number, function = match.group(1), int(match.group(2)), match.group(3)
        if path == os.path.join(grader, "jailed.py") and function == "run":
            serving = thread
        elif serving is None and os.path.dirname(path) == modules and MODULE_FILE.fullmatch(os.path.basename(path)) \
                and FUNCTION.fullmatch(function) and 1 <= number <= 10 ** 7 and len(thread) < MAX_FRAMES:
            thread.append((os.path.basename(path), number, function))
    return serving or []


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


class RemoteTensor(torch.Tensor):
    """A tensor with a graph in the jail (a loss, a parameter): its value here, torch's operations on it give plain
    tensors, and backward() and .grad act on the original there."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def of(value, remote):
        tensor = torch.Tensor._make_subclass(RemoteTensor, value)
        tensor.remote = remote
        return tensor

    def backward(self, *args, **kwargs):
        __tracebackhide__ = True
        return self.remote.backward(*args, **kwargs)

    @property
    def grad(self):
        __tracebackhide__ = True
        return self.remote.grad

    @property
    def requires_grad(self):
        return True  # only such tensors come back tracked


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
