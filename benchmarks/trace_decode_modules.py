"""Which qwax modules one decode step touches, from `qwax.generate` to the sampled token.

Runs `qwax.generate` on a tiny random model twice: once to compile, then again with a stream callback that turns
on `sys.setprofile` after the `--step`-th token and off after the next one. Between the two callbacks the loop
does exactly one step: it dispatches the sampling of the next token and the decode step (both compiled already)
and waits for the token, then updates the stop state and streams it. Printed: every qwax module whose Python
functions ran in that window (with the functions), the qwax modules on the call stack from `qwax.generate` down
to the loop, and the count of both together.

    python benchmarks/trace_decode_modules.py [--step 3] [--temperature 0.0] [--batch 2]
"""

from __future__ import annotations

import argparse
import sys
from types import FrameType
from typing import Any

import numpy as np
from flax import nnx

import qwax


def qwax_module(frame: FrameType) -> str | None:
    name = frame.f_globals.get("__name__", "")
    return name if name == "qwax" or name.startswith("qwax.") else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--step", type=int, default=3, help="trace the step after this many tokens (default 3)")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    if args.step < 1:
        parser.error("--step must be >= 1")

    cfg = qwax.get_preset("tiny-moe", initializer_range=0.1)
    model = qwax.QwaxForCausalLM(cfg, rngs=nnx.Rngs(0))
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, 12)).astype(np.int32)
    kw: dict[str, Any] = dict(max_new_tokens=args.step + 3, temperature=args.temperature, eos_token_id=[])
    qwax.generate(model, ids, **kw)  # warm-up: every step below is compiled already

    called: dict[str, set[str]] = {}
    stack: list[tuple[str, str]] = []
    seen = [0]

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if event == "call":
            module = qwax_module(frame)
            if module is not None:
                called.setdefault(module, set()).add(frame.f_code.co_qualname)

    def stream(tokens: np.ndarray) -> None:
        seen[0] += 1
        if seen[0] == args.step:
            frame = sys._getframe(1)
            while frame is not None:  # the qwax frames between qwax.generate and this callback
                module = qwax_module(frame)
                if module is not None:
                    stack.append((module, frame.f_code.co_qualname))
                frame = frame.f_back
            sys.setprofile(profile)
        elif seen[0] == args.step + 1:
            sys.setprofile(None)

    qwax.generate(model, ids, stream=stream, **kw)
    sys.setprofile(None)

    print(f"one decode step (after token {args.step}, batch {args.batch}, temperature {args.temperature}):")
    print("qwax functions called during the step:")
    for module in sorted(called):
        print(f"  {module}: {', '.join(sorted(called[module]))}")
    print("qwax frames on the stack (innermost first):")
    for module, function in stack:
        print(f"  {module}: {function}")
    modules = sorted(set(called) | {module for module, _ in stack})
    print(f"qwax modules touched: {len(modules)} ({', '.join(modules)})")


if __name__ == "__main__":
    main()
