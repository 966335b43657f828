"""The real commands end to end on CPU: train -> evaluate -> predict, and their errors."""

import json
import logging
import os
import re
import subprocess
import warnings
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from helpers import FULLRES, REPO, assert_no_lesion_leak, fake_checkpoint, make_ham_folder, write_image
from lesionkit import CLASSES
from lesionkit.cli import main
from lesionkit.train.loop import quiet_lightning

SMOKE = str(REPO / "configs" / "smoke.yaml")
DECISIONS = ",out_of_distribution,ood_score,refer,refer_threshold,refer_sensitivity"  # predict's CSV columns


def train(data: Path, out: Path, *extra: str) -> int:
    return main(["train", "--config", SMOKE, "--data-dir", str(data), "--out", str(out), *extra])


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    data = make_ham_folder(root / "ham", lesions_per_class=4)
    assert train(data, root / "run", "--set", "split.test_fraction=0.25") == 0
    return data, root / "run"


def check_run_folder(run: Path, data: Path) -> dict:
    for name in ("config.yaml", "split.csv", "metrics.csv", "report.json", "report.md",
                 "checkpoints/best.ckpt", "checkpoints/last.ckpt"):
        assert (run / name).is_file(), name
    split = pd.read_csv(run / "split.csv")
    assert list(split.columns) == ["image_id", "lesion_id", "dx", "split"]
    assert_no_lesion_leak(split, data / "HAM10000_metadata.csv")
    epochs = pd.read_csv(run / "metrics.csv")
    assert list(epochs["phase"]) == ["head", "finetune"]
    assert {"train_loss", "val_loss", "val_accuracy", "val_balanced_accuracy"} <= set(epochs.columns)
    report = json.loads((run / "report.json").read_text())
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc", "per_class", "confusion_matrix"):
        assert key in report
    assert list(report["per_class"]) == list(CLASSES)
    assert {"precision", "recall", "f1", "auc", "support"} <= set(report["per_class"]["mel"])
    assert report["confusion_matrix"]["classes"] == list(CLASSES)
    assert report["n_images"] == (split["split"] == "val").sum()
    # The best checkpoint's validation balanced accuracy is the best epoch's.
    assert report["balanced_accuracy"] == pytest.approx(epochs["val_balanced_accuracy"].max(), abs=1e-4)
    return report


def test_synthetic_run_writes_the_contract(synthetic_run):
    data, run = synthetic_run
    check_run_folder(run, data)
    assert (run / "test" / "report.json").is_file()
    checkpoint = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)
    meta = checkpoint["hyper_parameters"]
    assert meta["model_name"] == "tf_efficientnet_lite1" and meta["classes"] == list(CLASSES)
    assert meta["preprocessing"]["mean"] == [0.5, 0.5, 0.5] and meta["preprocessing"]["height"] == 96


def test_evaluate_on_a_split_part(synthetic_run, tmp_path, capsys):
    data, run = synthetic_run
    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(run / "checkpoints" / "best.ckpt"), "--data-dir", str(data),
                 "--split-file", str(run / "split.csv"), "--split", "test", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    same = json.loads((run / "test" / "report.json").read_text())
    assert report["balanced_accuracy"] == pytest.approx(same["balanced_accuracy"])
    assert "balanced accuracy" in capsys.readouterr().out
    assert len(pd.read_csv(out / "predictions.csv")) == report["n_images"]


def test_evaluate_reads_the_image_cache_training_left(synthetic_run, tmp_path, monkeypatch):
    """A part of a run's split is read from the run's image cache: no image is decoded (neither by the loader nor
    by building a cache anew), every evaluated picture comes out of the cache training built, and the report is
    the one training wrote for that part."""
    import lesionkit.data.cache
    import lesionkit.data.datasets
    import lesionkit.data.images
    import lesionkit.evaluate.evaluation

    data, run = synthetic_run
    cached = sorted((Path(os.environ["XDG_CACHE_HOME"]) / "lesionkit").glob("*.npy"))
    assert cached, "training left no image cache: the test proves nothing"
    stamps = {path: path.stat().st_mtime_ns for path in cached}

    def decoded(path, *args):
        raise AssertionError(f"{path} was decoded, not read from the cache")
    # Wherever a picture can be decoded: the loader's uncached path, and a cache built anew (decode_cover, which
    # falls back on load_image for other formats).
    for module in (lesionkit.data.datasets, lesionkit.data.cache, lesionkit.data.images):
        monkeypatch.setattr(module, "load_image", decoded)
    monkeypatch.setattr(lesionkit.data.cache, "decode_cover", decoded)

    found, served = [], []
    real_find, real_image = lesionkit.data.cache.find_cache, lesionkit.data.cache.ImageCache.image

    def find_cache(*args, **kwargs):
        found.append(real_find(*args, **kwargs))
        return found[-1]

    def image(self, image_id):
        served.append((self.path, image_id))
        return real_image(self, image_id)
    monkeypatch.setattr(lesionkit.evaluate.evaluation, "find_cache", find_cache)
    monkeypatch.setattr(lesionkit.data.cache.ImageCache, "image", image)

    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(run / "checkpoints" / "best.ckpt"), "--data-dir", str(data),
                 "--split-file", str(run / "split.csv"), "--split", "test", "--workers", "0", "--out", str(out)]) == 0
    assert len(found) == 1 and found[0] is not None, "evaluate did not find training's cache"
    assert found[0].path in stamps, f"{found[0].path} is not a cache training left ({cached})"
    assert {path: path.stat().st_mtime_ns for path in cached} == stamps, "the cache was rewritten"
    assert sorted((Path(os.environ["XDG_CACHE_HOME"]) / "lesionkit").glob("*.npy")) == cached, "a cache was built"
    split = pd.read_csv(run / "split.csv")
    tested = split.loc[split["split"] == "test", "image_id"]
    assert sorted(served) == sorted((found[0].path, image_id) for image_id in tested), \
        "every evaluated image, once each, from training's cache"
    assert len(pd.read_csv(out / "predictions.csv")) == len(tested)

    report = json.loads((out / "report.json").read_text())
    trained = json.loads((run / "test" / "report.json").read_text())
    # The very report, but for where it was asked from (evaluate names its split file and part) and its batch size.
    assert {k: v for k, v in report.items() if k not in ("data", "settings")} == \
        {k: v for k, v in trained.items() if k not in ("data", "settings")}
    assert {k: report["data"].get(k) for k in trained["data"]} == trained["data"]
    assert {**report["settings"], "batch_size": None} == {**trained["settings"], "batch_size": None}


def test_evaluate_and_predict_count_every_image_on_their_progress_bar(synthetic_run, tmp_path, monkeypatch):
    import tqdm

    import lesionkit.evaluate.evaluation
    import lesionkit.serve.predict

    bars = []

    class Recorded(tqdm.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(self)
    monkeypatch.setattr(lesionkit.evaluate.evaluation, "tqdm", Recorded)
    monkeypatch.setattr(lesionkit.serve.predict, "tqdm", Recorded)
    data, run = synthetic_run
    checkpoint = str(run / "checkpoints" / "best.ckpt")
    assert main(["evaluate", "--checkpoint", checkpoint, "--data-dir", str(data), "--split-file",
                 str(run / "split.csv"), "--split", "test", "--tta", "--out", str(tmp_path / "eval")]) == 0
    assert main(["predict", "--checkpoint", checkpoint, "--format", "json", str(data)]) == 0
    tested = (pd.read_csv(run / "split.csv")["split"] == "test").sum()
    assert [(bar.n, bar.total, bar.desc) for bar in bars] == [
        (tested, tested, "Evaluating, 8 views each"), (len(list(data.rglob("*.jpg"))),) * 2 + ("Predicting",)]


def test_predict_any_image_and_report_the_unreadable(synthetic_run, tmp_path, capsys):
    _, run = synthetic_run
    images = tmp_path / "mine"
    write_image(images / "big.jpg", 1, size=(600, 450))
    write_image(images / "alpha.png", 2, size=(90, 70), mode="RGBA")
    write_image(images / "gray.jpg", 3, size=(120, 300), mode="L")
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    code = main(["predict", "--checkpoint", str(run / "checkpoints" / "best.ckpt"), "--format", "json", str(images)])
    captured = capsys.readouterr()
    assert code == 1 and "broken.jpg" in captured.err
    results = json.loads(captured.out)
    assert sorted(Path(r["image"]).name for r in results) == ["alpha.png", "big.jpg", "gray.jpg"]
    for r in results:
        assert sum(r["probabilities"].values()) == pytest.approx(1, abs=1e-5)
        assert r["prediction"] == max(r["probabilities"], key=r["probabilities"].get)

    assert main(["predict", "--checkpoint", str(run / "checkpoints" / "best.ckpt"), "--format", "csv",
                 str(images / "big.jpg")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "image,prediction," + ",".join(CLASSES) + DECISIONS and len(lines) == 2


def test_training_fits_what_tells_predict_when_not_to_answer(synthetic_run, capsys):
    """The validation pass at the end of training fits the whole record (temperature, conformal scores,
    out-of-distribution detector, melanoma threshold); the reports say how each fares; predict answers with it."""
    data, run = synthetic_run
    entry = json.loads((run / "checkpoints" / "temperature.json").read_text())["best.ckpt"]
    validation = (pd.read_csv(run / "split.csv")["split"] == "val").sum()
    assert len(entry["conformal"]["scores"]) == validation and entry["ood"]["images"] == validation
    assert entry["melanoma"]["sensitivity"] == 0.9 and entry["temperature"] > 0
    for report in (run / "report.json", run / "test" / "report.json"):
        sections = json.loads(report.read_text())
        assert sections["conformal"]["target_coverage"] == 0.9 and sections["out_of_distribution"]["threshold"]
        assert sections["referral"]["threshold"] == entry["melanoma"]["threshold"]
    image = str(next(data.rglob("*.jpg")))
    checkpoint = str(run / "checkpoints" / "best.ckpt")
    assert main(["predict", "--checkpoint", checkpoint, "--format", "json", "--coverage", "0.9", image]) == 0
    (answer,) = json.loads(capsys.readouterr().out)
    assert answer["prediction"] in answer["prediction_set"] and isinstance(answer["out_of_distribution"], bool)
    assert answer["refer"] == (answer["probabilities"]["mel"] >= entry["melanoma"]["threshold"])
    assert answer["refer_threshold"] == entry["melanoma"]["threshold"] and answer["refer_sensitivity"] == 0.9
    assert main(["predict", "--checkpoint", checkpoint, "--coverage", "0.9", image]) == 0
    header = capsys.readouterr().out.splitlines()[0].split()
    assert header[-4:] == ["ood", "ood_score", f"refer(mel>={entry['melanoma']['threshold']:.3g}@sens0.9)",
                           "set@0.9"]


def test_predict_writes_answers_as_they_come_and_ctrl_c_keeps_them(synthetic_run, tmp_path, capsys, monkeypatch):
    import lesionkit.serve.predict

    data, run = synthetic_run
    real, calls = lesionkit.serve.predict.assess_batch, []

    def interrupted_after_one_batch(*args):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real(*args)
    monkeypatch.setattr(lesionkit.serve.predict, "assess_batch", interrupted_after_one_batch)
    code = main(["predict", "--checkpoint", str(run / "checkpoints" / "best.ckpt"), "--format", "json",
                 "--batch-size", "4", str(data)])
    captured = capsys.readouterr()
    assert code == 130 and "interrupted" in captured.err
    assert len(json.loads(captured.out)) == 4, "the first batch's answers, as valid JSON"


def test_predict_into_a_reader_that_stops_early_ends_quietly(synthetic_run):
    """`lesionkit predict ... | head -1`: the answers stream, so the pipe closes mid-run; no traceback."""
    data, run = synthetic_run
    command = [sys.executable, "-m", "lesionkit.cli", "predict", "--checkpoint", str(run / "checkpoints" / "best.ckpt"),
               "--format", "csv", "--batch-size", "1", str(data)]
    reader = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert reader.stdout.readline().startswith("image,prediction")
    reader.stdout.close()
    err = reader.stderr.read()
    assert reader.wait(timeout=120) == 1 and "Traceback" not in err and "BrokenPipe" not in err


def test_resume_continues_a_run_and_a_finished_folder_is_not_overwritten(synthetic_run, capsys):
    data, run = synthetic_run
    assert train(data, run) == 1
    assert "already holds a run" in capsys.readouterr().err
    before = pd.read_csv(run / "metrics.csv")
    assert main(["train", "--out", str(run), "--resume"]) == 0
    assert pd.read_csv(run / "metrics.csv").iloc[: len(before)].equals(before)


@pytest.mark.parametrize("argv, message", [
    (["train", "--config", SMOKE, "--out", "{tmp}/r", "--data-dir", "{tmp}/none"], "does not exist: check --data-dir"),
    (["train", "--config", SMOKE, "--out", "{tmp}/r"], "pass --data-dir"),
    (["train", "--config", SMOKE, "--out", "{tmp}/r", "--data-dir", "{tmp}", "--set", "train.epochs=3"],
     "unknown setting train.epochs"),
    (["train", "--out", "{tmp}/r", "--resume"], "nothing to resume"),
    (["predict", "--checkpoint", "{tmp}/none.ckpt", "{tmp}"], "does not exist: check --checkpoint"),
    (["predict", "--checkpoint", "{tmp}/fake.ckpt", "{tmp}"], "cannot load checkpoint"),
    (["evaluate", "--checkpoint", "{tmp}/fake.ckpt", "--data-dir", "{tmp}/none"], "does not exist"),
])
def test_errors_say_what_to_change(tmp_path, capsys, argv, message):
    (tmp_path / "fake.ckpt").write_bytes(b"garbage")
    assert main([a.format(tmp=tmp_path) for a in argv]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("argv", [["predict", "{tmp}"], ["explain", "{tmp}", "--out", "{tmp}/out"],
                                  ["evaluate", "--checkpoint", "{tmp}/none.ckpt"], ["serve"]])
@pytest.mark.parametrize("device, gpus, message", [
    ("cuda", 0, "--device cuda: no CUDA GPU is visible to PyTorch on this machine; use --device cpu"),
    ("cuda:1", 1, "--device cuda:1: PyTorch sees 1 CUDA GPU(s) on this machine, cuda:0 to cuda:0; give one of "
                  "those, or --device cpu"),
    ("tpu", 1, "--device tpu: give cpu, cuda or cuda:N"),
])
def test_a_device_this_machine_lacks_is_refused_before_loading(tmp_path, capsys, monkeypatch, argv, device, gpus,
                                                               message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    assert main([a.format(tmp=tmp_path) for a in argv] + ["--device", device]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_predict_with_onnx_refuses_a_gpu_it_would_not_use(tmp_path, capsys):
    assert main(["predict", "--checkpoint", str(tmp_path / "m.onnx"), str(tmp_path), "--device", "cuda"]) == 1
    assert "--device cuda: onnxruntime runs on the CPU here; leave out --device" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["predict", "{tmp}", "--batch-size", "0"], "--batch-size 0: must be at least 1"),
    (["evaluate", "--checkpoint", "{tmp}/m.ckpt", "--data-dir", "{tmp}", "--batch-size", "-1"],
     "--batch-size -1: must be at least 1"),
    (["evaluate", "--checkpoint", "{tmp}/m.ckpt", "--data-dir", "{tmp}", "--workers", "-2"],
     "--workers -2: must be at least 0"),
])
def test_counts_below_their_least_are_refused(tmp_path, capsys, argv, message):
    assert main([a.format(tmp=tmp_path) for a in argv]) == 1
    assert message in capsys.readouterr().err


def test_a_run_folder_answers_with_its_best_checkpoint(tmp_path, capsys):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    best = fake_checkpoint(tmp_path / "run" / "checkpoints" / "best.ckpt")
    image = write_image(tmp_path / "x.jpg", 0)
    answers = []
    for checkpoint in (tmp_path / "run", best):
        assert main(["predict", "--checkpoint", str(checkpoint), "--format", "json", str(image)]) == 0
        answers.append(json.loads(capsys.readouterr().out))
    assert answers[0] == answers[1]


def test_an_unknown_flag_is_named_with_the_usage_of_its_command(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["predict", "x.jpg", "--bogus"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "usage: lesionkit predict" in err
    assert "lesionkit predict: error: unrecognized arguments: --bogus" in err


def test_console_script_help():
    for args in ([], ["train"], ["evaluate"], ["predict"], ["data", "check"], ["download"]):
        result = subprocess.run([sys.executable, "-m", "lesionkit.cli", *args, "--help"], capture_output=True,
                                text=True)
        assert result.returncode == 0 and "usage: lesionkit" in result.stdout


# The real shared copy: two images are deliberately absent.

def test_data_check_on_the_real_copy_names_the_absent_images(real_data, capsys):
    assert main(["data", "check", "--data-dir", str(real_data)]) == 1
    out = capsys.readouterr().out
    assert "ISIC_0029861" in out and "ISIC_0029938" in out and "6705" in out


def test_lightning_deprecation_notice_about_torch_is_filtered():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with quiet_lightning():
            warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)`",
                          DeprecationWarning)
            warnings.warn("another deprecation", DeprecationWarning)
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated: seen again once the run is over",
                      DeprecationWarning)
    assert [str(w.message) for w in seen] == [
        "another deprecation", "`isinstance(treespec, LeafSpec)` is deprecated: seen again once the run is over"]


def test_real_smoke_run_refuses_then_trains_and_predicts_a_fullres_original(real_data, tmp_path, capfd, caplog):
    run = tmp_path / "run"
    assert train(real_data, run) == 1
    err = capfd.readouterr().err
    assert "2 listed image(s)" in err and "--allow-missing" in err and "ISIC_0029861" in err

    lightning = logging.getLogger("lightning.pytorch")  # its own stderr handler, which capfd does not see
    lightning.addHandler(caplog.handler)
    try:
        assert train(real_data, run, "--allow-missing") == 0
    finally:
        lightning.removeHandler(caplog.handler)
    assert "GPU available" in caplog.text  # the handler saw Lightning's messages...
    assert "Tip:" not in caplog.text and "litlogger" not in caplog.text  # ...but not its advertisement
    # One 96x128 image through Lite1, not Lightning's 0: in its log table, or in rich's where rich is installed.
    summary = caplog.text + capfd.readouterr().out
    assert re.search(r"\b245 M +Total Flops|Total FLOPs: 245 M", summary)
    report = check_run_folder(run, real_data)
    assert set(pd.read_csv(run / "skipped.csv")["image_id"]) == {"ISIC_0029861", "ISIC_0029938"}
    assert report["skipped_images"] == ["ISIC_0029861", "ISIC_0029938"]
    capfd.readouterr()

    original = sorted((FULLRES / "HAM10000_images_part_1").glob("*.jpg"))[0]
    assert main(["predict", "--checkpoint", str(run / "checkpoints" / "best.ckpt"), "--format", "json",
                 str(original)]) == 0
    (result,) = json.loads(capfd.readouterr().out)
    assert len(result["probabilities"]) == 7 and sum(result["probabilities"].values()) == pytest.approx(1, abs=1e-5)
