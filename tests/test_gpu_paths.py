"""The CUDA and MPS paths of train.py and cfg.py, simulated on a CPU: torch.cuda's and torch.mps's functions
are replaced by stand-ins that record how they are called. What only a GPU can show is said in each test."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import cfg
import train
from test_train import ENV, ROOT, TRAIN, tiny


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda with per-device generators (a state is 8 bytes holding the device's index) and given
    compute capabilities; the calls that would touch every GPU, or make a context, fail the test."""
    calls, capability = [], [(8, 0)]

    def forbidden(*args, **kwargs):
        raise AssertionError("touches every GPU, or makes a CUDA context")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.full((8,), int(device[-1]),
                                                                                      dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": calls.append((state[0].item(), device)))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=0: calls.append(index) or capability[0])
    for name in ("get_rng_state_all", "set_rng_state_all", "is_bf16_supported", "current_device"):
        monkeypatch.setattr(torch.cuda, name, forbidden)
    return calls, capability


def test_resume_on_fewer_gpus_restores_only_this_process_gpu(fake_cuda):
    # Only a GPU shows that the restored generator gives the same dropout masks as before the stop.
    calls, _ = fake_cuda
    saved = train.rng_state("cuda:1")  # process 1 of a run on two GPUs
    assert saved["cuda"][0].item() == 1 and saved["mps"] is None
    train.set_rng_state(saved, "cuda:0")  # resumed with --gpus=1: one process, on cuda:0
    assert calls == [(1, "cuda:0")]
    train.set_rng_state(saved, "cpu")  # or on a machine without a GPU: nothing to restore on a GPU
    assert calls == [(1, "cuda:0")]
    train.set_rng_state({**saved, "cuda": []}, "cuda:0")  # a checkpoint of an earlier version
    assert calls == [(1, "cuda:0")]


def test_mps_generator_is_saved_and_restored(monkeypatch):
    # Only a Mac shows that the resumed run then draws the same dropout masks as an uninterrupted one.
    restored = []
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda: torch.arange(4, dtype=torch.uint8))
    monkeypatch.setattr(torch.mps, "set_rng_state", lambda state: restored.append(state.tolist()))
    saved = train.rng_state("mps")
    train.set_rng_state(saved, "mps")
    assert restored == [[0, 1, 2, 3]] and saved["cuda"] is None


@pytest.mark.parametrize("capability, local_rank, auto", [((7, 0), "0", "fp16"), ((7, 5), "3", "fp16"),
                                                          ((8, 0), "1", "bf16"), ((9, 0), "0", "bf16")],
                         ids=["V100", "T4 as process 3", "A100 as process 1", "H100"])
def test_auto_precision_reads_the_capability_of_this_process_gpu(fake_cuda, monkeypatch, capability, local_rank,
                                                                 auto):
    # V100 and T4 only emulate bf16 (slowly): torch.cuda.is_bf16_supported() says True there, so it is not asked.
    # Only a GPU shows the speed: fp16 with loss scaling against emulated bf16.
    calls, capabilities = fake_cuda
    capabilities[0] = capability
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    assert cfg.resolve_precision("auto", "cuda") == auto
    assert calls == [int(local_rank)]  # asked about its own GPU only, before torch.cuda.set_device
    if auto == "fp16":
        with pytest.raises(ValueError, match="needs compute capability >= 8.0"):
            cfg.resolve_precision("bf16", "cuda")


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A100-PCIE-40GB", 312e12),
    ("NVIDIA L40S", 362e12), ("NVIDIA L40", 181e12), ("NVIDIA L4", 121e12), ("NVIDIA A10", 125e12),
    ("NVIDIA A10G", None), ("Tesla V100-SXM2-16GB", 125e12), ("Tesla T4", 65e12),
    ("NVIDIA GeForce RTX 4090", 165e12), ("NVIDIA RTX A6000", None),
])
def test_mfu_peak_is_the_gpu_model_not_a_substring(name, peak):
    # The names are those torch.cuda.get_device_name() returns; only each GPU shows its own.
    assert train.peak_flops(name) == peak


def test_each_process_takes_its_own_gpu_and_a_cpu_control_group_with_a_long_timeout(fake_cuda, monkeypatch):
    # process 1 of 2 on a node: its GPU is LOCAL_RANK's, NCCL for the model, and the stop flags and save
    # results go through gloo with hours of patience (process 0's save of GPT-2 xl takes minutes). Only a GPU
    # cluster shows NCCL itself and how long that save takes.
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(train.dist, "init_process_group", lambda backend: calls.append(("init", backend)))
    monkeypatch.setattr(train.dist, "new_group", lambda **kwargs: calls.append(("group", kwargs)) or "control")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert train.start_processes("cuda") == (1, 2, "cuda:1", "control")
    (_, device), (_, backend), (_, group) = calls
    assert (device, backend, group["backend"]) == ("cuda:1", "nccl", "gloo")
    assert group["timeout"].total_seconds() >= 3600
    monkeypatch.delenv("RANK")
    assert train.start_processes("cuda") == (0, 1, "cuda", None)  # no torchrun: one process, no group


def test_ddp_does_not_broadcast_the_fixed_buffers_before_each_step(monkeypatch):
    # the causal mask and rotary tables never change: DDP's default broadcasts them before every forward
    # (here counted on a one-process gloo group); on GPUs that is a copy per step over NVLink or the network.
    from gpt import GPT, GPTConfig
    broadcasts = []
    real = train.dist._broadcast_coalesced
    monkeypatch.setattr(train.dist, "_broadcast_coalesced", lambda *a, **k: broadcasts.append(1) or real(*a, **k))
    train.dist.init_process_group("gloo", store=train.dist.HashStore(), rank=0, world_size=1)
    try:
        model = GPT(GPTConfig(vocab_size=10, n_layer=1, n_head=1, n_embd=8, block_size=8))
        x = torch.zeros(1, 4, dtype=torch.long)
        counts = []
        for wrapped in (train.DDP(model), train.data_parallel(model, "cpu")):  # the default, then ours
            before = len(broadcasts)
            wrapped(x)
            counts.append(len(broadcasts) - before)
    finally:
        train.dist.destroy_process_group()
    assert counts[0] > 0 and counts[1] == 0, counts


@pytest.mark.slow
def test_torchrun_agent_sigterm_stops_every_process_at_the_next_step(corpus, tmp_path):
    # torchrun forwards SIGTERM to its processes and SIGKILLs them 30 s later: they must stop at the next step,
    # not at the next multiple of --log_interval, and the others wait for process 0's save. Here on gloo with a
    # tiny model; only a GPU cluster shows the time a large checkpoint takes against those 30 s.
    run_dir = tmp_path / "run"
    never = "1000000"
    process = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                                TRAIN, *tiny(corpus, run_dir, "--max_steps", never, "--log_interval", "1000",
                                             "--eval_interval", never, "--checkpoint_interval", never,
                                             "--batch_size", "4")],
                               env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = run_dir / "train.log"
    deadline = time.time() + 60
    while time.time() < deadline and not (log.exists() and "model " in log.read_text()):
        time.sleep(0.05)
    time.sleep(2)  # some steps, fewer than 1000
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    stopped = re.search(r"stopped by SIGTERM at step (\d+); last.pt written", stdout)
    assert stopped, stderr[-3000:]
    ckpt = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] == int(stopped.group(1)) < 1000 and len(ckpt["rng"]) == 2


GPU_CHECK = os.path.join(ROOT, "benchmarks", "gpu_check.py")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is here: the check would run")
def test_gpu_check_without_a_gpu_says_so_in_one_line():
    done = subprocess.run([sys.executable, GPU_CHECK], env=ENV, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and not done.stdout, done
    assert done.stderr.count("\n") == 1 and "no CUDA GPU here" in done.stderr and "srun --gpus=1" in done.stderr


@pytest.mark.slow
def test_gpu_check_runs_its_four_checks_on_the_cpu(corpus, tmp_path):
    # the instructor's GPU check (benchmarks/gpu_check.py) with --device cpu and a tiny model: each check runs
    # and passes. On a GPU it adds bf16, fp16 and --compile, and its figures are the point.
    done = subprocess.run([sys.executable, GPU_CHECK, "--device", "cpu", "--precisions", "fp32", "--no-compile",
                           "--steps", "20", "--out_dir", str(tmp_path), "--", "--txt_file", corpus, "--model_type",
                           "gpt-nano", "--block_size", "32", "--batch_size", "8", "--eval_iters", "2"],
                          env=ENV, capture_output=True, text=True, timeout=300)
    outcomes = re.findall(r"^(PASS|FAIL|SKIP) (\w+)", done.stdout, re.M)
    assert done.returncode == 0 and outcomes == [("PASS", "speed"), ("PASS", "resume"), ("PASS", "DDP"),
                                                 ("PASS", "sampling")], done.stdout + done.stderr[-3000:]
    assert "bitwise equal" in done.stdout and "tokens/s" in done.stdout
