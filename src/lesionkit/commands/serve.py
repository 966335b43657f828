"""``lesionkit serve``: the web demo (Gradio) for a checkpoint or an ensemble, on this machine only unless told
otherwise."""

from __future__ import annotations

import argparse
import os

from lesionkit.model.shipped import add_checkpoint_argument, checkpoint_or_default



def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_argument(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 opens it to the "
                             "network)")
    parser.add_argument("--port", type=int, default=7860, help="port to listen on (default: 7860)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")


def run(args: argparse.Namespace) -> int:
    args.checkpoint = checkpoint_or_default(args.checkpoint)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a research tool
    from lesionkit.serve.demo import serve
    from lesionkit.serve.ensemble import load_torch_classifier

    classifier = load_torch_classifier(args.checkpoint, args.device)
    print(f"Serving {args.checkpoint} on http://{args.host}:{args.port} (Ctrl-C stops)", flush=True)
    serve(classifier, str(args.checkpoint), args.host, args.port)
    return 0
