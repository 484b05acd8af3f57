"""`qwax serve --checkpoint DIR`: an OpenAI-compatible HTTP server for a Hugging Face-format checkpoint."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from qwax.inference.cli import add_rope_arguments, rope_config_overrides


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve", help="serve a checkpoint over the OpenAI API (chat completions, completions)",
        description="Load a checkpoint (config.json, safetensors, tokenizer.json, chat template, "
                    "generation_config.json) and answer the OpenAI API: POST /v1/chat/completions, "
                    "POST /v1/completions, GET /v1/models, GET /health. Concurrent requests are batched.")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (as written by qwax.save_hf)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("QWAX_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: $QWAX_API_KEY, else none)")
    p.add_argument("--max-batch", type=int, default=8, help="most rows (choices) decoded together (default 8)")
    p.add_argument("--batch-window-ms", type=float, default=1.0,
                   help="a forming batch waits for more requests while they arrive less than this apart "
                        "(default 1 ms; at most 50 ms in all)")
    p.add_argument("--model-name", default=None, help="the model id clients pass (default: the directory name)")
    p.add_argument("--dtype", default="auto", help="compute dtype: auto (the checkpoint's), float32, bfloat16")
    p.add_argument("--max-tokens", type=int, default=1024,
                   help="output budget of a request that sets no max_tokens (default 1024; capped by the context)")
    p.add_argument("--max-body-bytes", type=int, default=4 << 20, help="larger request bodies get 413 (4 MiB)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add_rope_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from qwax.serve.app import ServeSettings, create_app
    from qwax.serve.loading import load_served

    if not os.path.isdir(args.checkpoint):
        print(f"qwax serve: checkpoint directory {args.checkpoint!r} does not exist", file=sys.stderr)
        return 2
    for name in ("max_batch", "max_tokens", "max_body_bytes"):
        if getattr(args, name) < 1:
            print(f"qwax serve: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}",
                  file=sys.stderr)
            return 2
    logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        level=getattr(logging, args.log_level.upper()))
    try:
        served = load_served(args.checkpoint, dtype=args.dtype, max_batch=args.max_batch,
                             batch_window_s=args.batch_window_ms / 1000, **rope_config_overrides(args))
    except (FileNotFoundError, ValueError) as e:
        print(f"qwax serve: {e}", file=sys.stderr)
        return 2
    name = args.model_name or os.path.basename(os.path.abspath(args.checkpoint))
    settings = ServeSettings(model_name=name, api_key=args.api_key, max_body_bytes=args.max_body_bytes,
                             default_max_tokens=args.max_tokens)
    print(f"qwax serve: {name!r} on http://{args.host}:{args.port}/v1"
          + (" (API key required)" if args.api_key else ""), file=sys.stderr, flush=True)
    try:
        uvicorn.run(create_app(served, settings), host=args.host, port=args.port, log_level=args.log_level,
                    access_log=False)
    finally:
        served.scheduler.close()
    return 0
