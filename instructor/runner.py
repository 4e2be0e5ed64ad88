"""
The trusted test process of the grader: runs the graded tests with pytest, against the student modules
in the jail (instructor/jail.py), and appends one JSON line per event to EVENTS, flushed at once:

    python -m instructor.runner EVENTS --modules DIR --reference GPT_PY [--user NAME] [--unsealed]
                                [--timeout S] [--trace FILE,FILE...] [pytest arguments...]

    {"collected": [{"nodeid": ..., "points": 2, "todo": ["mlp", ...], "checks": ["mlp"]}, ...]}
    {"start": nodeid}
    {"done": nodeid, "passed": false, "output": "..."}     output clipped to a few KB
    {"collect_error": "..."}
    {"jail_error": "..."}                                  the jail cannot start at all: nothing was graded

It runs in a folder holding only the graders' test files; DIR holds the modules the jail imports. No
student code runs here: every verdict is computed from values the jail sent, against inputs drawn here
at grade time and expected values computed here by the reference solution GPT_PY (unittests.SOURCE).
A hidden test that fails reports one line: what the test expected, or which exception the student's
code raised, never source lines or what the student's code printed. With --trace, each "done"
also carries "lines": {file: [line numbers the test executed in it]} (`python -m instructor check` runs
each region's stub only against the tests that execute it).
"""

import argparse
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

    def __init__(self, path, the_jail, new_session, importer, inputs, timeout, trace=()):
        self.file = open(path, "a", encoding="utf-8")
        self.jail, self.new_session, self.importer, self.inputs = the_jail, new_session, importer, inputs
        self.timeout, self.trace = timeout, list(trace)
        self.reports, self.hidden, self.session = {}, {}, None

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
        try:
            self.session = self.new_session(time.monotonic() + self.timeout)
            if self.trace:
                self.session.request("trace", files=self.trace)
        except jail.JailError as e:
            self.reports[nodeid].append(f"the jail could not run your code: {e}")
        self.importer.begin(self.session)

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


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m instructor.runner")
    parser.add_argument("events")
    parser.add_argument("--modules", required=True)
    parser.add_argument("--reference", required=True)
    parser.add_argument("--user")
    parser.add_argument("--unsealed", action="store_true")
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--trace", default="")
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
    from instructor import make_reference, remote  # torch

    importer = remote.RemoteImporter(sorted(n[:-3] for n in os.listdir(args.modules) if n.endswith(".py")))
    sys.meta_path.insert(0, importer)
    trace = [f for f in args.trace.split(",") if f]
    reporter = Reporter(args.events, the_jail, lambda deadline: remote.Session(the_jail, the_jail.child(), deadline),
                        importer, make_reference.GradeTimeInputs(args.reference), args.timeout, trace)
    try:
        return pytest.main(pytest_args, plugins=[reporter])
    finally:
        the_jail.stop()


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
