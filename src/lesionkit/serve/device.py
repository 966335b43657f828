"""``--device`` of the commands that run a network (predict, explain, evaluate, serve), checked before anything is
loaded, so that a machine without the GPU asked for gets one line saying so instead of PyTorch's traceback.
Standard library only at import: ``predict`` imports this module with ``--backend onnx`` too.
"""

from __future__ import annotations

import argparse
import re

from lesionkit import LesionkitError


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N, the GPU numbered N (default: cpu)")


def check_device(device: str) -> None:
    """Refuse a ``device`` that is not cpu, cuda or cuda:N, or a GPU PyTorch cannot see here. PyTorch is imported
    only for a GPU, where the command imports it anyway."""
    spelled = re.fullmatch(r"cpu|cuda(?::(\d+))?", device)
    if not spelled:
        raise LesionkitError(f"--device {device}: give cpu, cuda or cuda:N (e.g. cuda:0)")
    if device == "cpu":
        return
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise LesionkitError(f"--device {device}: no CUDA GPU is visible to PyTorch on this machine; use --device cpu")
    if int(spelled.group(1) or 0) >= count:
        raise LesionkitError(f"--device {device}: PyTorch sees {count} CUDA GPU(s) on this machine, cuda:0 to "
                             f"cuda:{count - 1}; give one of those, or --device cpu")
