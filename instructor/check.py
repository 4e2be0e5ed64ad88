"""
`python -m instructor check` proves the release right; CI runs it (tests/test_instructor.py) and
`python -m instructor release` writes nothing unless it passes.

  1. the solution passes every graded test (unittests.py and the hidden tests);
  2. the release imports, and every graded test that covers a region fails there with the TODO[id]
     message of one of its regions (a test that covers none must pass: no student could fix it);
  3. coverage: with any one region alone replaced by its stub, at least one graded test fails;
  4. no line of solution code appears in the release (a notebook's cells included), no released .py
     file or notebook mentions the solution markers or the instructor, and notebooks carry no outputs;
  5. unittests_ref.pt was generated from the current gpt.py;
  6. the tests tell right from wrong: every realistic mistake of instructor/mistakes.py loses points
     and every valid alternative there keeps full marks;
  7. grading and a student's own `pytest unittests.py` agree: for every catalogue entry, each public test
     that checks its region gives the same verdict both ways.

Steps 1-3 grade a release built in a temporary folder with the grader's own machinery. The solution
run records the lines each test executes, so that each region's stub runs only against the tests that
execute the region (a test that never reaches a region cannot notice its stub); the runs go in parallel,
one per CPU core.

Steps 6 and 7 replace one region's solution code by a catalogue entry and run, again, only the graded
tests that execute that region, both ways: as a student runs them (stored inputs, in-process: a few plain
pytest processes each run many entries one after another, importing torch and pytest once) and as the
grader grades them (inputs drawn at grade time, the jail): each mistake on its own, on the tests that check its
region (those that only execute it too when none of those fails at home), the alternatives of different regions
together (a few graded runs). A mistake must lose points when graded; an alternative must
keep full marks both ways; and every public test that checks the region must give the same verdict both
ways (a test that only needs the region may catch a mistake there on some inputs and miss it on others).
"""

import concurrent.futures
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from instructor import grade, mistakes, regions, release
from instructor.release import ROOT

TIMEOUT = 60.0  # seconds per test; the solution and the stubs come nowhere near it
TODO_ID = re.compile(r"TODO\[([a-z0-9_]+)\]")
SHOWN = 3  # failing tests named per region in the coverage table
INSTRUCTOR_ONLY = re.compile(r"BEGIN SOLUTION|END SOLUTION|instructor", re.IGNORECASE)  # not in released .py files
MUTANT_WORKERS = min(os.cpu_count() or 2, 4)  # pytest processes that run the catalogue's entries (step 6)
MUTANT_TIMEOUT = 600.0  # seconds for one of them


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
    proc = subprocess.run([sys.executable, "-c", f"import {', '.join(names)}"], cwd=student_dir, env=grade.python_env(),
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


def released_lines(path, data):
    """[(where, line)] of a released text file; a notebook's lines are its cells' sources (its JSON escapes them)."""
    text = data.decode("utf-8")
    if not path.endswith(".ipynb"):
        return [(f"{path}:{n}", line) for n, line in enumerate(text.splitlines(), start=1)]
    return [(f"{path} cell {c} line {n}", line) for c, cell in enumerate(json.loads(text)["cells"], start=1)
            for n, line in enumerate("".join(cell["source"]).splitlines(), start=1)]


def leaks(found, student):
    """-> (problems, number of lines looked for): solution lines found anywhere in the release's text."""
    released = []  # (where, collapsed text)
    for path, (data, _) in sorted(student.items()):
        try:
            released += [(where, " ".join(line.split())) for where, line in released_lines(path, data)]
        except UnicodeDecodeError:
            continue  # binary (reference values)
    problems, looked_for = [], 0
    for r in found:
        lines = source(r.path).splitlines()
        for number in range(r.start + 1, r.end):
            code = searchable(lines[number - 1]) if lines[number - 1] in r.code else None
            if code is None:
                continue
            looked_for += 1
            for where, text in released:
                if code in text:
                    problems.append(f"{r.path}:{number} (region {r.id}) is in the release at {where}: {code}")
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


def mentions(student):
    """-> problems: lines of the released .py files and notebooks that speak of the solution markers or the
    instructor."""
    problems = []
    for path, (data, _) in sorted(student.items()):
        if path.endswith((".py", ".ipynb")):
            for where, line in released_lines(path, data):
                found = INSTRUCTOR_ONLY.search(line)
                if found:
                    problems.append(f"{where} in the release mentions {found.group(0)!r}: "
                                    f"{' '.join(line.split())[:90]}")
    return problems


def notebook_outputs(student):
    """-> problems: released notebooks that carry outputs (a traceback there would show solution code)."""
    problems = []
    for path, (data, _) in sorted(student.items()):
        if path.endswith(".ipynb"):
            cells = [str(n) for n, cell in enumerate(json.loads(data)["cells"], start=1) if cell.get("outputs")]
            if cells:
                problems.append(f"{path} holds the outputs of cell(s) {', '.join(cells)}: clear them (Jupyter: Edit > "
                                f"Clear All Outputs) and commit it")
    return problems


# ----------------------------------------------------------------------------- step 6: mistakes and alternatives

@dataclass
class Mutant:
    """A catalogue entry: one region's solution code replaced."""
    kind: str  # "mistake" or "alternative"
    region: str
    what: str
    path: str
    code: list  # the entry's lines, without the region's indent


def with_code(text, path, rid, code):
    """text with the solution code of region rid (the lines strictly between its markers, hint included)
    replaced by the lines of code, each indented as the region; the markers stay."""
    region = next((r for r in regions.parse(text, path) if r.id == rid), None)
    if region is None:
        raise KeyError(f"{path} has no region {rid}")
    lines = text.splitlines()
    body = [region.indent + line if line.strip() else "" for line in code]
    return "\n".join(lines[:region.start] + body + lines[region.end - 1:]) + ("\n" if text.endswith("\n") else "")


def catalogue(found):
    """-> (mutants, problems): the entries of instructor/mistakes.py; one that names no region or does not
    compile is a problem."""
    by_id = {r.id: r for r in found}
    out, problems = [], []
    for kind, entries in (("mistake", mistakes.MISTAKES), ("alternative", mistakes.ALTERNATIVES)):
        for rid, what, code in entries:
            r = by_id.get(rid)
            if r is None:
                problems.append(f"{kind} '{what}' names no region: {rid}")
                continue
            try:
                compile(with_code(source(r.path), r.path, rid, code), r.path, "exec")
            except SyntaxError as e:
                problems.append(f"{kind} {rid} ({what}) does not compile: {e.msg} at {r.path}:{e.lineno}")
                continue
            out.append(Mutant(kind, rid, what, r.path, list(code)))
    return out, problems


def applied(solution, entries):
    """The modules ({name: text}) of the solution with each entry's region replaced by its code."""
    modules = dict(solution)
    for m in entries:
        modules[m.path] = with_code(modules[m.path], m.path, m.region, m.code)
    return modules


def mutant_shares(mutants, solution, selections, workers=MUTANT_WORKERS):
    """The runs of the entries whose region some test executes, split into `workers` lists of about the
    same number of tests. -> [[(mutant, {"modules": ..., "select": [node ids]}), ...], ...]"""
    shares, load = [[] for _ in range(workers)], [0] * workers
    runs = [(m, {"modules": applied(solution, [m]), "select": selections[m.region]})
            for m in mutants if selections[m.region]]
    for m, job in sorted(runs, key=lambda run: -len(run[1]["select"])):
        least = load.index(min(load))
        shares[least].append((m, job))
        load[least] += len(job["select"]) + 2  # pytest's own start for each job costs about two tests
    return [share for share in shares if share]


def run_mutants(tests_dir, jobs, timeout=MUTANT_TIMEOUT):
    """Run jobs ([{"modules": {name: text}, "select": [node ids]}], "draws": n to run each test on n draws, see
    instructor/draws.py) one after another in one pytest process (mutant_worker) in tests_dir.
    -> ([{node id: {passed, output[, draws: [passed per draw]]}}, or None for a job that never ran], error)"""
    with tempfile.TemporaryDirectory(prefix="mutants-") as tmp:
        spec, out = os.path.join(tmp, "jobs.json"), os.path.join(tmp, "results.jsonl")
        with open(spec, "w", encoding="utf-8") as f:
            json.dump(jobs, f)
        env = grade.python_env(ROOT, OMP_NUM_THREADS="1")
        error = None
        try:
            proc = subprocess.run([sys.executable, "-m", "instructor.check", "--mutant-worker", spec, out],
                                  cwd=tests_dir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True, timeout=timeout)
            if proc.returncode:
                error = f"exit code {proc.returncode}: {proc.stderr.strip()[-500:]}"
        except subprocess.TimeoutExpired:
            error = f"still running after {timeout:g} s, stopped"
        results = [None] * len(jobs)
        if os.path.exists(out):
            with open(out, encoding="utf-8") as f:
                for line in f:
                    entry = json.loads(line)
                    for nodeid, verdicts in entry.get("draws", {}).items():
                        entry["results"][nodeid]["draws"] = verdicts
                    results[entry["job"]] = entry["results"]
    return results, error


def mutant_worker(spec, out):
    """`python -m instructor.check --mutant-worker JOBS OUT`, run in a folder of graded test files: for each
    job, its modules in a folder of their own, first on sys.path, and pytest on its selected tests, all in
    this one process, on the stored inputs, as a student's `pytest unittests.py` runs them; one JSON line per
    job to OUT: {"job": n, "results": {node id: {passed, output}}}."""
    import gc
    import importlib

    import pytest
    import torch

    from instructor import draws  # it imports this module

    torch.set_num_threads(1)  # as in the grader: tiny tensors, which threads only slow down
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != ROOT]  # no solution in sight
    gc.freeze()  # pytest collects garbage after every session: torch's many objects are spared from then on

    class Recorder:
        def __init__(self):
            self.results = {}

        def pytest_runtest_logreport(self, report):  # as graded: passed if no phase failed or skipped
            if report.when == "call" or not report.passed:
                entry = self.results.setdefault(report.nodeid, {"passed": True, "output": ""})
                if not report.passed:
                    entry["passed"] = False
                    entry["output"] = entry["output"] or report.longreprtext[-2000:]

        @pytest.hookimpl(hookwrapper=True)
        def pytest_runtest_call(self, item):
            signal.alarm(int(TIMEOUT))
            try:
                yield
            finally:
                signal.alarm(0)

    def alarm(*_):
        raise TimeoutError(f"timed out: still running after {TIMEOUT:g} s")

    signal.signal(signal.SIGALRM, alarm)
    with open(spec, encoding="utf-8") as f:
        jobs = json.load(f)
    with tempfile.TemporaryDirectory(prefix="mutant-") as tmp, open(out, "a", encoding="utf-8") as results:
        for number, job in enumerate(jobs):
            folder = os.path.join(tmp, str(number))
            os.mkdir(folder)
            names = [name[:-3] for name in job["modules"]]
            for name, text in job["modules"].items():
                with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
                    f.write(text)
            for name in names:
                sys.modules.pop(name, None)
            sys.path.insert(0, folder)
            importlib.invalidate_caches()
            recorder, redraw = Recorder(), draws.Redraw(job.get("draws", 0), TIMEOUT)
            plugins = [recorder, redraw] if redraw.n else [recorder]
            try:
                pytest.main([*grade.PYTEST_ARGS, *job["select"]], plugins=plugins)
            finally:
                sys.path.remove(folder)
            elsewhere = [n for n in names if n in sys.modules
                         and os.path.dirname(os.path.abspath(getattr(sys.modules[n], "__file__", "") or "")) != folder]
            if elsewhere:  # the tests saw some other copy of a module: none of them counts
                recorder.results = {nodeid: {"passed": False, "output": f"{', '.join(elsewhere)} imported from "
                                                                          f"elsewhere"} for nodeid in job["select"]}
            results.write(json.dumps({"job": number, "results": recorder.results, "draws": redraw.verdicts}) + "\n")
            results.flush()
    return 0


def graded_tests(m, executing, at_home, checks):
    """The graded tests that mistake m is graded on: those that check its region (step 7 compares them with
    at_home, its results in a student's own run); if none of them fails at home, also those that execute it
    and fail there; all that execute it when that leaves none or it did not run at home."""
    checking = [nodeid for nodeid in executing if m.region in checks.get(nodeid, ())]
    if at_home is None:
        return executing
    if any(not at_home[nodeid]["passed"] for nodeid in checking if nodeid in at_home):
        return checking
    chosen = [nodeid for nodeid in executing if nodeid in checking or not at_home.get(nodeid, {}).get("passed", True)]
    return chosen or executing


def together(mutants):
    """The alternatives, grouped so that no two in a group share a region: the first alternative of every
    region, then the second, ..."""
    groups = []
    for m in mutants:
        if m.kind == "alternative":
            group = next((g for g in groups if all(other.region != m.region for other in g)), None)
            if group is None:
                groups.append(group := [])
            group.append(m)
    return groups


def mutation_table(found, outcomes, points, checks, executed_by, graded_together):
    """-> (table lines, problems, disagreements). outcomes: [(mutant, select, local results or None, error,
    graded results or None)]: each mistake graded alone; graded_together: [(alternatives, grade.run_tests'
    triple)], the alternatives of each graded at once by the grader."""
    lines, problems, disagreements = [], [], []
    width = max(len(r.id) for r in found)
    where = max(len(f"{r.path}:{r.start}") for r in found)
    verdicts = {r.id: {"mistake": [], "alternative": []} for r in found}  # True: caught / kept
    broken = set()  # (region, what) of the alternatives that lose points
    together = {(m.region, m.what): results for members, (_, results, _) in graded_together for m in members}
    for m, select, results, error, graded in outcomes:
        tally = verdicts[m.region][m.kind]
        graded = graded if m.kind == "mistake" else together.get((m.region, m.what))
        missing = [nodeid for nodeid in select if results is None or nodeid not in results
                   or graded is None or nodeid not in graded]
        if missing:
            tally.append(False)
            problems.append(f"{m.kind} {m.region} ({m.what}): {len(missing)} of its {len(select)} graded tests did "
                            f"not run ({error or 'not collected'})")
            continue
        failing = [nodeid for nodeid in select if not graded[nodeid]["passed"]]
        if m.kind == "mistake":
            tally.append(any(points.get(nodeid) for nodeid in failing))
            if not tally[-1]:
                problems.append(f"mistake not caught: {m.region}: {m.what} (" + (
                    "no graded test executes the region" if not select else
                    ("its graded test passes" if len(select) == 1 else f"its {len(select)} graded tests pass")
                    + (" or fail for no points" if failing else "")) + ")")
        else:
            failing += [nodeid for nodeid in select if not results[nodeid]["passed"] and nodeid not in failing]
            tally.append(not failing)
            if failing:
                broken.add((m.region, m.what))
                first = failing[0]
                problems.append(f"alternative loses points: {m.region}: {m.what}: {len(failing)} of the {len(select)} "
                                f"graded tests that execute it fail, e.g. {first.partition('::')[2]}: "
                                f"{grade.reason((results if not results[first]['passed'] else graded)[first]['output'])}")
        for nodeid in select:  # the public tests that check the region (those that only need it may catch a
            # mistake elsewhere on some inputs and not on others: their own region's tests say where it is)
            if nodeid.startswith(grade.TEST_FILES[0]) and m.region in checks.get(nodeid, ()) \
                    and results[nodeid]["passed"] != graded[nodeid]["passed"]:
                local = "passes" if results[nodeid]["passed"] else "fails"
                why = grade.reason((graded if results[nodeid]["passed"] else results)[nodeid]["output"])
                disagreements.append(f"{m.kind} {m.region} ({m.what}): {nodeid.partition('::')[2]} {local} in "
                                     f"pytest unittests.py but not when graded: {why}")
    for r in found:
        caught, kept = verdicts[r.id]["mistake"], verdicts[r.id]["alternative"]
        lines.append(f"{r.id:<{width}}  {f'{r.path}:{r.start}':<{where}}  mistakes caught "
                     f"{sum(caught):>2}/{len(caught):<2}  alternatives kept {sum(kept)}/{len(kept)}")
        if not caught:
            problems.append(f"region {r.id} has no mistake in instructor/mistakes.py")
    for members, (tests, results, errors) in graded_together:
        problems += errors
        failing = [t["nodeid"] for t in tests if not results[t["nodeid"]]["passed"]]
        suspects = {nodeid: [m for m in members if nodeid in executed_by[m.region]] for nodeid in failing}
        unexplained = [nodeid for nodeid in failing if not any((m.region, m.what) in broken for m in suspects[nodeid])]
        if unexplained:  # each of them keeps full marks alone, yet the grader takes points from them together
            first = unexplained[0]
            problems.append(f"alternatives that keep full marks alone lose points graded together by the grader: "
                            f"{len(unexplained)} of {len(tests)} tests fail, e.g. {first.partition('::')[2]}: "
                            f"{grade.reason(results[first]['output'])}; it executes "
                            f"{'; '.join(f'{m.region} ({m.what})' for m in suspects[first]) or 'none of them'}")
    return lines, problems, disagreements


def check(file=None):
    """Run the seven steps, printing an OK / FAIL line for each (to file, default stdout). -> True if all pass."""
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
    entries, wrong_entries = catalogue(found)
    ok = []
    with tempfile.TemporaryDirectory(prefix="release-") as tmp, \
            concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        release.build(tmp)
        pristine = os.path.join(tmp, "autograder", "pristine")
        os.unlink(os.path.join(pristine, grade.KEY))  # fresh draws every run: the tests' power over all of them
        solution = {name: source(name) for name in grade.student_modules(pristine)}
        solution_run = pool.submit(graded_run, pristine, solution, trace=sorted({r.path for r in found}))
        release_run = pool.submit(graded_run, pristine, {})
        imported = pool.submit(import_error, os.path.join(tmp, "student"))
        leaked, looked_for = leaks(found, student)  # meanwhile
        mentioned = mentions(student) + notebook_outputs(student)
        stale = reference_problems()
        os.mkdir(os.path.join(tmp, "nothing"))
        grade.prepare(pristine, os.path.join(tmp, "nothing"), os.path.join(tmp, "mutants"))  # the test files
        executed = solution_run.result()[1]
        order = {nodeid: n for n, nodeid in enumerate(executed)}
        selections = {r.id: executing(r, executed) for r in found}

        # the longest runs first: the catalogue's entries at home (each mistake is then graded on what they show),
        # its alternatives graded together, the stubs, then each mistake graded alone
        shares = [(share, pool.submit(run_mutants, os.path.join(tmp, "mutants", "tests"), [job for _, job in share]))
                  for share in mutant_shares(entries, solution, selections)]
        graded_together = []
        for members in together(entries):
            select = sorted(set().union(*(selections[m.region] for m in members)), key=order.get)
            if select:
                graded_together.append((members, pool.submit(graded_run, pristine, applied(solution, members),
                                                             select)))
        stubbed = {}
        for r in found:
            if selections[r.id]:  # else no test reaches the region, so none can fail: it is reported uncovered
                stubbed[r.id] = pool.submit(graded_run, pristine, {
                    **solution, r.path: regions.strip(source(r.path), r.path, only={r.id})}, selections[r.id])
        tests = solution_run.result()[0]
        checks = {t["nodeid"]: t["checks"] for t in tests}
        at_home = []  # (entry, its job, its results in a student's own run or None, the worker's error)
        for share, future in shares:
            results, error = future.result()
            at_home += [(m, job, result, error) for (m, job), result in zip(share, results)]
        graded_alone = {}  # each mistake graded on its own: (region, what) -> (the tests, the run)
        for m, job, result, _ in at_home:
            if m.kind == "mistake":
                select = graded_tests(m, job["select"], result, checks)
                graded_alone[m.region, m.what] = select, pool.submit(graded_run, pristine, applied(solution, [m]),
                                                                     select)

        points = {t["nodeid"]: t["points"] for t in tests}
        ok.append(report(1, f"the solution passes every graded test ({len(tests)} tests, "
                            f"{sum(t['points'] for t in tests):g} points)", solution_problems(solution_run.result())))
        ok.append(report(2, "the release imports and its region tests fail with their TODO messages",
                         release_problems(release_run.result(), imported.result())))
        table, uncovered = coverage_table(found, {r.id: stubbed[r.id].result() if r.id in stubbed else ([], {}, [])
                                                  for r in found})
        ok.append(report(3, f"coverage: each of the {len(found)} regions alone stubbed fails a graded test",
                         uncovered, table))
        ok.append(report(4, f"no line of solution code in the release, notebooks included ({looked_for} lines looked "
                            f"for), no mention of the markers or the instructor, no notebook outputs",
                         leaked + mentioned))
        ok.append(report(5, "unittests_ref.pt was generated from the current gpt.py", stale))
        outcomes = []
        for m, job, result, error in at_home:
            select, graded = graded_alone.get((m.region, m.what), (job["select"], None))
            outcomes.append((m, select, result, error, graded and graded.result()[1]))
        outcomes += [(m, [], {}, None, {}) for m in entries if not selections[m.region]]
        table, wrong, disagreements = mutation_table(found, outcomes, points, checks, selections,
                                                     [(members, future.result()) for members, future in graded_together])
    number = {kind: sum(m.kind == kind for m in entries) for kind in ("mistake", "alternative")}
    ok.append(report(6, f"the tests tell right from wrong: each of {number['mistake']} mistakes loses points, each of "
                        f"{number['alternative']} alternatives keeps full marks", wrong_entries + wrong, table))
    ok.append(report(7, f"grading and pytest unittests.py agree on every public test of each of the {len(entries)} "
                        f"catalogue entries' regions", disagreements))
    print(f"check {'passed' if all(ok) else 'FAILED'} in {time.monotonic() - start:.0f} s", file=file)
    return all(ok)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--mutant-worker"] and len(sys.argv) == 4:
        sys.exit(mutant_worker(sys.argv[2], sys.argv[3]))
    sys.exit("usage: python -m instructor.check --mutant-worker JOBS OUT (check itself: python -m instructor check)")
