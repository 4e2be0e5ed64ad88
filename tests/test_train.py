"""train.py end to end: a tiny model on a small generated corpus, run as students run it (a subprocess).
Covers learning, the run folder, checkpoints (weights_only), exact resume after kill -9, SIGUSR1/SIGTERM,
DDP with torchrun (gloo, 2 CPU processes) against one process, NaN handling, and clean option errors."""

import io
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import cfg
import optim
import train
from cfg import EXIT_INTERRUPTED
from dataset import CharTokenizer
from gpt import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "train.py")
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")  # one thread: fast for a tiny model, deterministic
CHECKPOINT_KEYS = {"model", "optimizer", "scaler", "step", "epoch", "epoch_index", "best_val_loss", "config",
                   "model_config", "tokenizer", "rng"}


def tiny(corpus, out_dir, *extra):
    """Arguments of a tiny run (0.09M parameters, ~100 steps/s on one core)."""
    return ["--txt_file", corpus, "--out_dir", str(out_dir), "--model_type", "gpt-nano", "--block_size", "32",
            "--batch_size", "8", "--learning_rate", "3e-3", "--min_lr", "3e-4", "--warmup_steps", "5",
            "--eval_iters", "4", "--log_interval", "5", "--sample_length", "16", "--device", "cpu",
            "--precision", "fp32", *extra]


def run(args, launcher=(), timeout=120):
    return subprocess.run([sys.executable, *launcher, TRAIN, *args], env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def start(args):
    return subprocess.Popen([sys.executable, TRAIN, *args], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def val_losses(out_dir):
    with open(os.path.join(out_dir, "train.log"), encoding="utf-8") as f:
        return [float(line.split("| val loss ")[1].split()[0]) for line in f if "| val loss " in line]


def assert_same_tensors(a, b, exact=True):
    assert a.keys() == b.keys()
    for name in a:
        if exact:
            assert torch.equal(a[name], b[name]), name
        else:
            torch.testing.assert_close(a[name], b[name], atol=2e-5, rtol=1e-4, msg=name)


# ----------------------------------------------------------------------------- one run, looked at closely

@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("runs") / "tiny"
    result = run(tiny(corpus, out_dir, "--max_steps", "120", "--eval_interval", "40", "--dropout", "0"))
    assert result.returncode == 0, result.stderr
    return out_dir, result


def test_loss_falls(trained, corpus):
    out_dir, _ = trained
    losses = val_losses(out_dir)
    vocab = len(set(open(corpus, encoding="utf-8").read()))
    assert len(losses) == 3  # steps 40, 80, 120
    assert losses[-1] < losses[0] - 0.2 and losses[-1] < math.log(vocab) - 1.0, losses


def test_run_folder_holds_config_tokenizer_log_and_checkpoints(trained):
    out_dir, result = trained
    assert {"last.pt", "best.pt", "config.json", "tokenizer.json", "train.log"} <= set(os.listdir(out_dir))
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(out_dir))
    with open(out_dir / "config.json", encoding="utf-8") as f:
        config = json.load(f)
    assert (config["n_layer"], config["n_head"], config["n_embd"]) == (3, 3, 48)  # resolved from the preset
    assert config["out_dir"] == str(out_dir) and config["device"] == "cpu" and config["precision"] == "fp32"
    assert CharTokenizer.load(str(out_dir / "tokenizer.json")).to_dict() == load(out_dir / "last.pt")["tokenizer"]
    assert "sample at step 120" in result.stdout and "val bpc" in result.stdout


@pytest.mark.parametrize("name", ["last.pt", "best.pt"])
def test_checkpoints_load_with_weights_only_and_hold_the_training_state(trained, name):
    out_dir, _ = trained
    ckpt = load(out_dir / name)
    assert CHECKPOINT_KEYS <= ckpt.keys()
    assert (ckpt["step"], ckpt["epoch"], ckpt["scaler"]) == (120, 0, None)  # best: the last of 3 falling losses
    assert ckpt["epoch_index"] == 120 * 8 and ckpt["best_val_loss"] == pytest.approx(val_losses(out_dir)[-1], abs=1e-4)
    assert not any(key.startswith("_orig_mod.") for key in ckpt["model"])
    model = GPT(GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])  # strict: every key matches
    assert ckpt["config"]["max_steps"] == 120 and ckpt["optimizer"]["state"]
    rng, = ckpt["rng"]  # one process
    assert {"python", "numpy", "torch", "cuda"} <= rng.keys()


def test_tensorboard_has_the_scalars_and_samples(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out_dir, _ = trained
    events = EventAccumulator(str(out_dir))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"train/loss", "val/loss", "val/bpc", "lr", "grad_norm", "tokens_per_sec"} <= set(scalars)
    assert [e.step for e in events.Scalars("val/loss")] == [40, 80, 120]
    bpc, loss = events.Scalars("val/bpc")[-1].value, events.Scalars("val/loss")[-1].value
    assert bpc == pytest.approx(loss / math.log(2), rel=1e-5)
    assert all(e.value > 0 for e in events.Scalars("lr"))
    assert any("sample" in tag for tag in events.Tags()["tensors"])


def test_learning_rate_warms_up_from_above_zero_then_decays_to_min_lr():
    config = cfg.parse_config(["--learning_rate", "1e-3", "--min_lr", "1e-4", "--warmup_steps", "10",
                               "--max_steps", "100", "--device", "cpu"])
    lrs = [optim.lr_at(step, config, 100) for step in range(101)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)  # warmup: lr * (step + 1) / warmup
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[100] == pytest.approx(1e-4)


def test_warmup_stable_decay_holds_the_learning_rate_then_decays_linearly_over_the_cooldown():
    config = cfg.parse_config(["--learning_rate", "1e-3", "--min_lr", "1e-4", "--warmup_steps", "10",
                               "--cooldown", "0.3", "--max_steps", "100", "--device", "cpu"])
    lrs = [optim.lr_at(step, config, 100) for step in range(101)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert lrs[10:71] == pytest.approx([1e-3] * 61)  # stable until the last 30 steps
    assert lrs[85] == pytest.approx(1e-3 - 0.5 * 9e-4) and lrs[100] == pytest.approx(1e-4)  # linear


def test_processes_get_disjoint_shards_of_the_same_global_batch():
    ds = torch.utils.data.TensorDataset(torch.arange(100), torch.arange(100))  # window i is just i

    def windows(config, rank, world_size, n):  # the first n micro-batches of one process
        batches = train.micro_batches(ds, cfg.parse_config(config + ["--device", "cpu"]), 0, 0, rank, world_size, False)
        return [next(batches)[2] for _ in range(n)]

    one = windows(["--batch_size", "12"], 0, 1, 16)  # 100 // 12 = 8 steps per epoch
    two = [windows(["--batch_size", "3", "--grad_accum", "2"], rank, 2, 32) for rank in range(2)]
    for step in range(16):
        shards = torch.cat([x for rank in range(2) for x in two[rank][2 * step:2 * step + 2]])
        assert sorted(shards.tolist()) == sorted(one[step].tolist()) and len(set(shards.tolist())) == 12
    assert sorted(torch.cat(one[:8]).tolist()) != sorted(torch.cat(one[8:]).tolist())  # epoch 1: a new order


# ----------------------------------------------------------------------------- interruptions

@pytest.mark.slow
def optimizer_states(ckpt):
    """Every per-parameter state of the checkpoint's optimizer(s): AdamW's, or Muon's then AdamW's."""
    state = ckpt["optimizer"]
    return [s for o in state.get("optimizers", [state]) for s in o["state"].values()]


@pytest.mark.parametrize("optimizer", ["adamw", pytest.param("muon", marks=pytest.mark.slow)])
def test_kill_9_then_resume_is_bitwise_identical_to_an_uninterrupted_run(corpus, tmp_path, optimizer):
    args = ["--max_steps", "200", "--checkpoint_interval", "10", "--eval_interval", "50", "--dropout", "0.1",
            "--optimizer", optimizer]
    reference = run(tiny(corpus, tmp_path / "reference", *args))
    assert reference.returncode == 0, reference.stderr

    process = start(tiny(corpus, tmp_path / "cut", *args))
    last = tmp_path / "cut" / "last.pt"
    deadline = time.time() + 60
    while time.time() < deadline and process.poll() is None:  # wait for a checkpoint of step >= 30
        try:
            if last.exists() and load(last)["step"] >= 30:
                break
        except (EOFError, RuntimeError):  # a reader may see the file as it is being replaced
            pass
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed: raise --max_steps"
    killed_at = load(last)["step"]
    assert 30 <= killed_at < 200

    resumed = run(tiny(corpus, tmp_path / "cut", *args))  # the same command again: resumes by itself
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {tmp_path / 'cut'}/last.pt at step {killed_at}" in resumed.stdout
    a, b = load(tmp_path / "reference" / "last.pt"), load(last)
    assert a["step"] == b["step"] == 200
    assert_same_tensors(a["model"], b["model"])
    states_a, states_b = optimizer_states(a), optimizer_states(b)
    assert len(states_a) == len(states_b) == len(list(GPT(GPTConfig.from_dict(a["model_config"])).parameters()))
    for state_a, state_b in zip(states_a, states_b):
        assert_same_tensors(state_a, state_b)
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"]) and a["best_val_loss"] == b["best_val_loss"]


@pytest.mark.slow
@pytest.mark.parametrize("signum", [getattr(signal, "SIGUSR1", None), signal.SIGTERM, signal.SIGINT],
                         ids=["SIGUSR1", "SIGTERM", "Ctrl-C"])  # SIGUSR1: None on Windows, where only the quick tests run
def test_signal_finishes_the_step_writes_last_and_exits_with_the_requeue_code(corpus, tmp_path, signum):
    never = "1000000"
    process = start(tiny(corpus, tmp_path / "run", "--max_steps", never, "--eval_interval", never,
                         "--checkpoint_interval", never))
    log = tmp_path / "run" / "train.log"
    deadline = time.time() + 60
    while time.time() < deadline and not (log.exists() and " step 10 loss" in log.read_text()):
        time.sleep(0.02)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == EXIT_INTERRUPTED == 75, stderr
    assert f"stopped by {signum.name}" in stdout and "Traceback" not in stderr
    ckpt = load(tmp_path / "run" / "last.pt")
    assert 10 <= ckpt["step"] < int(never) and CHECKPOINT_KEYS <= ckpt.keys()


@pytest.mark.slow
def test_nan_loss_stops_with_exit_1_and_keeps_the_last_good_checkpoint(corpus, tmp_path):
    first = run(tiny(corpus, tmp_path / "run", "--max_steps", "10"))
    assert first.returncode == 0, first.stderr
    # resume with an absurd learning rate: the weights overflow and the loss turns NaN
    exploded = run(tiny(corpus, tmp_path / "run", "--max_steps", "40", "--learning_rate", "1e30", "--min_lr", "0",
                        "--warmup_steps", "0", "--grad_clip", "0", "--checkpoint_interval", "1"))
    assert exploded.returncode == 1
    assert exploded.stderr.strip().splitlines()[-1].startswith("error: the training loss became nan")
    ckpt = load(tmp_path / "run" / "last.pt")
    assert 10 <= ckpt["step"] < 40
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())


# ----------------------------------------------------------------------------- precision and DDP

@pytest.mark.slow
def test_fp16_saves_the_grad_scaler_and_bf16_runs_where_the_cpu_has_it(corpus, tmp_path):
    fp16 = run(tiny(corpus, tmp_path / "fp16", "--max_steps", "10", "--precision", "fp16"))
    assert fp16.returncode == 0, fp16.stderr
    assert load(tmp_path / "fp16" / "last.pt")["scaler"]["scale"] > 0
    muon = run(tiny(corpus, tmp_path / "fp16-muon", "--max_steps", "10", "--precision", "fp16", "--optimizer", "muon"))
    assert muon.returncode == 0, muon.stderr  # the loss scaler unscales and steps both optimizers
    assert load(tmp_path / "fp16-muon" / "last.pt")["scaler"]["scale"] > 0 and val_losses(tmp_path / "fp16-muon")[-1] < 4
    assert ("hint: this CPU has no native fp16" in fp16.stderr) == (not cfg.cpu_has_fp16()), fp16.stderr
    bf16 = run(tiny(corpus, tmp_path / "bf16", "--max_steps", "10", "--precision", "bf16"))
    if cfg.cpu_has_bf16():
        assert bf16.returncode == 0, bf16.stderr
    else:
        assert bf16.returncode == 2 and bf16.stderr.startswith("error: --precision bf16")


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_torchrun_two_processes_match_one_process_with_the_same_global_batch(corpus, tmp_path, optimizer):
    args = ["--max_steps", "12", "--eval_interval", "12", "--dropout", "0", "--eval_iters", "2", "--optimizer", optimizer]
    runs = {
        "one process, batch 8": ((), ["--batch_size", "8"]),
        "torchrun 2 processes, batch 4 each": (("-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                               "2"), ["--batch_size", "4"]),
    }
    if optimizer == "adamw":  # accumulation is the optimizer's business not at all: once is enough
        runs["one process, batch 4 x 2 accumulated"] = ((), ["--batch_size", "4", "--grad_accum", "2"])
    ckpts = {}
    for i, (name, (launcher, batch)) in enumerate(runs.items()):
        result = run(tiny(corpus, tmp_path / str(i), *args) + batch, launcher=launcher)
        assert result.returncode == 0, f"{name} exited {result.returncode}:\n{result.stderr[:3000]}"
        ckpts[name] = load(tmp_path / str(i) / "last.pt")
    reference, *others = ckpts.values()
    for ckpt in others:
        assert_same_tensors(reference["model"], ckpt["model"], exact=False)
        assert ckpt["best_val_loss"] == pytest.approx(reference["best_val_loss"], abs=1e-5)
    assert len(ckpts["torchrun 2 processes, batch 4 each"]["rng"]) == 2  # every process's RNG streams


# ----------------------------------------------------------------------------- bad options

BAD = [
    (["--n_layer", "-1"], "--n_layer must be a positive integer"),
    (["--n_head", "0"], "--n_head must be a positive integer"),
    (["--n_embd", "100", "--n_head", "3"], "divisible by n_head"),
    (["--block_size", "-8"], "--block_size must be a positive integer"),
    (["--batch_size", "0"], "--batch_size must be a positive integer"),
    (["--max_steps", "ten"], "invalid int value"),
    (["--model_type", "gpt5"], "invalid choice: 'gpt5'"),
    (["--norm", "batchnorm"], "invalid choice: 'batchnorm'"),
    (["--precision", "fp8"], "invalid choice: 'fp8'"),
    (["--dropout", "1.5"], "dropout must be in [0, 1)"),
    (["--learning_rate", "-1"], "--learning_rate must be positive"),
    (["--min_lr", "1"], "--min_lr must be between 0 and --learning_rate"),
    (["--learning_rate", "nan"], "--learning_rate must be a finite number"),
    (["--learning_rate", "inf"], "--learning_rate must be a finite number, got inf"),
    (["--sample_temperature", "inf"], "--sample_temperature must be a finite number"),
    (["--epochs", "1", "--max_steps", "3"], "--epochs 1 and --max_steps 3 both set the length of the run"),
    (["--num_epochs", "1", "--max_iters", "3"], "--epochs 1 and --max_steps 3 both set the length of the run"),
    (["--txt_file", "{tmp}/binary.bin"], "is a binary file, not text"),
    (["--beta2", "1"], "--beta2 must be in [0, 1)"),
    (["--val_fraction", "1.5"], "--val_fraction must be between 0 and 1"),
    (["--device", "tpu"], "--device must be auto, cuda, cuda:N, mps or cpu"),
    (["--device", "cuda:99"], "--device cuda"),
    (["--resume"], "--resume: there is no"),
    (["--sample_prompt", "\u00df"], "--sample_prompt has unknown character"),
    (["--val_fraction", "0.01", "--block_size", "2000"], "validation split: text of"),
    (["--batch_size", "100000"], "fewer than one global batch"),
    (["--txt_file", "{tmp}/missing.txt"], "does not exist"),
    (["--txt_file", "{tmp}"], "is a folder"),
    (["--txt_file", "{tmp}/empty.txt"], "is empty"),
    (["--txt_file", "{tmp}/latin1.txt"], "is not UTF-8"),
]


@pytest.mark.parametrize("bad, expected", BAD, ids=[" ".join(bad) for bad, _ in BAD])
def test_bad_option_is_one_clean_line_with_exit_code_2_and_writes_nothing(corpus, tmp_path, capsys, bad, expected):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9".encode("latin-1"))
    (tmp_path / "binary.bin").write_bytes(bytes(range(256)))
    bad = [arg.format(tmp=tmp_path) for arg in bad]
    with pytest.raises(SystemExit) as exit_:  # any other exception would be a traceback
        train.main(["--txt_file", corpus, "--out_dir", str(tmp_path / "run"), "--device", "cpu", *bad])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
    assert not (tmp_path / "run").exists()


def test_bf16_on_a_cpu_without_it_is_refused(corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cfg, "cpu_has_bf16", lambda: False)
    with pytest.raises(SystemExit) as exit_:
        train.main(["--txt_file", corpus, "--out_dir", str(tmp_path / "run"), "--device", "cpu", "--precision", "bf16"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith("error: --precision bf16: this CPU has no native bf16")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("bad", [["--model_type", "gpt5"], ["--txt_file", "missing.txt"], ["--n_embd", "100"]])
def test_bad_option_from_the_command_line_has_no_traceback(tmp_path, bad):
    result = subprocess.run([sys.executable, TRAIN, "--out_dir", str(tmp_path / "run"), *bad], cwd=tmp_path,
                            env=ENV, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert os.listdir(tmp_path) == []


def test_every_model_field_is_an_option_that_reaches_the_model():
    # the model's shape is GPTConfig's: each of its fields (but the text's vocabulary size) is a train.py option
    options = cfg.parse_config(["--n_layer", "2", "--n_head", "2", "--n_embd", "16", "--block_size", "8",
                                "--dropout", "0.1", "--no-bias", "--abs_emb", "--no-use_flash_attn", "--norm",
                                "rmsnorm", "--no-fused_norm", "--rope_base", "500", "--device", "cpu"])
    assert options.model_config(11) == GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16,
                                                 dropout=0.1, bias=False, abs_emb=True, use_flash_attn=False,
                                                 norm="rmsnorm", fused_norm=False, rope_base=500.0)


# ----------------------------------------------------------------------------- optimizers and presets

def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=11))
    muon, adamw = optim.configure_optimizers(model, 0.1, 1e-3, (0.9, 0.99), "cpu", "muon").optimizers
    names = {id(p): name for name, p in model.named_parameters()}
    on_muon = sorted(names[id(p)] for group in muon.param_groups for p in group["params"])
    assert on_muon == sorted(n for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2)
    assert len(on_muon) == 2 * 4  # attention c_attn, c_proj; MLP c_fc, c_proj
    on_adamw = {names[id(p)] for group in adamw.param_groups for p in group["params"]}
    assert "transformer.wte.weight" in on_adamw and not on_adamw & set(on_muon)  # the tied embedding/head: AdamW
    assert len(on_muon) + len(on_adamw) == len(list(model.parameters()))


def test_adamw_lr_scale_multiplies_the_schedule_for_adamw_only(corpus, tmp_path):
    assert run(tiny(corpus, tmp_path, "--max_steps", "3", "--optimizer", "muon", "--adamw_lr_scale", "3")).returncode == 0
    optimizers = torch.load(tmp_path / "last.pt", weights_only=True)["optimizer"]["optimizers"]
    (muon_lr,), adamw_lrs = ({g["lr"] for g in o["param_groups"]} for o in optimizers)
    assert muon_lr > 0 and adamw_lrs == {3 * muon_lr}


def test_orthogonalize_makes_every_singular_value_about_one():
    shapes = [(48, 144), (192, 48), (96, 48), (32, 80)]  # three of one Gram size (batched), one alone
    generator = torch.Generator().manual_seed(0)
    matrices = [torch.randn(shape, generator=generator) * torch.logspace(-2, 0, shape[1]) for shape in shapes]
    for G, (U,) in zip(matrices, optim.orthogonalize([G[None] for G in matrices])):
        assert torch.linalg.cond(G) > 15  # ill-conditioned: some directions of the gradient are much larger
        s = torch.linalg.svdvals(U)
        assert U.shape == G.shape and s.min() > 0.6 and s.max() < 1.25, s  # every direction (about) alike
        torch.testing.assert_close(U, optim.orthogonalize([G[None]])[0][0], atol=1e-5, rtol=1e-4)  # batched as alone


def test_muon_loaded_from_its_state_dict_steps_exactly_as_the_original():
    """Muon keeps its momentum buffers as views of one flat tensor; a state_dict holds one tensor per matrix,
    and an optimizer loaded from it steps bitwise as the one that was never saved."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(48, 16), (16, 16), (16, 48), (48, 16), (16, 16)]
    params = [torch.randn(shape, generator=generator) for shape in shapes]
    grads = [[torch.randn(shape, generator=generator) for shape in shapes] for _ in range(3)]

    def stepped(weights, optimizer, step_grads):
        for p, g in zip(weights, step_grads):
            p.grad = g.clone()
        optimizer.step()

    a = [torch.nn.Parameter(p.clone()) for p in params]
    muon_a = optim.Muon(a, lr=0.01, weight_decay=0.1)
    for step_grads in grads[:2]:
        stepped(a, muon_a, step_grads)
    checkpoint = io.BytesIO()
    torch.save(muon_a.state_dict(), checkpoint)
    saved = torch.load(io.BytesIO(checkpoint.getvalue()), weights_only=True)  # as train.py resumes
    assert [tuple(saved["state"][i]["momentum_buffer"].shape) for i in range(len(shapes))] == shapes

    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    muon_b = optim.Muon(b, lr=0.01, weight_decay=0.1)
    muon_b.load_state_dict(saved)
    stepped(a, muon_a, grads[2])
    stepped(b, muon_b, grads[2])
    for p, q in zip(a, b):
        assert torch.equal(p, q) and torch.equal(muon_a.state[p]["momentum_buffer"], muon_b.state[q]["momentum_buffer"])
    assert not torch.equal(a[0], params[0])


def test_a_preset_fills_in_flags_and_the_command_line_overrides_them(monkeypatch):
    monkeypatch.setattr(cfg, "cpu_has_bf16", lambda: False)
    config = cfg.parse_config(["--preset", "cpu-speedrun", "--max_steps", "7"])
    assert config.optimizer == "muon" and config.n_embd == 192 and config.max_steps == 7
    assert config.precision == "fp32"  # the preset's bf16, on a CPU without it
    assert cfg.parse_config(["--preset", "cpu-quick"]).optimizer == "adamw"


def test_resuming_with_another_optimizer_is_refused(corpus, tmp_path, capsys):
    assert run(tiny(corpus, tmp_path, "--max_steps", "3")).returncode == 0
    with pytest.raises(SystemExit) as exit_:
        train.main(tiny(corpus, tmp_path, "--max_steps", "6", "--optimizer", "muon"))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--optimizer adamw, not muon" in err and err.count("\n") == 1, err


def test_full_val_loss_counts_every_position_of_every_window_once():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from val_loss import full_val_loss
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=11)).eval()
    data = torch.randint(0, 11, (8 * 5 + 3,))  # 5 whole windows, and 2 tokens no window takes as input
    with torch.no_grad():
        losses = [model(data[i:i + 8][None], data[i + 1:i + 9][None])[1] for i in range(0, 40, 8)]
    assert full_val_loss(model, data, batch_size=2) == pytest.approx(torch.stack(losses).mean().item(), rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [None, "cpu-quick"])
def test_cpu_quality_runs_a_preset_and_reports_the_full_validation_loss(corpus, tmp_path, recipe):
    env = dict(ENV, PYTHON=sys.executable, TXT_FILE=corpus, OUT_DIR=str(tmp_path / "run"), OMP_WAIT_POLICY="PASSIVE")
    if recipe:
        env["RECIPE"] = recipe
    shrink = ["--n_layer", "1", "--n_embd", "32", "--block_size", "16", "--batch_size", "4", "--max_steps", "6",
              "--eval_interval", "6", "--warmup_steps", "2", "--eval_iters", "2", "--sample_length", "0"]
    result = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "cpu_quality.sh"), *shrink], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    summary = result.stdout.strip().splitlines()[-1]
    assert summary.startswith(f"{recipe or 'cpu-speedrun'}: full val loss "), summary
    full = float(summary.split("full val loss ")[1].split()[0])
    direct = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "val_loss.py"), str(tmp_path / "run")],
                            env=ENV, capture_output=True, text=True, timeout=60)
    assert direct.stdout.strip() == f"{full:.4f}" and 2.5 < full < 4.5  # 6 steps: far from trained, but learning
    assert load(tmp_path / "run" / "best.pt")["config"]["optimizer"] == ("adamw" if recipe else "muon")
    assert float(summary.split("wall time ")[1].split()[0]) > 0
