"""
Every benchmark script runs to the end, tiny, on both kinds of CPU the code has paths for: one with native bf16
(AVX-512 bf16 / AMX: bf16 rounds, bf16 presets) and one without (AVX2 only: fp32 everywhere). The kind is
simulated on this machine: cfg.cpu_flags() reads a /proc/cpuinfo that names the kind's flags (a sitecustomize.py
first on PYTHONPATH), and the AVX2 kind also caps PyTorch's kernels (ATEN_CPU_CAPABILITY=avx2) and oneDNN's
(ONEDNN_MAX_CPU_ISA=AVX2) and MKL's at AVX2, so that they run the code a CPU without AVX-512 runs. The bf16 kind on a host
without bf16 runs bf16 in emulation: slow, and the same code. benchmarks/gpu_check.py has its own test
(tests/test_gpu_paths.py); benchmarks/grade_class.py, which no CPU kind changes, runs once.
"""

import os
import platform
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SITECUSTOMIZE = '''
import builtins, io, os
_open = builtins.open
def _open_cpuinfo(file, *args, **kwargs):  # the simulated CPU's flags (tests/test_benchmarks.py)
    if file == "/proc/cpuinfo":
        return io.StringIO("processor\\t: 0\\nflags\\t\\t: " + os.environ["MICROGPT_CPU_FLAGS"] + "\\n")
    return _open(file, *args, **kwargs)
builtins.open = _open_cpuinfo
'''
KINDS = {  # the environment of each simulated CPU kind
    "bf16": dict(MICROGPT_CPU_FLAGS="fpu sse4_2 avx2 fma avx512f avx512bw avx512_bf16 amx_bf16 amx_tile"),
    "avx2": dict(MICROGPT_CPU_FLAGS="fpu sse4_2 avx2 fma", ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2",
                 MKL_ENABLE_INSTRUCTIONS="AVX2"),
}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cpu-kind")
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return folder


def run(site, kind, command, **extra):
    """command run as on a CPU of this kind, extra in its environment -> its stdout (it must succeed)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ATEN_", "ONEDNN_", "MKL_", "OMP_WAIT"))}
    env.update(KINDS[kind], PYTHONPATH=os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p),
               PYTHON=sys.executable, **extra)
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.parametrize("kind", KINDS)
def test_the_simulated_kind_is_what_the_code_sees(site, kind):
    out = run(site, kind, [sys.executable, "-c", "import cfg, torch; print(cfg.cpu_has_bf16(), "
                                                 "torch.backends.cpu.get_cpu_capability())"])
    bf16, capability = out.split()
    assert bf16 == str(kind == "bf16")
    if kind == "avx2" and platform.machine().lower() in ("x86_64", "amd64"):  # an ISA cap only x86 has
        assert capability == "AVX2", capability


@pytest.mark.parametrize("kind", KINDS)
def test_generate_speed(site, kind):
    out = run(site, kind, [sys.executable, "benchmarks/generate_speed.py", "--tiny", "--repeats", "1"])
    row = r"^(float32|bfloat16)\s+\S+\s+\S+\s+\S+\s+(\S+)"  # precision, 3 speeds, cache / HF
    rows = {m.group(1): float(m.group(2)) for m in re.finditer(row, out, re.M)}
    assert sorted(rows) == (["bfloat16", "float32"] if kind == "bf16" else ["float32"]), out
    assert all(ratio > 0 for ratio in rows.values()), out
    assert (kind == "bf16") != ("no native bf16" in out), out


@pytest.mark.parametrize("kind", KINDS)
def test_train_throughput(site, kind):
    out = run(site, kind, [sys.executable, "benchmarks/train_throughput.py", "--tiny", "--steps", "1", "--warmup",
                           "0", "--rounds", "1", "--batch_size", "2"])
    assert "fp32:" in out and ("bf16 autocast:" in out) == (kind == "bf16"), out


@pytest.mark.slow  # trains a preset for a few steps (half a minute)
@pytest.mark.parametrize("kind,recipe", [("bf16", "cpu-speedrun"), ("avx2", "cpu-quick")])
def test_cpu_quality_and_val_loss_and_omp_wait_policy(site, kind, recipe, corpus, tmp_path):
    tiny = ["--max_steps", "3", "--eval_interval", "3", "--eval_iters", "1", "--sample_length", "8"]
    out = run(site, kind, ["bash", "benchmarks/cpu_quality.sh", *tiny], RECIPE=recipe, TXT_FILE=corpus,
              OUT_DIR=str(tmp_path / recipe))
    assert re.search(rf"^{recipe}: full val loss \d+\.\d+ \| run's estimate \d", out, re.M), out
    logged = (tmp_path / recipe / "train.log").read_text()
    assert re.search(r"\| cpu (\w+) x 1 \|", logged).group(1) == ("bf16" if kind == "bf16" else "fp32"), logged
    out = run(site, kind, [sys.executable, "benchmarks/omp_wait_policy.py", "--steps", "2", "--rounds", "1",
                           "--settings", "OMP_WAIT_POLICY=PASSIVE", "--txt_file", corpus])
    assert "PASSIVE" in out, out


@pytest.mark.slow  # grades a small class (a minute or two)
def test_grade_class(tmp_path):
    from test_grading_security import jail_usable  # POSIX-only modules: not collected on Windows

    why = jail_usable()
    if why and os.environ.get("MICROGPT_REQUIRE_ROOT") == "1":
        pytest.fail(f"MICROGPT_REQUIRE_ROOT=1 but {why}")
    options = ["--grade-options=--not-tamper-proof"] if why else []
    done = subprocess.run([sys.executable, "benchmarks/grade_class.py", "--out", str(tmp_path), "--honest", "1",
                           "--mistakes", "1", "--pairs", "1", *options], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.search(r"s per submission \(\d+ cores\)", done.stdout), done.stdout
