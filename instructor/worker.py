"""
The test process of the grader. Runs pytest and appends one JSON line per event to EVENTS, flushed at
once, so that the grader watching the file always knows which test is running when it must kill us:

    python worker.py EVENTS [--trace FILE,FILE...] [pytest arguments...]

    {"collected": [{"nodeid": ..., "points": 2, "todo": ["mlp"]}, ...]}
    {"start": nodeid}
    {"done": nodeid, "passed": false, "output": "..."}     output clipped to a few KB
    {"collect_error": "..."}

With --trace, each "done" also carries "lines": {file: [line numbers the test executed in it]}, for
the given files of the current folder (`python -m instructor check` runs each region's stub only
against the tests that execute the region).
"""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]  # tested code must not import the grader

import pytest  # noqa: E402 (after the sys.path change)

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


class LineTracer:
    """The lines executed in some files, through sys.settrace (the other files' frames are not traced)."""

    def __init__(self, files):
        self.files = {os.path.abspath(f): f for f in files}
        self.lines = {}

    def start(self):
        self.lines = {}
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


class Reporter:
    """pytest plugin writing the events."""

    def __init__(self, path, tracer=None):
        self.file = open(path, "a", encoding="utf-8")
        self.reports = {}
        self.tracer = tracer

    def write(self, **event):
        self.file.write(json.dumps(event) + "\n")
        self.file.flush()

    def pytest_collection_finish(self, session):
        self.write(collected=[{"nodeid": item.nodeid, "points": (marker_args(item, "points") or (0,))[0],
                               "todo": list(marker_args(item, "todo"))} for item in session.items])

    def pytest_collectreport(self, report):
        if report.failed:
            self.write(collect_error=clip(f"{report.nodeid}: {report.longreprtext}"))

    def pytest_runtest_logstart(self, nodeid):
        self.reports[nodeid] = []
        self.write(start=nodeid)
        if self.tracer:
            self.tracer.start()

    def pytest_runtest_logreport(self, report):
        self.reports[report.nodeid].append(report)

    def pytest_runtest_logfinish(self, nodeid):
        lines = self.tracer.stop() if self.tracer else None
        reports = self.reports.pop(nodeid)
        passed = all(r.passed for r in reports)  # a skipped graded test earns nothing
        parts = []
        for r in reports:
            if r.failed:
                parts.append(clip(r.longreprtext) if r.when == "call" else f"error in {r.when}: {clip(r.longreprtext)}")
            elif r.skipped:
                parts.append(r.longrepr[-1] if isinstance(r.longrepr, tuple) else r.longreprtext)  # "Skipped: why"
        for stream in ("stdout", "stderr"):
            captured = getattr(reports[-1], f"cap{stream}")  # the last phase's report holds every phase's output
            if captured:
                parts.append(f"--- captured {stream} ---\n{clip(captured)}")
        self.write(done=nodeid, passed=passed, output="\n".join(parts), **({"lines": lines} if self.tracer else {}))


if __name__ == "__main__":
    events, args, tracer = sys.argv[1], sys.argv[2:], None
    if args[:1] == ["--trace"]:
        tracer, args = LineTracer(args[1].split(",")), args[2:]
    sys.exit(pytest.main(args, plugins=[Reporter(events, tracer)]))
