"""Interrupted runs lose nothing: kill -9, Ctrl-C, a full disk, a NaN loss, a second run into the same folder.

Every run here is the same tiny job (timm's 100k-parameter ``test_efficientnet``, 48x64 px, ~5 s on 2 CPU
cores) with the same seed, so an interrupted-then-resumed run must end exactly where the uninterrupted reference
ends: same metrics.csv to the last bit, same report. The head phase's rate is too low to change a prediction,
so its early stopping (patience 1) always ends it after two of its three epochs: resuming must respect that too.
"""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from helpers import REPO, make_ham_folder
from lesionkit.cli import main
from lesionkit.train.runfolder import run_lock

TINY = """\
data: {image_size: [48, 64], batch_size: 8, num_workers: 0}
split: {val_fraction: 0.25}
model: {name: test_efficientnet, weights: none}
train:
  accelerator: cpu
  phases:
    - {name: head, epochs: 3, lr: 1.0e-6, unfreeze: 0, patience: 1}
    - {name: finetune, epochs: 1, lr: 1.0e-3, unfreeze: 1}
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    data = make_ham_folder(root / "ham", lesions_per_class=4)
    (root / "tiny.yaml").write_text(TINY)
    reference = root / "reference"
    assert main(train_args(root, data, reference)) == 0
    return root, data, reference


def train_args(root: Path, data: Path, out: Path) -> list[str]:
    return ["train", "--config", str(root / "tiny.yaml"), "--data-dir", str(data), "--out", str(out)]


def scores(run: Path) -> dict:
    """What must match between two runs: the epoch table and the report's numbers (paths aside)."""
    report = json.loads((run / "report.json").read_text())
    return {"metrics": (run / "metrics.csv").read_text(), "split": (run / "split.csv").read_text(),
            **{k: report[k] for k in ("balanced_accuracy", "accuracy", "macro_auc", "confusion_matrix", "per_class")}}


def start(log: Path, argv: list[str]) -> subprocess.Popen:
    """``lesionkit ARGV`` in its own process, to be interrupted for real; stderr goes to ``log`` (a pipe
    nobody reads would fill up with progress bars and stall the run)."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    with log.open("w") as err:
        # A suite started in the background (`make test &`) passes Ctrl-C on as ignored, and Python then keeps
        # ignoring it: the run must hear it as a user's terminal would send it.
        process = subprocess.Popen([sys.executable, "-m", "lesionkit.cli", *argv], env=env,
                                   stdout=subprocess.DEVNULL, stderr=err,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    process.log = log
    return process


def wait_for(condition, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the run ended too soon: {process.log.read_text()[-2000:]}"
        assert time.monotonic() < deadline, f"nothing after {timeout} s"
        time.sleep(0.01)


def test_same_seed_same_data_same_run(setup):
    root, data, reference = setup
    again = root / "again"
    assert main(train_args(root, data, again)) == 0
    assert scores(again) == scores(reference)
    provenance = json.loads((again / "provenance.json").read_text())
    assert provenance["seed"] == 42 and provenance["data"]["images"] == 56
    assert provenance["data"] == json.loads((reference / "provenance.json").read_text())["data"]
    assert provenance["versions"]["torch"] == torch.__version__.split("+")[0]
    # The processor, since the same recipe and seed give other figures on another one.
    assert torch.backends.cpu.get_cpu_capability() in provenance["hardware"]["processor"]
    assert provenance["hardware"]["gpus"] == [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def test_ctrl_c_then_kill_9_then_resume_ends_identically(setup):
    root, data, reference = setup
    run, last = root / "interrupted", root / "interrupted" / "checkpoints" / "last.ckpt"
    process = start(root / "first.log", train_args(root, data, run))
    wait_for(lambda: last.exists(), process)
    process.send_signal(signal.SIGINT)  # Ctrl-C: a clean stop that says how to go on
    process.wait(timeout=120)
    err = process.log.read_text()
    assert process.returncode == 130, err[-2000:]
    assert f"lesionkit train --out {run} --resume" in err and "Traceback" not in err
    assert torch.load(last, weights_only=True)["epoch"] >= 0

    stamp = last.stat().st_mtime_ns
    process = start(root / "second.log", ["train", "--out", str(run), "--resume"])
    wait_for(lambda: last.stat().st_mtime_ns != stamp, process)  # the resumed run wrote its next epoch
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (run / "report.json").exists(), "the run finished before the kill: the test proves nothing"
    # What the kill left behind is whole: the checkpoint loads, and no temporary file lies around.
    assert torch.load(last, weights_only=True)["epoch"] >= 0
    assert not list(run.rglob("*.tmp"))
    assert (run / ".lock").exists()  # the dead run's lock file does not block the resume

    assert main(["train", "--out", str(run), "--resume"]) == 0
    assert scores(run) == scores(reference)
    assert len(json.loads((run / "provenance.json").read_text())["resumed"]) == 2


def test_interrupted_between_phases_resumes_with_the_next_phase(setup, monkeypatch, capsys):
    root, data, reference = setup
    assert list(pd.read_csv(reference / "metrics.csv")["phase"]) == ["head", "head", "finetune"]  # stopped early
    from lesionkit.model.module import LesionClassifier

    set_phase = LesionClassifier.set_phase

    def interrupt_at_phase_2(self, index):
        if index == 1:
            raise KeyboardInterrupt
        set_phase(self, index)

    monkeypatch.setattr(LesionClassifier, "set_phase", interrupt_at_phase_2)
    run = root / "between"
    assert main(train_args(root, data, run)) == 130
    assert "--resume" in capsys.readouterr().err
    monkeypatch.setattr(LesionClassifier, "set_phase", set_phase)
    assert main(["train", "--out", str(run), "--resume"]) == 0
    assert scores(run) == scores(reference)
    assert sorted(p.name for p in (run / "logs" / "csv").iterdir()) == ["finetune", "head", "head-resumed"]


def test_resume_before_the_first_checkpoint_starts_over(setup):
    """kill -9 during the first epoch: the folder has its config (and split) but no checkpoint; --resume starts the
    run over and ends where the uninterrupted reference does."""
    root, data, reference = setup
    run = root / "early"
    config, last = run / "config.yaml", run / "checkpoints" / "last.ckpt"
    process = start(root / "early.log", train_args(root, data, run))
    wait_for(config.exists, process)  # written atomically, after the split and the image cache
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert not last.exists(), "the first checkpoint landed before the kill: the test proves nothing"
    assert not (run / "metrics.csv").exists() and (run / "split.csv").is_file()
    assert (run / ".lock").exists()  # the dead run's lock file does not block the resume

    assert main(["train", "--out", str(run), "--resume"]) == 0
    assert scores(run) == scores(reference)
    assert torch.load(last, weights_only=True)["epoch"] >= 0


def test_full_disk_fails_clearly_and_keeps_the_previous_checkpoint(setup, monkeypatch, capsys):
    root, data, reference = setup
    run = root / "full"
    real_replace, saves = os.replace, []

    def replace(src, dst):
        if str(dst).endswith("last.ckpt"):
            saves.append(dst)
            if len(saves) == 2:  # the second epoch's checkpoint: the disk is full
                raise OSError(errno.ENOSPC, "No space left on device", str(src))
        return real_replace(src, dst)

    monkeypatch.setattr("lesionkit.files.os.replace", replace)
    assert main(train_args(root, data, run)) == 1
    err = capsys.readouterr().err
    assert "the disk is full" in err and "last.ckpt" in err and "--resume" in err and "Traceback" not in err
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 0  # epoch 1 never landed
    assert not list(run.rglob("*.tmp"))
    monkeypatch.setattr("lesionkit.files.os.replace", real_replace)
    assert main(["train", "--out", str(run), "--resume"]) == 0
    assert scores(run) == scores(reference)


def test_nan_loss_stops_the_run_naming_the_step(setup, monkeypatch, capsys):
    root, data, _ = setup
    from lesionkit.model.module import LesionClassifier

    forward, calls = LesionClassifier.forward, []

    def poisoned(self, images):
        logits = forward(self, images)
        calls.append(self.training)
        return logits * float("nan") if self.training and sum(calls) == 7 else logits

    monkeypatch.setattr(LesionClassifier, "forward", poisoned)
    run = root / "nan"
    assert main(train_args(root, data, run)) == 1
    err = capsys.readouterr().err
    # Five steps per epoch: the seventh training batch is step 6, the second of epoch 1.
    assert "training loss is nan at step 6 (phase 'head', epoch 1, batch 1)" in err and "Traceback" not in err
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 0
    assert len(pd.read_csv(run / "metrics.csv")) == 1


def test_a_second_run_into_a_busy_folder_is_refused(setup, capsys):
    root, data, _ = setup
    busy = root / "busy"
    with run_lock(busy):
        assert main(train_args(root, data, busy)) == 1
    assert "in use by another lesionkit run" in capsys.readouterr().err
    assert sorted(p.name for p in busy.iterdir()) == [".lock"]  # the refused run wrote nothing
