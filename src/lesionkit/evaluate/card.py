"""A model card for a trained run, in the sections of Mitchell et al. (2019), "Model Cards for Model Reporting",
with what dermatology reviewers ask of a skin-lesion classifier: the image modality, where the images came from
and how their diagnoses were confirmed, how the split keeps lesions apart, per-class and subgroup results with
intervals, calibration, conformal coverage, out-of-distribution behaviour, and the external tests run or not.

Everything comes from the run folder (``config.yaml``, ``provenance.json``, ``split.csv``, ``report.json`` and
``test/report.json``); what the folder does not hold is said to be missing, never filled in.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import yaml

from lesionkit import LesionkitError, __version__
from lesionkit.evaluate.render import markdown_table
from lesionkit.evaluate.report import HEADLINE, Report, load_report
from lesionkit.train.runfolder import describe

# HAM10000's dx_type: how each diagnosis was confirmed (Tschandl et al. 2018).
DX_TYPES = {"histo": "histopathology", "follow_up": "follow-up examination", "consensus": "expert consensus",
            "confocal": "in-vivo confocal microscopy"}
CLASS_NAMES = {"akiec": "actinic keratosis / intraepithelial carcinoma", "bcc": "basal cell carcinoma",
               "bkl": "benign keratosis-like lesion", "df": "dermatofibroma", "mel": "melanoma",
               "nv": "melanocytic nevus", "vasc": "vascular lesion"}


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _with_interval(report: Report, key: str) -> str:
    bounds = report.interval(key)
    return _pct(getattr(report, key)) + (f" ({_pct(bounds[0])} to {_pct(bounds[1])})" if bounds else "")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _metadata(provenance: dict, run: Path) -> pd.DataFrame | None:
    """The training metadata CSV the run recorded, where it can still be found."""
    recorded = provenance.get("data", {}).get("metadata")
    if not recorded:
        return None
    for candidate in (Path(recorded), run / recorded):
        if candidate.is_file():
            return pd.read_csv(candidate, dtype=str)
    return None


def model_card(run: Path, name: str | None = None) -> str:
    """The model card of the run in ``run`` (called ``name``, by default the folder's), as markdown."""
    report_path = run / "report.json"
    if not report_path.is_file():
        raise LesionkitError(f"{run} holds no report.json: pass a run folder written by `lesionkit train` (a run "
                             f"that finished)")
    report = load_report(report_path)
    test = load_report(run / "test" / "report.json") if (run / "test" / "report.json").is_file() else None
    config = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").is_file() else {}
    provenance = _read_json(run / "provenance.json")
    split = pd.read_csv(run / "split.csv", dtype=str) if (run / "split.csv").is_file() else None
    metadata = _metadata(provenance, run)
    model = config.get("model", {})
    pre = report.settings.get("preprocessing", {})
    lines = [f"# Model card: {name or run.name}", "",
             "A research tool, **not a medical device**: it has not been cleared or approved for clinical use and "
             "must not be used to diagnose, treat or triage anyone.", ""]

    lines += ["## Model details", "",
              f"- Network: `{model.get('name', report.context.get('model', 'unknown'))}` (timm), ImageNet weights "
              f"`{model.get('weights', 'unknown')}`, a head of {_pooling(model)} pooling, dropout "
              f"{model.get('dropout', 'n/a')} and a linear layer over 7 classes"
              + (f" that also reads {', '.join(model['metadata'])} through a small MLP (trained with each field "
                 f"withheld at random, so it also answers without them)" if model.get("metadata") else "") + ".",
              f"- Training: {len(config.get('train', {}).get('phases', []))} phase(s) "
              + ", ".join(f"{p['name']} ({p['epochs']} epochs at lr {p['lr']:g}, unfreeze {p['unfreeze']})"
                          for p in config.get("train", {}).get("phases", []))
              + f"; class weights {config.get('train', {}).get('class_weights', 'n/a')}; seed "
              f"{provenance.get('seed', 'n/a')}.",
              f"- Input: {pre.get('height', '?')}x{pre.get('width', '?')} px (height x width), scaled to cover and "
              f"centre-cropped, mean {pre.get('mean')} and std {pre.get('std')}.",
              f"- Written by lesionkit {provenance.get('lesionkit_version', __version__)}, commit "
              f"{provenance.get('git_commit') or 'unknown'}, on {provenance.get('time', 'an unknown date')}"
              + (f", trained on {describe(provenance['hardware'])}." if provenance.get("hardware") else "."),
              "- Licence of the weights: derived from HAM10000 (CC BY-NC 4.0): non-commercial use, with attribution.",
              ""]

    lines += ["## Intended use", "",
              "- For research and teaching on dermoscopic images of pigmented skin lesions: comparing methods, "
              "studying errors, calibration and explanations.",
              "- Out of scope: any clinical decision; clinical (non-dermoscopic) photos, histology or other body "
              "imaging; lesion types outside the 7 classes; populations unlike the training data (below).", ""]

    lines += ["## Factors", "",
              "- Image modality: **dermoscopy** (polarised and non-polarised dermatoscopes, 600x450 frames in "
              "HAM10000); other photos are outside what the model has seen (see out-of-distribution behaviour).",
              "- Diagnoses: " + ", ".join(f"{c} ({name})" for c, name in CLASS_NAMES.items()) + ".",
              "- Patient factors with results below: sex, age band, body site. Skin type (Fitzpatrick) is not "
              "recorded in HAM10000; its images come mostly from fair-skinned patients in Austria and Australia, "
              "so performance on darker skin is unknown.", ""]

    lines += ["## Metrics", "",
              "Balanced accuracy (mean per-class recall) leads: always answering nv scores about 67% accuracy "
              "on HAM10000 but 14% balanced accuracy. Melanoma sensitivity, macro AUC (one-vs-rest) and macro F1 "
              "follow; 95% intervals are percentile bootstraps that resample whole lesions.", ""]

    lines += _data_sections(split, metadata, report, provenance)
    lines += ["## Quantitative analyses", ""]
    parts = [("validation", report)] + ([("test", test)] if test else [])
    lines += markdown_table(["metric", *(name for name, _ in parts)],
                            [[label, *(_with_interval(r, key) for _, r in parts)] for key, label in HEADLINE.items()]
                            + [["images", *(r.n_images for _, r in parts)]])
    if report.metadata:
        with_, without = report.metadata["with"], report.metadata["without"]
        lines += ["", f"Without the clinical metadata (every field unknown, as for a user who has none), validation "
                      f"balanced accuracy is {_pct(without['balanced_accuracy'])} against "
                      f"{_pct(with_['balanced_accuracy'])} with it; macro AUC {_pct(without['macro_auc'])} against "
                      f"{_pct(with_['macro_auc'])}."]
    lines += ["", "Per class (validation):", ""]
    lines += markdown_table(["class", "images", "sensitivity", "specificity", "AUC"],
                            [[c, m["support"], _pct(m["recall"]), _pct(m.get("specificity")), _pct(m["auc"])]
                             for c, m in report.per_class.items()])
    for column, groups in report.subgroups.items():
        lines += ["", f"By {column.replace('_', ' ')} (validation; groups under 30 images are too small to judge):",
                  ""]
        lines += markdown_table(["group", "images", "balanced accuracy", "melanoma sensitivity", "status"],
                                [[g, m["images"], _pct(m["balanced_accuracy"]), _pct(m["melanoma_sensitivity"]),
                                  m["status"]] for g, m in groups.items()])
    lines += _calibration_and_safeguards(report)

    lines += ["## Ethical considerations", "",
              "- A wrong benign answer on a melanoma can delay treatment; a wrong malignant answer causes worry "
              "and needless excisions. The per-class sensitivities above show where each happens.",
              "- The data under-represents darker skin types and some body sites; subgroup results with few "
              "images are marked and should not be read as evidence of fairness.",
              "- Patient data: HAM10000 is de-identified and public; images a user brings should be too.", ""]
    lines += ["## Caveats and recommendations", "",
              "- Validation figures chose the checkpoint (best validation balanced accuracy) and fitted the "
              "temperature: they are optimistic. " + ("The test part was held out and measured once."
                                                     if test else "No held-out test part was measured."),
              f"- External test sets run: {_external(run)}.",
              "- Figures on a reduced-resolution copy of the images are a lower bound of what the same recipe "
              "reaches at full resolution; say which copy a figure came from.",
              "- Re-measure on your own data before relying on any number here.", ""]
    return "\n".join(lines)


def _pooling(model: dict) -> str:
    return "attention" if model.get("pool") == "attention" else "global average"


def _data_sections(split: pd.DataFrame | None, metadata: pd.DataFrame | None, report: Report,
                   provenance: dict) -> list[str]:
    part = report.data.get("part")
    evaluated = f"the {part} part's" if part not in (None, "all") else "the evaluated"
    data = provenance.get("data", {})
    lines = ["## Training and evaluation data", "",
             "- Source: HAM10000 (Tschandl, Rosendahl and Kittler, Scientific Data 5, 180161, 2018; "
             "doi:10.7910/DVN/DBW86T), dermoscopic images from the ViDIR group (Medical University of Vienna) and "
             "Cliff Rosendahl's practice (Queensland), CC BY-NC 4.0.",
             f"- Data used: {data.get('images', 'n/a')} images of {data.get('lesions', 'n/a')} lesions, "
             f"metadata md5 {data.get('metadata_md5', 'n/a')}; sizes of {evaluated} images: "
             f"{report.data.get('image_sizes')}."]
    if split is not None:
        lines.append("- Split: grouped by `lesion_id` and stratified by class (scikit-learn's StratifiedGroupKFold): "
                     "no lesion's images lie in two parts.")
        counts = split.pivot_table(index="dx", columns="split", values="image_id", aggfunc="size").fillna(0)
        lines += ["", *markdown_table(["class", *counts.columns],
                                      [[c, *map(int, row)] for c, row in counts.iterrows()])]
    if metadata is not None and "dx_type" in metadata:
        used = metadata if split is None else metadata[metadata["image_id"].isin(split["image_id"])]
        confirmed = used["dx_type"].value_counts()
        lines += ["", f"How the diagnoses were confirmed (`dx_type` of the {len(used)} images the run used):", ""]
        lines += markdown_table(["dx_type", "meaning", "images"],
                                [[k, DX_TYPES.get(k, "?"), int(v)] for k, v in confirmed.items()])
    else:
        lines += ["", "How the diagnoses were confirmed: the metadata file the run recorded is not reachable from "
                  "here, so `dx_type` counts are not given."]
    return lines + [""]


def _calibration_and_safeguards(report: Report) -> list[str]:
    lines = ["", "## Calibration, prediction sets and out-of-distribution behaviour", ""]
    cal, ece = report.calibration, report.ece
    if ece:
        temperature = f"{cal['temperature']:.3f}" if cal.get("temperature") else "none"
        lines.append(f"- Temperature {temperature}: top-label ECE {_pct(ece.get('before'))} "
                     f"before, {_pct(ece.get('after'))} after (fitted on these validation images).")
    sets, ood, referral = report.conformal, report.out_of_distribution, report.referral
    if sets:
        per_class = ", ".join(f"{name} {_pct(c['coverage'])}" for name, c in sets["per_class"].items()
                              if c["coverage"] is not None)
        lines.append(f"- Conformal prediction sets ({sets['method']}, calibrated on {sets['calibration_scores']} "
                     f"validation images): at {_pct(sets['target_coverage'])} coverage they hold the true class of "
                     f"{_pct(sets['coverage'])} of these images with {sets['mean_set_size']:.2f} classes on average; "
                     f"per class {per_class}. The promise is marginal: it holds on average, not for every class, "
                     f"and only for images like the validation part.")
    else:
        lines.append("- Conformal prediction sets: not fitted for this checkpoint.")
    if ood:
        per_class = ", ".join(f"{name} {_pct(v)}" for name, v in ood["flagged_per_class"].items() if v is not None)
        lines.append(f"- Out-of-distribution warnings ({ood['method']}): {_pct(ood['validation_flagged'])} of "
                     f"validation images flagged when held out, {_pct(ood['flagged'])} of these in sample (per "
                     f"class {per_class}). `docs/ood.md` in lesionkit gives how photos, noise and blank images "
                     f"fare; clinical close-ups of skin were not tried.")
    else:
        lines.append("- Out-of-distribution warnings: not fitted for this checkpoint.")
    if referral:
        lines.append(f"- Melanoma referral: p(mel) >= {referral['threshold']:.4f}, fitted to refer "
                     f"{_pct(referral['sensitivity'])} of validation melanomas; on these images sensitivity "
                     f"{_pct(referral['sensitivity_here'])}, specificity {_pct(referral['specificity_here'])}, "
                     f"{_pct(referral['referred'])} of images referred.")
    else:
        lines.append("- Melanoma referral threshold: not fitted for this checkpoint.")
    return lines + [""]


def _external(run: Path) -> str:
    found = sorted(p.parent.name for p in run.glob("evaluate-*/report.json") if "-val" not in p.parent.name)
    return ", ".join(found) if found else "none"


def write_card(run: Path, out: Path | None = None, name: str | None = None) -> Path:
    from lesionkit.files import atomic_write_text

    out = out or run / "MODEL_CARD.md"
    atomic_write_text(out, model_card(run, name), "model card")
    return out
