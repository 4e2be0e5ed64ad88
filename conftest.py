"""
pytest plugin for the graded tests (unittests.py); pytest loads it by itself.

- A TODO whose stub is still in place fails with one short line naming it, e.g.
  `NotImplementedError: TODO[mlp]: ...  (gpt.py:212 in forward: replace the stub with your code)`,
  instead of a traceback.
- At the end of the run, a table "TODO regions": a row for each TODO that the tests which ran check or
  blame, how many of the tests that cover it (check it, or need it to run) pass, and its status:
    done                              a test that checks it passes, and no failing test blames it
    to do                             its stub is still there: a test ran into it
    partly                            a failing test blames it, not at its stub: read that test's message
    not reached yet (needs TODO[x])   no test blames it, but none that checks it passes yet: they fail on
                                      TODOs it needs first; write (or fix) TODO[x], then run the tests again
  A failing test blames the TODO whose stub it ran into, else the TODOs its message names (TODO[id]),
  else the TODOs it checks. Then the points earned out of the points at stake.
- `pytest unittests.py -k <region id>` runs the tests that check that TODO (@graded's regions, not
  its needs).
"""

import os
import re

import pytest

TODO = re.compile(r"TODO\[([a-z0-9_]+)\]")


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
        self.stubs = {}  # nodeid -> the todo id whose stub it ran into
        self.blamed = {}  # nodeid -> the todo ids its failure blames, first named first
        self.order = {}  # todo id -> where the tests first name it, before `-k` picks some of them

    def pytest_collection_modifyitems(self, items):
        for item in items:
            for marker in item.iter_markers("todo"):
                for todo in marker.args:
                    self.order.setdefault(todo, len(self.order))

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
        stub = error is not None and error.errisinstance(NotImplementedError) and TODO.search(str(error.value))
        if stub:
            self.stubs.setdefault(item.nodeid, stub.group(1))
            entry = error.traceback[-1]
            where = (getattr(error.value, "location", None)  # the autograder's: the stub's place in the jail
                     or f"{os.path.relpath(entry.path)}:{entry.lineno + 1} in {entry.name}")
            report.longrepr = f"NotImplementedError: {error.value}  ({where}: replace the stub with your code)"

    def pytest_runtest_logreport(self, report):
        # passed if its call passed and no phase failed or skipped (a skipped graded test earns nothing);
        # an interrupted test has no call report and does not count as run
        nodeid = report.nodeid
        if nodeid in self.graded and (report.when == "call" or not report.passed):
            self.passed[nodeid] = self.passed.get(nodeid, True) and report.passed
            if not report.passed and nodeid not in self.blamed:  # its first failure
                stub = self.stubs.get(nodeid)
                named = [stub] if stub else list(dict.fromkeys(TODO.findall(report.longreprtext)))
                self.blamed[nodeid] = named or list(self.graded[nodeid][2])

    def rank(self, todo):
        return self.order.get(todo, len(self.order))

    def region_results(self, ran):
        """[(todo id, status, tests that pass, tests that cover it)] for each region that the tests in ran check
        or blame, in the order the tests name them."""
        rows = []
        for todo in sorted({t for n in ran for t in (*self.graded[n][2], *self.blamed.get(n, ()))}, key=self.rank):
            tests = [n for n in ran if todo in self.graded[n][1] or todo in self.blamed.get(n, ())]
            failing = [n for n in tests if not self.passed[n]]
            against = [n for n in failing if todo in self.blamed[n]]
            if any(self.stubs.get(n) == todo for n in against):
                status = "to do"
            elif against:
                status = "partly"
            elif any(self.passed[n] and todo in self.graded[n][2] for n in tests):
                status = "done"
            else:  # the tests that check it fail and blame TODOs it needs: name the first of them
                first = min((t for n in failing for t in self.blamed[n]), key=self.rank)
                status = f"not reached yet (needs TODO[{first}])"
            rows.append((todo, status, len(tests) - len(failing), len(tests)))
        return rows

    def pytest_terminal_summary(self, terminalreporter):
        ran = [nodeid for nodeid in self.graded if nodeid in self.passed]
        if not ran:
            return
        rows = self.region_results(ran)
        write = terminalreporter.write_line
        terminalreporter.section("TODO regions")
        width = max([len(todo) for todo, *_ in rows] + [10]) + 6
        status_width = max(len(status) for _, status, *_ in rows) if rows else 0
        for todo, status, passed, total in rows:
            write(f"{'TODO[' + todo + ']':<{width}} {status:<{status_width}} {passed}/{total} tests pass")
        earned = sum(self.graded[n][0] for n in ran if self.passed[n])
        total = sum(self.graded[n][0] for n in ran)
        failing = [n for n in ran if not self.passed[n]]
        write(f"points: {earned:g} / {total:g} ({len(ran) - len(failing)} of {len(ran)} graded tests pass"
              + (f"; {total - earned:g} points at stake in {len(failing)} failing tests)" if failing else ")"),
              bold=True, green=not failing, red=bool(failing))


def pytest_configure(config):
    config.pluginmanager.register(Scoreboard(), "micro-gpt-scoreboard")
