"""
pytest plugin for the graded tests (unittests.py); pytest loads it by itself.

- A TODO whose stub is still in place fails with one short line naming it, e.g.
  `NotImplementedError: TODO[mlp]: ...  (gpt.py:212 in forward: replace the stub with your code)`,
  instead of a traceback.
- At the end of the run, a table of the TODO regions (done; to do: its stub is still reached; partly:
  a test that checks it fails) and the points earned out of the points at stake. A failing test counts
  against the region its message names.
- `pytest unittests.py -k <region id>` runs the tests that check that TODO (@graded's regions, not
  its needs).
"""

import os
import re

import pytest

TODO = re.compile(r"TODO\[[a-z0-9_]+\]")


def pytest_collection_modifyitems(items):
    """`pytest unittests.py -k <region id>` selects the tests that check that TODO."""
    for item in items:
        checks = item.get_closest_marker("checks")
        if checks is not None:
            item.extra_keyword_matches.update(checks.args)


class Scoreboard:
    def __init__(self):
        self.graded = {}  # nodeid -> (points, todo ids it covers, todo ids it checks), in collection order
        self.passed = {}  # nodeid -> True / False once it ran
        self.blamed = {}  # nodeid -> the todo ids its failure names

    def pytest_collection_finish(self, session):
        for item in session.items:
            points = item.get_closest_marker("points")
            if points is not None:
                todo, checks = item.get_closest_marker("todo"), item.get_closest_marker("checks")
                self.graded[item.nodeid] = (points.args[0], todo.args if todo else (), checks.args if checks else ())

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
            if not report.passed:
                self.blamed[report.nodeid] = set(TODO.findall(report.longreprtext))

    def region_results(self, ran):
        """{todo id: [(passed, stub)]}: a failing test counts against the regions its message names (TODO[id]),
        or against the regions it checks when it names none; stub: the failure is that region's stub."""
        regions = {}
        for nodeid in ran:
            _, covers, checks = self.graded[nodeid]
            blamed = self.blamed.get(nodeid, set())
            named = {b[5:-1] for b in blamed}
            for todo in covers:
                if self.passed[nodeid] or (named and todo not in named) or (not named and todo not in checks):
                    regions.setdefault(todo, []).append((True, False))
                else:
                    regions.setdefault(todo, []).append((False, todo in named))
        return regions

    def pytest_terminal_summary(self, terminalreporter):
        ran = [nodeid for nodeid in self.graded if nodeid in self.passed]
        if not ran:
            return
        regions = self.region_results(ran)
        write = terminalreporter.write_line
        terminalreporter.section("TODO regions")
        width = max([len(todo) for todo in regions] + [10]) + 6
        for todo, results in regions.items():
            ok = [passed for passed, _ in results]
            status = "done" if all(ok) else "to do" if any(stub for _, stub in results) else "partly"
            write(f"{'TODO[' + todo + ']':<{width}} {status:<7} {sum(ok)}/{len(ok)} tests pass")
        earned = sum(self.graded[n][0] for n in ran if self.passed[n])
        total = sum(self.graded[n][0] for n in ran)
        failing = [n for n in ran if not self.passed[n]]
        write(f"points: {earned:g} / {total:g} ({len(ran) - len(failing)} of {len(ran)} graded tests pass"
              + (f"; {total - earned:g} points at stake in {len(failing)} failing tests)" if failing else ")"),
              bold=True, green=not failing, red=bool(failing))


def pytest_configure(config):
    config.pluginmanager.register(Scoreboard(), "micro-gpt-scoreboard")
