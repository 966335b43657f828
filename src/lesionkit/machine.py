"""The hardware a figure comes from: runs record it in ``provenance.json``, the benchmark prints it, and
``lesionkit compare`` says when runs it sets side by side were trained on different machines, since the same
recipe's figures move with the processor alone (other vector kernels sum in another order).

Only the standard library at import: PyTorch is imported when a description is asked for.
"""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path


def processor() -> str:
    """The processor's name (with its family and model, which tell apart generations sold under one name), its
    core count and the widest vector instructions PyTorch uses on it."""
    import torch

    fields: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or platform.processor() or "unknown CPU"
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return f"{name}, {os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()}"


def hardware() -> dict:
    """The processor and the GPUs this process sees, as ``provenance.json`` records them."""
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"processor": processor(), "gpus": gpus}


def describe(record: dict | None) -> str:
    """One line for a :func:`hardware` record: the GPUs where there are any, else the processor."""
    if not record:
        return "unknown"
    gpus = record.get("gpus") or []
    if gpus:
        return ", ".join(f"{gpus.count(g)}x {g}" for g in dict.fromkeys(gpus))
    return record.get("processor") or "unknown"
