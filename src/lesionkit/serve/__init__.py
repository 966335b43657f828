"""Serving: one classifier protocol with a PyTorch and an onnxruntime backend, test-time views, prediction on a
user's images, and ONNX export.

Nothing here imports torch at package level: ``predict`` with the onnxruntime backend runs without it.
"""
