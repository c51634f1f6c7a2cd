"""The README's "Your own model, start to finish" runs as written (issue 12.8): each bash block of
that section, verbatim, in a scratch folder holding what a user would bring — train.csv / test.csv
(text,label) and a LoRA adapter trained by a few lines of plain peft code, not by train.py
(issue 12.6) — with ``$MODEL`` the MiniLM folder that ``make setup`` installs.

Each command of a block is one of the project's console commands; it runs in this process, as the
installed command would: the function its console-script entry point names, called with the
command's arguments (what pip's wrapper does), in the scratch folder — without starting an
interpreter and importing torch for every line, and with digits-mlp's pretraining shared. That the
commands are on the PATH and start as programs is checked by running them there
(:func:`test_the_console_commands_are_installed_and_start`, and the wrong-base-model test)."""
import importlib.metadata
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Your own model, start to finish"


def section_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    body = text[text.index(SECTION):]
    body = body[: body.index("\n## ", len(SECTION))]
    return re.findall(r"```bash\n(.*?)```", body, flags=re.S)


def write_csvs(folder: Path) -> None:
    """Small Rotten Tomatoes CSVs in the user's format: text,label (label names, not ids)."""
    from flatlora import get_task

    task = get_task("rt-minilm")
    for split, name, n in (("train", "train.csv", 96), ("test", "test.csv", 32)):
        rows = [{"text": t, "label": task.label_names[e["label"]]}
                for t, e in zip(task.texts[split][:n], task.splits[split][:n])]
        pd.DataFrame(rows).to_csv(folder / name, index=False)


def train_adapter_with_plain_peft(model_dir: Path, csv: Path, out: Path) -> None:
    """What a user does without this project: a few lines of peft on the CSV, then save_pretrained."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    data = pd.read_csv(csv)
    labels = sorted(data["label"].unique())
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=len(labels))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                            task_type=TaskType.SEQ_CLS))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    for i in range(0, 64, 16):
        chunk = data.iloc[i : i + 16]
        batch = tok(list(chunk["text"]), padding=True, truncation=True, max_length=64, return_tensors="pt")
        y = torch.tensor([labels.index(v) for v in chunk["label"]])
        model(**batch, labels=y).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    (out / "labels.json").write_text('{"labels": ' + str(labels).replace("'", '"') + "}")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from flatlora.tasks import minilm_dir

    folder = tmp_path_factory.mktemp("user")
    write_csvs(folder)
    train_adapter_with_plain_peft(minilm_dir(), folder / "train.csv", folder / "my-adapter")
    env = {**os.environ, "MODEL": str(minilm_dir()),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return folder, env


def test_the_section_has_the_three_workflows():
    blocks = section_blocks()
    assert len(blocks) == 3 and "--task digits-mlp" in blocks[0] and "--task custom" in blocks[1]
    assert "--adapter" in blocks[2]


COMMANDS = {e.name: e for e in importlib.metadata.entry_points(group="console_scripts") if e.name.startswith("flatlora-")}


def block_commands(block: str) -> list[list[str]]:
    """The block's command lines as argument lists, as bash splits them: continuations joined,
    ``$VAR`` expanded from the environment, quotes removed."""
    return [shlex.split(os.path.expandvars(line)) for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def run_command(argv: list[str]) -> subprocess.CompletedProcess:
    """``argv`` as its console script runs it: the module its entry point names, run as ``__main__``
    (``sys.exit(main())``) with the command's arguments (helpers.run_script)."""
    import importlib.util

    from helpers import run_script

    assert argv[0] in COMMANDS, f"{argv[0]!r} is not one of the project's commands {sorted(COMMANDS)}"
    return run_script(importlib.util.find_spec(COMMANDS[argv[0]].module).origin, *argv[1:])


def test_the_console_commands_are_installed_and_start(workspace):
    """pip put each command on the PATH, naming the function the in-process runs call."""
    folder, env = workspace
    assert set(COMMANDS) == {"flatlora-train", "flatlora-probe", "flatlora-figures", "flatlora-study"}
    for name in COMMANDS:
        assert shutil.which(name, path=env["PATH"]) == str(Path(sys.executable).parent / name)
    r = subprocess.run(["flatlora-figures", "--help"], cwd=folder, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "--probes" in r.stdout, r.stderr


@pytest.mark.parametrize("index", [0, 1, 2], ids=["digits", "csv-minilm", "adapter-csv"])
def test_readme_workflow_runs_verbatim(workspace, index, monkeypatch, shared_digits_pretraining):
    folder, env = workspace
    block = section_blocks()[index]
    monkeypatch.chdir(folder)
    monkeypatch.setenv("MODEL", env["MODEL"])
    for argv in block_commands(block):
        r = run_command(argv)
        assert r.returncode == 0, f"{shlex.join(argv)} failed:\n{r.stderr[-3000:]}"
    probes = re.search(r"--out (\S+probes\.csv)", block).group(1)
    frame = pd.read_csv(folder / probes)
    assert (frame["measure"] == "eigenvalue").any()
    figures = re.findall(r"flatlora-figures .*--out (\S+)", block)[0]
    assert list((folder / figures).glob("*-lines.png")), r.stderr[-2000:]


def test_an_adapter_on_the_wrong_base_model_is_a_clear_error(workspace, tmp_path):
    """Issue 12.6: the adapter's saved shapes do not fit another base model: exit 2, one line, no output."""
    from transformers import BertConfig, BertForSequenceClassification

    folder, env = workspace
    BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=37)).save_pretrained(tmp_path / "other-base")
    r = subprocess.run(["flatlora-probe", "--base-model", str(tmp_path / "other-base"), "--adapter", "my-adapter",
                        "--data", "test.csv", "--out", str(tmp_path / "p.csv")], cwd=folder, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "does not belong to this base model" in r.stderr
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "p.csv.parts").exists()
