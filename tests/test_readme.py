"""The README's commands are what CI and users run: keep them in step with .ci/run."""

import os
import re

from cfg import PRESETS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_commands():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    section = readme.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section)


def test_readme_gives_train_and_test_commands():
    train, quick, full = readme_commands()
    assert train.endswith("python train.py") and "pip install -r requirements.txt" in train
    assert quick == "pip install -r requirements-dev.txt && python -m pytest"
    assert full == quick + " --full"


def test_ci_runs_the_full_test_command_verbatim():
    _, _, full = readme_commands()
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        ci_lines = [line.strip() for line in f]
    assert full in ci_lines, f".ci/run must run the README's full test command `{full}`"


def read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def one_line(command):
    return " ".join(command.replace("\\\n", " ").split())


def test_the_documented_quick_cpu_runs_are_the_speedrun_preset():
    quick = re.search(r"\*\*A quick run on a CPU\*\*.*?```bash\n(.+?)\n```", read("README.md"), re.S)
    assert quick and one_line(quick.group(1)) == "python train.py --preset cpu-speedrun"
    job = re.search(r"slurm/train\.job (--preset \S+) +# the README's quick CPU run", read("slurm/README.md"))
    assert job and job.group(1) == "--preset cpu-speedrun"
    assert "cpu-speedrun" in PRESETS
