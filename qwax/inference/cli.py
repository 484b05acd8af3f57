"""`qwax generate --checkpoint DIR --prompt TEXT`: stream a continuation to the terminal."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import numpy as np


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="generate text from a Hugging Face-format checkpoint",
                              description="Load a checkpoint (config.json, safetensors, tokenizer.json) and stream "
                                          "a continuation of the prompt.")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (as written by qwax.save_hf)")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--max-new-tokens", type=int, default=64)
    # Sampling flags default to the checkpoint's generation_config.json (greedy without one).
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: the checkpoint's "
                                                                   "generation_config.json, else greedy)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--presence-penalty", type=float, default=None)
    p.add_argument("--frequency-penalty", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import qwax
    from qwax.inference.generation_config import load_generation_config
    from qwax.inference.tokenizer import load_tokenizer

    if not os.path.isdir(args.checkpoint):
        print(f"qwax generate: checkpoint directory {args.checkpoint!r} does not exist", file=sys.stderr)
        return 2
    try:
        tokenizer = load_tokenizer(args.checkpoint)
        defaults = load_generation_config(args.checkpoint)
    except (FileNotFoundError, ValueError) as e:
        print(f"qwax generate: {e}", file=sys.stderr)
        return 2
    try:
        sampling = defaults.sampling.updated(
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, presence_penalty=args.presence_penalty,
            frequency_penalty=args.frequency_penalty, repetition_penalty=args.repetition_penalty)
    except ValueError as e:
        print(f"qwax generate: {e}", file=sys.stderr)
        return 2
    model = qwax.load_hf(args.checkpoint, dtype=args.dtype)
    ids = tokenizer.encode(args.prompt).ids
    if not ids:
        print("qwax generate: the prompt encodes to no tokens", file=sys.stderr)
        return 2
    limit = model.config.max_position_embeddings
    if len(ids) + args.max_new_tokens > limit:
        print(f"qwax generate: prompt of {len(ids)} tokens + --max-new-tokens {args.max_new_tokens} exceeds the "
              f"model's maximum length {limit}", file=sys.stderr)
        return 2

    generated: list[int] = []
    shown = ""
    start = [0.0]

    def stream(tokens: np.ndarray) -> None:
        nonlocal shown
        if not generated:
            start[0] = time.perf_counter()  # time decoding, not the prefill's compilation
        generated.append(int(tokens[0]))
        text = tokenizer.decode(generated)
        sys.stdout.write(text[len(shown):])
        sys.stdout.flush()
        shown = text

    sys.stdout.write(args.prompt)
    try:
        qwax.generate(model, np.asarray([ids], np.int32), max_new_tokens=args.max_new_tokens,
                      **dataclasses.asdict(sampling),
                      eos_token_id=defaults.eos_token_id, seed=args.seed, stream=stream)
    except ValueError as e:
        print(f"\nqwax generate: {e}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - start[0]
    rate = (len(generated) - 1) / elapsed if len(generated) > 1 and elapsed > 0 else float("nan")
    print(f"\n\n[{len(generated)} tokens, {rate:.1f} tokens/s after the first]", file=sys.stderr)
    return 0
