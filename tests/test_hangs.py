"""
A hang costs one timeout per place, not one per test. Submissions that hang in a TODO region (an endless
loop in Python, a sleep in C with every signal blocked, a blocked read, a loop at import), graded for real
(the sandbox as root) with a short per-test timeout: the first test that hangs fails naming the function,
its line and its TODO; every later test that covers that region or reaches that line fails at once naming
the TODO; every other test passes, and the grading takes about one timeout more than grading the solution.
Which tests reach a region is not guessed: the solution is graded once with the line trace that `instructor
check` uses. A submission that forges the stacks the grader reads only hurts its own grade.
"""

import json
import os
import re
import sys
import time

import pytest

try:  # the grader's sandbox and limits: Linux servers only (as conftest.linux_tools says for the other files)
    for name in ("pwd", "resource"):
        __import__(name)
except ImportError:
    pytest.skip("grading runs on Linux servers", allow_module_level=True)
if sys.platform != "linux":
    pytest.skip("grading runs on Linux servers", allow_module_level=True)

from instructor import check, grade, regions, release  # noqa: E402
from test_instructor import assert_gradescope_format, solution  # noqa: E402

ROOT = release.ROOT
TIMEOUT = 6.0  # per test: a normal test takes a second or less (GPT-2 small on meta, the slowest, 1.5 s)
FILES = ("gpt.py", "dataset.py")

pytestmark = pytest.mark.slow  # gradings: about three minutes in all


def with_code(path, rid, *code):
    """The solution's modules with region rid of path replaced by the lines of code."""
    files = {name: solution(name) for name in FILES}
    files[path] = check.with_code(files[path], path, rid, list(code))
    return files


def lines_of(text, *needles):
    """The numbers of the lines that hold one of the needles (where a loop spins depends on Python's version)."""
    return {i for i, line in enumerate(text.split("\n"), start=1) if any(n in line for n in needles)}


CASES = {  # name: (file, region, function, what the line it hangs on holds, its files)
    "mlp_loop": ("gpt.py", "mlp", "MLP.forward", ("while True:", "pass"),
                 with_code("gpt.py", "mlp", "while True:", "    pass")),
    # in C, every signal blocked: only SIGKILL ends it; one of three regions of CausalSelfAttention.forward
    "attn_values_sleep_in_c": ("gpt.py", "attn_values", "CausalSelfAttention.forward", ("CDLL",), with_code(
        "gpt.py", "attn_values", "import ctypes, signal",
        "signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())", "ctypes.CDLL(None).sleep(3600)")),
    # one of five regions of sample_next: the tests of the other four go on
    "top_p_sleep": ("gpt.py", "sample_top_p", "sample_next", ("time.sleep",),
                    with_code("gpt.py", "sample_top_p", "import time", "time.sleep(10 ** 6)")),
    "encode_blocked_read": ("dataset.py", "tokenizer_encode", "CharTokenizer.encode", ("os.read",), with_code(
        "dataset.py", "tokenizer_encode", "import os", "os.read(os.pipe()[0], 1)")),
}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    dest = tmp_path_factory.mktemp("dist")
    release.build(str(dest))
    return str(dest / "autograder" / "pristine")


def graded(pristine, folder, files, timeout=TIMEOUT):
    """Grade files ({name: text}) as a submission. -> (results.json as written, seconds it took)"""
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text)
    start = time.monotonic()
    grade.grade(str(folder), pristine, str(folder / "results.json"), timeout=timeout, quiet=True,
                sealed=os.geteuid() == 0)
    return json.loads((folder / "results.json").read_text()), time.monotonic() - start


def report_name(nodeid):
    file, _, name = nodeid.partition("::")
    return f"hidden: {name}" if file in grade.HIDDEN_FILES else name


@pytest.fixture(scope="module")
def reached(pristine, tmp_path_factory):
    """{(file, region): the names of the tests that execute its code}, from the solution graded with the trace."""
    workdir = tmp_path_factory.mktemp("trace") / "run"
    folder = workdir.parent / "solution"
    folder.mkdir()
    for name in FILES:
        (folder / name).write_text(solution(name))
    grade.prepare(pristine, str(folder), str(workdir))
    tests, results, problems = grade.run_tests(str(workdir), 60, trace=FILES)
    assert not problems and all(r["passed"] for r in results.values())
    out = {}
    for name in FILES:
        for region in regions.parse(solution(name), name):
            code = set(range(region.start + 1, region.end))
            out[name, region.id] = {report_name(n) for n, r in results.items() if code & set(r["lines"].get(name, ()))}
    return out


@pytest.fixture(scope="module")
def gradings(pristine, tmp_path_factory):
    """{case: (results, seconds)}, the solution first, one at a time (their times are compared)."""
    root = tmp_path_factory.mktemp("hangs")
    cases = {"solution": {name: solution(name) for name in FILES}, **{k: v[-1] for k, v in CASES.items()},
             "import_loop": {"gpt.py": "while True:\n    pass\n" + solution("gpt.py"),
                             "dataset.py": solution("dataset.py")},
             "unlocatable": with_code("gpt.py", "rmsnorm", "import faulthandler",
                                      "faulthandler.cancel_dump_traceback_later()", "while True:", "    pass"),
             "slow_outside_regions": {"gpt.py": solution("gpt.py").replace(
                 "        self.config = config\n",
                 "        self.config = config\n        if config.n_layer == 12:  # GPT-2 small only\n"
                 "            import time; time.sleep(60)\n", 1), "dataset.py": solution("dataset.py")},
             "forged_stacks": forged_stacks()}
    return {name: graded(pristine, root / name, files) for name, files in cases.items()}


def failed(result):
    return {t["name"] for t in result["tests"] if t["status"] == "failed"}


def tagged(result, rid):
    return {t["name"] for t in result["tests"] if rid in t["tags"]}


def outputs(result):
    return {t["name"]: t["output"] for t in result["tests"]}


@pytest.mark.parametrize("case", list(CASES))
def test_a_hang_costs_one_timeout_and_fails_exactly_the_tests_it_blocks(gradings, reached, case):
    path, rid, function, needles, files = CASES[case]
    result, seconds = gradings[case]
    honest, honest_seconds = gradings["solution"]
    assert_gradescope_format(result)
    assert [t["name"] for t in result["tests"]] == [t["name"] for t in honest["tests"]]
    out = outputs(result)
    timed_out = [n for n, o in out.items() if f"timed out after {TIMEOUT:g} s in" in o]
    assert len(timed_out) == 1, timed_out
    found = re.search(rf"timed out after {TIMEOUT:g} s in {re.escape(function)} \({path}:([0-9]+)\): TODO\[{rid}\]$",
                      out[timed_out[0]], re.M)
    assert found and int(found.group(1)) in lines_of(files[path], *needles), out[timed_out[0]]
    at = f"{function} ({path}:{found.group(1)})"
    blocked = reached[path, rid] | tagged(result, rid)  # what runs the region, and what covers it
    assert failed(result) == blocked, (failed(result) ^ blocked)
    for name in blocked - {timed_out[0]}:  # at once, without running or as soon as it gets there
        assert re.search(rf"(?:^|JailError: )(not run: TODO\[{rid}\] hangs in {re.escape(at)}|stopped: this test reached "
                         rf"{re.escape(at)}, where TODO\[{rid}\] hangs): a test before timed out there after "
                         rf"{TIMEOUT:g} s$", out[name], re.M), (name, out[name])
    for t in result["tests"]:
        if t["name"].startswith("hidden: "):
            assert "\n" not in t["output"]
    assert result["score"] == honest["score"] - sum(t["max_score"] for t in result["tests"] if t["name"] in blocked)
    assert f"TODO[{rid}] hangs in {at}" in result["output"]
    assert seconds - honest_seconds < 2 * TIMEOUT + 4, (seconds, honest_seconds)  # one timeout, not one per test
    print(f"{case}: {len(blocked)} tests blocked, graded in {seconds:.1f} s (the solution: {honest_seconds:.1f} s); "
          f"a timeout per test would have taken {honest_seconds + len(blocked) * TIMEOUT:.0f} s or more")


def test_the_model_tests_reach_the_mlp_beyond_those_that_cover_it(gradings, reached):
    """Why the grader also watches the line: some tests run MLP.forward without covering TODO[mlp]."""
    result, _ = gradings["mlp_loop"]
    assert reached["gpt.py", "mlp"] - tagged(result, "mlp")
    assert len(reached["gpt.py", "mlp"] | tagged(result, "mlp")) * TIMEOUT > 2 * TIMEOUT + 4


def test_a_loop_at_import_costs_one_timeout(gradings):
    result, seconds = gradings["import_loop"]
    honest, honest_seconds = gradings["solution"]
    out = outputs(result)
    model = {n for n in out if not n.startswith(("test_tokenizer", "test_dataset"))}
    assert failed(result) == model
    timed_out = [n for n, o in out.items() if f"timed out after {TIMEOUT:g} s in" in o]
    found = re.search(rf"timed out after {TIMEOUT:g} s in gpt.py:([12]), at import$", out[timed_out[0]], re.M)
    assert len(timed_out) == 1 and found, out[timed_out[0]]
    assert all(f"stopped: this test reached gpt.py:{found.group(1)}, at import: a test before timed out" in out[n]
               for n in model - set(timed_out))
    assert seconds - honest_seconds < 2 * TIMEOUT + 4


def test_a_hang_that_cannot_be_located_costs_a_timeout_per_test(gradings):
    """Without the stacks (the submission disarmed the watchdog), today's behaviour: each test waits its own
    timeout (one test reaches RMSNorm.forward)."""
    result, _ = gradings["unlocatable"]
    assert failed(result) == {"test_rmsnorm_matches_formula_and_torch"}
    assert "timed out: still running after the test's time limit" in outputs(result)[
        "test_rmsnorm_matches_formula_and_torch"]


def test_a_timeout_outside_the_regions_costs_only_its_test(gradings):
    """Maybe only slow: a test that runs out of time in the released code around the regions (here GPT.__init__,
    which every model test runs) says where, and the later tests run as before."""
    result, _ = gradings["slow_outside_regions"]
    assert failed(result) == {"test_gpt2_small_parameter_count"}
    assert re.search(rf"timed out after {TIMEOUT:g} s in GPT.__init__ \(gpt.py:27[34]\)$",
                     outputs(result)["test_gpt2_small_parameter_count"], re.M)
    assert "hang" not in result["output"]


def forged_stacks():
    """The solution, but MLP.forward hangs while a thread writes forged stacks (naming another region, a file
    outside the modules, absurd lines and names) and garbage to every pipe it can write to."""
    files = with_code("gpt.py", "mlp", "_forge()", "while True:", "    pass")
    files["gpt.py"] += '''

def _forge():
    import os, stat, sys, threading
    here, grader = os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.abspath(sys.argv[0]))
    frames = [f'  File "{here}/gpt.py", line 165 in qkv', f'  File "{here}/../etc/passwd", line 1 in x',
              f'  File "{here}/gpt.py", line 99999999999 in ' + "y" * 5000,
              f'  File "{grader}/jailed.py", line 1 in run']
    forged = ("Timeout (0:00:01)!\\nThread 0x1 (most recent call first):\\n" + "\\n".join(frames) + "\\n\\n").encode()

    def flood():
        fds = [int(fd) for fd in os.listdir("/proc/self/fd") if int(fd) > 2]
        while True:
            for fd in fds:
                try:
                    if stat.S_ISFIFO(os.fstat(fd).st_mode):
                        os.set_blocking(fd, False)
                        os.write(fd, forged + os.urandom(3000) + forged)
                except OSError:
                    pass
    threading.Thread(target=flood, daemon=True).start()
'''
    return files


def test_forged_stacks_only_hurt_the_submission(gradings):
    """What the jail writes is read as a file among the modules, a line and a function name, checked: forged
    stacks may move the hang to another region of the same submission (or cost it a timeout per test, as
    before), never break or stall the grading."""
    result, seconds = gradings["forged_stacks"]
    honest, honest_seconds = gradings["solution"]
    assert_gradescope_format(result)
    assert [t["name"] for t in result["tests"]] == [t["name"] for t in honest["tests"]]
    assert not failed(result) - tagged(result, "mlp") - tagged(result, "attn_qkv") - {
        t["name"] for t in result["tests"] if "stopped: " in t["output"] or "timed out" in t["output"]}
    assert "passwd" not in json.dumps(result) and "y" * 100 not in json.dumps(result)
    assert seconds < honest_seconds + len(result["tests"]) * (TIMEOUT + 1)
