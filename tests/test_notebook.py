"""The notebook (notebooks/attention.ipynb) and the pictures of plot.py: attention maps, loss curves, sampled
distributions, `generate.py --attention_map` and `python plot.py RUN`. The slow tests run the notebook top to
bottom with nbclient, against the solution and against the release's stubs, on a small model trained here."""

import base64
import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict

import nbformat
import pytest
import torch
from nbclient import NotebookClient
from torch.nn import functional as F

import generate
import plot
from dataset import CharTokenizer, DataError
from gpt import GPT, GPTConfig
from instructor import regions, release

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join("notebooks", "attention.ipynb")
PNG = b"\x89PNG\r\n\x1a\n"
ENV = dict(os.environ, OMP_NUM_THREADS="1")
FIGURES = ("heatmaps(", "bars(", "loss_figure(", "attention_map(")  # the calls that make a figure
TEXT = "ROMEO:\nBut soft, what light through yonder window breaks?\nJULIET:\nAy me!\n" * 10


def png_size(data):
    """(width, height) of a PNG file's bytes, from its header."""
    assert data[:8] == PNG, data[:8]
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def read_notebook(folder=ROOT):
    return nbformat.read(os.path.join(folder, NOTEBOOK), as_version=4)


def one_error_line(err, *words):
    return err.startswith("error: ") and err.count("\n") == 1 and all(w in err for w in words)


# ----------------------------------------------------------------------------- the notebook as stored

def test_notebook_is_stored_without_outputs():
    nb = read_notebook()
    nbformat.validate(nb)
    cells = [c for c in nb.cells if c.cell_type == "code"]
    assert cells and all(c.outputs == [] and c.execution_count is None for c in cells), \
        "clear the notebook's outputs before committing it"
    assert nb.metadata.kernelspec.name == "python3"


def test_notebook_requirements_are_installed_by_the_tests_only():
    with open(os.path.join(ROOT, "notebooks", "requirements.txt"), encoding="utf-8") as f:
        wanted = f.read()
    with open(os.path.join(ROOT, "requirements-dev.txt"), encoding="utf-8") as f:
        dev = f.read().splitlines()
    with open(os.path.join(ROOT, "requirements.txt"), encoding="utf-8") as f:
        runtime = f.read()
    assert "matplotlib" in wanted and "-r notebooks/requirements.txt" in dev and "matplotlib" not in runtime
    assert "pip install -r notebooks/requirements.txt" in read_notebook().cells[0].source


def test_notebook_requirements_install_a_front_end_that_opens_it():
    with open(os.path.join(ROOT, "notebooks", "requirements.txt"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert "notebook>=7" in lines and "ipykernel>=6.0" in lines  # Jupyter Notebook 7 (JupyterLab's parts) and a kernel
    assert any(line.startswith("#") and "jupyter notebook notebooks/attention.ipynb" in line for line in lines)
    assert "jupyter notebook notebooks/attention.ipynb" in read_notebook().cells[0].source
    # what requirements-dev.txt installed (it includes notebooks/requirements.txt): the front end and its command
    assert importlib.util.find_spec("notebook") is not None, "pip install -r notebooks/requirements.txt"
    assert int(importlib.metadata.version("notebook").split(".")[0]) >= 7
    script = os.path.join(os.path.dirname(sys.executable), "jupyter-notebook" + (".exe" if os.name == "nt" else ""))
    assert os.path.isfile(script), f"{script} is missing: the `jupyter notebook` command would not open the notebook"


# ----------------------------------------------------------------------------- what the pictures show

def tiny(abs_emb=False, flash=False, block_size=16, vocab_size=20):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=16,
                         abs_emb=abs_emb, use_flash_attn=flash)).eval()


@pytest.mark.parametrize("abs_emb", [False, True], ids=["rotary", "absolute"])
def test_attention_maps_are_the_probabilities_the_model_uses(abs_emb):
    model = tiny(abs_emb)
    idx = torch.randint(0, 20, (1, 9))
    maps = plot.attention(model, idx)
    assert maps.shape == (2, 2, 9, 9)
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 2, 9))
    assert torch.all(maps.triu(diagonal=1) == 0)  # no weight on the future
    # layer 0 by hand: its input is ln_1 of the embeddings; q and k from c_attn, rotated when rotary
    x = model.transformer.wte(idx) + (model.transformer.wpe(torch.arange(9)) if abs_emb else 0)
    attn = model.transformer.h[0].attn
    q, k, _ = attn.c_attn(model.transformer.h[0].ln_1(x)).split(16, dim=2)
    q, k = (t.view(1, 9, 2, 8).transpose(1, 2) for t in (q, k))  # (1, nh, T, hs)
    if not abs_emb:
        q, k = attn.rotary(q), attn.rotary(k)
    scores = (q @ k.transpose(-2, -1) / 8 ** 0.5).masked_fill(~torch.ones(9, 9, dtype=torch.bool).tril(), -torch.inf)
    torch.testing.assert_close(maps[0], F.softmax(scores, dim=-1)[0].detach())
    # the fused path gives the same maps (recomputed by the manual path); the hooks are gone afterwards
    flash = tiny(abs_emb, flash=True)
    torch.testing.assert_close(plot.attention(flash, idx), maps)
    assert not any(block.attn._forward_pre_hooks for block in model.transformer.h)


def test_sampled_frequencies_are_what_sample_next_draws():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    torch.testing.assert_close(plot.sampled(logits), F.softmax(logits, dim=-1), atol=0.01, rtol=0)
    torch.testing.assert_close(plot.sampled(logits, temperature=0.5), F.softmax(logits / 0.5, dim=-1), atol=0.01,
                               rtol=0)
    assert plot.sampled(logits, top_k=2)[2:].sum() == 0 and plot.sampled(logits, top_k=2)[:2].min() > 0.2
    assert plot.sampled(logits, top_p=0.5).tolist() == [1, 0, 0, 0, 0]  # 0.53 > 0.5: the first alone


def stubbed(tmp_path, name):
    """The release's version of a module (every solution region a stub), imported under another name."""
    with open(os.path.join(ROOT, f"{name}.py"), encoding="utf-8") as f:
        path = tmp_path / f"stub_{name}.py"
        path.write_text(regions.strip(f.read(), f"{name}.py"), encoding="utf-8")
    spec = importlib.util.spec_from_file_location(f"stub_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_needs_names_the_stubs_instead_of_a_traceback(tmp_path, capsys):
    gpt = stubbed(tmp_path, "gpt")
    attn = gpt.CausalSelfAttention(gpt.GPTConfig(block_size=8, n_layer=1, n_head=2, n_embd=8))
    reached = []
    with plot.needs("attn_qkv", "attn_scores"):
        attn.qkv(torch.randn(1, 8, 8))
        reached.append(True)
    out = capsys.readouterr().out
    assert not reached and out.count("\n") == 1
    assert out.startswith("This cell needs your code for the TODOs attn_qkv, attn_scores. TODO[attn_qkv] is still a "
                          "stub: write it") and "pytest unittests.py -k attn_qkv" in out
    for name in ("plot.py", "cfg.py"):  # the grader takes a module that says TODO[ for one with stubs left
        with open(os.path.join(ROOT, name), encoding="utf-8") as f:
            assert "TODO[" not in f.read(), name
    with plot.needs("rotary"):
        raise DataError("there is no run folder runs/x")
    assert capsys.readouterr().out == "This cell cannot run: there is no run folder runs/x\n"
    with pytest.raises(NotImplementedError):  # not a stub of ours: the traceback is wanted
        with plot.needs("rotary"):
            raise NotImplementedError("something else")


# ----------------------------------------------------------------------------- generate.py --attention_map

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder holding an untrained tiny model, as train.py writes it."""
    folder = tmp_path_factory.mktemp("run")
    tokenizer = CharTokenizer(TEXT)
    model = tiny(vocab_size=tokenizer.vocab_size)
    torch.save({"model": model.state_dict(), "model_config": asdict(model.config), "tokenizer": tokenizer.to_dict()},
               folder / "last.pt")
    return str(folder)


def test_attention_map_cli(run_dir, tmp_path, capsys):
    out = tmp_path / "maps" / "attn.png"
    prompt = "ROMEO:\nBut soft, what light"  # 26 characters, the map shows the last 16 (block_size)
    assert generate.main(["--checkpoint", run_dir, "--prompt", prompt, "--attention_map", str(out),
                          "--max_new_tokens", "5"]) == 0
    captured = capsys.readouterr()
    assert f"wrote every head's attention over the prompt to {out}" in captured.err and "sample 1 of 1" in captured.out
    width, height = png_size(out.read_bytes())
    assert out.stat().st_size > 20_000 and width > 2 * 200 and height > 2 * 200  # 2 x 2 maps of 16 x 16
    assert os.listdir(out.parent) == ["attn.png"]  # no temporary file left


@pytest.mark.parametrize("name, code, message", [
    ("attn.jpg", 2, "is not a .png file"),
    ("folder.png", 2, "is a folder"),
    ("file/attn.png", 74, "is a file, not a folder"),
])
def test_attention_map_bad_paths(run_dir, tmp_path, capsys, name, code, message):
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "file").write_text("")
    before = sorted(os.listdir(tmp_path))
    assert generate.main(["--checkpoint", run_dir, "--attention_map", str(tmp_path / name)]) == code
    captured = capsys.readouterr()
    assert one_error_line(captured.err, "--attention_map", message), captured.err
    assert captured.out == "" and sorted(os.listdir(tmp_path)) == before and (tmp_path / "folder.png").is_dir()


def test_pictures_without_matplotlib_say_how_to_install_it(run_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # `from matplotlib.figure import ...` fails
    assert generate.main(["--checkpoint", run_dir, "--attention_map", str(tmp_path / "a.png")]) == 2
    assert one_error_line(capsys.readouterr().err, "pip install -r notebooks/requirements.txt")
    assert plot.main([run_dir, "--output", str(tmp_path / "b.png")]) == 2
    assert one_error_line(capsys.readouterr().err, "pip install -r notebooks/requirements.txt")
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_sampling_and_training_need_no_matplotlib(run_dir):
    code = ("import sys; sys.modules['matplotlib'] = None\n"  # every import of matplotlib fails
            "import generate, plot, train\n"
            f"sys.exit(generate.main(['--checkpoint', {run_dir!r}, '--max_new_tokens', '5']))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "sample 1 of 1" in result.stdout, result.stderr


# ----------------------------------------------------------------------------- python plot.py RUN

@pytest.fixture(scope="module")
def events_dir(tmp_path_factory):
    """A run folder with TensorBoard events as train.py writes them: train/loss every 10 steps, val/loss every 50."""
    from torch.utils.tensorboard import SummaryWriter
    folder = tmp_path_factory.mktemp("events")
    with SummaryWriter(str(folder)) as writer:
        for step in range(10, 101, 10):
            writer.add_scalar("train/loss", 4.0 - step / 50, step)
            if step % 50 == 0:
                writer.add_scalar("val/loss", 4.1 - step / 50, step)
            writer.add_scalar("lr", 1e-3, step)
    return str(folder)


def test_plot_cli_draws_the_loss_curves(events_dir, tmp_path, capsys):
    curves = plot.losses(events_dir)
    assert list(curves) == ["train/loss", "val/loss"]
    assert curves["train/loss"][0] == list(range(10, 101, 10)) and curves["val/loss"][0] == [50, 100]
    assert curves["val/loss"][1] == pytest.approx([3.1, 2.1])
    assert plot.main([events_dir]) == 0
    assert capsys.readouterr().out == f"wrote {os.path.join(events_dir, 'loss.png')}\n"
    with open(os.path.join(events_dir, "loss.png"), "rb") as f:
        assert png_size(f.read()) == (700, 400)
    assert plot.main([events_dir, "--output", str(tmp_path / "plots" / "loss.png")]) == 0
    assert os.listdir(tmp_path / "plots") == ["loss.png"]


def test_loss_curves_of_a_resumed_run_drop_what_the_resume_purged(tmp_path):
    from torch.utils.tensorboard import SummaryWriter
    with SummaryWriter(str(tmp_path)) as writer:  # interrupted after step 80, its last checkpoint at step 50
        for step in range(10, 81, 10):
            writer.add_scalar("train/loss", 3.0, step)
    with SummaryWriter(str(tmp_path), purge_step=50) as writer:  # as train.py resumes: from step 50 again
        for step in range(60, 101, 10):
            writer.add_scalar("train/loss", 2.0, step)
    steps, values = plot.losses(str(tmp_path))["train/loss"]  # steps >= 50 of the first run are gone, as in TensorBoard
    assert steps == [10, 20, 30, 40, 60, 70, 80, 90, 100] and values == [3.0] * 4 + [2.0] * 5


def test_plot_cli_bad_input(events_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        plot.main(["--help"])
    assert "RUN" in (out := capsys.readouterr().out) and "74 the picture could not be written" in out
    with pytest.raises(SystemExit) as exit_code:
        plot.main([])
    assert exit_code.value.code == 2 and one_error_line(capsys.readouterr().err, "RUN")
    from torch.utils.tensorboard import SummaryWriter
    (tmp_path / "empty").mkdir()
    with SummaryWriter(str(tmp_path / "no_loss")) as writer:
        writer.add_scalar("lr", 1e-3, 1)
    (tmp_path / "file").write_text("")
    cases = [([str(tmp_path / "missing")], 2, "is not a folder"),
             ([str(tmp_path / "empty")], 2, "holds no TensorBoard events"),
             ([str(tmp_path / "no_loss")], 2, "holds no training loss yet"),
             ([events_dir, "--output", str(tmp_path / "loss.svg")], 2, "is not a .png file"),
             ([events_dir, "--output", str(tmp_path / "file" / "loss.png")], 74, "is a file, not a folder")]
    before = sorted(os.listdir(tmp_path))
    for args, code, message in cases:
        assert plot.main(args) == code, args
        err = capsys.readouterr().err
        assert one_error_line(err, message), err
    assert sorted(os.listdir(tmp_path)) == before  # nothing written, no temporary file left


# ----------------------------------------------------------------------------- the notebook's cells, run here

def first_cell(monkeypatch, folder):
    """The notebook's first cell (its %magic left out) run in this process from folder, as a kernel started there
    runs it -> its names, `display` collecting what later cells show in names["displayed"]."""
    monkeypatch.chdir(folder)
    monkeypatch.delenv("MICROGPT_RUN", raising=False)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the cell puts the repository first; undone afterwards
    displayed = []
    names = {"display": displayed.append, "displayed": displayed}
    source = read_notebook().cells[1].source
    exec("\n".join(line for line in source.splitlines() if not line.startswith("%")), names)
    return names


def code_cell(call):
    """The source of the notebook's one code cell that makes the call."""
    found = [c.source for c in read_notebook().cells if c.cell_type == "code" and call in c.source]
    assert len(found) == 1, call
    return found[0]


def test_notebook_finds_the_repository_from_its_folder_or_the_repository(monkeypatch):
    assert first_cell(monkeypatch, os.path.join(ROOT, "notebooks"))["ROOT"] == ".."
    assert first_cell(monkeypatch, ROOT)["ROOT"] == "."


def test_notebook_looks_inside_the_newest_run_or_says_how_to_train_one(tmp_path, monkeypatch, capsys):
    (tmp_path / "notebooks").mkdir()  # a checkout without a run yet, the notebook opened in notebooks/
    names = first_cell(monkeypatch, tmp_path / "notebooks")
    assert names["RUN"] is None and names["ROOT"] == ".."
    exec(code_cell("loss_figure("), names)
    assert capsys.readouterr().out == ("This cell cannot run: there is no trained model in runs/ yet: run `python "
                                       "train.py --preset cpu-speedrun` in the repository's folder (a few minutes on a "
                                       "CPU), then this cell again\n")
    assert names["displayed"] == []
    # the quick run's folder, named after the text it trained on; the newest run folder wins, as in generate.py
    for age, (name, checkpoint) in enumerate([("tinyshakespeare-gpt-micro", "best.pt"), ("mine", "notes.txt"),
                                              ("shakespeare_gutenberg-gpt-micro", "last.pt")]):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / checkpoint).write_bytes(b"")
        os.utime(tmp_path / "runs" / name / checkpoint, (1e9 + age, 1e9 + age))
    assert names["trained_run"]() == os.path.join("..", "runs", "shakespeare_gutenberg-gpt-micro")
    os.utime(tmp_path / "runs" / "tinyshakespeare-gpt-micro" / "best.pt")  # now
    assert names["trained_run"]() == os.path.join("..", "runs", "tinyshakespeare-gpt-micro")
    names["RUN"] = "elsewhere"  # set in the first cell (or MICROGPT_RUN): that folder, whatever runs/ holds
    assert names["trained_run"]() == "elsewhere"


def val_loss(step):
    return 2.6 + abs(step - 140) / 100  # lowest at step 140, then rising: the text learned by heart


def write_events(folder, val_steps):
    """TensorBoard events as train.py writes them: train/loss every 10 steps up to 200, val/loss at val_steps."""
    from torch.utils.tensorboard import SummaryWriter
    with SummaryWriter(str(folder)) as writer:
        for step in range(1, 201):
            if step % 10 == 0:
                writer.add_scalar("train/loss", 4.0 - step / 100, step)
            if step in val_steps:
                writer.add_scalar("val/loss", val_loss(step), step)
    return str(folder)


@pytest.mark.parametrize("val_steps", [[], [200], [100, 200], list(range(5, 201, 5))],
                         ids=["none", "one", "two", "forty"])
def test_notebook_draws_the_validation_loss_as_a_curve_with_a_dot_per_evaluation(val_steps, tmp_path, monkeypatch,
                                                                                 capsys):
    names = first_cell(monkeypatch, os.path.join(ROOT, "notebooks"))
    names["RUN"] = write_events(tmp_path / "run", val_steps)
    exec(code_cell("loss_figure("), names)
    fig, = names["displayed"]
    lines = {line.get_label(): line for line in fig.axes[0].lines}
    assert list(lines["training"].get_xdata()) == list(range(10, 201, 10))
    out = capsys.readouterr().out
    if not val_steps:
        assert "validation" not in lines and out == ("no validation loss yet: train.py measures it every "
                                                     "--eval_interval steps and at the end\n")
        return
    validation = lines["validation"]
    assert list(validation.get_xdata()) == val_steps and validation.get_ydata() == pytest.approx(
        [val_loss(step) for step in val_steps])
    assert validation.get_marker() == "o" and validation.get_linestyle() == "-"  # a line through dots, one or many
    legend = {text.get_text(): handle for text, handle in zip(fig.axes[0].get_legend().get_texts(),
                                                               fig.axes[0].get_legend().legend_handles)}
    assert legend["validation"].get_marker() == "o"
    lowest = min(val_steps, key=val_loss)  # 200, 100, 140
    assert out == f"validation loss at {len(val_steps)} evaluation(s): last 3.200 (step 200), lowest " \
                  f"{val_loss(lowest):.3f} (step {lowest}, the model in best.pt)\n"


# ----------------------------------------------------------------------------- the notebook, run top to bottom

@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
    """A run folder of train.py: a small model (2 layers, 4 heads, 64 wide) trained for 100 steps in ~10 s on a
    text that has the notebook's prompt's characters."""
    folder = tmp_path_factory.mktemp("trained")
    text = folder / "text.txt"
    with open(corpus, encoding="utf-8") as f:
        text.write_text(f.read() + "\n" + TEXT, encoding="utf-8")
    out = folder / "run"
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), "--txt_file", str(text), "--out_dir", str(out),
         "--n_layer", "2", "--n_head", "4", "--n_embd", "64", "--block_size", "64", "--batch_size", "16",
         "--learning_rate", "3e-3", "--min_lr", "3e-4", "--warmup_steps", "10", "--max_steps", "100",
         "--eval_interval", "50", "--eval_iters", "4", "--log_interval", "10", "--sample_length", "0", "--dropout", "0",
         "--no-use_flash_attn", "--device", "cpu", "--precision", "fp32"],
        env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return str(out)


def execute(folder, run, monkeypatch, where="notebooks"):
    """Run the notebook of folder (a repository) top to bottom in a fresh kernel started in its folder where (as
    Jupyter and VS Code start it: notebooks/; "": the repository's) -> (notebook, seconds)."""
    monkeypatch.setenv("MICROGPT_RUN", run)
    nb = read_notebook(folder)
    start = time.monotonic()
    NotebookClient(nb, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": os.path.join(folder, where)}}).execute()
    return nb, time.monotonic() - start


def outputs(cell):
    """(printed text, PNG images) of an executed cell."""
    text = "".join(o.text for o in cell.outputs if o.output_type == "stream")
    images = [o.data["image/png"] for o in cell.outputs if "image/png" in o.get("data", {})]
    return text, [base64.b64decode(image) for image in images]


@pytest.mark.slow
def test_notebook_runs_top_to_bottom_on_the_solution(trained, monkeypatch):
    nb, seconds = execute(ROOT, trained, monkeypatch)  # a cell that raises fails the test here
    assert seconds < 120
    cells = [c for c in nb.cells if c.cell_type == "code"]
    for cell in cells:
        text, images = outputs(cell)
        assert "This cell" not in text, (cell.source, text)  # no stub, no missing model
        assert len(images) == sum(cell.source.count(call) for call in FIGURES), cell.source
        for image in images:
            width, height = png_size(image)
            assert width >= 200 and height >= 200 and len(image) > 5000, cell.source
    assert sum(len(outputs(c)[1]) for c in cells) == 8
    assert any("causal_mask and attention_probs: as above" in outputs(c)[0] for c in cells)
    assert any(re.fullmatch(r"validation loss at 2 evaluation\(s\): last \d\.\d{3} \(step 100\), lowest \d\.\d{3} "
                            r"\(step (50|100), the model in best\.pt\)\n", outputs(c)[0])
               for c in cells)  # the trained run evaluated at steps 50 and 100


@pytest.mark.slow
def test_notebook_in_the_release_names_the_todos_it_needs(trained, tmp_path, monkeypatch):
    release.write_tree(release.student_files(), str(tmp_path))
    nb, _ = execute(str(tmp_path), trained, monkeypatch, where="")  # opened in the repository's folder this time
    stubbed_cells = 0
    for cell in (c for c in nb.cells if c.cell_type == "code"):
        text, images = outputs(cell)
        if "with needs(" in cell.source and "with needs():" not in cell.source:
            assert "is still a stub: write it" in text and not images, (cell.source, text)
            stubbed_cells += 1
        else:  # what needs none of the student's code works in the release too
            assert "This cell" not in text and len(images) == sum(cell.source.count(call) for call in FIGURES)
    assert stubbed_cells == 6


@pytest.mark.slow
def test_attention_map_and_loss_curves_of_a_trained_run(trained, tmp_path):
    out = tmp_path / "attn.png"
    result = subprocess.run([sys.executable, "generate.py", "--checkpoint", trained, "--prompt", "ROMEO:",
                             "--attention_map", str(out), "--max_new_tokens", "20"], cwd=ROOT, env=ENV,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "ROMEO:" in result.stdout, result.stderr
    assert png_size(out.read_bytes())[1] > 2 * 200  # a row of maps per layer
    result = subprocess.run([sys.executable, "plot.py", trained], cwd=ROOT, env=ENV, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    with open(os.path.join(trained, "loss.png"), "rb") as f:
        assert png_size(f.read()) == (700, 400)
    curves = plot.losses(trained)  # the tags train.py writes
    assert curves["train/loss"][0] == list(range(10, 101, 10)) and curves["val/loss"][0] == [50, 100]
    assert curves["train/loss"][1][-1] < curves["train/loss"][1][0] - 1  # it learned
    result = subprocess.run([sys.executable, "plot.py", str(tmp_path / "missing")], cwd=ROOT, env=ENV,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and one_error_line(result.stderr, "is not a folder"), result.stderr  # no traceback
