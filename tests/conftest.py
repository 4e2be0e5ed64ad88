"""The project's tests come in two sets. `python -m pytest` runs the quick one (about 50 s, installs
nothing); `python -m pytest --full` (what CI runs) adds the tests marked slow: grading hostile submissions,
`instructor check`, training end to end with kills, signals, DDP and full disks, and the Slurm integration
tests, which install Debian's slurm-wlm, munge and shellcheck with apt when they are missing (as root); as
root, it installs bubblewrap first when missing, the sandbox that seals graded student code."""

import os
import random
import sys

import pytest



def linux_tools():
    """The instructor's tools (the grading sandbox: bubblewrap, accounts, limits; Slurm) run on Linux servers."""
    try:
        import pwd, resource  # noqa: F401  (Windows' Python has neither)
    except ImportError:
        return False
    return sys.platform == "linux"


# on a student's Windows or macOS laptop (the GitHub workflow's other legs) the tests of training, sampling and data
collect_ignore = [] if linux_tools() else ["test_grading_security.py", "test_instructor.py", "test_slurm.py",
                                           "zoo_replay.py", "test_grade_all.py", "test_class_report.py",
                                           "test_slurm_grading.py", "test_hangs.py"]


SLOW = pytest.StashKey[int]()  # how many slow tests the quick run left out


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true",
                     help="also run the slow tests, Slurm's included (they install slurm-wlm and munge with apt)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs only with --full (minutes, or installs system packages)")
    if config.getoption("--full") and config.option.durations is None:
        config.option.durations = 20  # the full run's log says where its minutes go


def pytest_sessionstart(session):
    if session.config.getoption("--full") and os.geteuid() == 0:
        from slurm_cluster import apt_install

        apt_install(["bubblewrap"], ["bwrap"])


def pytest_collection_modifyitems(config, items):
    if config.getoption("--full"):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]
        config.stash[SLOW] = len(slow)



def pytest_terminal_summary(terminalreporter, config):
    if config.stash.get(SLOW, 0):
        terminalreporter.write_line(f"{config.stash[SLOW]} slow tests not run: `python -m pytest --full` runs every "
                                    f"test (the README says how long; it installs Slurm with apt as root where it is missing)")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """~60 KB of English-like text with a little structure to learn (a fixed seed: always the same)."""
    rng = random.Random(0)
    words = ("the king shall come to thee and my lord will speak of love and night and day for all that is good "
             "in this world we are not what they were but she was there with her heart").split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 10))).capitalize() + rng.choice(".,;!?")
             for _ in range(2000)]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(lines), encoding="utf-8")
    return str(path)
