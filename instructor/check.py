"""
`python -m instructor check` proves the release right; CI runs it (tests/test_instructor.py) and
`python -m instructor release` writes nothing unless it passes.

  1. the solution passes every graded test (unittests.py and the hidden tests);
  2. the release imports, and every graded test that covers a region fails there with the TODO[id]
     message of one of its regions (a test that covers none must pass: no student could fix it);
  3. coverage: with any one region alone replaced by its stub, at least one graded test fails;
  4. no line of solution code appears in the release;
  5. unittests_ref.pt was generated from the current gpt.py.

Steps 1-3 grade a release built in a temporary folder with the grader's own machinery. The solution
run records the lines each test executes, so that each region's stub runs only against the tests that
execute the region (a test that never reaches a region cannot notice its stub); the runs go in parallel,
one per CPU core.
"""

import concurrent.futures
import os
import re
import subprocess
import sys
import tempfile
import time

from instructor import grade, regions, release
from instructor.release import ROOT

TIMEOUT = 60.0  # seconds per test; the solution and the stubs come nowhere near it
TODO_ID = re.compile(r"TODO\[([a-z0-9_]+)\]")
SHOWN = 3  # failing tests named per region in the coverage table


def graded_run(pristine, modules, select=None, trace=()):
    """Grade modules ({name: text}) as a submission against the pristine folder; the instructor's own code, so
    the jail runs as this user. -> grade.run_tests' triple."""
    with tempfile.TemporaryDirectory(prefix="check-") as workdir:
        submission, run = os.path.join(workdir, "submission"), os.path.join(workdir, "run")
        os.mkdir(submission)
        for name, text in modules.items():
            with open(os.path.join(submission, name), "w", encoding="utf-8") as f:
                f.write(text)
        grade.prepare(pristine, submission, run)
        return grade.run_tests(run, TIMEOUT, select=select, trace=trace)


def import_error(student_dir):
    """None if the released modules import, else the error's last line."""
    names = [n[:-3] for n in release.STUDENT_MODULES if os.path.isfile(os.path.join(student_dir, n))]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", f"import {', '.join(names)}"], cwd=student_dir, env=env,
                          capture_output=True, text=True, timeout=300)
    return None if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["?"])[-1]


def solution_problems(run):
    tests, results, problems = run
    return problems + [f"{t['nodeid']} fails: {grade.reason(results[t['nodeid']]['output'])}"
                       for t in tests if not results[t["nodeid"]]["passed"]]


def release_problems(run, error):
    tests, results, problems = run
    out = problems + ([f"the release does not import: {error}"] if error else [])
    for t in tests:
        passed, output = results[t["nodeid"]]["passed"], results[t["nodeid"]]["output"]
        todo, seen = t["todo"], TODO_ID.findall(output)
        if not todo:
            if not passed:
                out.append(f"{t['nodeid']} covers no region yet fails in the release: {grade.reason(output)}")
            elif t["points"]:
                out.append(f"{t['nodeid']} covers no region, so the untouched release earns its {t['points']} points")
        elif passed:
            out.append(f"{t['nodeid']} passes in the release although it covers {', '.join(todo)}")
        elif not seen:
            out.append(f"{t['nodeid']} fails with an error that names no TODO: {grade.reason(output)}")
        elif not set(seen) & set(todo):
            out.append(f"{t['nodeid']} fails with TODO[{seen[0]}], none of its regions ({', '.join(todo)}): "
                       f"add '{seen[0]}' to its @graded(...)")
    return out


def executing(region, results):
    """The node ids of the tests that executed a line of region (from a traced run)."""
    return [nodeid for nodeid, result in results.items()
            if any(region.start < n < region.end for n in result.get("lines", {}).get(region.path, ()))]


def coverage_table(found, runs):
    """-> (table lines, problems): the graded tests failing with each region alone stubbed."""
    lines, problems = [], []
    width = max(len(r.id) for r in found)
    where = max(len(f"{r.path}:{r.start}") for r in found)
    for r in found:
        tests, results, errors = runs[r.id]
        failing = [t["nodeid"].partition("::")[2] for t in tests if not results[t["nodeid"]]["passed"]]
        shown = ", ".join(failing[:SHOWN]) + (f", +{len(failing) - SHOWN} more" if len(failing) > SHOWN else "")
        lines.append(f"{r.id:<{width}}  {f'{r.path}:{r.start}':<{where}}  {len(failing):>2} failing: {shown or '-'}")
        problems += errors
        if not failing:
            problems.append(f"region {r.id} ({r.path}:{r.start}) is not covered: no graded test fails when it "
                            f"alone is replaced by its stub")
    return lines, problems


def source(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def searchable(line):
    """A solution line as looked for in the release, or None: code without its trailing comment, whitespace
    collapsed; not a comment, not a block header (`for block in self.transformer.h:` gives nothing away),
    at least 12 characters (lone brackets, `return x` and the like neither)."""
    code = " ".join(re.sub(r"\s+#.*$", "", line).split())
    return code if len(code) >= 12 and not code.startswith("#") and not code.endswith(":") else None


def leaks(found, student):
    """-> (problems, number of lines looked for): solution lines found anywhere in the release's text."""
    released = []  # (path, line number, collapsed text)
    for path, (data, _) in sorted(student.items()):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            continue  # binary (reference values)
        released += [(path, n, " ".join(line.split())) for n, line in enumerate(text.splitlines(), start=1)]
    problems, looked_for = [], 0
    for r in found:
        lines = source(r.path).splitlines()
        for number in range(r.start + 1, r.end):
            code = searchable(lines[number - 1]) if lines[number - 1] in r.code else None
            if code is None:
                continue
            looked_for += 1
            for path, n, text in released:
                if code in text:
                    problems.append(f"{r.path}:{number} (region {r.id}) is in the release at {path}:{n}: {code}")
                    break
    return problems, looked_for


def reference_problems():
    import torch  # here, not at the top: only this step needs it

    from instructor import make_reference

    path = make_reference.REF_PATH
    if not os.path.isfile(path):
        return [f"{os.path.basename(path)} is missing: run `python -m instructor reference`"]
    recorded = torch.load(path, weights_only=True).get("source_sha256")
    if recorded != make_reference.source_hash():
        return [f"{os.path.basename(path)} was generated from another gpt.py: run `python -m instructor reference` "
                f"and commit it"]
    return []


def check(file=None):
    """Run the five steps, printing an OK / FAIL line for each (to file, default stdout). -> True if all pass."""
    start, file = time.monotonic(), file or sys.stdout

    def report(number, title, problems, details=()):
        print(f"{'FAIL' if problems else 'OK  '}  {number}. {title}", file=file, flush=True)
        for line in list(details) + problems:
            print(f"        {line}", file=file, flush=True)
        return not problems

    try:
        found = release.solution_regions()
        student = release.student_files()
    except release.ReleaseError as e:
        return report(0, "markers", [str(e)])
    ok = []
    with tempfile.TemporaryDirectory(prefix="release-") as tmp, \
            concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        release.build(tmp)
        pristine = os.path.join(tmp, "autograder", "pristine")
        solution = {name: source(name) for name in grade.student_modules(pristine)}
        solution_run = pool.submit(graded_run, pristine, solution, trace=sorted({r.path for r in found}))
        release_run = pool.submit(graded_run, pristine, {})
        imported = pool.submit(import_error, os.path.join(tmp, "student"))
        leaked, looked_for = leaks(found, student)  # meanwhile
        stale = reference_problems()
        executed = solution_run.result()[1]
        stubbed = {}
        for r in found:
            select = executing(r, executed)
            if select:  # else no test reaches the region, so none can fail: it is reported uncovered
                stubbed[r.id] = pool.submit(graded_run, pristine, {
                    **solution, r.path: regions.strip(source(r.path), r.path, only={r.id})}, select)

        tests = solution_run.result()[0]
        ok.append(report(1, f"the solution passes every graded test ({len(tests)} tests, "
                            f"{sum(t['points'] for t in tests):g} points)", solution_problems(solution_run.result())))
        ok.append(report(2, "the release imports and its region tests fail with their TODO messages",
                         release_problems(release_run.result(), imported.result())))
        table, uncovered = coverage_table(found, {r.id: stubbed[r.id].result() if r.id in stubbed else ([], {}, [])
                                                  for r in found})
        ok.append(report(3, f"coverage: each of the {len(found)} regions alone stubbed fails a graded test",
                         uncovered, table))
    ok.append(report(4, f"no line of solution code in the release ({looked_for} lines looked for)", leaked))
    ok.append(report(5, "unittests_ref.pt was generated from the current gpt.py", stale))
    print(f"check {'passed' if all(ok) else 'FAILED'} in {time.monotonic() - start:.0f} s", file=file)
    return all(ok)
