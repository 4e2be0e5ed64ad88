"""
pytest plugin for the graded tests (unittests.py); pytest loads it by itself.

- A TODO whose stub is still in place fails with one short line naming it, e.g.
  `NotImplementedError: TODO[mlp]: ...  (gpt.py:212 in forward: replace the stub with your code)`,
  instead of a traceback.
- At the end of the run, a table of the TODO regions (done / partly / to do, from the tests that cover
  them) and the points earned out of the points at stake.
"""

import os
import re

import pytest

TODO = re.compile(r"TODO\[[a-z0-9_]+\]")


class Scoreboard:
    def __init__(self):
        self.graded = {}  # nodeid -> (points, todo ids), in collection order
        self.passed = {}  # nodeid -> True / False once it ran

    def pytest_collection_finish(self, session):
        for item in session.items:
            points = item.get_closest_marker("points")
            if points is not None:
                todo = item.get_closest_marker("todo")
                self.graded[item.nodeid] = (points.args[0], todo.args if todo else ())

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item, call):
        report = (yield).get_result()
        error = call.excinfo
        if error is not None and error.errisinstance(NotImplementedError) and TODO.search(str(error.value)):
            entry = error.traceback[-1]
            where = (getattr(error.value, "location", None)  # the autograder's: the stub's place in the jail
                     or f"{os.path.relpath(entry.path)}:{entry.lineno + 1} in {entry.name}")
            report.longrepr = f"NotImplementedError: {error.value}  ({where}: replace the stub with your code)"

    def pytest_runtest_logreport(self, report):
        # passed if its call passed and no phase failed or skipped (a skipped graded test earns nothing);
        # an interrupted test has no call report and does not count as run
        if report.nodeid in self.graded and (report.when == "call" or not report.passed):
            self.passed[report.nodeid] = self.passed.get(report.nodeid, True) and report.passed

    def pytest_terminal_summary(self, terminalreporter):
        ran = [nodeid for nodeid in self.graded if nodeid in self.passed]
        if not ran:
            return
        regions = {}  # todo id -> [passed, ...] of the tests that cover it
        for nodeid in ran:
            for todo in self.graded[nodeid][1]:
                regions.setdefault(todo, []).append(self.passed[nodeid])
        write = terminalreporter.write_line
        terminalreporter.section("TODO regions")
        width = max([len(todo) for todo in regions] + [10]) + 6
        for todo, results in regions.items():
            status = "done" if all(results) else "partly" if any(results) else "to do"
            write(f"{'TODO[' + todo + ']':<{width}} {status:<7} {sum(results)}/{len(results)} tests pass")
        earned = sum(self.graded[n][0] for n in ran if self.passed[n])
        total = sum(self.graded[n][0] for n in ran)
        failing = [n for n in ran if not self.passed[n]]
        write(f"points: {earned:g} / {total:g} ({len(ran) - len(failing)} of {len(ran)} graded tests pass"
              + (f"; {total - earned:g} points at stake in {len(failing)} failing tests)" if failing else ")"),
              bold=True, green=not failing, red=bool(failing))


def pytest_configure(config):
    config.pluginmanager.register(Scoreboard(), "micro-gpt-scoreboard")
