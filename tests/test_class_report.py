"""
instructor/class_report.py on a small class made by hand from the solution: an honest student (the solution
itself), one with a catalogued mistake planted, one who wrote an alternative in every region (mistakes.ALTERNATIVES),
a copy of that one with its variables renamed, another independent alternative, a student whose one test timed
out, one with a mistake the catalogue lacks and one refused. The quick tests use a catalogue.json written here
(the signatures' cache); the slow one computes the real signatures (a minute or two) and grades the planted
mistake for real.
"""

import io
import json
import os
import re
import shutil
import tempfile
import time
import tokenize

import matplotlib.image
import pytest

from instructor import check, class_report, grade, regions, release

PLANTED = ("layernorm", "epsilon outside the square root")  # four layernorm mistakes fail its one test: a tie
UNCATALOGUED = "rotary"  # the "uncatalogued" student fails one of its three tests, which no mistake does alone
TIMED_OUT = "timed out: still running after 30 s, stopped"
RENAMES = {"x": "inp", "y": "out", "att": "scores", "logits": "lg", "q": "query", "mean": "mu", "var": "variance"}


def submitted(text):
    """A module as a student hands it in: the release has no solution markers."""
    return "".join(line for line in text.splitlines(keepends=True) if not regions.BEGIN.match(line)
                   and not regions.END.match(line))


def renamed(text):
    """text with its variables renamed (attributes and keyword arguments left alone) and a comment before each def."""
    found = list(tokenize.generate_tokens(io.StringIO(text).readline))
    lines, depth, edits = text.splitlines(keepends=True), 0, []
    for before, token, after in zip(found, found[1:], found[2:]):
        depth += (token.string in "([{") - (token.string in ")]}") if token.type == tokenize.OP else 0
        if token.type == tokenize.NAME and token.string in RENAMES and before.string != "." \
                and not (depth and after.string == "="):
            edits.append(token)
    for token in reversed(edits):
        (row, col), line = token.start, lines[token.start[0] - 1]
        lines[row - 1] = line[:col] + RENAMES[token.string] + line[col + len(token.string):]
    return re.sub(r"^([ \t]*)def ", r"\1# my own work\n\1def ", "".join(lines), flags=re.M)


def modules(entries=()):
    """The student's gpt.py and dataset.py: the solution with the catalogue entries' code in their regions."""
    solution = {name: check.source(name) for name in ("gpt.py", "dataset.py")}
    return {name: submitted(text) for name, text in check.applied(solution, list(entries)).items()}


def catalogue_entries():
    entries, problems = check.catalogue(release.solution_regions())
    assert not problems, problems
    return entries


def alternatives(which):
    """One alternative of each region that has some: the first (which=0) or the last (-1)."""
    by_region = {}
    for m in catalogue_entries():
        if m.kind == "alternative":
            by_region.setdefault(m.region, []).append(m)
    return [found[which] for found in by_region.values()]


def planted():
    return next(m for m in catalogue_entries() if m.kind == "mistake" and (m.region, m.what) == PLANTED)


def result(tests, failing=(), status="graded", seconds=6.0, student=None):
    """A results.json object as grade.report and grade_all write it; failing: {node id: output}."""
    failing = dict(failing)
    outcome = {t["nodeid"]: {"passed": t["nodeid"] not in failing, "output": failing.get(t["nodeid"], "")}
               for t in tests}
    report = grade.report(tests, outcome, [], seconds)
    report["extra_data"] = {"student": student, "status": status, "key": None, "seconds": seconds}
    return report


def failure(todo):
    return f"E   Failed: the values differ; look at TODO[{todo}]"


def checking(tests, region):
    return [t["nodeid"] for t in tests if region in t["checks"]]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """The graders' folder and its graded tests, as grade_all.prepare_out makes them."""
    folder = tmp_path_factory.mktemp("pristine") / "pristine"
    release.write_tree(release.pristine_files(release.student_files()), folder)
    return str(folder), grade.collect(str(folder))


def make_class(root, pristine, planted_result):
    """DIR as grade_all leaves it (pristine/, tests.json, submissions/, results/) under root/class -> its path."""
    folder, tests = pristine
    out = os.path.join(root, "class")
    shutil.copytree(folder, os.path.join(out, "pristine"))
    with open(os.path.join(out, "tests.json"), "w") as f:
        json.dump(tests, f)
    alt = modules(alternatives(0))
    rotary_test = checking(tests, UNCATALOGUED)[0]
    students = {
        "honest": (modules(), result(tests)),
        "planted": (modules([planted()]), planted_result),
        "alt": (alt, result(tests)),
        "copy": ({name: renamed(text) for name, text in alt.items()}, result(tests)),
        "alt2": (modules(alternatives(-1)), result(tests, seconds=7.5)),
        "stuck": (modules(), result(tests, {checking(tests, "sample_draw")[0]: TIMED_OUT}, seconds=95.0)),
        "uncatalogued": (modules(), result(tests, {rotary_test: failure(UNCATALOGUED)})),
        "refused": ({}, result(tests, {t["nodeid"]: "not graded: gpt.py is a link" for t in tests},
                               status="refused: gpt.py is a link", seconds=0)),
    }
    for student, (files, outcome) in students.items():
        outcome["extra_data"]["student"] = student
        os.makedirs(os.path.join(out, "results"), exist_ok=True)
        with open(os.path.join(out, "results", f"{student}.json"), "w") as f:
            json.dump(outcome, f)
        for name, text in files.items():
            os.makedirs(os.path.join(out, "submissions", student), exist_ok=True)
            with open(os.path.join(out, "submissions", student, name), "w") as f:
                f.write(text)
    return out


def write_report(out, tests, sandbox):
    """class_report.write with an empty working folder and TMPDIR of its own -> (report.md, seconds); asserts
    that nothing was written outside DIR."""
    cwd, tmp = os.path.join(sandbox, "cwd"), os.path.join(sandbox, "tmp")
    os.makedirs(cwd, exist_ok=True)
    os.makedirs(tmp, exist_ok=True)
    before = sorted(os.listdir(os.path.dirname(out)))
    old = os.getcwd(), tempfile.tempdir, os.environ.get("TMPDIR")
    os.chdir(cwd)
    tempfile.tempdir, os.environ["TMPDIR"] = tmp, tmp
    start = time.monotonic()
    try:
        class_report.write(out, tests)
    finally:
        os.chdir(old[0])
        tempfile.tempdir = old[1]
        os.environ.pop("TMPDIR") if old[2] is None else os.environ.update(TMPDIR=old[2])
    seconds = time.monotonic() - start
    assert os.listdir(cwd) == [] and os.listdir(tmp) == [] and sorted(os.listdir(os.path.dirname(out))) == before
    with open(os.path.join(out, "report.md"), encoding="utf-8") as f:
        return f.read(), seconds


def fake_catalogue(out, tests):
    """catalogue.json as signatures() writes it, each mistake failing every test that checks its region (so that
    the four layernorm mistakes tie), under the current key: the quick tests compute no signature."""
    entries = [m for m in catalogue_entries() if m.kind == "mistake"]
    catalogue = {"key": class_report.catalogue_key(os.path.join(out, "pristine")), "seconds": 0.0, "errors": [],
                 "mistakes": [{"region": m.region, "what": m.what, "path": m.path, "code": m.code,
                               "tests": checking(tests, m.region),
                               "failing": {n: [m.region] for n in checking(tests, m.region)}}
                              for m in entries]}
    with open(os.path.join(out, "catalogue.json"), "w") as f:
        json.dump(catalogue, f)
    return catalogue


@pytest.fixture(scope="module")
def quick(pristine, tmp_path_factory):
    """The class, its report written with the catalogue made here -> (DIR, report.md)."""
    _, tests = pristine
    root = tmp_path_factory.mktemp("quick")
    out = make_class(str(root / "dir"), pristine, result(tests, {checking(tests, "layernorm")[0]:
                                                                 failure("layernorm")}))
    fake_catalogue(out, tests)
    with open(os.path.join(out, "catalogue.json")) as f:
        cached = f.read()
    report, _ = write_report(out, tests, str(root / "sandbox"))
    with open(os.path.join(out, "catalogue.json")) as f:
        assert f.read() == cached, "the current catalogue.json was computed again"
    return out, report


def mistake_line(report, what):
    return next((line for line in report.splitlines() if line.startswith(f"- **{what}**")), None)


def test_report_names_the_planted_mistake_once_over_the_tied_ones(quick):
    _, report = quick
    line = mistake_line(report, PLANTED[1])
    assert line == f"- **{PLANTED[1]}** ({PLANTED[0]}): 1 student (planted)", report
    assert sum(line.startswith("- **") for line in report.splitlines()) == 1, "only the planted mistake matches"


def test_report_counts_uncatalogued_mistakes_and_skips_crashed_tests(quick):
    _, report = quick
    assert f"- {UNCATALOGUED}: 1 student with an uncatalogued mistake (uncatalogued)" in report
    assert "sample_draw" not in report.split("## Mistakes")[1].split("##")[0], "a timed-out test is no mistake"


def test_report_summary_slowest_and_trouble(quick):
    _, report = quick
    assert "# Class report: 8 students" in report
    lines = report.splitlines()
    summary = lines[next(n for n, line in enumerate(lines) if line.startswith("| students |")) + 2]
    assert summary.startswith("| 8 | ") and summary.endswith(" | 1 | 0 |"), summary  # 1 refused, 0 errors
    trouble = report.split("## Slowest")[1]
    assert trouble.index("| stuck | 95 |") < trouble.index("| alt2 | 7.5 |")
    assert "| refused | refused: gpt.py is a link |" in trouble
    assert f"| stuck | timed out: {checking_name(quick, 'sample_draw')} |" in trouble


def checking_name(quick, region):
    out, _ = quick
    with open(os.path.join(out, "tests.json")) as f:
        return checking(json.load(f), region)[0].partition("::")[2]


def test_region_pass_rates(quick):
    _, report = quick
    rows = {line.split(" | ")[0][2:]: line for line in report.splitlines() if line.startswith("| ")}
    assert rows["layernorm"].endswith(" | 6 | 86% |")  # 7 graded students, the planted one fails it
    assert rows["rotary"].endswith(" | 6 | 86% |") and rows["mlp"].endswith(" | 7 | 100% |")


def test_renamed_copy_ranks_first_and_honest_students_are_not_flagged(quick):
    out, report = quick
    copying = report.split("## Suspected copying")[1]
    flagged = [line for line in copying.splitlines() if re.match(r"\| \d+ \|", line)]
    assert flagged and flagged[0].startswith("| 1 | alt / copy | 100% |"), copying
    assert len(flagged) == 1, f"honest students flagged: {flagged[1:]}"
    assert "### alt / copy: the longest common stretch" in copying and "```python" in copying
    with open(os.path.join(out, "report", "copies.html"), encoding="utf-8") as f:
        assert "copy" in f.read()


def test_pictures_are_pngs(quick):
    out, report = quick
    for name in ("scores", "regions"):
        path = os.path.join(out, "report", f"{name}.png")
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        height, width, _ = matplotlib.image.imread(path).shape
        assert height > 100 and width > 100 and f"(report/{name}.png)" in report


def test_diagnose_takes_the_mistake_that_accounts_for_most_failures():
    """A mistake in the MLP also fails the block's test: the block's look-alike mistake is not reported; a stub is
    counted as such, a timed-out test diagnoses nothing; an unexplained region whose failing tests all need another
    unexplained one follows from it."""
    relu = {"region": "mlp", "what": "relu", "failing": {"mlp1": ["mlp"], "block1": ["block"]}}
    post_norm = {"region": "block", "what": "post-norm", "failing": {"block1": ["block"], "block2": ["block"]}}
    residual = {"region": "block", "what": "no residual", "failing": {"block1": ["block"]}}
    checks = {"mlp": {"mlp1"}, "block": {"block1"}, "rotary": {"rot1"}, "gpt_embed": {"emb1"},
              "sample_draw": {"draw1"}}
    needs = {"mlp1": set(), "block1": {"mlp"}, "rot1": set(), "emb1": {"rotary"}, "draw1": set()}
    by_region = {"mlp": [relu], "block": [post_norm, residual]}
    failed = {"mlp1": failure("mlp"), "block1": failure("block"), "emb1": failure("gpt_embed"),
              "rot1": "NotImplementedError: TODO[rotary]: write it  (gpt.py:10 in forward: replace the stub)",
              "draw1": f"{TIMED_OUT} E Failed: look at TODO[sample_draw]"}
    matched, unknown, stubs = class_report.diagnose("s", failed, checks, needs, by_region, lambda s, m: 0.0)
    assert matched == {"mlp": (relu, [])} and stubs == ["rotary"] and unknown == ["gpt_embed"]
    del failed["mlp1"]  # the block's own mistake; two that fail the same tests: the code decides, ties are named
    matched, unknown, _ = class_report.diagnose("s", failed, checks, needs, {"block": [residual, dict(residual)]},
                                                lambda s, m: 0.1)
    assert matched["block"][0] is residual and matched["block"][1] == [residual] and unknown == ["gpt_embed"]
    failed["rot1"] = failure("rotary")  # an uncatalogued rotary mistake, which the embedding's test needs
    assert class_report.diagnose("s", failed, checks, needs, by_region, lambda s, m: 0.0)[1] == ["rotary"]


def test_code_evidence_on_the_function_that_holds_the_region(tmp_path):
    mistakes = [{"region": "layernorm", "what": m.what, "path": m.path, "code": m.code}
                for m in catalogue_entries() if m.kind == "mistake" and m.region == "layernorm"]
    folder = tmp_path / "submissions" / "s"
    folder.mkdir(parents=True)
    (folder / "gpt.py").write_text(renamed(modules([planted()])["gpt.py"]))
    evidence = class_report.Evidence(str(tmp_path))
    scores = {m["what"]: evidence("s", m) for m in mistakes}
    assert max(scores, key=scores.get) == PLANTED[1] and scores[PLANTED[1]] > 0, scores
    (folder / "gpt.py").write_text(modules()["gpt.py"])  # the solution's LayerNorm: no mistake there
    assert class_report.Evidence(str(tmp_path))("s", mistakes[0]) is None
    (folder / "gpt.py").write_text("def broken(:\n")  # no function: the whole file, far from both
    assert abs(class_report.Evidence(str(tmp_path))("s", mistakes[0])) < 0.1


@pytest.mark.slow
def test_real_signatures_find_the_planted_mistake_graded_for_real(pristine, tmp_path, monkeypatch):
    """The planted student graded by the real grader (sandbox, grade-time inputs); the catalogue's signatures
    computed for real, then read back from catalogue.json, and a new class finds them in the user's cache."""
    folder, tests = pristine
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # computed here, not found from another test
    run = check.graded_run(folder, modules([planted()]))
    assert not run[2], run[2]
    graded = grade.report(*run[:2], [], 6.0)
    graded["extra_data"] = {"student": "planted", "status": "graded", "key": None, "seconds": 6.0}
    out = make_class(str(tmp_path / "dir"), pristine, graded)
    report, first = write_report(out, tests, str(tmp_path / "sandbox"))
    with open(os.path.join(out, "catalogue.json")) as f:
        catalogue = json.load(f)
    print(f"signatures: {catalogue['seconds']} s for {len(catalogue['mistakes'])} mistakes; report {first:.0f} s")
    assert catalogue["key"] and not catalogue["errors"] and all(m["failing"] for m in catalogue["mistakes"]
                                                                if m["tests"])
    assert mistake_line(report, PLANTED[1]) == f"- **{PLANTED[1]}** ({PLANTED[0]}): 1 student (planted)", report
    report_again, second = write_report(out, tests, str(tmp_path / "sandbox2"))
    assert report_again == report and second < first / 3, (first, second)
    other = make_class(str(tmp_path / "other"), pristine, graded)  # another class, the same tests
    assert not os.path.exists(os.path.join(other, "catalogue.json"))
    report_other, third = write_report(other, tests, str(tmp_path / "sandbox3"))
    assert report_other == report and third < first / 3, (first, third)

    # each mistake alone, failing what it failed when the signatures were computed, is diagnosed as itself
    regions_checked = {r: set(checking(tests, r)) for r in class_report.grade_all.regions_of(tests)}
    needs = {t["nodeid"]: set(t["todo"]) - set(t["checks"]) for t in tests}
    by_region = {}
    for m in catalogue["mistakes"]:
        by_region.setdefault(m["region"], []).append(m)
    evidence = class_report.Evidence(str(tmp_path / "alone"))
    for n, m in enumerate(catalogue["mistakes"]):
        os.makedirs(tmp_path / "alone" / "submissions" / str(n))
        for name, text in modules([check.Mutant("mistake", m["region"], m["what"], m["path"], m["code"])]).items():
            (tmp_path / "alone" / "submissions" / str(n) / name).write_text(text)
        failed = {node: " ".join(f"look at TODO[{r}]" for r in named) for node, named in m["failing"].items()}
        matched, unknown, _ = class_report.diagnose(str(n), failed, regions_checked, needs, by_region, evidence)
        assert {r: found["what"] for r, (found, _) in matched.items()} == {m["region"]: m["what"]} and not unknown
