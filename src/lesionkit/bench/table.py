"""The benchmark's figures as the table ``lesionkit benchmark`` prints: each saving beside its baseline."""

from __future__ import annotations


def allocator_row(a: dict) -> str:
    if "skipped" in a:
        return f"memory held      skipped: {a['skipped']}"
    return (f"memory held      {a['held_images_per_s']:8.1f} img/s   glibc's defaults {a['glibc_images_per_s']:8.1f} "
            f"img/s   {a['ratio']:5.2f}x   (frozen-phase step, batch {a['batch_size']}: "
            f"{a['held_page_faults_per_step']:,.0f} vs {a['glibc_page_faults_per_step']:,.0f} page faults)")


def table(result: dict) -> str:
    """The figures of :func:`lesionkit.bench.measure.benchmark`, a line per measurement."""
    c, t, o = result["cache"], result["training"], result["onnx"]
    f = t["full_vs_timm"]
    if "skipped" in o:
        o = {k: float("nan") for k in ("torch_latency_ms", "onnxruntime_latency_ms", "ratio", "max_abs_difference",
                                        "max_abs_logit", "onnxruntime_1_thread_latency_ms",
                                        "torch_batch_images_per_s", "onnxruntime_batch_images_per_s")}

    rows = [
        f"lesionkit benchmark on {result['device']}, {result['model']} at {result['input'][0]}x{result['input'][1]}, "
        f"torch {result['torch']}, data: {result['data_source']}{' (quick)' if result['quick'] else ''}",
        f"processor: {result['cpu']}",
        *[f"{name}={value}" + (" (PyTorch's threads sleep between operations: one image's latency about doubles, "
                               "measured here)" if value.upper() == "PASSIVE" else "")
          for name, value in result["environment"].items()],
        "",
        f"data, {c['images']} images   JPEG {c['jpeg_images_per_s']:8.1f} img/s   cache {c['cache_images_per_s']:8.1f} "
        f"img/s   {c['ratio']:5.2f}x   (cache built at {c['build_images_per_s']:.0f} img/s)",
        f"frozen phase     {t['frozen']['images_per_s']:8.1f} img/s   naive {t['frozen']['naive_images_per_s']:8.1f} "
        f"img/s   {t['frozen']['ratio']:5.2f}x",
        f"  on stored features {t['frozen']['cached_features_images_per_s']:8.0f} img/s (cache_features: true)",
        f"fine-tune phase  {t['finetune']['images_per_s']:8.1f} img/s   "
        f"naive {t['finetune']['naive_images_per_s']:8.1f} img/s   {t['finetune']['ratio']:5.2f}x",
        *([f"  bf16 autocast  {t['finetune_bf16']['images_per_s']:8.1f} img/s   32-bit "
           f"{t['finetune']['images_per_s']:8.1f} img/s   {t['finetune_bf16']['ratio']:5.2f}x   "
           f"(train.precision: bf16-mixed on this CPU)"] if "finetune_bf16" in t else []),
        f"full network     {t['full']['images_per_s']:8.1f} img/s (BatchNorm statistics frozen, random batch)",
        f"  real images at {f['size'][0]}x{f['size'][1]}, batch {f['batch_size']}, BatchNorm updating: lesionkit "
        f"{f['images_per_s']:.1f} img/s   timm train.py way {f['timm_train_py_images_per_s']:.1f} img/s   "
        f"{f['ratio']:5.2f}x",
        allocator_row(result["allocator"]),
        f"loader (fine-tune, {result['loader']['workers']} workers): {result['loader']['images_per_s']:.1f} img/s, "
        f"{100 * result['loader']['wait_share']:.0f}% of the step waiting for data",
        f"evaluation       {result['evaluation']['images_per_s']:8.1f} img/s",
        f"one image        PyTorch {o['torch_latency_ms']:7.1f} ms   onnxruntime {o['onnxruntime_latency_ms']:7.1f} ms"
        f"   {o['ratio']:5.2f}x   max |diff| {o['max_abs_difference']:.1e} on logits up to "
        f"{o['max_abs_logit']:.2f}",
        f"  onnxruntime on one thread {o['onnxruntime_1_thread_latency_ms']:.1f} ms: all threads together "
        f"{o['onnxruntime_1_thread_latency_ms'] / o['onnxruntime_latency_ms']:.2f}x faster",
        f"batch of {result['evaluation']['batch_size']:<3}     PyTorch {o['torch_batch_images_per_s']:7.1f} img/s   "
        f"onnxruntime {o['onnxruntime_batch_images_per_s']:7.1f} img/s",
        "peak memory      " + ", ".join(f"{k.removeprefix('peak_').removesuffix('_mb')} {v:.0f} MB"
                                         for k, v in result["memory"].items()),
    ]
    return "\n".join(rows)
