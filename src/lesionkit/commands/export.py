"""``lesionkit export``: a checkpoint as an ONNX file for onnxruntime, checked against PyTorch."""

from __future__ import annotations

import argparse
from pathlib import Path

from lesionkit import LesionkitError
from lesionkit.files import file_above

# Beyond this, onnxruntime's logits are not PyTorch's: a broken export, not rounding.
TOLERANCE = 1e-3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, type=Path,
                        help="a checkpoint written by `lesionkit train`, or an ensemble: RUN/ensemble.json of "
                             "`lesionkit train --folds K` (or that RUN folder), written as one graph of every member")
    parser.add_argument("--format", choices=("onnx",), default="onnx")
    parser.add_argument("--out", type=Path, help="file to write (default: the checkpoint's name with .onnx)")
    parser.add_argument("--check", nargs="*", type=Path, default=[], metavar="IMAGE_OR_FOLDER",
                        help="real images to compare PyTorch and onnxruntime on (default: 4 random inputs)")
    parser.add_argument("--quantize", choices=("fp16", "int8"),
                        help="then make the file smaller with onnxruntime's tools: fp16 (half the size, answers "
                             "within rounding) or int8 (a quarter, faster, less accurate; needs --calibrate)")
    parser.add_argument("--calibrate", nargs="+", type=Path, default=[], metavar="IMAGE_OR_FOLDER",
                        help="training images whose activation ranges scale --quantize int8 (a few hundred)")
    parser.add_argument("--tta", action="store_true",
                        help="also serve the inputs turned by 90 degrees that `predict --tta` feeds (a second "
                             "graph: the file is twice the size)")


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from lesionkit.data.images import load_image
    from lesionkit.model import shipped
    from lesionkit.serve.ensemble import load_torch_classifier
    from lesionkit.serve.export import CHECK_BATCH, check_export, export_classifier, network
    from lesionkit.serve.onnx_classifier import OnnxClassifier, onnx_path_for
    from lesionkit.serve.predict import collect_images

    if args.quantize and args.tta:
        raise LesionkitError("--quantize works on a plain export: drop --tta")
    if args.quantize == "int8" and not args.calibrate:
        raise LesionkitError("--quantize int8 needs --calibrate with a few hundred training images (a folder)")
    # A wrong path is named before anything is written.
    paths = collect_images(args.check) if args.check else []
    calibration = collect_images(args.calibrate) if args.calibrate else []
    args.checkpoint = shipped.checkpoint_or_default(args.checkpoint)  # an ensemble's folder: its manifest
    check_out(args.out, args.checkpoint, shipped.CHECKPOINT)
    classifier = load_torch_classifier(args.checkpoint, "cpu")
    out = export_classifier(classifier, args.checkpoint, args.out or onnx_path_for(args.checkpoint), args.tta)
    served = OnnxClassifier(out)
    pre, turned = served.preprocessing, served.meta["turned"]
    sizes = f"{pre.height} x {pre.width}" + (f" or {pre.width} x {pre.height}" if turned else "")
    print(f"Wrote {out} ({out.stat().st_size / 1e6:.1f} MB, classes {', '.join(served.classes)}, "
          f"input batch x 3 x {sizes})", flush=True)  # before the check, which may meet an unreadable image
    if paths:
        what = f"{len(paths)} image(s)"
        # Loaded a batch at a time: a folder of thousands of images need not fit in memory at once.
        batches = (torch.from_numpy(np.stack([served.transform(load_image(p)) for p in paths[i:i + CHECK_BATCH]]))
                   for i in range(0, len(paths), CHECK_BATCH))
    else:
        what = "4 random inputs"
        batches = [torch.randn(4, 3, pre.height, pre.width, generator=torch.Generator().manual_seed(0))]
    difference, largest = check_export(network(classifier), served, batches, len(paths) or 4)
    print(f"max |PyTorch - onnxruntime| logit difference on {what}{' and their 90-degree turns' if turned else ''}: "
          f"{difference:.2e} (logits up to {largest:.3g})")
    if difference > TOLERANCE:
        raise LesionkitError(f"onnxruntime's logits differ from PyTorch's by {difference:.2e} (> {TOLERANCE:g}): "
                             f"do not use this export; report the model name and versions")
    if args.quantize:
        quantize(args.quantize, out, calibration, served)
    return 0


def check_out(out: Path | None, checkpoint: Path, shipped: Path) -> None:
    """Refuse, before anything is loaded, an ``--out`` that cannot be the file written, and an export of the
    shipped model over its own export (float16, made and measured as docs/shipped-model.md says)."""
    if out is None:
        if checkpoint.resolve() == shipped.resolve():
            raise LesionkitError(f"{checkpoint} is the model shipped with lesionkit, and its export "
                                 f"{shipped.with_suffix('.onnx')} is already there: pass --out FILE.onnx to write "
                                 f"another export of it")
        return
    if out.is_dir():
        from lesionkit.serve.onnx_classifier import onnx_path_for  # numpy: not for every CLI start

        raise LesionkitError(f"--out {out} is a folder: give the file to write, e.g. --out "
                             f"{out / onnx_path_for(checkpoint).name}")
    above = file_above(out)
    if above is not None:
        raise LesionkitError(f"--out {out} cannot be written: {above} is a file, not a folder")


def quantize(kind: str, out: Path, calibration: list[Path], served) -> None:
    """Replace the float32 export ``out`` by its ``kind`` quantisation, and say how far its logits moved on
    random inputs (the figures that matter, accuracy on labelled images, come from ``lesionkit evaluate``)."""
    import numpy as np

    from lesionkit.data.images import load_image
    from lesionkit.serve.onnx_classifier import OnnxClassifier
    from lesionkit.serve.quantize import quantize_fp16, quantize_int8

    if kind == "fp16":
        quantize_fp16(out, out)
    else:
        batches = (np.stack([served.transform(load_image(p)) for p in calibration[i:i + 32]])
                   for i in range(0, len(calibration), 32))
        quantize_int8(out, out, batches)
    small = OnnxClassifier(out)
    pre = small.preprocessing
    inputs = np.random.default_rng(0).standard_normal((4, 3, pre.height, pre.width)).astype(np.float32)
    moved = float(np.abs(small.logits(inputs) - served.logits(inputs)).max())
    print(f"Quantised to {kind}: {out} ({out.stat().st_size / 1e6:.1f} MB), logits moved by up to {moved:.2e} on "
          f"4 random inputs; measure its accuracy with `lesionkit evaluate`")
