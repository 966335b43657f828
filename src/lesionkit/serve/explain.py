"""Where the network looked for its answer: class activation maps from the grad-cam package
(``pytorch_grad_cam``), on the image as the network sees it, with a faithfulness score from the same package.

A map is computed at the network's last feature stage (:func:`target_layer`), stretched to the input size and
laid over the framed image. Gradients are needed only there: for the one call every parameter is frozen and the
layer's output starts the graph, so the backward pass runs through the head alone, no parameter keeps a
``.grad`` and every ``requires_grad`` flag is as it was afterwards (the classifier serves on right after).

Faithfulness is the drop in the calibrated probability of the explained class when the normalised input is
multiplied by the inverted map (``CamMultImageConfidenceChange`` on ``1 - map``): what the map highlights is taken
away, so a map that shows what the answer rests on scores high and one that points at the background scores near
zero or below. It costs one forward pass; ROAD (``pytorch_grad_cam.metrics.road``) would cost a sparse solve of
~60,000 pixels per threshold, seconds per image on a CPU.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus
from pytorch_grad_cam.metrics.cam_mult_image import CamMultImageConfidenceChange
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from lesionkit import LesionkitError
from lesionkit.model.network import logits_with_metadata
from lesionkit.serve.classifier import softmax

# EigenCAM needs no gradient: the first principal component of the layer's activations, the same for every class.
METHODS = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "eigencam": EigenCAM}
FAITHFULNESS = "confidence drop, image x (1 - map)"


@dataclass
class Explanation:
    """One image's map for one class."""

    class_name: str
    probability: float
    """Calibrated probability of ``class_name``: softmax of the logits over the classifier's temperature."""
    method: str
    layer: str
    """The network's layer whose activations the map is computed on."""
    heatmap: np.ndarray
    """``(height, width)`` float32 in [0, 1], at the network's input size."""
    framed: np.ndarray
    """The image as the network saw it (scaled, centre-cropped): ``(height, width, 3)`` RGB uint8."""
    overlay: np.ndarray
    """The map in colour over ``framed``: ``(height, width, 3)`` RGB uint8."""
    faithfulness: float
    """Calibrated probability of ``class_name`` minus that once the map's region is removed (see the module)."""
    faithfulness_metric: str = FAITHFULNESS


def target_layer(model: nn.Module) -> str:
    """The dotted name of ``model``'s last feature stage (``model.get_submodule(name)`` is the layer): timm's own
    ``feature_info`` where the model has it (``blocks.6`` of an EfficientNet-Lite1, ``layer4`` of a ResNet), else
    the last top-level module before the global pooling (``bn2`` of an EfficientNet)."""
    info = getattr(model, "feature_info", None)
    if info:
        name = info[-1]["module"]
        model.get_submodule(name)  # a name that is not a module is an error here, not a missing map later
        return name
    children = list(model.named_children())
    for index, (name, module) in enumerate(children):
        if index and (name == "global_pool" or isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d))):
            return children[index - 1][0]
    raise LesionkitError(f"cannot find the last feature stage of this {type(model).__name__}: it has no timm "
                         f"feature_info and no global pooling layer; explain a timm CNN (EfficientNet, ResNet, ...)")


def network(classifier) -> nn.Module:
    """The network explain differentiates: the framed ``(n, 3, height, width)`` batch to logits (its metadata,
    for a model that reads some, is bound by :class:`WithMetadata`). The one place this module reaches into a
    classifier."""
    model = getattr(classifier, "model", None)
    if not isinstance(model, nn.Module):
        raise LesionkitError("explanations need the PyTorch network: load the .ckpt checkpoint (an ONNX export "
                             "has no gradients to follow)")
    return model


class WithMetadata(nn.Module):
    """``model`` with one patient's encoded clinical metadata: framed images to the logits the classifier gives
    them with that metadata (what a map of a metadata model has to follow)."""

    def __init__(self, model: nn.Module, metadata: torch.Tensor):
        super().__init__()
        self.model, self.metadata = model, metadata

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return logits_with_metadata(self.model, images, self.metadata.expand(len(images), -1))


class CalibratedProbability:
    """The target of the faithfulness metric: the class's probability at the classifier's temperature."""

    def __init__(self, index: int, temperature: float):
        self.index, self.temperature = index, temperature

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.float() / self.temperature, dim=-1)[..., self.index]


@contextmanager
def gradients_from(model: nn.Module, layer: nn.Module):
    """Within the block, gradients flow from the logits back to ``layer``'s output and no further; on leaving,
    every parameter's ``requires_grad`` is as it was and none holds a gradient."""
    flags = [p.requires_grad for p in model.parameters()]
    # Registered before the CAM's own hooks, so that they see (and hook) the output that starts the graph.
    handle = layer.register_forward_hook(lambda module, args, output: output.detach().requires_grad_(True))
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        handle.remove()
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)


def framed_rgb(classifier, batch: np.ndarray) -> np.ndarray:
    """The normalised ``(3, height, width)`` input back as ``(height, width, 3)`` floats in [0, 1]."""
    pre = classifier.preprocessing
    pixels = batch.transpose(1, 2, 0) * np.array(pre.std, np.float32) + np.array(pre.mean, np.float32)
    return np.clip(pixels, 0, 1)


def explain(classifier, image: Image.Image, method: str = "gradcam", class_name: str | None = None,
            metadata: dict | None = None) -> Explanation:
    """Where ``classifier``'s network looked in ``image`` (RGB) for ``class_name`` (default: its prediction).

    ``method``: ``gradcam``, ``gradcam++`` or ``eigencam`` (class-agnostic: ``class_name`` then only chooses the
    probability and the faithfulness reported). A model that reads clinical metadata runs with ``metadata``'s
    values (``{"age": 55, ...}``; unknown where absent), as :func:`lesionkit.serve.answer.assess` answers with
    them: the default class, the probability and the faithfulness are the answer's. The map of a given class does
    not change with the metadata, which joins the pooled features after the mapped layer.
    """
    if method not in METHODS:
        raise LesionkitError(f"unknown explanation method {method!r}: use one of {', '.join(METHODS)}")
    if class_name is not None and class_name not in classifier.classes:
        raise LesionkitError(f"unknown class {class_name!r}: this model's classes are {', '.join(classifier.classes)}")
    model = network(classifier)
    array = classifier.transform(image)
    device = next(model.parameters()).device
    batch = torch.from_numpy(array[None]).to(device).contiguous(memory_format=torch.channels_last)
    layer_name = target_layer(model)
    layer = model.get_submodule(layer_name)
    encoding = classifier.encoding
    if encoding is not None:
        model = WithMetadata(model, torch.from_numpy(encoding.encode_one(metadata)).to(device))
    with gradients_from(model, layer):
        cam = METHODS[method](model, [layer])
        try:  # without a class the CAM explains the top logit: the prediction, whatever the temperature
            targets = None if class_name is None else [ClassifierOutputTarget(classifier.classes.index(class_name))]
            heatmap = cam(batch, targets)[0]
            logits = cam.outputs.detach().float().cpu().numpy()[0]
        finally:
            cam.activations_and_grads.release()
    index = int(logits.argmax()) if class_name is None else classifier.classes.index(class_name)
    class_name = classifier.classes[index]
    probability = float(softmax(logits, classifier.temperature)[index])
    with torch.no_grad():
        removed = CamMultImageConfidenceChange()(batch, (1 - heatmap)[None], [CalibratedProbability(
            index, classifier.temperature)], model, return_diff=False)
    framed = framed_rgb(classifier, array)
    return Explanation(class_name, probability, method, layer_name, heatmap, np.uint8(np.round(255 * framed)),
                       show_cam_on_image(framed, heatmap, use_rgb=True), probability - float(removed[0]))
