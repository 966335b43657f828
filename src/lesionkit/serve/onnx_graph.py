"""The network rewritten for onnxruntime's fastest form, and two graphs joined into one that takes either
orientation of the input."""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame
from timm.layers.padding import pad_same_arg
from timm.models._efficientnet_blocks import SqueezeExcite


def export_form(model: torch.nn.Module, height: int, width: int) -> torch.nn.Module:
    """A copy of ``model`` (eval mode, contiguous) with the same numbers for ``height`` x ``width`` inputs, in the
    form onnxruntime runs fastest: every layer in its blocked (NCHWc) convolution layout.

    - timm's ``Conv2dSame`` (the ``tf_`` EfficientNets' strided convolutions) computes its padding from the
      input's shape on every call; exported as it is, that becomes shape arithmetic and a ``Pad`` outside the
      blocked layout. Here it pads by constants, which onnxruntime folds into the convolution (what that saves
      on one Lite1 image is in docs/speed.md).
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
             helper.make_node("If", ["is_upright"], [output.name for output in upright.graph.output],
                              then_branch=branch(upright, "/upright"), else_branch=branch(turned, "/turned"))]
    graph = helper.make_graph(nodes, "lesionkit", [upright.graph.input[0]], list(upright.graph.output),
                              [numpy_helper.from_array(np.array([height], dtype=np.int64), "upright_height")])
    graph.input[0].type.tensor_type.shape.dim[2].dim_param = "height"  # either size, now
    graph.input[0].type.tensor_type.shape.dim[3].dim_param = "width"
    return helper.make_model(graph, opset_imports=upright.opset_import, producer_name=upright.producer_name)
