"""`qwax generate --checkpoint DIR --prompt TEXT`: stream a continuation to the terminal."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Any

import numpy as np


def add_rope_arguments(p: argparse.ArgumentParser) -> None:
    """--rope-scaling / --rope-parameters: long-context rope scaling without editing the checkpoint's config.json
    (qwax.config.rope_overrides; `qwax generate`, `qwax serve` and `qwax chat` take them)."""
    p.add_argument("--rope-scaling", metavar="TYPE:FACTOR", default=None,
                   help="scale the rotary frequencies: yarn:4 (Qwen3.5's 1M-token recipe), linear:F, llama3:F "
                        "(with low/high_freq_factor in --rope-parameters). The original length is the "
                        "checkpoint's max_position_embeddings; the new maximum is FACTOR times it")
    p.add_argument("--rope-parameters", metavar="JSON", default=None,
                   help="a JSON object merged over the checkpoint's rope_parameters after --rope-scaling (null "
                        "deletes a key), as vLLM's --hf-overrides; e.g. '{\"beta_fast\": 16}'")


def rope_config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The QwaxConfig overrides that --rope-scaling / --rope-parameters ask of `args.checkpoint` ({} without
    them), for `qwax.load_hf(path, **overrides)`. Raises ConfigError (a ValueError) naming the flag or field."""
    if args.rope_scaling is None and args.rope_parameters is None:
        return {}
    from qwax.config import QwaxConfig, rope_overrides

    return rope_overrides(QwaxConfig.from_hf(args.checkpoint), args.rope_scaling, args.rope_parameters)


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
    add_rope_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import qwax
    from qwax.inference.generation_config import load_generation_config
    from qwax.inference.tokenizer import load_tokenizer

    if not os.path.isdir(args.checkpoint):
        print(f"qwax generate: checkpoint directory {args.checkpoint!r} does not exist", file=sys.stderr)
        return 2
    try:
        overrides = rope_config_overrides(args)
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
    model = qwax.load_hf(args.checkpoint, dtype=args.dtype, **overrides)
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
