"""
The instructor tooling (instructor/): region markers, the student release and its determinism, the
autograder bundle, `check` on this repository, and a zoo of broken submissions graded end to end.
"""

import concurrent.futures
import glob
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from instructor import __main__ as cli
from instructor import check, draws, grade, mistakes, regions, release

ROOT = release.ROOT
HANG_TIMEOUT = 15.0  # per-test timeout of the zoo: each hang costs this much, a normal test takes ~1 s


def solution(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def with_region(path, rid, *code):
    """The solution's file with region rid's code replaced by the given lines."""
    return check.with_code(solution(path), path, rid, list(code))


# ----------------------------------------------------------------------------- markers

@pytest.mark.parametrize("text, line, message", [
    ("# BEGIN SOLUTION a\n# BEGIN SOLUTION b\n# END SOLUTION\n", 2, "cannot nest"),
    ("x = 1\n    # BEGIN SOLUTION a\n    y = 2\n", 2, "never closed"),
    ("# BEGIN SOLUTION\n# END SOLUTION\n", 1, "needs an id"),
    ("# BEGIN SOLUTION Bad-Id\n# END SOLUTION\n", 1, "needs an id"),
    ("x = 1\n# END SOLUTION\n", 2, "without a beginning"),
    ("# BEGIN SOLUTION a  # oops\n# END SOLUTION\n", 1, "malformed marker"),
])
def test_marker_errors_name_file_and_line(text, line, message):
    with pytest.raises(regions.RegionError) as error:
        regions.parse(text, "gpt.py")
    assert str(error.value).startswith(f"gpt.py:{line}: ") and message in str(error.value)


def test_duplicate_region_ids_across_files(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\n# BEGIN SOLUTION same\n# END SOLUTION\n")
    (tmp_path / "b.py").write_text("# BEGIN SOLUTION same\n# END SOLUTION\n")
    with pytest.raises(regions.RegionError, match=r"^b\.py:1: duplicate region id 'same' \(also at a\.py:2\)"):
        regions.parse_files(["a.py", "b.py"], str(tmp_path))


def test_strip_keeps_hint_prompt_and_stub():
    text = ("def f(x):\n"
            "    # BEGIN SOLUTION double\n"
            "    # PROMPT: shown to students only\n"
            "    # TODO: return x times two\n"
            "    return 2 * x\n"
            "    # END SOLUTION\n"
            "\n"
            "def g(x):\n"
            "    # BEGIN SOLUTION same\n"
            "    # STUB: return x  # TODO[same]: write it\n"
            "    return x + 0\n"
            "    # END SOLUTION\n")
    assert regions.strip(text) == (
        "def f(x):\n"
        "    # shown to students only\n"
        "    # TODO: return x times two\n"
        "    raise NotImplementedError('TODO[double]: return x times two')\n"
        "\n"
        "def g(x):\n"
        "    return x  # TODO[same]: write it\n")
    assert "return 2 * x" in regions.strip(text, only={"same"})


def test_readme_for_students():
    text = "# Title\n<!-- instructor-only -->\n## For instructors\nsecret\n<!-- /instructor-only -->\nend\n"
    assert release.student_readme(text) == "# Title\nend\n"
    assert release.student_readme("no markers\n") == "no markers\n"
    with pytest.raises(release.ReleaseError, match=r"^README\.md:2: .* never closed"):
        release.student_readme("a\n<!-- instructor-only -->\nb\n")
    with pytest.raises(release.ReleaseError, match=r"^README\.md:3: .* cannot nest"):
        release.student_readme("<!-- instructor-only -->\na\n<!-- instructor-only -->\n")
    with pytest.raises(release.ReleaseError, match=r"^README\.md:1: end of .* without a beginning"):
        release.student_readme("<!-- /instructor-only -->\n")


def test_pytest_ini_for_students():
    ini = "[pytest]\ntestpaths =\n    unittests.py\n    tests\npythonpath = .\n"
    assert release.student_pytest_ini(ini) == "[pytest]\ntestpaths = unittests.py\npythonpath = .\n"


# ----------------------------------------------------------------------------- release

@pytest.fixture(scope="module")
def built(tmp_path_factory):
    dest = tmp_path_factory.mktemp("dist")
    release.build(str(dest))
    return dest


def tree(folder):
    """{relative path: (bytes, mode)} of every file under folder."""
    out = {}
    for base, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(base, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = (f.read(), os.stat(path).st_mode & 0o777)
    return out


def test_release_is_deterministic(tmp_path, monkeypatch):
    monkeypatch.setattr(check, "check", lambda: True)  # tested on its own below
    for name in ("a", "b"):
        assert cli.main(["release", "--out", str(tmp_path / name)]) == 0
    assert cli.main(["release", "--out", str(tmp_path / "a")]) == 0  # over an existing release
    assert sorted(os.listdir(tmp_path / "a")) == sorted(release.OUTPUTS)  # no leftover temporary folder
    assert tree(tmp_path / "a") == tree(tmp_path / "b")


def test_release_refuses_to_write_when_check_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(check, "check", lambda: False)
    assert cli.main(["release", "--out", str(tmp_path / "dist")]) == 1
    assert not os.path.exists(tmp_path / "dist")


def test_release_contents(built):
    student = tree(built / "student")
    assert not any(p.split(os.sep)[0] in ("instructor", "tests", "benchmarks", ".ci", "dist", "runs") for p in student)
    for path in ("gpt.py", "dataset.py", "unittests.py", "unittests_ref.pt", "conftest.py", "pytest.ini"):
        assert path in student
    for path, (data, _) in student.items():
        if path.endswith(".py"):
            assert b"BEGIN SOLUTION" not in data.replace(b"`BEGIN SOLUTION`", b""), path
    assert b"testpaths = unittests.py\n" in student["pytest.ini"][0]
    bundle = tree(built / "autograder")
    assert bundle["run_autograder"][1] == bundle["setup.sh"][1] == 0o755
    assert bundle["pristine/gpt.py"] == student["gpt.py"]  # the bundle holds no solution either
    assert "pristine/hidden_tests.py" in bundle and "hidden_tests.py" not in student
    key = bundle["pristine/reference/key"]  # the course's secret, which decides the inputs drawn: root's only
    assert key == (release.grading_key(), 0o600) and len(key[0]) == 64 and key[0] not in b"".join(
        data for data, _ in student.values())
    ignored = subprocess.run(["git", "check-ignore", "-q", release.KEY_FILE], cwd=ROOT)
    assert ignored.returncode == 0, f"{release.KEY_FILE} must be git-ignored: it would publish the key"


def test_grade_time_inputs_are_keyed_by_the_course_and_the_files():
    """The same files and key draw the same inputs (a regrade gives the same grade); other files or another key
    draw others; without a key every draw is fresh."""
    from instructor.make_reference import GradeTimeInputs

    def seeds(key, files, nodeid="unittests.py::test_mlp"):
        return GradeTimeInputs(os.path.join(ROOT, "gpt.py"), key, files).seed(nodeid)

    first = seeds(b"k" * 64, b"files")
    assert first == seeds(b"k" * 64, b"files") and 0 <= first < 2 ** 63
    assert len({first, seeds(b"k" * 64, b"other files"), seeds(b"x" * 64, b"files"),
                seeds(b"k" * 64, b"files", "unittests.py::test_block")}) == 4
    assert seeds(None, b"files") != seeds(None, b"files")
    inputs = GradeTimeInputs(os.path.join(ROOT, "gpt.py"), b"k" * 64, b"files")
    again = GradeTimeInputs(os.path.join(ROOT, "gpt.py"), b"k" * 64, b"files")
    assert torch.equal(inputs.reference()["logits"], again.reference()["logits"])


# ----------------------------------------------------------------------------- check

@pytest.mark.slow
def test_check_passes_on_this_repository(capsys):
    ok = check.check()
    out = capsys.readouterr().out
    assert ok, out
    assert out.count("\nOK  ") + out.startswith("OK  ") == 7


@pytest.mark.slow
def test_draws_reports_a_verdict_that_changes_with_the_draw_and_only_that(monkeypatch, capsys):
    """A made-up mistake that is wrong only when the batch has 3 rows (B is drawn from 2 and 3) passes on some
    draws; the real entries of the region give the same verdict on every draw."""
    loss = "loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)"
    flaky = ("gpt_loss", "doubled for 3 rows", [loss, "loss = loss * (1 + (idx.size(0) == 3))"])
    monkeypatch.setattr(mistakes, "MISTAKES", [m for m in mistakes.MISTAKES if m[0] == "gpt_loss"] + [flaky])
    assert not draws.draws(8, ["gpt_loss"])
    out = capsys.readouterr().out
    changing = [line.strip() for line in out.splitlines()[1:]]
    assert changing and all(line.startswith("mistake gpt_loss (doubled for 3 rows): ") for line in changing), out
    assert any("test_gpt_loss_is_cross_entropy passes on " in line for line in changing), out
    assert out.startswith(f"{len(mistakes.MISTAKES) + sum(a[0] == 'gpt_loss' for a in mistakes.ALTERNATIVES)} "
                          f"catalogue entries"), out
    assert cli.main(["draws", "no_such_region"]) == 2
    assert "error: no region no_such_region: the regions are tokenizer_encode, " in capsys.readouterr().err
    assert cli.main(["draws", "--draws", "0"]) == 2 and capsys.readouterr().err == "error: --draws 0: give at least 1\n"


def test_check_finds_solution_code_instructor_notes_and_outputs_in_a_released_notebook():
    found, student = release.solution_regions(), release.student_files()
    assert "notebooks/attention.ipynb" in student and "plot.py" in student
    assert check.leaks(found, student)[0] == [] and check.mentions(student) == []
    notebook = json.loads(student["notebooks/attention.ipynb"][0])
    line = next(line for r in found if r.id == "attn_mask" for line in r.code)  # holds quotes, which JSON escapes
    notebook["cells"].append({"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [],
                              "source": ["x = 1\n", line.strip() + "  # the answer\n"]})
    notebook["cells"].append({"cell_type": "markdown", "metadata": {}, "source": ["See the instructor's notes."]})
    cells = len(notebook["cells"])
    student["notebooks/attention.ipynb"] = (json.dumps(notebook).encode(), 0o644)
    leaked, _ = check.leaks(found, student)
    assert len(leaked) == 1 and f"(region attn_mask) is in the release at notebooks/attention.ipynb cell {cells - 1} " \
                                f"line 2: " in leaked[0], leaked
    assert check.mentions(student) == [f"notebooks/attention.ipynb cell {cells} line 1 in the release mentions "
                                       f"'instructor': See the instructor's notes."]
    assert check.notebook_outputs(student) == []
    notebook["cells"][cells - 2]["outputs"] = [{"output_type": "stream", "name": "stdout", "text": ["1\n"]}]
    student["notebooks/attention.ipynb"] = (json.dumps(notebook).encode(), 0o644)
    assert check.notebook_outputs(student) == [f"notebooks/attention.ipynb holds the outputs of cell(s) {cells - 1}: "
                                               f"clear them (Jupyter: Edit > Clear All Outputs) and commit it"]


def test_check_catalogue_entries_replace_one_region():
    found = release.solution_regions()
    entries, problems = check.catalogue(found)
    assert not problems
    assert {m.region for m in entries if m.kind == "mistake"} == {r.id for r in found}  # a mistake in every region
    text = solution("gpt.py")
    mlp = next(r for r in regions.parse(text, "gpt.py") if r.id == "mlp")
    changed = check.with_code(text, "gpt.py", "mlp", ["h = self.c_fc(x)", "", "return self.c_proj(h)"])
    assert changed.splitlines() == (text.splitlines()[:mlp.start] + [mlp.indent + "h = self.c_fc(x)", "",
                                    mlp.indent + "return self.c_proj(h)"] + text.splitlines()[mlp.end - 1:])
    assert [r.id for r in regions.parse(changed, "gpt.py")] == [r.id for r in regions.parse(text, "gpt.py")]


# ----------------------------------------------------------------------------- grading

SPEC_TOP = {"score", "execution_time", "output", "output_format", "test_output_format", "test_name_format",
            "visibility", "stdout_visibility", "extra_data", "tests", "leaderboard"}
SPEC_TEST = {"score", "max_score", "status", "name", "name_format", "number", "output", "output_format", "tags",
             "visibility", "extra_data"}
VISIBILITY = {"visible", "hidden", "after_due_date", "after_published"}


def assert_gradescope_format(result):
    """The fields and value types of Gradescope's autograder specification (results.json)."""
    assert set(result) <= SPEC_TOP and isinstance(result["score"], float)
    assert isinstance(result["execution_time"], int) and isinstance(result["output"], str)
    assert result["visibility"] in VISIBILITY and result["output_format"] == result["test_output_format"] == "text"
    for number, test in enumerate(result["tests"], start=1):
        assert set(test) <= SPEC_TEST
        assert test["number"] == str(number) and isinstance(test["name"], str) and isinstance(test["output"], str)
        assert test["status"] in ("passed", "failed") and test["visibility"] in VISIBILITY
        assert 0 <= test["score"] <= test["max_score"] and all(isinstance(t, str) for t in test["tags"])
        assert test["score"] == (test["max_score"] if test["status"] == "passed" else 0)
    assert result["score"] == sum(t["score"] for t in result["tests"])
    json.dumps(result)


def zoo_cases():
    """{name: {path in the submission: text}}: broken submissions, each graded end to end."""
    graded = {name: solution(name) for name in ("gpt.py", "dataset.py")}
    return {
        "solution": graded,
        "syntax_error": {**graded, "gpt.py": with_region("gpt.py", "mlp", "return x +")},
        "import_error": {**graded, "dataset.py": "from torch import no_such_name\n" + solution("dataset.py")},
        # one graded test reaches RMSNorm.forward, so this hang costs one timeout
        "infinite_loop": {**graded, "gpt.py": with_region("gpt.py", "rmsnorm", "while True:", "    pass")},
        # every signal blocked, then a sleep in C: only SIGKILL ends it (signal-based timeouts cannot)
        "native_hang": {**graded, "dataset.py": with_region(
            "dataset.py", "tokenizer_decode", "import ctypes, signal",
            "signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())", "ctypes.CDLL(None).sleep(3600)")},
        "crash": {**graded, "dataset.py": with_region("dataset.py", "tokenizer_encode", "import os", "os._exit(3)")},
        "huge_output": {**graded, "gpt.py": 'print("spam " * 1_000_000)\n' + with_region(
            "gpt.py", "gpt_loss", 'print("eggs " * 1_000_000)',
            "loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)")},
        "wrong_shapes": {**graded, "gpt.py": with_region(  # heads never moved next to the batch dim
            "gpt.py", "attn_qkv", "q, k, v = self.c_attn(x).split(self.n_embd, dim=2)",
            "q, k, v = (t.view(B, T, self.n_head, C // self.n_head) for t in (q, k, v))")},
        "untouched_release": {},  # graded as released: every file is missing
        "edited_tests": {"unittests.py": "def test_everything():\n    assert True\n", "conftest.py": "",
                         "pytest.ini": "[pytest]\naddopts = -k nothing\n"},
        "nested_and_missing": {"my-work/dataset.py": graded["dataset.py"]},
    }


@pytest.fixture(scope="module")
def zoo(built, tmp_path_factory):
    """Each zoo submission's results.json, as written, graded two at a time."""
    root = tmp_path_factory.mktemp("zoo")
    pristine = str(built / "autograder" / "pristine")

    def run(name, files):
        for path, text in files.items():
            (root / name / path).parent.mkdir(parents=True, exist_ok=True)
            (root / name / path).write_text(text)
        (root / name).mkdir(exist_ok=True)
        grade.grade(str(root / name), pristine, str(root / f"{name}.json"), timeout=HANG_TIMEOUT, quiet=True,
                    sealed=os.geteuid() == 0)  # the sandbox needs root
        return json.loads((root / f"{name}.json").read_text())

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = {name: pool.submit(run, name, files) for name, files in zoo_cases().items()}
        return {name: future.result() for name, future in futures.items()}


def failed(result):
    return {t["name"] for t in result["tests"] if t["status"] == "failed"}


def names(result, *prefixes):
    """The test names of a result (those starting with one of the prefixes, if given)."""
    return {t["name"] for t in result["tests"] if not prefixes or t["name"].startswith(prefixes)}


def output(result, name):
    return next(t["output"] for t in result["tests"] if t["name"] == name)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(zoo_cases()))
def test_zoo_every_test_reported_in_gradescope_format(zoo, case):
    assert_gradescope_format(zoo[case])
    assert [t["name"] for t in zoo[case]["tests"]] == [t["name"] for t in zoo["solution"]["tests"]]


@pytest.mark.slow
def test_zoo_solution_gets_full_marks(zoo):
    result = zoo["solution"]
    assert not failed(result) and result["score"] == sum(t["max_score"] for t in result["tests"]) > 0
    hidden = [t for t in result["tests"] if t["name"].startswith("hidden: ")]
    assert hidden and all(t["visibility"] == "after_published" for t in hidden)


@pytest.mark.slow
def test_zoo_untouched_release_scores_zero_on_every_region(zoo):
    result = zoo["untouched_release"]
    assert result["score"] == 0
    assert failed(result) == {t["name"] for t in result["tests"] if t["tags"]}
    assert "graded from the submission: no file" in result["output"]


@pytest.mark.slow
def test_zoo_syntax_and_import_errors_fail_only_the_tests_of_that_file(zoo):
    data_tests = names(zoo["solution"], "test_tokenizer", "test_dataset")
    model_tests = names(zoo["solution"]) - data_tests
    assert failed(zoo["syntax_error"]) == model_tests
    assert all("cannot import gpt.py: SyntaxError" in output(zoo["syntax_error"], n) for n in model_tests)
    assert failed(zoo["import_error"]) == data_tests
    assert all("cannot import dataset.py: ImportError" in output(zoo["import_error"], n) for n in data_tests)


@pytest.mark.slow
@pytest.mark.parametrize("case, test, message", [
    ("infinite_loop", "test_rmsnorm_matches_formula_and_torch", "timed out"),
    ("native_hang", "test_tokenizer_round_trip", "timed out"),
    ("crash", "test_tokenizer_round_trip", "died during this test (exit code 3)"),
])
def test_zoo_hangs_and_crashes_cost_one_test(zoo, case, test, message):
    result = zoo[case]
    assert failed(result) == {test} and message in output(result, test)
    max_score = sum(t["max_score"] for t in result["tests"])
    assert result["score"] == max_score - next(t["max_score"] for t in result["tests"] if t["name"] == test)


@pytest.mark.slow
def test_zoo_huge_output_is_clipped(zoo):
    result = zoo["huge_output"]
    assert not failed(result)
    assert max(len(t["output"]) for t in result["tests"]) < 10_000 < 5_000_000
    assert any("characters cut" in t["output"] for t in result["tests"])


@pytest.mark.slow
def test_zoo_wrong_shapes(zoo):
    result = zoo["wrong_shapes"]
    assert {"test_attention_qkv_shapes_and_heads", "test_attention_reference", "test_gpt_logits_reference[rope]",
            "hidden: test_other_shape_matches_plain_torch[manual-rope]"} <= failed(result)
    assert not failed(result) & names(result, "test_tokenizer", "test_dataset", "test_rmsnorm", "test_rotary")
    assert "should have shape (B, nh, T, hs)" in output(result, "test_attention_qkv_shapes_and_heads")


@pytest.mark.slow
def test_zoo_edited_tests_are_ignored(zoo):
    result = zoo["edited_tests"]
    assert result["score"] == zoo["untouched_release"]["score"] == 0
    assert "ignored, the grader uses its own copy: conftest.py, pytest.ini, unittests.py" in result["output"]


@pytest.mark.slow
def test_zoo_nested_folder_and_missing_files(zoo):
    result = zoo["nested_and_missing"]
    assert result["output"].splitlines()[1:] == ["graded from the submission: dataset.py",
                                                 "not in the submission, graded as released (TODOs not done): gpt.py"]
    untagged = {t["name"] for t in result["tests"] if not t["tags"]}
    assert names(result) - failed(result) == names(result, "test_tokenizer", "test_dataset") | untagged


@pytest.mark.slow
def test_run_autograder_end_to_end(built, tmp_path):
    """The bundle as Gradescope runs it: source/, submission/ (files in one folder), results/results.json."""
    shutil.copytree(built / "autograder", tmp_path / "source")
    (tmp_path / "submission" / "micro-gpt").mkdir(parents=True)
    for name in ("gpt.py", "dataset.py"):
        shutil.copy(os.path.join(ROOT, name), tmp_path / "submission" / "micro-gpt" / name)
    env = {**os.environ, "AUTOGRADER_DIR": str(tmp_path), "PYTHON": sys.executable, "JAIL_USER": "nobody"}
    if os.geteuid() != 0:  # no sandbox without root: the bundle is then told that the grade is not tamper-proof
        env["GRADER_ARGS"] = "--timeout 30 --total-timeout 540 --not-tamper-proof"
    proc = subprocess.run(["bash", str(tmp_path / "source" / "run_autograder")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "results" / "results.json").read_text())
    assert_gradescope_format(result)
    assert result["score"] == sum(t["max_score"] for t in result["tests"]) > 0
    assert "score" in proc.stdout and "test_mlp" in proc.stdout  # the table, for the instructor's stdout log


def test_grade_cli_rejects_a_missing_folder(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "instructor", "grade", str(tmp_path / "nope")], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr == f"error: submission folder {tmp_path / 'nope'} does not exist " \
                                                   f"or is not a folder\n"


def todo_table(stdout):
    """{todo id: (status, "n/m")} from the "TODO regions" table of a run of unittests.py."""
    table = stdout.split("TODO regions")[1].split("points:")[0]
    return {m[1]: (m[2], m[3]) for m in re.finditer(r"^TODO\[(\w+)\]\s+(.+?)\s+(\d+/\d+) tests pass$", table, re.M)}


def run_unittests(folder, *args):
    return subprocess.run([sys.executable, "unittests.py", "-p", "no:cacheprovider", *args], cwd=folder,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_student_run_shows_todos_and_points(built):
    """`python unittests.py` in the untouched release: short TODO failures, the region table, the points. No TODO
    is done, with `-k <region>` too: each is to do, or not reached yet and names a TODO to do that its tests need."""
    proc = run_unittests(built / "student")
    assert proc.returncode == 1
    assert "NotImplementedError: TODO[mlp]: " in proc.stdout and "replace the stub with your code" in proc.stdout
    assert "points: 0 / " in proc.stdout and "points at stake" in proc.stdout
    table = todo_table(proc.stdout)
    assert set(table) == {r.id for r in release.solution_regions()}
    assert table["tokenizer_encode"] == ("to do", "0/1")
    assert table["tokenizer_decode"] == ("not reached yet (needs TODO[tokenizer_encode])", "0/1")
    assert table["attn_mask"][0] == "not reached yet (needs TODO[attn_qkv])"
    proc = run_unittests(built / "student", "-k", "attn_mask")
    assert "points: 0 / " in proc.stdout
    selected = todo_table(proc.stdout)
    assert selected["attn_mask"][0] == "not reached yet (needs TODO[attn_qkv])"
    for rows in (table, selected):
        for todo, (status, passed) in rows.items():
            needs = re.fullmatch(r"not reached yet \(needs TODO\[(\w+)\]\)", status)
            assert status == "to do" or needs and rows[needs[1]][0] == "to do", (todo, status)
            assert passed.startswith("0/"), (todo, passed)


def test_student_run_of_a_partly_solved_release(built, tmp_path):
    """Some TODOs written, one wrongly: done only where a test that checks it passes and no test blames it,
    partly where a test blames it, to do at its stub, not reached yet where its test stops at another TODO."""
    student = tmp_path / "student"
    shutil.copytree(built / "student", student)
    unsolved = {r.id for r in release.solution_regions()} - {"tokenizer_encode", "dataset_item", "layernorm",
                                                              "rmsnorm"}
    (student / "dataset.py").write_text(regions.strip(solution("dataset.py"), "dataset.py", only=unsolved))
    (student / "gpt.py").write_text(regions.strip(with_region("gpt.py", "layernorm", "return x"), "gpt.py",
                                                  only=unsolved))
    proc = run_unittests(student, "-k", "tokenizer_round_trip or dataset_windows or layernorm or rmsnorm")
    assert todo_table(proc.stdout) == {
        "tokenizer_encode": ("not reached yet (needs TODO[tokenizer_decode])", "0/1"),
        "tokenizer_decode": ("to do", "0/1"),
        "dataset_item": ("done", "1/1"),
        "layernorm": ("partly", "0/1"),
        "rmsnorm": ("done", "1/1"),
    }
    assert "points: 3 / 6 (2 of 4 graded tests pass; 3 points at stake in 2 failing tests)" in proc.stdout


def test_readme_tells_students_the_share_of_hidden_points(built):
    tests = grade.collect(str(built / "autograder" / "pristine"))
    hidden = sum(t["points"] for t in tests if t["nodeid"].startswith("hidden_tests.py"))
    total = sum(t["points"] for t in tests)
    readme = (built / "student" / "README.md").read_text()
    assert f"hidden tests, {hidden:g} of the {total:g} points ({round(100 * hidden / total)}%)" in readme


def test_students_get_the_guides_they_can_use_and_no_pointer_to_what_they_lack(built):
    student = built / "student"
    readme = (student / "README.md").read_text()
    assert readme.lstrip().startswith("# Micro-GPT") and readme.index("## The assignment") < readme.index("## Training")
    assert not re.search(r"tests/|benchmarks/|instructor", readme), "the students' README points at unreleased files"
    assert (student / "slurm" / "README.md").is_file() and (student / "data" / "README.md").is_file()
    assert not (student / "instructor").exists()


# ----------------------------------------------------------------------------- failing closed

def grade_cli(submission, env=None, python=sys.executable, *flags):
    return subprocess.run([python, "-m", "instructor", "grade", str(submission), *flags], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)


def needs_root():
    if os.geteuid() != 0:
        if os.environ.get("MICROGPT_REQUIRE_ROOT") == "1":
            pytest.fail("MICROGPT_REQUIRE_ROOT=1 but not root: the sandbox needs root")
        pytest.skip("not root: the sandbox needs root")


def solution_folder(tmp_path):
    folder = tmp_path / "submission"
    folder.mkdir()
    for name in ("gpt.py", "dataset.py"):
        shutil.copy(os.path.join(ROOT, name), folder / name)
    return folder


@pytest.mark.slow
def test_grading_without_the_sandbox_stops_in_one_line_unless_told(tmp_path):
    """Not root, no bwrap, or namespaces refused (a stand-in bwrap says what a refusing kernel makes it say):
    one line naming what is missing and the flag, exit 2; with --not-tamper-proof the report says so."""
    submission = solution_folder(tmp_path)
    if os.geteuid() != 0:
        proc = grade_cli(submission)
        assert proc.returncode == 2 and "only root can seal student code" in proc.stderr
    else:
        without, refusing = tmp_path / "without", tmp_path / "refusing"
        for folder in (without, refusing):
            folder.mkdir()
            os.symlink(shutil.which("git"), folder / "git")  # the release lists its files with git
        (refusing / "bwrap").write_text("#!/bin/sh\necho 'bwrap: Creating new namespace failed: Operation not "
                                        "permitted' >&2\nexit 1\n")
        (refusing / "bwrap").chmod(0o755)
        scratch_before = set(glob.glob("/tmp/jail-*"))
        for path, missing in ((without, "bubblewrap (bwrap) is not installed"),
                              (refusing, "the sandbox cannot start here (bwrap: Creating new namespace failed")):
            proc = grade_cli(submission, {**os.environ, "PATH": str(path)})
            assert proc.returncode == 2, proc.stderr
            assert proc.stderr.startswith(f"error: {missing}") and proc.stderr.count("\n") == 1, proc.stderr
            assert "--not-tamper-proof" in proc.stderr
        assert set(glob.glob("/tmp/jail-*")) <= scratch_before, "a jail that could not start left its folder"
    out = tmp_path / "results.json"
    proc = grade_cli(submission, None, sys.executable, "--out", str(out), "--not-tamper-proof")
    result = json.loads(out.read_text())
    assert proc.returncode == 0 and result["score"] == sum(t["max_score"] for t in result["tests"])
    assert "this grade is not tamper-proof" in result["output"]


@pytest.mark.slow
def test_a_python_the_jail_user_cannot_read_is_named(tmp_path):
    """A virtual environment whose folder the jail user cannot enter: the error names that folder (the
    folders above it do not matter: the sandbox binds the Python installation in place)."""
    needs_root()
    private = tmp_path / "private"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(private / "venv")], check=True)
    site = subprocess.run([str(private / "venv" / "bin" / "python"), "-c", "import sysconfig; "
                           "print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True).stdout.strip()
    with open(os.path.join(site, "grader.pth"), "w") as f:  # this environment's packages, torch among them
        f.write("\n".join(p for p in sys.path if p.endswith("site-packages")) + "\n")
    os.chmod(private / "venv", 0o700)
    proc = grade_cli(solution_folder(tmp_path), None, str(private / "venv" / "bin" / "python"))
    assert proc.returncode == 2
    assert proc.stderr == (f"error: user nobody cannot run {private / 'venv' / 'bin' / 'python'}: it cannot enter "
                           f"{private / 'venv'}; grade with a Python installation that user can read, or name "
                           f"another user with --jail-user\n")
