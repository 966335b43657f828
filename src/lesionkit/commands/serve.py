"""``lesionkit serve``: the web demo (Gradio) for a checkpoint or an ensemble, on this machine only unless told
otherwise."""

from __future__ import annotations

import argparse
import os

from lesionkit.model.shipped import add_checkpoint_argument, checkpoint_or_default
from lesionkit.serve.device import add_device_argument, check_device



def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_argument(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 opens it to the "
                             "network)")
    parser.add_argument("--port", type=int, default=7860, help="port to listen on (default: 7860)")
    add_device_argument(parser)


def run(args: argparse.Namespace) -> int:
    check_device(args.device)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a research tool
    from lesionkit.serve.demo import check_address, serve
    from lesionkit.serve.ensemble import load_torch_classifier

    check_address(args.host, args.port)
    args.checkpoint = checkpoint_or_default(args.checkpoint)
    classifier = load_torch_classifier(args.checkpoint, args.device)
    serve(classifier, str(args.checkpoint), args.host, args.port)
    return 0
