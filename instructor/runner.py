"""
The trusted test process of the grader: runs the graded tests with pytest, against the student modules
in the jail (instructor/jail.py), and appends one JSON line per event to EVENTS, flushed at once:

    python -m instructor.runner EVENTS --modules DIR --reference GPT_PY [--released DIR] [--hangs JSON]
                                [--user NAME] [--unsealed] [--timeout S] [--trace FILE,FILE...] [pytest arguments...]

    {"collected": [{"nodeid": ..., "points": 2, "todo": ["mlp", ...], "checks": ["mlp"]}, ...]}
    {"start": nodeid}
    {"done": nodeid, "passed": false, "output": "..."}     output clipped to a few KB
    {"hang": {"file": "gpt.py", "line": 241, "function": "forward", "qualname": "MLP.forward",
              "regions": ["mlp"], "inner": null, "seconds": 30}}      a test hung there (before its "done")
    {"collect_error": "..."}
    {"jail_error": "..."}                                  the jail cannot start at all: nothing was graded

It runs in a folder holding only the graders' test files; DIR holds the modules the jail imports. No
student code runs here: every verdict is computed from values the jail sent, against inputs drawn here
at grade time and expected values computed here by the reference solution GPT_PY (unittests.SOURCE).
A hidden test that fails reports one line: what the test expected, or which exception the student's
code raised, never source lines or what the student's code printed. With --trace, each "done"
also carries "lines": {file: [line numbers the test executed in it]} (`python -m instructor check` runs
each region's stub only against the tests that execute it).

A hang costs one timeout per place, not one per test. When a test runs out of time, the stacks its child
wrote just before (instructor/remote.py) give the student's frames; Locator finds, in its own copies of the
student's files (DIR) and of the released ones (--released: each region's stub names its TODO[id]), the
innermost function that holds a TODO region and, by aligning the student's function with the released one,
which of its regions the hung line replaced. The test fails with "timed out after 30 s in MLP.forward
(gpt.py:241): TODO[mlp]". When the hung call had run for at least half the time limit, in code the student
wrote in a TODO region (or at the top level of a module, at import), the place counts as a hang: every
later test that covers its region(s) fails at once without running ("not run: TODO[mlp] hangs in ..."),
and every other later test stops as soon as it reaches that line (the child watches for it) instead of
waiting for its own timeout. Elsewhere (the released code around the regions, or a helper the student
added that no region calls: maybe only slow) the test names the function, and later tests wait as before.
What the child wrote is only ever read as a file name among the student's modules, a line number and a
function name; a submission that fakes them can only fail its own tests. --hangs passes the hangs seen by
an earlier runner of the same grading on to this one.
"""

import argparse
import ast
import difflib
import hashlib
import importlib.util
import json
import os
import pathlib
import re
import signal
import sys
import time

import pytest

from instructor import jail, procs  # no torch yet: the jail starts first, while this process imports it

HIDDEN = "hidden_tests.py::"
TODO = re.compile(r"TODO\[[a-z0-9_]+\]")

OUTPUT_LIMIT = 4000  # characters of failure message and of captured output kept per test
SOURCE_LIMIT = 2 << 20  # bytes of a module read to tell where a test hung
ALIGN_LIMIT = 5000  # lines of a function aligned with the released one to tell which of its regions hung
MAX_HANGS = 20
STUB = re.compile(r"^\s*raise NotImplementedError\(.*TODO\[([a-z0-9_]+)\]")


class Source:
    """A module's lines and its functions: [(qualified name, name, first line, last line)]."""

    def __init__(self, path):
        with open(path, "rb") as f:
            data = f.read(SOURCE_LIMIT + 1)
        if len(data) > SOURCE_LIMIT:
            raise ValueError("too large")
        text = importlib.util.decode_source(data)  # its coding line, universal newlines: as Python reads it
        self.lines = text.split("\n")
        self.functions, stack = [], [(ast.parse(text), "")]
        while stack:  # not recursive: nesting never exhausts this process's stack
            node, prefix = stack.pop()
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    self.functions.append((prefix + child.name, child.name, child.lineno, child.end_lineno))
                    stack.append((child, f"{prefix}{child.name}.<locals>."))
                elif isinstance(child, ast.ClassDef):
                    stack.append((child, f"{prefix}{child.name}."))
                else:
                    stack.append((child, prefix))

    def function_at(self, line):
        """The innermost function whose lines hold line, or None."""
        return max((f for f in self.functions if f[2] <= line <= f[3]), key=lambda f: f[2], default=None)

    def function(self, qualname):
        return next((f for f in self.functions if f[0] == qualname), None)

    def text(self, function):
        return [line.strip() for line in self.lines[function[2] - 1:function[3]]]


def read_source(path):
    try:
        return Source(path)
    except Exception:  # unreadable, too large, not Python: where it hung is then not told
        return None


class Locator:
    """Where a test hung, from the student's frames: the function and the TODO region(s)."""

    def __init__(self, modules, released):
        self.modules, self.released, self.sources = modules, released, {}

    def source(self, folder, name):
        """The Source of folder/name (name: a student module's file name), or None."""
        key = (folder, name)
        if key not in self.sources:
            try:
                there = folder is not None and name in os.listdir(folder)
            except OSError:
                there = False
            self.sources[key] = read_source(os.path.join(folder, name)) if there else None
        return self.sources[key]

    def stubs(self, name):
        """The released module's regions: {qualified name of their function: [ids]}, {line: id} (the stub's
        raise and the comment lines above it), its Source."""
        released = self.source(self.released, name)
        regions, owners = {}, {}
        if released is not None:
            for number, line in enumerate(released.lines, start=1):
                match = STUB.match(line)
                if match:
                    function = released.function_at(number)
                    regions.setdefault(function[0] if function else "<module>", []).append(match.group(1))
                    owners[number] = match.group(1)
                    above = number - 1
                    while above >= 1 and released.lines[above - 1].strip().startswith("#"):
                        owners[above] = match.group(1)
                        above -= 1
        return regions, owners, released

    def locate(self, frames):
        """frames [(file, line, function)], innermost first -> the hang {file, line, function, qualname, regions,
        inner}, or None when no frame is in a student's file as it is."""
        try:
            return self.find(frames)
        except Exception:  # never the grading's end: the test then only says that it timed out
            return None

    def find(self, frames):
        seen = []
        for name, line, function in frames:
            source = self.source(self.modules, name)
            if source is None or line > len(source.lines):
                continue
            found = source.function_at(line)
            if function == "<module>":
                if found is not None:
                    continue
                qualname = "<module>"
            elif function.startswith("<") or found is None or found[1] != function:
                continue  # a lambda or comprehension (its function's frame comes next), or not this file's code
            else:
                qualname = found[0]
            seen.append((name, line, function, qualname))
            regions, written = self.regions(name, line, qualname, source, found)
            if regions:  # on a line of the released function as it was (not a TODO's code): no TODO to name
                return self.hang(seen[-1], regions if written else [], seen[0])
        return self.hang(seen[0], [], seen[0]) if seen else None

    @staticmethod
    def hang(frame, regions, innermost):
        name, line, function, qualname = frame
        inner = None if innermost == frame else f"{innermost[3]} at {innermost[0]}:{innermost[1]}"
        return {"file": name, "line": line, "function": function, "qualname": qualname, "regions": regions,
                "inner": inner}

    def regions(self, name, line, qualname, source, function):
        """The regions of the released function qualname that the student's line may stand for, and whether it
        is the student's code: the student's function aligned with the released one, a line as released outside
        the stubs is not; a line where a stub was, or written between the lines as released, is (its regions:
        those whose stubs are in that gap, or all of the function's when the gap holds none)."""
        stubs, owners, released = self.stubs(name)
        ids = stubs.get(qualname, [])
        theirs = released.function(qualname) if ids and function is not None else None
        if theirs is None or function[3] - function[2] > ALIGN_LIMIT:
            return ids, True
        ours = [owners.get(theirs[2] + i) for i in range(theirs[3] - theirs[2] + 1)]
        at, before, after = line - function[2], 0, len(ours)
        matcher = difflib.SequenceMatcher(lambda text: not text, released.text(theirs), source.text(function),
                                          autojunk=False)
        for a, b, size in matcher.get_matching_blocks():
            if b <= at < b + size:  # a line as released
                return ([ours[a + at - b]], True) if ours[a + at - b] else (ids, False)
            if b + size <= at:
                before = a + size
            else:
                after = a
                break
        gap = set(ours[before:after]) | ({ours[before - 1]} if before else set())  # what the student rewrote
        return [i for i in ids if i in gap] or ids, True


def place(qualname, name, line):
    return f"{name}:{line}, at import" if qualname == "<module>" else f"{qualname} ({name}:{line})"


def todos(regions):
    names = [f"TODO[{r}]" for r in regions]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def where_hung(hang):
    """'MLP.forward (gpt.py:241)', 'MLP.forward (gpt.py:241, in helper at gpt.py:20)', 'gpt.py:3, at import'."""
    where = place(hang["qualname"], hang["file"], hang["line"])
    return where[:-1] + f", in {hang['inner']})" if hang.get("inner") and where.endswith(")") else where


def spot(hang):
    """The place the jail watches for: [file, function, line]."""
    return [hang["file"], hang["function"], hang["line"]]


def clip(text, limit=OUTPUT_LIMIT):
    """text, or its head and tail around a note saying how much was cut."""
    if len(text) <= limit:
        return text
    head, tail = text[:limit * 2 // 3], text[-(limit // 3):]
    return f"{head}\n... [{len(text) - len(head) - len(tail)} characters cut] ...\n{tail}"


def marker_args(item, name):
    marker = item.get_closest_marker(name)
    return marker.args if marker else ()


class Reporter:
    """pytest plugin: a jail child per test, the student modules imported there, the events written."""

    def __init__(self, path, the_jail, new_session, importer, inputs, timeout, trace=(), locator=None, hangs=()):
        self.file = open(path, "a", encoding="utf-8")
        self.jail, self.new_session, self.importer, self.inputs = the_jail, new_session, importer, inputs
        self.timeout, self.trace, self.locator = timeout, list(trace), locator
        self.reports, self.hidden, self.session = {}, {}, None
        self.hangs, self.pending = list(hangs)[:MAX_HANGS], None  # where tests hung; the current test's hang
        self.covers, self.blocked = {}, {}  # {nodeid: the regions it covers}, {nodeid: why it is not run}

    def write(self, **event):
        self.file.write(json.dumps(event) + "\n")
        self.file.flush()

    def pytest_collection_finish(self, session):
        if session.items and not session.config.option.collectonly:
            try:
                self.jail.wait_ready()
            except jail.JailError as e:  # nothing can be graded: the grader says so in one line
                self.write(jail_error=str(e))
                self.jail.stop()
                os._exit(3)
            unittests = sys.modules.get("unittests")
            if unittests is not None:
                unittests.SOURCE = self.inputs  # grade-time inputs and the trusted reference, never the stored ones
        self.covers = {item.nodeid: set(marker_args(item, "todo")) for item in session.items}
        self.write(collected=[{"nodeid": item.nodeid, "points": (marker_args(item, "points") or (0,))[0],
                               "todo": list(marker_args(item, "todo")), "checks": list(marker_args(item, "checks"))}
                              for item in session.items])

    def pytest_collectreport(self, report):
        if report.failed:
            self.write(collect_error=clip(f"{report.nodeid}: {report.longreprtext}"))

    def pytest_runtest_logstart(self, nodeid):
        self.reports[nodeid] = []
        self.write(start=nodeid)
        self.session = None
        hang = next((h for h in self.hangs if h["regions"] and set(h["regions"]) <= self.covers.get(nodeid, set())),
                    None)
        if hang is not None:  # it covers the region that hung: no need to wait for it again
            self.blocked[nodeid] = (f"not run: {todos(hang['regions'])} hangs in {where_hung(hang)}: a test before "
                                    f"timed out there after {hang['seconds']:g} s")
            self.importer.begin(None)
            return
        watches = [] if self.trace else [(spot(h), watched(h)) for h in self.hangs]
        try:
            self.session = self.new_session(time.monotonic() + self.timeout, watches, self.timed_out)
            if self.trace:
                self.session.request("trace", files=self.trace)
            if watches:
                self.session.request("watch", spots=[w for w, _ in watches])
        except jail.JailError as e:
            self.reports[nodeid].append(f"the jail could not run your code: {e}")
        self.importer.begin(self.session)

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item):
        if item.nodeid in self.blocked:
            pytest.fail(self.blocked[item.nodeid], pytrace=False)

    def timed_out(self, frames, ran):
        """The current test's request ran out of time after running for ran seconds, its child in frames
        (remote.parse_stacks). -> why the test failed, or None when where it hung is not known."""
        hang = self.locator.locate(frames) if self.locator is not None else None
        if hang is None:
            return None
        hang["seconds"] = self.timeout
        known = any(spot(h) == spot(hang) for h in self.hangs)
        if ran >= self.timeout / 2 and (hang["regions"] or hang["qualname"] == "<module>") and not known \
                and len(self.hangs) < MAX_HANGS:  # stuck in one call, in a TODO's code or at import: a hang
            self.pending = hang
        why = f"timed out after {self.timeout:g} s in {where_hung(hang)}"
        return f"{why}: {todos(hang['regions'])}" if hang["regions"] else why

    @pytest.fixture
    def tmp_path(self):
        """A fresh folder in the jail's scratch folder: the test passes its path to the student's code."""
        return pathlib.Path(self.session.request("mkdtemp"))

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item, call):
        yield
        if item.nodeid.startswith(HIDDEN) and call.excinfo is not None:
            self.hidden.setdefault(item.nodeid, one_line(call.excinfo.value))

    def pytest_runtest_logreport(self, report):
        self.reports[report.nodeid].append(report)

    def pytest_runtest_logfinish(self, nodeid):
        lines = {}
        if self.session is not None:
            if self.trace and not self.session.dead:
                try:
                    lines = self.session.request("untrace")
                except Exception:
                    lines = {}
            printed = self.session.end()
        else:
            printed = ""
        reports = self.reports.pop(nodeid)
        stopped = self.session.stopped if self.session is not None else None
        if nodeid in self.blocked:
            reports = [self.blocked.pop(nodeid)]
        elif stopped and not any(isinstance(r, str) or r.failed for r in reports):
            reports.append(stopped)  # it timed out or reached a hang, whatever it did with the error
        if self.pending is not None:
            self.hangs.append(self.pending)
            self.write(hang=self.pending)
            self.pending = None
        passed, parts = True, []
        for r in reports:
            if isinstance(r, str):
                passed = False
                parts.append(r)
            elif r.failed:
                passed = False
                parts.append(clip(r.longreprtext) if r.when == "call" else f"error in {r.when}: {clip(r.longreprtext)}")
            elif r.skipped:  # a skipped graded test earns nothing
                passed = False
                parts.append(r.longrepr[-1] if isinstance(r.longrepr, tuple) else r.longreprtext)
        if nodeid.startswith(HIDDEN):  # its inputs stay hidden: neither its source lines nor what was printed
            parts = [self.hidden.pop(nodeid, parts[0].splitlines()[0][:300] if parts else "")] if not passed else []
        elif printed.strip():
            parts.append(f"--- printed by your code ---\n{clip(printed)}")
        self.session = None
        event = {"done": nodeid, "passed": passed, "output": "\n".join(parts)}
        if self.trace:
            event["lines"] = lines if isinstance(lines, dict) else {}
        self.write(**event)


def watched(hang):
    """Why a test that reached the place where an earlier test hung stopped there."""
    where = f"{where_hung(hang)}, where {todos(hang['regions'])} hangs" if hang["regions"] else where_hung(hang)
    return f"stopped: this test reached {where}: a test before timed out there after {hang['seconds']:g} s"


def hangs_argument(text):
    """--hangs: the hangs an earlier runner reported, as it reported them (checked all the same)."""
    hangs = []
    for h in json.loads(text or "[]"):
        if (type(h) is dict and type(h.get("file")) is str and type(h.get("line")) is int
                and type(h.get("function")) is str and type(h.get("qualname")) is str
                and type(h.get("regions")) is list and all(type(r) is str for r in h["regions"])
                and type(h.get("seconds")) in (int, float) and type(h.get("inner")) in (str, type(None))):
            hangs.append(h)
    return hangs


def one_line(error):
    """A hidden test's failure in one line: the test's own message, or the type and place of what the student's
    code raised (its message could carry the test's inputs)."""
    if isinstance(error, (pytest.fail.Exception, jail.JailError)):
        return str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
    where = getattr(error, "location", None)
    if where:  # raised in the jail: its TODO[id] if it is a stub, nothing else of its message
        todo = TODO.search(str(error)) if isinstance(error, NotImplementedError) else None
        return f"your code raised {type(error).__name__}{': ' + todo.group() if todo else ''} ({where})"
    return f"{type(error).__name__} while checking what your code returned"


def grade_time_inputs(reference, modules):
    """The trusted reference's inputs, drawn from the course's secret key (the file `key` beside the reference,
    when there is one) and a digest of the graded modules: the same files, the same inputs."""
    from instructor import make_reference  # torch

    key_path, digest = os.path.join(os.path.dirname(reference), "key"), hashlib.sha256()
    key = pathlib.Path(key_path).read_bytes() if os.path.exists(key_path) else None
    for name in sorted(os.listdir(modules)):
        digest.update(name.encode() + b"\0" + hashlib.sha256(pathlib.Path(modules, name).read_bytes()).digest())
    return make_reference.GradeTimeInputs(reference, key, digest.digest())


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m instructor.runner")
    parser.add_argument("events")
    parser.add_argument("--modules", required=True)
    parser.add_argument("--reference", required=True)
    parser.add_argument("--user")
    parser.add_argument("--unsealed", action="store_true")
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--trace", default="")
    parser.add_argument("--released", help="the released modules: their stubs tell which TODO a hang is in")
    parser.add_argument("--hangs", default="[]", help="JSON: where tests of an earlier runner hung")
    args, pytest_args = parser.parse_known_args(argv)
    procs.become_subreaper()  # every process the jail starts stays ours to kill
    try:
        the_jail = jail.Jail(args.modules, args.user, sealed=not args.unsealed and "--collect-only" not in pytest_args)
        if "--collect-only" not in pytest_args:
            the_jail.start()  # python and torch start in the jail while pytest collects here
    except jail.JailError as e:
        with open(args.events, "a", encoding="utf-8") as f:
            f.write(json.dumps({"jail_error": str(e)}) + "\n")
        return 3
    signal.signal(signal.SIGTERM, lambda *_: (the_jail.stop(), os._exit(1)))
    procs.on_parent_death(signal.SIGTERM)  # a grader that dies takes the jail with it
    from instructor import remote  # torch

    importer = remote.RemoteImporter(sorted(n[:-3] for n in os.listdir(args.modules) if n.endswith(".py")))
    sys.meta_path.insert(0, importer)
    trace = [f for f in args.trace.split(",") if f]

    def new_session(deadline, watches, on_timeout):
        sock, stacks = the_jail.child()
        return remote.Session(the_jail, sock, deadline, stacks, watches, on_timeout)

    reporter = Reporter(args.events, the_jail, new_session, importer, grade_time_inputs(args.reference, args.modules),
                        args.timeout, trace, Locator(args.modules, args.released), hangs_argument(args.hangs))
    try:
        return pytest.main(pytest_args, plugins=[reporter])
    finally:
        the_jail.stop()


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
