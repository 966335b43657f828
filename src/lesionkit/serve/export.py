"""``lesionkit export``: a checkpoint as an ONNX file that onnxruntime serves, with its classes and
preprocessing inside, for :class:`lesionkit.serving.OnnxClassifier` (``predict --backend onnx``).

On 2 CPU cores onnxruntime answers one 240x320 image about twice as fast as PyTorch eager, up to 2.9x depending
on the processor and the network (fused convolutions and BatchNorm, no Python between layers);
``lesionkit benchmark`` measures it.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame
from timm.layers.padding import pad_same_arg
from timm.models._efficientnet_blocks import SqueezeExcite
from tqdm import tqdm

from lesionkit import LesionkitError, __version__
from lesionkit.preprocessing import Preprocessing
from lesionkit.runfolder import atomic_write
from lesionkit.serving import METADATA_KEY, OnnxClassifier, onnx_path_for

# ONNX opset 17 (2022) runs on every onnxruntime since 1.13; the legacy TorchScript exporter needs no
# onnxscript and behaves the same in torch 2.4 to 2.14.
OPSET = 17
# Images per batch in ``export --check``. In one batch, a Lite1 checkpoint at 180x240 peaked at 4.7 GB resident
# for 215 images, growing with every image; in batches of 32, at 2.4 GB for 215 images or 1,000.
CHECK_BATCH = 32


def export_form(model: torch.nn.Module, height: int, width: int) -> torch.nn.Module:
    """A copy of ``model`` (eval mode, contiguous) with the same numbers for ``height`` x ``width`` inputs, in the
    form onnxruntime runs fastest: every layer in its blocked (NCHWc) convolution layout.

    - timm's ``Conv2dSame`` (the ``tf_`` EfficientNets' strided convolutions) computes its padding from the
      input's shape on every call; exported as it is, that becomes shape arithmetic and a ``Pad`` outside the
      blocked layout. Here it pads by constants, which onnxruntime folds into the convolution (Lite1, one image
      on 2 cores: 10.7 ms before, 8 after).
    - A squeeze-and-excitation gate multiplies the block's largest tensor (N, C, H, W) by one value per channel
      (N, C, 1, 1). onnxruntime has no blocked multiply that broadcasts, so around each of B1's 23 gates it moved
      that tensor out of its layout and back. Here the gate is widened to H x W by nearest upsampling with
      constant factors first, which runs blocked, as does the multiply of two equal shapes.
    """
    model = copy.deepcopy(model).to(memory_format=torch.contiguous_format).eval()
    sizes = {}

    def record(module: torch.nn.Module, args: tuple) -> None:
        sizes[module] = tuple(args[0].shape[-2:])
    hooks = [module.register_forward_pre_hook(record) for module in model.modules()
             if isinstance(module, (Conv2dSame, SqueezeExcite))]
    with torch.inference_mode():
        model(torch.zeros(1, 3, height, width))
    for hook in hooks:
        hook.remove()
    for name, module in list(model.named_modules()):
        if module not in sizes:
            continue
        if isinstance(module, Conv2dSame):
            replacement = _constant_padding(module, sizes[module])
        else:
            replacement = WideGate(module, sizes[module])
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, replacement)
    return model


def _constant_padding(conv: Conv2dSame, size: tuple[int, int]) -> torch.nn.Module:
    plain = torch.nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, 0, conv.dilation,
                            conv.groups, conv.bias is not None)
    plain.load_state_dict(conv.state_dict())
    return torch.nn.Sequential(torch.nn.ZeroPad2d(pad_same_arg(size, conv.kernel_size, conv.stride, conv.dilation)),
                               plain)


class WideGate(torch.nn.Module):
    """timm's ``SqueezeExcite`` (its layers, shared) for a fixed ``size`` of input: the squeeze as a global average
    pool, and the gate upsampled to ``size`` before it multiplies."""

    def __init__(self, se: SqueezeExcite, size: tuple[int, int]):
        super().__init__()
        self.conv_reduce, self.act1, self.conv_expand, self.gate = se.conv_reduce, se.act1, se.conv_expand, se.gate
        self.scale = tuple(float(side) for side in size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate(self.conv_expand(self.act1(self.conv_reduce(F.adaptive_avg_pool2d(x, 1)))))
        return x * F.interpolate(gate, scale_factor=self.scale, mode="nearest")


def name_gate_batches(proto) -> None:
    """Give every upsampled gate the input's symbolic batch size. ONNX's shape inference leaves the batch of a
    ``Resize`` output unnamed, and onnxruntime multiplies two tensors in its blocked layout only when it can
    tell their shapes are equal."""
    import onnx

    inferred = {info.name: info for info in onnx.shape_inference.infer_shapes(proto).graph.value_info}
    batch = proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    for node in proto.graph.node:
        if node.op_type == "Resize" and node.output[0] in inferred:
            info = onnx.ValueInfoProto()
            info.CopyFrom(inferred[node.output[0]])
            info.type.tensor_type.shape.dim[0].dim_param = batch
            proto.graph.value_info.append(info)


def export_model(model: torch.nn.Module, pre: Preprocessing, meta: dict, out: Path, turned: bool = False) -> Path:
    """Write ``model`` (eval mode, on the CPU) to ``out`` with a dynamic batch axis and ``meta`` as metadata.

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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice and tracer warnings
        torch.onnx.export(export_form(model, height, width), (torch.zeros(1, 3, height, width),), buffer,
                          dynamo=False, opset_version=OPSET, input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    proto = onnx.load_from_string(buffer.getvalue())
    name_gate_batches(proto)
    return proto


def either_orientation(upright, turned, height: int):
    """One model that runs ``upright``'s graph on inputs ``height`` pixels high and ``turned``'s on the others,
    through an ONNX ``If``. Each branch keeps its own weights, so onnxruntime lays both out blockwise."""
    import onnx
    from onnx import helper, numpy_helper

    def branch(proto, suffix: str):
        # With every tensor's shape for its own size: the If's input may have either, and without them
        # onnxruntime cannot tell the first gate's two tensors equal in shape (name_gate_batches).
        graph = onnx.GraphProto()
        graph.CopyFrom(onnx.shape_inference.infer_shapes(proto).graph)
        renamed = {init.name: init.name + suffix for init in graph.initializer}
        renamed.update({name: name + suffix for node in graph.node for name in node.output})
        for init in graph.initializer:
            init.name = renamed[init.name]
        for node in graph.node:
            node.name += suffix
            node.input[:] = [renamed.get(name, name) for name in node.input]  # "image" stays the outer input
            node.output[:] = [renamed[name] for name in node.output]
        for info in [*graph.value_info, *graph.output]:
            info.name = renamed.get(info.name, info.name)
        del graph.input[:]
        graph.name = "lesionkit" + suffix
        return graph

    nodes = [helper.make_node("Shape", ["image"], ["image_height"], start=2, end=3),
             helper.make_node("Equal", ["image_height", "upright_height"], ["height_matches"]),
             helper.make_node("Squeeze", ["height_matches"], ["is_upright"]),
             helper.make_node("If", ["is_upright"], ["logits"], then_branch=branch(upright, "/upright"),
                              else_branch=branch(turned, "/turned"))]
    graph = helper.make_graph(nodes, "lesionkit", [upright.graph.input[0]], [upright.graph.output[0]],
                              [numpy_helper.from_array(np.array([height], dtype=np.int64), "upright_height")])
    graph.input[0].type.tensor_type.shape.dim[2].dim_param = "height"  # either size, now
    graph.input[0].type.tensor_type.shape.dim[3].dim_param = "width"
    return helper.make_model(graph, opset_imports=upright.opset_import, producer_name=upright.producer_name)


def export_classifier(classifier, checkpoint: Path, out: Path, turned: bool = False) -> Path:
    """Write the network of ``classifier`` (``checkpoint`` loaded by ``lesionkit.inference.Classifier``) to
    ``out``, carrying its classes, preprocessing and temperature."""
    meta = {"model_name": classifier.meta["model_name"], "classes": classifier.classes,
            "preprocessing": classifier.preprocessing.to_dict(),
            "temperature": float(getattr(classifier, "temperature", 1.0)), "checkpoint": str(checkpoint)}
    return export_model(classifier.model, classifier.preprocessing, meta, out, turned)


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, type=Path, help="a checkpoint written by `lesionkit train`")
    parser.add_argument("--format", choices=("onnx",), default="onnx")
    parser.add_argument("--out", type=Path, help="file to write (default: the checkpoint's name with .onnx)")
    parser.add_argument("--check", nargs="*", type=Path, default=[], metavar="IMAGE_OR_FOLDER",
                        help="real images to compare PyTorch and onnxruntime on (default: 4 random inputs)")
    parser.add_argument("--tta", action="store_true",
                        help="also serve the inputs turned by 90 degrees that `predict --tta` feeds (a second "
                             "graph: the file is twice the size)")


def run(args: argparse.Namespace) -> int:
    from lesionkit.images import load_image
    from lesionkit.inference import Classifier
    from lesionkit.predict import collect_images

    paths = collect_images(args.check) if args.check else []  # a wrong path is named before anything is written
    classifier = Classifier.load(args.checkpoint, "cpu")
    out = export_classifier(classifier, args.checkpoint, args.out or onnx_path_for(args.checkpoint), args.tta)
    onnx_model = OnnxClassifier(out)
    pre, turned = onnx_model.preprocessing, onnx_model.meta["turned"]
    sizes = f"{pre.height} x {pre.width}" + (f" or {pre.width} x {pre.height}" if turned else "")
    print(f"Wrote {out} ({out.stat().st_size / 1e6:.1f} MB, classes {', '.join(onnx_model.classes)}, "
          f"input batch x 3 x {sizes})", flush=True)  # before the check, which may meet an unreadable image
    if paths:
        what = f"{len(paths)} image(s)"
        # Loaded a batch at a time: a folder of thousands of images need not fit in memory at once.
        batches = (torch.from_numpy(np.stack([onnx_model.transform(load_image(p)) for p in paths[i:i + CHECK_BATCH]]))
                   for i in range(0, len(paths), CHECK_BATCH))
    else:
        what = "4 random inputs"
        batches = [torch.randn(4, 3, pre.height, pre.width, generator=torch.Generator().manual_seed(0))]
    difference = largest = 0.0
    with tqdm(total=len(paths) or 4, desc="Comparing with PyTorch", unit="img", delay=1, leave=False) as bar:
        for batch in batches:
            for view in [batch, batch.rot90(1, (-2, -1)).contiguous()] if turned else [batch]:
                view_difference, view_largest = compare_model(classifier.model, onnx_model, view)
                difference, largest = max(difference, view_difference), max(largest, view_largest)
            bar.update(len(batch))
    print(f"max |PyTorch - onnxruntime| logit difference on {what}{' and their 90-degree turns' if turned else ''}: "
          f"{difference:.2e} (logits up to {largest:.3g})")
    if difference > 1e-3:
        raise LesionkitError(f"onnxruntime's logits differ from PyTorch's by {difference:.2e} (> 1e-3): "
                             f"do not use this export; report the model name and versions")
    return 0
