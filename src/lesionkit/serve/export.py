"""A trained network as an ONNX file that onnxruntime serves, with its classes, preprocessing and calibration
record inside, for :class:`lesionkit.serve.onnx_classifier.OnnxClassifier` (``predict --backend onnx``), and the
check that onnxruntime's logits are PyTorch's.

The file takes ``image`` (and, for a model that reads clinical metadata, ``metadata``: the encoded rows of
:mod:`lesionkit.data.clinical`). It has two outputs: ``logits``, and ``features``, the pooled pre-logit features that
the record's out-of-distribution detector scores (:mod:`lesionkit.evaluate.ood`), so that both backends flag the same
images. An ensemble is one graph holding every member: ``logits`` is the log of their mean calibrated probability.
"""

from __future__ import annotations

import io
import json
import math
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

from lesionkit import LesionkitError, __version__
from lesionkit.data.preprocessing import Preprocessing
from lesionkit.files import atomic_write, file_hash
from lesionkit.model.checkpoint import checkpoint_meta
from lesionkit.model.network import MetadataHead
from lesionkit.serve.ensemble import EnsembleClassifier
from lesionkit.serve.onnx_classifier import METADATA_KEY, OnnxClassifier
from lesionkit.serve.onnx_graph import either_orientation, export_form, name_gate_batches

# ONNX opset 17 (2022) runs on every onnxruntime since 1.13; the legacy TorchScript exporter needs no
# onnxscript and behaves the same in torch 2.4 to 2.14.
OPSET = 17
# Images per batch when PyTorch and onnxruntime are compared: memory stays flat however many images are checked.
CHECK_BATCH = 32


def export_model(model: torch.nn.Module, pre: Preprocessing, meta: dict, out: Path, turned: bool = False) -> Path:
    """Write ``model`` (a timm network or an :class:`Averaged` ensemble; eval mode, on the CPU) to ``out`` with a
    dynamic batch axis and ``meta`` as metadata.

    ``turned`` also serves the input turned by 90 degrees (width x height), as test-time augmentation feeds it:
    a second graph for that size, chosen by the input's height (the file is twice the size)."""
    try:
        import onnx  # the exporter needs it as well
    except ImportError:
        raise LesionkitError("exporting to ONNX needs the onnx package: pip install onnx") from None

    proto = _graph(model, pre.height, pre.width)
    turned = turned and pre.height != pre.width
    if turned:
        proto = either_orientation(proto, _graph(model, pre.width, pre.height), pre.height)
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps({**meta, "turned": turned, "lesionkit_version": __version__})
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: onnx.save(proto, str(tmp)), "ONNX export")  # an earlier export stays whole
    return out


def _graph(model: torch.nn.Module, height: int, width: int):
    import onnx

    buffer = io.BytesIO()
    head = (model.members[0] if isinstance(model, Averaged) else model).get_classifier()
    inputs = (torch.zeros(1, 3, height, width),) + ((head.unknown.clone(),) if isinstance(head, MetadataHead) else ())
    names = ["image", "metadata"][:len(inputs)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice and tracer warnings
        torch.onnx.export(WithFeatures(export_form(model, height, width)), inputs,
                          buffer, dynamo=False, opset_version=OPSET, input_names=names,
                          output_names=["logits", "features"],
                          dynamic_axes={**{name: {0: "batch"} for name in names}, "logits": {0: "batch"},
                                        "features": {0: "batch"}})
    proto = onnx.load_from_string(buffer.getvalue())
    name_gate_batches(proto)
    return proto


class WithFeatures(torch.nn.Module):
    """``model``'s logits and its pooled pre-logit features, from one pass (timm's ``forward_head(pre_logits=True)``
    and the classifier on it: ``model(x)``'s logits); a model with a metadata head takes its metadata as a second
    input; an :class:`Averaged` ensemble gives its own."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, *metadata: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(self.model, Averaged):
            return self.model.logits_and_features(x, *metadata)
        features = self.model.forward_head(self.model.forward_features(x), pre_logits=True)
        return self.model.get_classifier()(features, *metadata), features


class Averaged(torch.nn.Module):
    """An ensemble's networks as one: ``forward`` gives the log of the members' mean probability, each member's
    at its own temperature (:meth:`lesionkit.serve.ensemble.EnsembleClassifier.combine`, in torch), as a timm
    network gives its logits, weighted by the ensemble's class weights where it has them; the file also serves the
    first member's pooled features, which the ensemble's out-of-distribution detector reads."""

    def __init__(self, members: list[torch.nn.Module], temperatures: list[float], weights=None):
        super().__init__()
        self.members = torch.nn.ModuleList(members)
        self.register_buffer("temperatures", torch.tensor(temperatures, dtype=torch.float32))
        self.register_buffer("log_weights", None if weights is None else torch.log(torch.tensor(
            weights, dtype=torch.float32)))

    def forward(self, x: torch.Tensor, *metadata: torch.Tensor) -> torch.Tensor:
        return self.logits_and_features(x, *metadata)[0]

    def logits_and_features(self, x: torch.Tensor, *metadata: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, features = WithFeatures(self.members[0])(x, *metadata)
        rest = (WithFeatures(member)(x, *metadata)[0] for member in self.members[1:])
        every = torch.stack([logits, *rest])  # (members, n, classes)
        logs = torch.log_softmax(every.float() / self.temperatures[:, None, None], dim=-1)
        mean = torch.logsumexp(logs, dim=0) - math.log(len(self.members))
        if self.log_weights is not None:
            mean = torch.log_softmax(mean + self.log_weights, dim=-1)
        return mean, features


def network(classifier) -> torch.nn.Module:
    """The torch module whose output is ``classifier``'s logits: a :class:`TorchClassifier`'s network, or an
    :class:`lesionkit.serve.ensemble.EnsembleClassifier`'s members as :class:`Averaged`."""
    if isinstance(classifier, EnsembleClassifier):
        return Averaged([network(member) for member in classifier.members],
                        [member.temperature for member in classifier.members], classifier.weights).eval()
    return classifier.model


def export_classifier(classifier, checkpoint: Path, out: Path, turned: bool = False) -> Path:
    """Write the network of ``classifier`` (a :class:`lesionkit.serve.torch_classifier.TorchClassifier` of
    ``checkpoint``, or an ensemble of them in one graph) to ``out``, carrying its classes, preprocessing and
    calibration record (temperature too, on its own, for readers from before the record)."""
    ensemble = {key: classifier.meta[key] for key in ("kind", "members", "class_weights") if key in classifier.meta}
    if not ensemble:  # what the checkpoint beside the export is checked against where it is served
        ensemble["checkpoint_sha256"] = file_hash(checkpoint, "sha256")
    meta = checkpoint_meta(classifier.meta["model_name"], classifier.preprocessing, classifier.classes,
                           temperature=float(classifier.temperature), checkpoint=str(checkpoint),
                           calibration=classifier.calibration.to_entry(), metadata=classifier.meta.get("metadata"),
                           **ensemble)
    return export_model(network(classifier), classifier.preprocessing, meta, out, turned)


@torch.inference_mode()
def compare_model(model: torch.nn.Module, served: OnnxClassifier, images: torch.Tensor,
                  batch_size: int = CHECK_BATCH) -> tuple[float, float]:
    """The largest absolute difference between PyTorch's and onnxruntime's logits on ``images``, and the largest
    absolute logit, the scale to read that difference against; a batch at a time, so that memory stays flat."""
    difference = largest = 0.0
    model.eval()
    for batch in images.split(batch_size):
        served_logits = torch.from_numpy(served.logits(batch.numpy()))
        difference = max(difference, float((model(batch).float() - served_logits).abs().max()))
        largest = max(largest, float(served_logits.abs().max()))
    return difference, largest


def check_export(model: torch.nn.Module, served: OnnxClassifier, batches, total: int) -> tuple[float, float]:
    """The largest logit difference between ``model`` and its export ``served`` over ``batches`` (``total``
    images), on both orientations where the export serves both, and the largest logit."""
    turned = served.meta.get("turned", False)
    difference = largest = 0.0
    with tqdm(total=total, desc="Comparing with PyTorch", unit="img", delay=1, leave=False) as bar:
        for batch in batches:
            for view in [batch, batch.rot90(1, (-2, -1)).contiguous()] if turned else [batch]:
                view_difference, view_largest = compare_model(model, served, view)
                difference, largest = max(difference, view_difference), max(largest, view_largest)
            bar.update(len(batch))
    return difference, largest
