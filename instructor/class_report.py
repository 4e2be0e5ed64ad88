"""
The class report: `python -m instructor grade-all` calls write(DIR, tests) once every student is graded; it reads
what grading left in DIR (results/, submissions/, pristine/) and writes DIR/report.md, its pictures in DIR/report/
and the suspected copies side by side in DIR/report/copies.html.

  1. scores: a histogram and a summary;
  2. regions: for each TODO region, the share of graded students who pass every test that checks it;
  3. mistakes: which catalogued mistakes (instructor/mistakes.py) the failing submissions match. A mistake's
     signature is the set of graded tests that fail with it: check's mutant workers run the solution with that
     one region replaced (our own code; no student code runs outside the sandbox) on every graded test (a
     mistake upstream fails tests downstream: those failures are its own), on the stored inputs, once per class (a minute or two), cached in DIR/catalogue.json. A student who
     fails a region (a failing test that checks it names TODO[region], or no TODO) may hold the mistakes whose
     failing tests among those that check the region are exactly the student's; of those, and across regions
     (a mistake fails other regions' tests too), the one that accounts best for all the student's failing tests
     is taken first, then the one whose code is closest to the student's (diagnose); a region whose tests timed
     out or crashed the grader is not diagnosed;
  4. the slowest submissions, and those refused, in error, timed out or crashing the grader;
  5. suspected copying: copydetect's fingerprints of each student's modules, with the released modules and the
     solution as boilerplate, so that neither the release nor the canonical answer counts as copied.
"""

import ast
import collections
import contextlib
import concurrent.futures
import difflib
import hashlib
import html
import io
import json
import os
import statistics
import tempfile
import time
import tokenize
from unittest import mock

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # files only, never a display
import matplotlib.pyplot as plt  # noqa: E402 (after the backend)

from files import atomic_write  # noqa: E402
from instructor import check, grade, grade_all, mistakes, regions, release  # noqa: E402

SHOWN = 8  # students named in a row; the rest are counted
SLOWEST = 10
CRASHES = ("timed out", "the grader's test process died")  # in a test's output: not the student's answer
STUB = "NotImplementedError: TODO[{}]"  # a region still raising its stub
TIE = 1e-9  # code evidence closer than this is a tie
# copydetect works on filtered code: every name becomes one letter (V, F, O), every string S, comments and
# spaces go, so renaming variables changes nothing. Its fingerprints are the k-grams of NOISE characters of it
# (about a short line; copydetect's default, every one kept). The share of a student's own code (what is not
# boilerplate) found in another's: a copy with renamed variables 100%; the same alternatives in half the regions
# 94-98%; two solutions written with different alternatives 26-34% (they share the 5 regions where the catalogue
# has one alternative only: 400 characters); 300 students drawing each region at random from the solution, its
# alternatives and mistakes: at most 76% over their 44850 pairs (some 24 s for the comparisons on 2 cores).
NOISE = 25
COPY_SHARE = 0.8  # flagged: this share of one student's own code is in the other's ...
COPY_CHARS = 400  # ... and at least this many characters of filtered code (five regions or so)
TOP_PAIRS = 3  # pairs whose longest common stretch report.md shows


# ----------------------------------------------------------------------------- reading DIR

def load_results(out):
    """{student: results.json object}, by file name."""
    found = {}
    folder = os.path.join(out, "results")
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.endswith(".json"):
            result = grade_all.previous(os.path.join(folder, name))
            if result is not None:
                found[result.get("extra_data", {}).get("student", name[:-5])] = result
    return found


def status(result):
    return result.get("extra_data", {}).get("status", "graded")


def failed_tests(result, nodeids):
    """{node id: output} of the tests the student failed (names as grade.report writes them)."""
    return {nodeids[t["name"]]: t.get("output", "") for t in result["tests"]
            if t["status"] != "passed" and t["name"] in nodeids}


def names(students):
    students = sorted(students)
    more = len(students) - SHOWN
    return ", ".join(students[:SHOWN]) + (f" and {more} more" if more > 0 else "")


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]


# ----------------------------------------------------------------------------- 1, 2: scores and regions

def scores_section(results, total, pictures):
    scores = [r["score"] for r in results.values()]
    statuses = collections.Counter(status(r).split(":")[0] for r in results.values())
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.hist(scores, bins=[b - 0.5 for b in range(int(total) + 2)], color="tab:blue", edgecolor="white")
    ax.set(xlabel=f"score (out of {total:g})", ylabel="students", title=f"Scores of {len(scores)} students")
    ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(os.path.join(pictures, "scores.png"), dpi=100)
    plt.close(fig)
    return ["## Scores", "", "![scores](report/scores.png)", "", *table(
        ["students", "mean", "median", f"full marks ({total:g})", "zero", "refused", "errors"],
        [[len(scores), f"{statistics.fmean(scores):.1f}", f"{statistics.median(scores):g}",
          sum(s >= total for s in scores), sum(s == 0 for s in scores), statuses["refused"], statuses["error"]]]),
        "", "Refused and errored submissions count as 0 here; section 4 says why.", ""]


def regions_section(failed, checking, pictures):
    """The share of graded students who pass every test that checks each region."""
    shares = {}
    for r, tests in checking.items():
        passing = sum(not mine.keys() & tests for mine in failed.values())
        shares[r] = (passing, passing / max(len(failed), 1))
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(shares) + 1))
    ax.barh(list(shares)[::-1], [100 * s for _, s in list(shares.values())[::-1]], color="tab:green")
    ax.set(xlim=(0, 100), xlabel="% of graded students passing every test that checks it", title="TODO regions")
    fig.tight_layout()
    fig.savefig(os.path.join(pictures, "regions.png"), dpi=100)
    plt.close(fig)
    return ["## TODO regions", "", "![regions](report/regions.png)", "", *table(
        ["region", "tests checking it", "students passing them all", "share"],
        [[r, len(checking[r]), passing, f"{100 * share:.0f}%"] for r, (passing, share) in shares.items()]), ""]


# ----------------------------------------------------------------------------- 3: the catalogue's signatures

def solution_modules(pristine):
    """The solution's modules, as check grades them: {name: text} for every module a submission may replace."""
    return {name: check.source(name) for name in grade.student_modules(pristine)}


def catalogue_key(pristine):
    """What the signatures depend on: the graders' files (tests, reference values), the solution, the catalogue."""
    digest = hashlib.sha256(grade_all.tests_key(pristine).encode())
    for name, text in sorted(solution_modules(pristine).items()):
        digest.update(name.encode() + b"\0" + text.encode() + b"\0")
    digest.update(json.dumps(mistakes.MISTAKES).encode())
    return digest.hexdigest()


def signatures(out, tests):
    """The catalogue's mistakes, each {region, what, path, code, tests (node ids run), failing ({node id: the TODO ids
    its message names} of those failing; None if they did not all run)}, from DIR/catalogue.json if its key is
    current, else computed and cached."""
    pristine, path = os.path.join(out, "pristine"), os.path.join(out, "catalogue.json")
    key = catalogue_key(pristine)
    shared = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser(os.path.join("~", ".cache")),
                          "micro-gpt", f"catalogue-{key[:32]}.json")  # for every class graded with these tests
    for source in (path, shared):
        cached = grade_all.previous(source)
        if cached and cached.get("key") == key:
            if source == shared:
                atomic_write(path, json.dumps(cached, indent=1))
            return cached
    start = time.monotonic()
    entries, problems = check.catalogue(release.solution_regions())
    unique = {}  # mistakes.py describes a few pieces of code twice: one run, the first description
    for m in entries:
        if m.kind == "mistake":
            unique.setdefault((m.region, tuple(m.code)), m)
    # every test, not only those that check the region: a mistake upstream also fails tests downstream (a wrong
    # rotary embedding fails greedy decoding), and only a full signature says that those failures are its own
    covering = dict.fromkeys((r for r, _ in unique), [t["nodeid"] for t in tests])
    solution = solution_modules(pristine)
    failing, errors = {}, list(problems)
    with tempfile.TemporaryDirectory(prefix="class-report-") as tmp, \
            mock.patch.dict(os.environ, TMPDIR=tmp), \
            concurrent.futures.ThreadPoolExecutor(check.MUTANT_WORKERS) as pool:  # pytest's tmp_path in tmp too
        os.mkdir(os.path.join(tmp, "nothing"))
        grade.prepare(pristine, os.path.join(tmp, "nothing"), os.path.join(tmp, "run"))  # the test files only
        shares = check.mutant_shares(list(unique.values()), solution, covering)
        runs = [(share, pool.submit(check.run_mutants, os.path.join(tmp, "run", "tests"), [job for _, job in share]))
                for share in shares]
        for share, future in runs:
            results, error = future.result()
            errors += [error] if error else []
            for (m, job), result in zip(share, results):
                if result is not None and all(n in result for n in job["select"]):
                    failing[id(m)] = {n: check.TODO_ID.findall(result[n]["output"]) for n in job["select"]
                                      if not result[n]["passed"]}
    catalogue = {"key": key if not errors else None, "seconds": round(time.monotonic() - start, 1), "errors": errors,
                 "mistakes": [{"region": m.region, "what": m.what, "path": m.path, "code": m.code,
                               "tests": covering[m.region],
                               "failing": failing.get(id(m), None if covering[m.region] else {})}
                              for m in unique.values()]}
    atomic_write(path, json.dumps(catalogue, indent=1))
    if catalogue["key"]:
        with contextlib.suppress(OSError):  # a read-only home: each class computes its own
            os.makedirs(os.path.dirname(shared), exist_ok=True)
            atomic_write(shared, json.dumps(catalogue, indent=1))
    return catalogue


# ----------------------------------------------------------------------------- 3: the code's evidence

def tokens(text):
    """The code's tokens without comments and layout (a file that does not tokenize: its words)."""
    layout = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
              tokenize.ENCODING, tokenize.ENDMARKER}
    try:
        return [t.string for t in tokenize.generate_tokens(io.StringIO(text).readline) if t.type not in layout]
    except Exception:  # noqa: BLE001 (tokenize raises several kinds on broken code)
        return text.split()


def functions(text):
    """{qualified name: (first line, last line)} of the functions of a module's text, parsed, never run."""
    found = {}

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            name = prefix
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = prefix + child.name
                if not isinstance(child, ast.ClassDef):
                    found[name] = (child.lineno, child.end_lineno)
                name += "."
            visit(child, name)
    try:
        visit(ast.parse(text), "")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return {}
    return found


def region_function(mistake):
    """(qualified name, the solution's tokens, the mistake's) of the function that holds the mistake's region."""
    solution = check.source(mistake["path"])
    text = check.with_code(solution, mistake["path"], mistake["region"], mistake["code"])
    start = next(r.start for r in regions.parse(text, mistake["path"]) if r.id == mistake["region"])
    holding = [(a, name) for name, (a, b) in functions(text).items() if a <= start <= b]
    if not holding:
        return None, tokens(solution), tokens(text)
    name = max(holding)[1]  # the innermost

    def body(t):
        a, b = functions(t)[name]
        return tokens("\n".join(t.splitlines()[a - 1:b]))
    return name, body(solution), body(text)


class Evidence:
    """How much closer the student's code is to the mistake's than to the solution's, -1 to 1: difflib's ratio of
    their tokens (comments and layout left out), in the function that holds the region (the whole module where the
    student has no function of that name); None where the student's function is the solution's, token for token
    (the mistake cannot be there). Student code is read and parsed, never run; each module once."""

    def __init__(self, out):
        self.out, self.modules, self.mistakes, self.functions = out, {}, {}, {}

    def function(self, path, name):
        """The tokens of the function name (qualified) of the module at path (all of it without one), or None."""
        if path not in self.modules:
            try:
                with open(path, encoding="utf-8", errors="replace") as f:
                    text = f.read(grade.MAX_FILE)
            except OSError:
                text = None
            self.modules[path] = text and (text.splitlines(), functions(text))
        if self.modules[path] is None:
            return None
        if (path, name) not in self.functions:
            lines, found = self.modules[path]
            a, b = found.get(name, (1, len(lines)))
            self.functions[path, name] = tokens("\n".join(lines[a - 1:b]))
        return self.functions[path, name]

    def __call__(self, student, mistake):
        key = (mistake["region"], mistake["what"])
        if key not in self.mistakes:
            self.mistakes[key] = region_function(mistake)
        name, solution, theirs = self.mistakes[key]
        mine = self.function(os.path.join(self.out, "submissions", student, mistake["path"]), name)
        if mine is None:  # no such module: no evidence either way
            return 0.0
        if mine == solution:
            return None
        return (difflib.SequenceMatcher(None, mine, theirs, autojunk=False).ratio()
                - difflib.SequenceMatcher(None, mine, solution, autojunk=False).ratio())


# ----------------------------------------------------------------------------- 3: matching

def blames(output, region):
    """A failing test's output blames the region it names (TODO[region]), or every region it checks if none."""
    return region in check.TODO_ID.findall(output) or not check.TODO_ID.search(output)


def diagnose(student, failed, checking, needs, by_region, evidence):
    """One student's failing regions: ({region: (mistake, [mistakes tied with it])}, [regions with an uncatalogued
    mistake], [regions left as stubs]). failed: {node id: output} of the student's failing tests; checking: {region:
    node ids checking it}; needs: {node id: the regions it needs besides those it checks}; by_region: {region:
    [catalogue entries]}; evidence(student, entry): -1 to 1, or None where the student's code holds no mistake.

    A region fails when a failing test that checks it blames it. Its candidates are the mistakes that fail the
    same tests among those that check it (and, for a region that does not fail, only tests the student fails). A
    mistake also fails tests of other regions (one in the MLP fails the block's test), so the candidates are taken
    greedily: first the one whose failing tests best account for the student's (each one the student failed counts
    1, each one the student passed -1), then the code's evidence; one that accounts for no failing test that the
    mistakes taken before do not is left out. A failing region left unexplained holds an uncatalogued mistake,
    unless each of its failing tests needs another such region (then it follows from that one)."""
    mine = set(failed)
    failing = [r for r, tests in checking.items() if any(blames(failed[n], r) for n in mine & tests)]
    candidates, stubs, crashed = [], [], set()  # candidates: (fit, evidence, region, mistake)
    for r, tests in checking.items():
        here = mine & tests
        if any(c in failed[n] for n in here for c in CRASHES):
            crashed.add(r)  # no verdict on the code: section 4 lists it
        elif r in failing and any(STUB.format(r) in failed[n] for n in here):
            stubs.append(r)
        else:  # a region that does not fail may hold a mistake that only other regions' tests catch, all failing
            for m in by_region.get(r, ()):
                theirs = m["failing"].keys()
                if theirs & tests == here and (r in failing or theirs and theirs <= mine):
                    proof = evidence(student, m)
                    if proof is not None:
                        candidates.append((len(mine & theirs) - len(theirs - mine), proof, r, m))
    matched, explained = {}, set()
    for fit, proof, r, m in sorted(candidates, key=lambda c: (-c[0], -c[1])):  # stable: region, catalogue order
        if r not in matched and not mine & m["failing"].keys() <= explained:
            matched[r] = (m, [o for f, p, q, o in candidates
                              if q == r and o is not m and f == fit and abs(p - proof) <= TIE])
            explained |= mine & m["failing"].keys()
    unknown = [r for r in failing if r not in matched and r not in stubs and r not in crashed
               and not mine & checking[r] <= explained]
    first = [r for r in unknown if any(blames(failed[n], r) and not needs[n] & set(unknown)
                                       for n in mine & checking[r] - explained)]
    return matched, first or unknown, stubs


def mistakes_section(out, tests, failed, checking):
    catalogue = signatures(out, tests)
    by_region = collections.defaultdict(list)
    for m in catalogue["mistakes"]:
        if m["failing"] is not None:
            by_region[m["region"]].append(m)
    needs = {t["nodeid"]: set(t["todo"]) - set(t.get("checks", t["todo"])) for t in tests}
    found, ties = collections.defaultdict(list), collections.defaultdict(set)
    uncatalogued, stubs = collections.defaultdict(list), collections.defaultdict(list)
    evidence = Evidence(out)
    for student, mine in failed.items():
        matched, unknown, stubbed = diagnose(student, mine, checking, needs, by_region, evidence)
        for r, (m, tied) in matched.items():
            found[r, m["what"]].append(student)
            ties[r, m["what"]].update(t["what"] for t in tied)
        for r in unknown:
            uncatalogued[r].append(student)
        for r in stubbed:
            stubs[r].append(student)
    order = {r: n for n, r in enumerate(checking)}
    lines = ["## Mistakes", "",
             f"The catalogue's {len(catalogue['mistakes'])} mistakes, each run on every graded test "
             f"({catalogue['seconds']:g} s, cached in catalogue.json), matched to the failing regions of "
             f"{len(failed)} graded students: the same failing tests among those that check the region; of several, "
             f"the one that accounts for most of the student's failing tests, then the one closest to the student's "
             f"code (the function that holds the region). A region's failures that a mistake elsewhere accounts "
             f"for are not counted again.", ""]
    lines += [f"- not run: {e}" for e in catalogue["errors"]]
    lines += [f"- **{what}** ({r}): {len(s)} student{'s' * (len(s) > 1)} ({names(s)})"
              + (f"; tied on code with: {'; '.join(sorted(ties[r, what]))}" if ties[r, what] else "")
              for (r, what), s in sorted(found.items(), key=lambda kv: (-len(kv[1]), order.get(kv[0][0], 0)))]
    lines += [f"- {r}: {len(s)} student{'s' * (len(s) > 1)} with an uncatalogued mistake ({names(s)})"
              for r, s in sorted(uncatalogued.items(), key=lambda kv: (-len(kv[1]), order.get(kv[0], 0)))]
    lines += [f"- {r}: {len(s)} student{'s' * (len(s) > 1)} left the stub ({names(s)})"
              for r, s in sorted(stubs.items(), key=lambda kv: (-len(kv[1]), order.get(kv[0], 0)))]
    if not (found or uncatalogued or stubs):
        lines.append("- no failing region")
    return lines + [""]


# ----------------------------------------------------------------------------- 4: slow and crashing

def trouble_section(results):
    timed = sorted(((r.get("extra_data", {}).get("seconds") or 0, s) for s, r in results.items()
                    if status(r) == "graded"), reverse=True)[:SLOWEST]
    lines = ["## Slowest and crashing submissions", "", *table(
        ["student", "seconds", "score"], [[s, f"{sec:g}", f"{results[s]['score']:g}"] for sec, s in timed]), ""]
    rows = [[student, status(result)] for student, result in results.items() if status(result) != "graded"]
    for student, result in results.items():
        for what in CRASHES if status(result) == "graded" else ():
            hit = [t["name"] for t in result["tests"] if t["status"] != "passed" and what in t.get("output", "")]
            if hit:
                rows.append([student, f"{what}: {names(hit)}"])
    return lines + (table(["student", "what happened"], rows) if rows else ["No submission refused, in error, timed "
                                                                             "out or crashing the grader."]) + [""]


# ----------------------------------------------------------------------------- 5: copying

def copies_section(out, pictures):
    import copydetect  # here: it imports pyplot, after the Agg backend is set

    submissions, pristine = os.path.join(out, "submissions"), os.path.join(out, "pristine")
    students = [s for s in sorted(os.listdir(submissions)) if os.path.isdir(os.path.join(submissions, s))] \
        if os.path.isdir(submissions) else []
    head = ["## Suspected copying", ""]
    if len(students) < 2:
        return head + ["Fewer than two submissions with files.", ""]
    detector = copydetect.CopyDetector(
        test_dirs=[submissions], ref_dirs=[submissions], boilerplate_dirs=[pristine], extensions=["py"],
        noise_t=NOISE, guarantee_t=NOISE, same_name_only=True, ignore_leaf=True, autoopen=False, silent=True)
    for name in grade.student_modules(pristine):  # the solution of every module (pristine/ has gpt.py's only)
        detector.add_file(os.path.join(release.ROOT, name), "boilerplate")
    detector.run()
    if not detector.similarity_matrix.size:
        return head + ["No module to compare.", ""]
    owner = {f: os.path.basename(os.path.dirname(f)) for f in detector.test_files}
    coverage = {f: data.token_coverage for f, data in detector.file_data.items()}  # characters not boilerplate
    own, common = collections.Counter(), collections.Counter()  # a student's own code; of it, what another has
    for f in detector.test_files:
        own[owner[f]] += coverage.get(f, 0)
    for i, j in zip(*(detector.similarity_matrix[:, :, 0] > 0).nonzero()):  # [i, j, 0]: the share of file i
        f, g = detector.test_files[i], detector.ref_files[j]
        common[owner[f], owner[g]] += detector.similarity_matrix[i, j, 0] * coverage[f]
    pairs = [(max(chars / max(own[a], 1), common[b, a] / max(own[b], 1)), round(min(chars, common[b, a])), a, b)
             for (a, b), chars in common.items() if a < b]
    flagged = sorted((p for p in pairs if p[0] >= COPY_SHARE and p[1] >= COPY_CHARS), reverse=True)
    atomic_write(os.path.join(pictures, "copies.html"), copies_html(detector, owner, flagged))
    lines = head + [f"copydetect on {len(students)} students' modules, with the release and the solution as "
                    f"boilerplate (neither counts); a pair is flagged when at least {COPY_SHARE:.0%} of one student's "
                    f"own code is in the other's, at least {COPY_CHARS} characters of filtered code (every name is "
                    f"one letter). Each flagged pair side by side: [report/copies.html](report/copies.html).", ""]
    if not flagged:
        return lines + ["No pair flagged.", ""]
    lines += table(["rank", "students", "share of own code in common", "characters in common"],
                   [[n, f"{a} / {b}", f"{share:.0%}", chars] for n, (share, chars, a, b) in enumerate(flagged, 1)])
    for share, chars, a, b in flagged[:TOP_PAIRS]:
        lines += ["", f"### {a} / {b}: the longest common stretch", ""]
        lines += longest_common(detector, owner, a, b)
    return lines + [""]


def pair_slices(detector, owner, a, b):
    """[(a's file, b's file, a's copied slices, b's)]: slices are 2 x N arrays of [start, end) offsets in the code."""
    found = []
    for (f, g), (slices_f, slices_g) in detector.slice_matrix.items():
        if (owner[f], owner[g]) == (a, b):
            found.append((f, g, slices_f, slices_g))
        elif (owner[f], owner[g]) == (b, a) and not any((g, f) == (x, y) for x, y, _, _ in found):
            found.append((g, f, slices_g, slices_f))
    return found


def copies_html(detector, owner, flagged):
    from copydetect.utils import highlight_overlap

    parts = ["<!doctype html><meta charset='utf-8'><title>Suspected copying</title><style>td{vertical-align:top}"
             "pre{font-size:12px}mark{background:#fbb}</style><h1>Suspected copying</h1>"]
    for n, (share, chars, a, b) in enumerate(flagged, 1):
        parts.append(f"<h2>{n}. {html.escape(a)} / {html.escape(b)}: {share:.0%}, {chars} characters</h2>")
        for f, g, slices_f, slices_g in pair_slices(detector, owner, a, b):
            shown = [highlight_overlap(detector.file_data[path].raw_code, slices, "<mark>", "</mark>", truncate=10,
                                       escape_html=True)[0] for path, slices in ((f, slices_f), (g, slices_g))]
            parts.append(f"<h3>{html.escape(os.path.basename(f))}</h3><table><tr>"
                         + "".join(f"<td><pre>{code}</pre></td>" for code in shown) + "</tr></table>")
    return "\n".join(parts) + "\n"


def longest_common(detector, owner, a, b):
    """Markdown: a's longest stretch found in b's code, and the stretch of b's most like it (filtered: names as V),
    as code blocks of whole lines."""
    from copydetect.utils import filter_code

    found = pair_slices(detector, owner, a, b)
    if not found:
        return []
    f, g, slices_f, slices_g = max(found, key=lambda s: int((s[2][1] - s[2][0]).max()))

    def stretch(path, slices, n):
        code = detector.file_data[path].raw_code
        start, end = code.rfind("\n", 0, int(slices[0, n])) + 1, code.find("\n", int(slices[1, n]))
        return code.count("\n", 0, start) + 1, code[start:end if end >= 0 else None]

    mine = stretch(f, slices_f, int((slices_f[1] - slices_f[0]).argmax()))
    filtered = filter_code(mine[1], f)[0]
    theirs = max((stretch(g, slices_g, n) for n in range(slices_g.shape[1])),
                 key=lambda s: difflib.SequenceMatcher(None, filter_code(s[1], g)[0], filtered).ratio())
    lines = []
    for student, path, (first, text) in ((a, f, mine), (b, g, theirs)):
        text = text.splitlines()
        shown = text[:20] + [f"# ... {len(text) - 20} more lines"] * (len(text) > 20)
        lines += [f"{student}, {os.path.basename(path)} line {first}:", "", "```python", *shown, "```", ""]
    return lines


# ----------------------------------------------------------------------------- the report

def write(out, tests):
    """DIR/report.md, DIR/report/*.png and DIR/report/copies.html from DIR's results; tests: DIR/tests.json's."""
    pictures = os.path.join(out, "report")
    os.makedirs(pictures, exist_ok=True)
    results = load_results(out)
    nodeids = {(f"hidden: {name}" if file in grade.HIDDEN_FILES else name): t["nodeid"]
               for t in tests for file, _, name in [t["nodeid"].partition("::")]}
    checking = {r: {t["nodeid"] for t in tests if r in t.get("checks", t["todo"])} for r in grade_all.regions_of(tests)}
    failed = {s: failed_tests(r, nodeids) for s, r in results.items() if status(r) == "graded"}
    total = sum(t["points"] for t in tests)
    lines = [f"# Class report: {len(results)} students", ""]
    if not results:
        lines.append("No results yet.")
    else:
        lines += scores_section(results, total, pictures)
        lines += regions_section(failed, checking, pictures)
        lines += mistakes_section(out, tests, failed, checking)
        lines += trouble_section(results)
        lines += copies_section(out, pictures)
    atomic_write(os.path.join(out, "report.md"), "\n".join(lines).rstrip() + "\n")
