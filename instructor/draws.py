"""
`python -m instructor draws [--draws N] [REGION ...]`: does a verdict depend on the draw?

The grader draws every test's inputs and reference values afresh for each submission, so two students who make
the same mistake must lose the same points whatever their draws. `check` grades each catalogue entry on one
draw; here each graded test that checks an entry's region (public and hidden) runs on N draws, drawn as the
grader draws them and numbered 0..N-1 (the same numbers give the same draws on every run), in the pytest
processes of check's step 6. A mistake must fail such a test on every draw or on none, an alternative pass on
every draw: each test whose verdict changes is printed with the draws that disagree. Exit status 1 if any.
"""

import concurrent.futures
import os
import signal
import tempfile
import time

from instructor import check, grade, release

KEY = b"instructor draws"  # draw d is what the grader draws with this key for a submission named str(d)
SOLUTION_GPT = os.path.join(release.ROOT, "gpt.py")


class Redraw:
    """pytest plugin for check's mutant worker: each test function called on draws 0..n-1 instead of once, each
    within timeout seconds. -> verdicts: {node id: [passed, per draw]}."""

    def __init__(self, n, timeout):
        self.n, self.timeout, self.verdicts = n, timeout, {}

    def pytest_pyfunc_call(self, pyfuncitem):
        import pytest
        import unittests
        from instructor.make_reference import GradeTimeInputs

        args = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
        verdicts = self.verdicts[pyfuncitem.nodeid] = []
        for d in range(self.n):
            inputs = GradeTimeInputs(SOLUTION_GPT, KEY, str(d).encode())  # unittests.SOURCE at grade time
            unittests.INPUTS.manual_seed(inputs.seed(pyfuncitem.nodeid))
            if "ref" in args:
                args["ref"] = inputs.reference()
            signal.alarm(int(self.timeout))  # a draw that hangs fails, as graded
            try:
                pyfuncitem.obj(**args)
                verdicts.append(True)
            except (Exception, pytest.fail.Exception):
                verdicts.append(False)
        return True


def changing(m, results, n):
    """-> lines for the tests whose verdict on catalogue entry m depends on the draw."""
    lines = []
    for nodeid, result in results.items():
        verdicts = result.get("draws")
        if verdicts is None:
            lines.append(f"{m.kind} {m.region} ({m.what}): {nodeid} did not run: {grade.reason(result['output'])}")
            continue
        odd = [d for d, passed in enumerate(verdicts) if passed == (m.kind == "mistake")]
        if odd and (m.kind == "alternative" or len(odd) < n):
            lines.append(f"{m.kind} {m.region} ({m.what}): {nodeid} {'passes' if m.kind == 'mistake' else 'fails'} "
                         f"on {len(odd)} of {n} draws: {', '.join(map(str, odd[:8]))}{' ...' * (len(odd) > 8)}")
    return lines


def draws(n, wanted=(), file=None):
    """Run every catalogue entry of the wanted regions (all if none) on n draws, print what changes. -> True if
    nothing does."""
    if n < 1:
        raise ValueError(f"--draws {n}: give at least 1")
    start = time.monotonic()
    found = release.solution_regions()
    entries, problems = check.catalogue(found)
    unknown = sorted(set(wanted) - {r.id for r in found})
    if unknown:
        raise ValueError(f"no region {', '.join(unknown)}: the regions are {', '.join(r.id for r in found)}")
    entries = [m for m in entries if not wanted or m.region in wanted]
    with tempfile.TemporaryDirectory(prefix="draws-") as tmp:
        pristine = os.path.join(tmp, "pristine")
        release.write_tree(release.pristine_files(release.student_files()), pristine)
        tests = grade.collect(pristine)
        os.mkdir(os.path.join(tmp, "nothing"))
        grade.prepare(pristine, os.path.join(tmp, "nothing"), os.path.join(tmp, "mutants"))  # the test files
        selections = {r.id: [t["nodeid"] for t in tests if r.id in t["checks"]] for r in found}
        solution = {name: check.source(name) for name in grade.student_modules(pristine)}
        shares = check.mutant_shares(entries, solution, selections)
        for share in shares:
            for _, job in share:
                job["draws"] = n
        with concurrent.futures.ThreadPoolExecutor(max(1, len(shares))) as pool:
            runs = [(share, pool.submit(check.run_mutants, os.path.join(tmp, "mutants", "tests"),
                                        [job for _, job in share], timeout=check.MUTANT_TIMEOUT * n))
                    for share in shares]
            lines = list(problems)
            for share, future in runs:
                results, error = future.result()
                for (m, job), result in zip(share, results):
                    lines += changing(m, result, n) if result is not None else \
                        [f"{m.kind} {m.region} ({m.what}): did not run ({error})"]
    pairs = sum(len(selections[m.region]) for m in entries)
    print(f"{len(entries)} catalogue entries, {pairs} (entry, test) pairs, {n} draws each: "
          f"{len(lines)} depend on the draw ({time.monotonic() - start:.0f} s)", file=file)
    for line in lines:
        print(f"  {line}", file=file)
    return not lines
