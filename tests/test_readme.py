"""The README's two commands are what CI and users run: keep them in step with .ci/run."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_commands():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    section = readme.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section)


def test_readme_gives_train_and_test_commands():
    train, test = readme_commands()
    assert train.endswith("python train.py") and "pip install -r requirements.txt" in train
    assert "pytest" in test and "pip install -r requirements-dev.txt" in test


def test_ci_runs_the_readme_test_command_verbatim():
    _, test = readme_commands()
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        ci_lines = [line.strip() for line in f]
    assert test in ci_lines, f".ci/run must run the README's test command `{test}`"
