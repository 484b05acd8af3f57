"""`qwax plan`: memory per device of a model on a (possibly huge, abstract) device mesh.

    qwax plan --preset qwen3.5-397b-a17b --mesh fsdp=16,expert=8 --strategy fsdp_ep --seq 4096 --batch 128 \
        --device v5p --remat full --json
    qwax plan --preset qwen3.5-397b-a17b --mesh expert=8,context=8 --strategy fsdp_ep --mode infer \
        --context 1048576 --device h200
    qwax plan --preset qwen3.5-397b-a17b --mode infer --context 1048576 --remat full --sweep v5p,h200

--dtype, --param-dtype and --remat build the model's `qwax.RunOptions` (default: bfloat16 parameters and
compute, no remat). --context N is the context length: the sequence in train mode (as --seq), the KV cache in
infer mode (as --cache-len), whose prefill then runs in chunks of --seq (default 8192). A `context` mesh axis
splits the sequence, each prefill chunk and the KV cache; it must divide them. --sweep plans every candidate
mesh of `qwax.sharding.planner.SWEEP_MESHES` for the given devices and prints a Markdown table (--json: one
JSON list). Mesh axes a rule cannot use because they do not divide a dim are reported once on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    from qwax.options import REMAT_NAMES
    from qwax.sharding.planner import DEVICE_MEMORY_BYTES, PREFILL_CHUNK
    from qwax.sharding.rules import STRATEGIES

    p = subparsers.add_parser("plan", help="plan memory of a model on a device mesh",
                              description=__doc__.splitlines()[0])
    p.add_argument("--preset", required=True, help="model preset (qwax.PRESETS), e.g. qwen3.5-397b-a17b")
    p.add_argument("--mesh", default=None,
                   help='mesh spec, e.g. "data=2,fsdp=32,expert=8,context=4"; one axis may be -1 with --num-devices '
                        "(required unless --sweep)")
    p.add_argument("--num-devices", type=int, default=None, help="device count for -1 / auto mesh specs")
    p.add_argument("--strategy", default="fsdp", choices=sorted(STRATEGIES))
    p.add_argument("--rules", default=None, help='rule overrides, e.g. "vocab=tensor,embed=fsdp+expert,norm=none"')
    p.add_argument("--seq", type=int, default=None,
                   help=f"sequence length (train); prefill chunk (infer; with --context, default {PREFILL_CHUNK})")
    p.add_argument("--context", type=int, default=None,
                   help="context length in tokens: the sequence (train) or the KV cache (infer)")
    p.add_argument("--batch", type=int, default=None,
                   help="global batch size (sequences); required unless --sweep, whose default is 1 (infer) or "
                        "one sequence per batch shard of each mesh (train)")
    p.add_argument("--mode", default="train", choices=("train", "infer"))
    p.add_argument("--cache-len", type=int, default=None, help="KV cache length in infer mode (default: --seq)")
    p.add_argument("--device", default="v5p", choices=sorted(DEVICE_MEMORY_BYTES))
    p.add_argument("--sweep", default=None,
                   help='plan the candidate meshes of these devices, e.g. "v5p,h200" (ignores --mesh, --device)')
    p.add_argument("--remat", default="none", choices=REMAT_NAMES, help="rematerialisation policy (default none)")
    p.add_argument("--dtype", default="bfloat16", help="compute dtype: float32 | bfloat16 | float16 (default bfloat16)")
    p.add_argument("--param-dtype", default="bfloat16",
                   help="parameter storage dtype: float32 | bfloat16 | float16 (default bfloat16)")
    p.add_argument("--capacity-factor", type=float, default=None,
                   help="expert-parallel capacity factor (default: exact, worst-case buffers)")
    p.add_argument("--json", action="store_true", help="print exactly one JSON object (a list with --sweep)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qwax.config import get_preset
    from qwax.options import RunOptions
    from qwax.sharding.planner import format_plan, format_table, plan, sweep

    def fail(message: str) -> int:
        print(f"qwax plan: {message}", file=sys.stderr)
        return 2

    try:
        options = RunOptions(dtype=args.dtype, param_dtype=args.param_dtype, remat=args.remat)
        cfg = get_preset(args.preset)
    except (KeyError, ValueError) as e:
        return fail(e.args[0] if e.args else str(e))
    lengths = dict(seq=args.seq, context=args.context, mode=args.mode)
    try:
        if args.sweep is not None:
            devices = [d.strip() for d in args.sweep.split(",") if d.strip()]
            if args.cache_len is not None:
                return fail("--sweep plans --context (or --seq) tokens; --cache-len is not used there")
            plans = sweep(cfg, devices, options=options, batch=args.batch, capacity_factor=args.capacity_factor,
                          **lengths)
            print(json.dumps(plans) if args.json else format_table(plans))
            return 0
        if args.mesh is None or args.batch is None:
            return fail("--mesh and --batch are required (or --sweep DEVICES for a table of candidate meshes)")
        result = plan(cfg, args.mesh, args.strategy, options=options, batch=args.batch, cache_len=args.cache_len,
                      device=args.device, num_devices=args.num_devices, rule_overrides=args.rules,
                      capacity_factor=args.capacity_factor, **lengths)
    except ValueError as e:
        return fail(e.args[0] if e.args else str(e))
    print(json.dumps(result) if args.json else format_plan(result))
    return 0
