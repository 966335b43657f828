"""How fast this machine loads, trains, evaluates and serves, each saving measured
side by side with what it saves against, in one run.

- data: images/s through the eval transform from the JPEGs vs from the image cache (one process);
- training, per phase: images/s of a step (forward, backward, AdamW) with lesionkit's freezing
  (``requires_grad=False`` below the trained layers) vs "the common naive way" (every parameter still
  requires grad, only the optimizer restricted); the frozen phase on stored features too; the full network,
  and the full network on real images against the way timm's reference ``train.py`` trains it; on a CPU the
  fine-tune step under bfloat16 autocast against 32 bits;
- head-phase steps with freed memory held in the process (as every ``lesionkit`` command runs) vs glibc's
  defaults, which give large CPU tensors fresh pages at every step (:mod:`lesionkit.allocator`), each side in
  fresh processes;
- the share of a training step spent waiting for the DataLoader (cache, augmentation, default workers);
- evaluation images/s, and one image's latency and a batch's throughput in onnxruntime vs PyTorch eager, with
  onnxruntime's one-image latency on a single thread beside it (how well the cores shared the work);
- peak memory (process RSS; GPU memory when there is one).

Steps run on random tensors except where the data is the point, so the training figures measure the network.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import timm
import torch

from lesionkit import LesionkitError
from lesionkit.bench.against_timm import bench_full_network
from lesionkit.allocator import hold_freed_memory, user_chose_allocator
from lesionkit.data.cache import build_cache
from lesionkit.train.runfolder import processor
from lesionkit.config import AugmentConfig, ModelConfig
from lesionkit.data.metadata import load_dataset
from lesionkit.data.datasets import ImageDataset, make_loader
from lesionkit.model.network import create_model, freeze_batchnorm_stats, set_trainable
from lesionkit.model.checkpoint import checkpoint_meta
from lesionkit.model.module import adamw
from lesionkit.data.preprocessing import Preprocessing
from lesionkit.bench.timing import latencies, rate, synchronize
from lesionkit.data.transforms import eval_transform, train_transform

def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synthetic_jpegs(root: Path, count: int) -> pd.DataFrame:
    """``count`` 600x450 JPEGs of smooth noise (dermoscope-sized), for a benchmark without --data-dir."""
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = []
    for i in range(count):
        coarse = rng.integers(0, 255, (45, 60, 3), dtype=np.uint8)
        path = root / f"SYN_{i:05d}.jpg"
        Image.fromarray(coarse).resize((600, 450), Image.BICUBIC).save(path, quality=90)
        rows.append({"image_id": path.stem, "path": str(path), "dx": "nv", "lesion_id": path.stem})
    return pd.DataFrame(rows)


def bench_data(frame: pd.DataFrame, pre: Preprocessing, cache_dir: Path) -> dict:
    start = time.perf_counter()
    cache = build_cache(frame, pre, cache_dir, progress=False)
    build = len(frame) / (time.perf_counter() - start)
    transform = eval_transform(pre)
    plain, cached = ImageDataset.from_frame(frame, transform), ImageDataset.from_frame(frame, transform, cache)
    n = len(frame)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker, which PyTorch runs single-threaded
    try:
        jpeg = rate(lambda: [plain[i] for i in range(n)], n, 1)
        from_cache = rate(lambda: [cached[i] for i in range(n)], n, 2)
    finally:
        torch.set_num_threads(threads)
    return {"images": n, "jpeg_images_per_s": jpeg, "cache_images_per_s": from_cache, "ratio": from_cache / jpeg,
            "build_images_per_s": build, "cache": cache}


def train_step(model: torch.nn.Module, unfreeze: int, naive: bool, device: torch.device, bf16: bool = False):
    """A training step ``step(images, labels)`` for a phase that trains the top ``unfreeze`` groups, lesionkit's
    way or the naive way; ``step.prepare()`` puts the model back in that state after another step's use.
    Under bfloat16 autocast on a GPU, as ``train.precision: auto`` trains, and on a CPU with ``bf16``."""
    trainable = set_trainable(model, unfreeze)
    # The naive way: the optimizer holds the trainable part, but autograd still tracks every parameter.
    flags = [naive or p.requires_grad for p in model.parameters()]

    def prepare() -> None:
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad = flag
        model.train()
        freeze_batchnorm_stats(model, everywhere=True)
    prepare()
    optimizer = adamw(trainable, lr=1e-4)
    criterion = torch.nn.CrossEntropyLoss()
    autocast = device.type == "cuda" or bf16

    def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = criterion(model(images), labels)
        loss.backward()
        optimizer.step()
        return loss
    step.prepare = prepare
    return step


def random_batch(batch_size: int, size: tuple[int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, *size, generator=generator)
    labels = torch.randint(0, 7, (batch_size,), generator=generator)
    return images.to(device).contiguous(memory_format=torch.channels_last), labels.to(device)


def bench_training(model: torch.nn.Module, size: tuple[int, int], batch_size: int, steps: int,
                   device: torch.device) -> dict:
    from lesionkit.model.features import head_logits

    images, labels = random_batch(batch_size, size, device)
    # With everything trained the naive way is the same thing: "full" has no naive twin.
    variants = {(phase, naive): train_step(model, unfreeze, naive, device)
                for phase, unfreeze in (("frozen", 0), ("finetune", 1), ("full", -1))
                for naive in ((False, True) if unfreeze != -1 else (False,))}
    # On a CPU, whether bfloat16 autocast would pay (``train.precision: bf16-mixed``; ``auto`` keeps 32-bit there).
    if device.type == "cpu":
        variants["finetune", "bf16"] = train_step(model, 1, False, device, bf16=True)
    # Two interleaved rounds, the better of each kept: a busy machine slows one round, rarely both.
    best = dict.fromkeys(variants, 0.0)
    for _ in range(2):
        for key, step in variants.items():
            step.prepare()
            best[key] = max(best[key], rate(lambda: step(images, labels), batch_size, steps, device=device))
    results = {}
    for phase, unfreeze in (("frozen", 0), ("finetune", 1), ("full", -1)):
        results[phase] = {"unfreeze": unfreeze, "images_per_s": best[phase, False]}
        if (phase, True) in best:
            results[phase].update(naive_images_per_s=best[phase, True], ratio=best[phase, False] / best[phase, True])
    if ("finetune", "bf16") in best:
        results["finetune_bf16"] = {"images_per_s": best["finetune", "bf16"],
                                    "ratio": best["finetune", "bf16"] / best["finetune", False]}
    # The frozen phase on stored features (cache_features): dropout + linear per step.
    set_trainable(model, 0)
    with torch.inference_mode():
        features = model.eval().forward_head(model.forward_features(images), pre_logits=True).float()
    features = features.clone()
    model.train()
    head = adamw(model.get_classifier().parameters(), lr=1e-3)

    def feature_step():
        head.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(head_logits(model, features), labels).backward()
        head.step()
    results["frozen"]["cached_features_images_per_s"] = rate(feature_step, batch_size, 20, 2, device)
    return results


def head_steps(model_name: str, size: tuple[int, int], batch_size: int, steps: int, held: bool) -> dict:
    """Images/s and page faults per step of head-phase steps in this process, with freed memory held or with
    glibc's own thresholds: what :func:`bench_allocator` runs in a fresh process for each side."""
    if held:
        hold_freed_memory()
    cpu = torch.device("cpu")
    model = create_model(ModelConfig(name=model_name, weights="none"), 7).to(memory_format=torch.channels_last)
    images, labels = random_batch(batch_size, size, cpu)
    step = train_step(model, 0, False, cpu)
    for _ in range(2):  # untimed: the heap settles in two steps
        step(images, labels)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    images_per_s = rate(lambda: step(images, labels), batch_size, steps, warmup=0)
    return {"images_per_s": images_per_s,
            "page_faults_per_step": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / steps}


def bench_allocator(model_name: str, size: tuple[int, int], batch_size: int, steps: int) -> dict:
    """Head-phase steps with freed memory held (:mod:`lesionkit.allocator`, as every ``lesionkit`` command runs)
    against glibc's defaults: images/s and page faults per step.

    The one comparison not made inside this process: glibc's thresholds follow the process's history, and once a
    heap has grown, later settings no longer change where its blocks come from. Each side runs in a fresh
    process instead, two rounds in alternating order, the better of each kept.
    """
    if user_chose_allocator():
        return {"skipped": "the environment sets glibc's malloc thresholds or preloads another allocator"}
    results = {"glibc": [], "held": []}
    for order in (("glibc", "held"), ("held", "glibc")):
        for side in order:
            code = (f"import json; from lesionkit.bench.measure import head_steps; print(json.dumps(head_steps("
                    f"{model_name!r}, {tuple(size)}, {batch_size}, {steps}, {side == 'held'})))")
            child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            if child.returncode != 0:
                return {"skipped": f"the {side} run failed: {(child.stderr.strip().splitlines() or ['?'])[-1]}"}
            results[side].append(json.loads(child.stdout.splitlines()[-1]))
    best = {side: max(runs, key=lambda run: run["images_per_s"]) for side, runs in results.items()}
    return {"glibc_images_per_s": best["glibc"]["images_per_s"], "held_images_per_s": best["held"]["images_per_s"],
            "ratio": best["held"]["images_per_s"] / best["glibc"]["images_per_s"],
            "glibc_page_faults_per_step": best["glibc"]["page_faults_per_step"],
            "held_page_faults_per_step": best["held"]["page_faults_per_step"], "batch_size": batch_size}


def bench_loader_wait(model: torch.nn.Module, frame: pd.DataFrame, pre: Preprocessing, cache, batch_size: int,
                      steps: int, device: torch.device) -> dict:
    """Share of the fine-tuning step's wall time spent in ``next(loader)``: augmenting from the cache, with the
    default workers and prefetching, as ``lesionkit train`` loads."""
    dataset = ImageDataset.from_frame(frame, train_transform(pre, AugmentConfig()), cache)
    loader = make_loader(dataset, min(batch_size, len(frame)), train=True)
    step = train_step(model, 1, False, device)
    iterator = iter(loader)
    images, labels = next(iterator)  # worker start-up is a one-off, not a per-step cost
    step(images.to(device).contiguous(memory_format=torch.channels_last), labels.to(device))
    waited = total = 0.0
    for _ in range(steps):
        start = time.perf_counter()
        try:
            images, labels = next(iterator)
        except StopIteration:
            iterator = iter(loader)
            images, labels = next(iterator)
        got = time.perf_counter()
        step(images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last),
             labels.to(device, non_blocking=True))
        synchronize(device)
        waited += got - start
        total += time.perf_counter() - start
    return {"workers": loader.num_workers, "batch_size": loader.batch_size, "wait_share": waited / total,
            "images_per_s": steps * loader.batch_size / total}


def batch_statistics(model: torch.nn.Module, images: torch.Tensor) -> None:
    """Set every BatchNorm's running statistics to those of ``images``, as training on data would. Fresh from
    random weights, a network's activations shrink layer by layer (each of B1's 23 gates halves them) to logits
    near 1e-6, where no difference between PyTorch and onnxruntime could show; afterwards they are of order one."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a plain average over the batches seen: here, exactly this one
    with torch.no_grad():
        model.train()(images)
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum
    model.eval()


def bench_inference(model: torch.nn.Module, pre: Preprocessing, meta: dict, batch_size: int, repeats: int,
                    device: torch.device, workdir: Path) -> tuple[dict, dict]:
    """Evaluation images/s on ``device``, and onnxruntime vs PyTorch eager on the CPU (one image; a batch)."""
    from lesionkit.serve.export import compare_model, export_model
    from lesionkit.serve.onnx_classifier import OnnxClassifier

    model.eval()
    images, _ = random_batch(batch_size, (pre.height, pre.width), device)

    @torch.inference_mode()
    def evaluate():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            return model(images)
    evaluation = {"images_per_s": rate(evaluate, batch_size, repeats, device=device), "batch_size": batch_size}

    cpu_model, batch = model.to("cpu"), images.cpu()
    batch_statistics(cpu_model, batch)
    try:
        onnx_file = export_model(cpu_model, pre, meta, workdir / "model.onnx")
    except LesionkitError as err:  # a GPU image without onnx still gets its other figures
        model.to(device)
        return evaluation, {"skipped": str(err)}
    served = OnnxClassifier(onnx_file, threads=torch.get_num_threads())  # a like-for-like thread count
    # The same on one thread tells how well the cores shared one image: on a virtual machine whose cores the
    # host sometimes runs as two threads of one physical core, two threads gain far less over one than otherwise
    # (docs/speed.md, "One image").
    alone = OnnxClassifier(onnx_file, threads=1)
    one = random_batch(1, (pre.height, pre.width), torch.device("cpu"))[0]

    @torch.inference_mode()
    def eager(x):
        return cpu_model(x.contiguous(memory_format=torch.channels_last))
    single = latencies({"torch": lambda: eager(one), "onnxruntime": lambda: served.logits(one),
                        "onnxruntime_1_thread": lambda: alone.logits(one)}, 3 * repeats)
    torch_single, onnx_single = single["torch"], single["onnxruntime"]
    difference, largest = compare_model(cpu_model, served, batch)
    onnx = {"torch_latency_ms": 1e3 * torch_single, "onnxruntime_latency_ms": 1e3 * onnx_single,
            "ratio": torch_single / onnx_single,
            "onnxruntime_1_thread_latency_ms": 1e3 * single["onnxruntime_1_thread"],
            "torch_batch_images_per_s": rate(lambda: eager(batch), len(batch), repeats),
            "onnxruntime_batch_images_per_s": rate(lambda: served.logits(batch), len(batch), repeats),
            "max_abs_difference": difference, "max_abs_logit": largest}
    model.to(device)
    return evaluation, onnx


def threading_environment() -> dict:
    """The OpenMP settings that change PyTorch's CPU figures, where set."""
    return {name: os.environ[name] for name in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY") if name in os.environ}


def memory(device: torch.device) -> dict:
    peak = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux reports KiB
    if device.type == "cuda":
        peak["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return peak


STAGES = ("data loading: JPEGs against the cache", "serving: onnxruntime against PyTorch eager",
          "training phases: lesionkit's freezing against the naive way", "memory held against glibc's defaults",
          "full network: lesionkit against timm's train.py loop", "waiting for data")


def announce(stage: int) -> None:
    """One line on stderr as each measurement starts: on a CPU the whole takes minutes (--json keeps stdout)."""
    print(f"[{stage + 1}/{len(STAGES)}] {STAGES[stage]}", file=sys.stderr, flush=True)


def benchmark(data_dir: Path | None, *, quick: bool, model_name: str, batch_size: int, steps: int = 10) -> dict:
    """Every measurement of the module docstring, as one JSON-ready dict."""
    device = _device()
    hold_freed_memory()  # as every lesionkit command runs; bench_allocator measures what it saves
    torch.manual_seed(0)
    model = create_model(ModelConfig(name=model_name, weights="none"), 7)  # weights do not change speed
    pre = Preprocessing.from_model_config(timm.data.resolve_model_data_config(model), [64, 88] if quick else None)
    meta = checkpoint_meta(model_name, pre, temperature=1.0)
    model = model.to(device, memory_format=torch.channels_last)
    with tempfile.TemporaryDirectory(prefix="lesionkit-benchmark-") as tmp:
        tmp = Path(tmp)
        if data_dir is None:
            source, frame = "synthetic 600x450 JPEGs", synthetic_jpegs(tmp, 16 if quick else 200)
        else:
            source, frame = str(data_dir), load_dataset(data_dir, decode=False).usable
            frame = frame.head(24) if quick else frame
        announce(0)
        data = bench_data(frame, pre, tmp / "cache")
        cache = data.pop("cache")
        steps = 2 if quick else steps
        # Serving before training: after minutes of load on every core, a virtual machine's host can leave two
        # threads sharing one image badly for a minute or more (docs/speed.md, "One image").
        announce(1)
        evaluation, onnx = bench_inference(model, pre, meta, 4 if quick else batch_size, steps, device, tmp)
        train_size = (pre.height, pre.width)
        announce(2)
        training = bench_training(model, train_size, 4 if quick else batch_size, steps, device)
        announce(3)
        allocator = bench_allocator(model_name, train_size, 4 if quick else batch_size, steps) \
            if device.type == "cpu" else {"skipped": "CPU memory only"}
        # Against timm's reference train.py: the full network at 224x224, batch 32, channels-last.
        announce(4)
        training["full_vs_timm"] = bench_full_network(frame, model_name, 64 if quick else 224, 4 if quick else 32,
                                                      steps, tmp / "cache", device)
        announce(5)
        wait = bench_loader_wait(model, frame, pre, cache, 4 if quick else batch_size, steps + 1, device)
    return {"device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} "
            f"threads)", "cpu": processor(), "model": model_name, "input": [pre.height, pre.width],
            "data_source": source, "quick": quick, "torch": torch.__version__,
            "environment": threading_environment(), "cache": data,
            "training": training, "allocator": allocator, "loader": wait, "evaluation": evaluation, "onnx": onnx,
            "memory": memory(device)}
