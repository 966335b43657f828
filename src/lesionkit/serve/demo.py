"""The web demo: a page where a user uploads a dermoscopic image and sees the calibrated probabilities, where the
network looked (Grad-CAM), the prediction set, the melanoma referral flag and an out-of-distribution warning,
under a plain statement that it is a research tool, not a medical device. A model that reads clinical metadata
gets optional fields for age, sex and body site.

Every upload is checked by lesionkit itself (size on disk, an image Pillow opens safely, dimensions): a bad one
gets a message on the page, never a traceback, and the server goes on serving.
"""

from __future__ import annotations

import errno
import socket
from pathlib import Path

import gradio as gr
import numpy as np

from lesionkit import LesionkitError
from lesionkit.data.images import load_image
from lesionkit.serve.answer import assess, missing_parts
from lesionkit.serve.explain import explain

DISCLAIMER = ("**Research tool, not a medical device.** lesionkit has not been cleared or approved for clinical "
              "use: do not use it to diagnose, treat or triage anyone. See a dermatologist about any lesion that "
              "worries you.")
MAX_UPLOAD_MB = 20


COVERAGE = 0.9


def describe(answer: dict, ood_threshold: float | None, source: str, missing: list[str] = ()) -> str:
    """The answer (:func:`lesionkit.serve.answer.assess`) in words, for the page's status box."""
    prediction = answer["prediction"]
    lines = [f"### {prediction} ({100 * answer['probabilities'][prediction]:.1f}%)", ""]
    if answer["out_of_distribution"]:
        lines += [f"**Warning: this does not look like a dermoscopic image** (out-of-distribution score "
                  f"{answer['ood_score']:.1f}, threshold {ood_threshold:.1f}): do not trust the answer.", ""]
    if answer["out_of_distribution"] is False:
        lines.append(f"- Looks like the dermoscopic images the model was validated on (out-of-distribution score "
                     f"{answer['ood_score']:.2f}; flagged above {ood_threshold:.1f})")
    if answer.get("prediction_set") is not None:
        lines.append(f"- Prediction set at {100 * COVERAGE:.0f}% coverage: {', '.join(answer['prediction_set'])}")
    if answer["refer"] is not None:
        lines.append(f"- Melanoma referral: {'**refer**' if answer['refer'] else 'no'} (p(mel) "
                     f"{answer['probabilities']['mel']:.3f}, threshold {answer['refer_threshold']:.3f}, set for "
                     f"{100 * answer['refer_sensitivity']:.0f}% sensitivity on validation)")
    if missing:
        lines.append(f"- This model has {', '.join(missing)}: no warning can be given on that count")
    lines.append(f"- Model: {source}")
    return "\n".join(lines)


def analyse(classifier, path: str | None, source: str, *clinical) -> tuple[str, dict | None, np.ndarray | None]:
    """Status text, probabilities and Grad-CAM overlay for the file at ``path``; a bad file gets a message only.
    ``clinical``: the page's values of the fields the model reads (its encoding's order; None or blank: unknown)."""
    if not path:
        return "Upload a dermoscopic image (JPEG or PNG) first.", None, None
    name = Path(path).name
    try:
        if Path(path).stat().st_size > MAX_UPLOAD_MB * 2**20:
            raise LesionkitError(f"{name} is over {MAX_UPLOAD_MB} MB: upload a smaller JPEG or PNG")
        image = load_image(Path(path))
        coverage = COVERAGE if classifier.calibration.conformal_scores is not None else None
        fields = classifier.encoding.fields if classifier.encoding else ()
        metadata = {f: v for f, v in zip(fields, clinical) if v not in (None, "")}
        answer = assess(classifier, image, coverage, metadata=metadata)
        overlay = explain(explained(classifier), image, class_name=answer["prediction"], metadata=metadata).overlay
    except LesionkitError as err:
        return f"**Could not use this upload.** {str(err).replace(str(path), name)}", None, None
    except Exception as err:  # whatever a hostile upload provokes, the page says so and the server goes on
        return f"**Could not analyse {name}** ({type(err).__name__}: {err}). Try another image.", None, None
    ood = classifier.calibration.ood
    status = describe(answer, ood.threshold if ood else None, source, missing_parts(classifier))
    if classifier.encoding:
        given = ", ".join(f"{k} {v}" for k, v in metadata.items()) or "none (the model answers as for unknown values)"
        status += f"\n- Clinical metadata used: {given}"
    return status, answer["probabilities"], overlay


def explained(classifier):
    """The network whose map the page shows: the classifier's own, or an ensemble's first member (Grad-CAM follows
    one network's gradients; the page says which)."""
    members = getattr(classifier, "members", None)
    return members[0] if members else classifier


def build_demo(classifier, source: str) -> gr.Blocks:
    """The page, for ``classifier`` (a :class:`lesionkit.serve.torch_classifier.TorchClassifier` or an
    :class:`lesionkit.serve.ensemble.EnsembleClassifier`) whose checkpoint or manifest is named by ``source``."""
    looked = (f"Grad-CAM of member 1 of the {len(classifier.members)}: where it looked for the ensemble's answer"
              if explained(classifier) is not classifier else "Grad-CAM: where the network looked for its answer")
    with gr.Blocks(title="lesionkit: skin-lesion classifier (research tool)") as demo:
        gr.Markdown("# lesionkit\nClassify a dermoscopic image of a pigmented skin lesion into HAM10000's seven "
                    "diagnoses.\n\n" + DISCLAIMER)
        with gr.Row():
            with gr.Column():
                upload = gr.File(label="Dermoscopic image (JPEG or PNG)", file_types=["image"], type="filepath",
                                 elem_id="upload")
                clinical = clinical_inputs(classifier.encoding)
                button = gr.Button("Classify", variant="primary", elem_id="classify")
            with gr.Column():
                status = gr.Markdown(elem_id="status")
                probabilities = gr.Label(num_top_classes=len(classifier.classes), label="Calibrated probabilities",
                                         elem_id="probabilities")
        overlay = gr.Image(label=looked, type="numpy",
                           interactive=False, height=400, elem_id="overlay")
        button.click(lambda path, *values: analyse(classifier, path, source, *values), inputs=[upload, *clinical],
                     outputs=[status, probabilities, overlay], api_name="classify")
    return demo


def clinical_inputs(encoding) -> list:
    """Optional fields for the clinical metadata a model reads (none for an image-only model)."""
    if encoding is None:
        return []
    inputs = []
    for name in encoding.fields:
        if name == "age":
            # Given value=None, the page shows 0 and sends it: a newborn, not an unknown age. A value computed at
            # page load leaves the box empty (Gradio issue 6728).
            inputs.append(gr.Number(label="Age in years (optional)", value=lambda: None, minimum=0, maximum=120,
                                    elem_id="age"))
        else:
            label = "Body site (optional)" if name == "localization" else "Sex (optional)"
            inputs.append(gr.Dropdown(list(encoding.levels[name]), label=label, value=None, elem_id=name))
    return inputs


HOSTS = "give an address of this machine, e.g. --host 127.0.0.1 (this machine only) or 0.0.0.0 (the network)"


def in_use(host: str, port: int) -> LesionkitError:
    other = port + 1 if port < 65535 else 7860
    return LesionkitError(f"port {port} on {host} is in use: pass another --port, e.g. --port {other}")


def check_address(host: str, port: int) -> None:
    """Refuse an address the demo cannot listen on, naming the flag to change: called before the model loads, where
    Gradio would fail after it, with advice for Python callers of launch()."""
    if not 1 <= port <= 65535:
        raise LesionkitError(f"--port {port}: must be between 1 and 65535 (e.g. 7860)")
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server's: a port just closed is free
            probe.bind(address)
    except socket.gaierror:
        raise LesionkitError(f"--host {host}: not an address or name this machine knows; {HOSTS}") from None
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            raise in_use(host, port) from None
        if err.errno == errno.EADDRNOTAVAIL:
            raise LesionkitError(f"--host {host}: not an address of this machine; {HOSTS}") from None
        if err.errno == errno.EACCES:
            raise LesionkitError(f"--port {port}: this user may not listen on it (ports below 1024 need "
                                 f"administrator rights); pass e.g. --port 7860") from None
        raise


def serve(classifier, source: str, host: str = "127.0.0.1", port: int = 7860, block: bool = True) -> gr.Blocks:
    """Start the demo on ``host:port`` (loopback unless told otherwise) and print its address; with ``block=False``
    return at once."""
    demo = build_demo(classifier, source)
    demo.queue(default_concurrency_limit=1)  # one image at a time: the CPU is shared anyway
    try:
        # quiet: Gradio's lines advise setting share=True in launch(), which a command-line user cannot; the
        # address is printed below instead.
        demo.launch(server_name=host, server_port=port, max_file_size=f"{MAX_UPLOAD_MB}mb", prevent_thread_lock=True,
                    quiet=True, show_error=False, share=False, ssr_mode=False)
    except OSError as err:
        if "empty port" not in str(err):  # Gradio's words for a port taken since check_address
            raise
        raise in_use(host, port) from None
    print(f"Serving {source} on {demo.local_url} (Ctrl-C stops)", flush=True)
    if block:
        demo.block_thread()
    return demo
