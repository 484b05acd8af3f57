"""`qwax plan`: memory per device of a model on a (possibly huge, abstract) device mesh.

    qwax plan --preset qwen3.5-397b-a17b --mesh fsdp=16,expert=8 --strategy fsdp_ep --seq 4096 --batch 128 \
        --device v5p --remat full --json

--dtype, --param-dtype and --remat build the model's `qwax.RunOptions` (default: bfloat16 parameters and
compute, no remat). Mesh axes a rule cannot use because they do not divide a dim are reported once on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    from qwax.options import REMAT_NAMES
    from qwax.sharding.planner import DEVICE_MEMORY_BYTES
    from qwax.sharding.rules import STRATEGIES

    p = subparsers.add_parser("plan", help="plan memory of a model on a device mesh",
                              description=__doc__.splitlines()[0])
    p.add_argument("--preset", required=True, help="model preset (qwax.PRESETS), e.g. qwen3.5-397b-a17b")
    p.add_argument("--mesh", required=True,
                   help='mesh spec, e.g. "data=2,fsdp=32,expert=8,tensor=1"; one axis may be -1 with --num-devices')
    p.add_argument("--num-devices", type=int, default=None, help="device count for -1 / auto mesh specs")
    p.add_argument("--strategy", default="fsdp", choices=sorted(STRATEGIES))
    p.add_argument("--rules", default=None, help='rule overrides, e.g. "vocab=tensor,embed=fsdp+expert,norm=none"')
    p.add_argument("--seq", type=int, required=True, help="sequence length (prefill length in infer mode)")
    p.add_argument("--batch", type=int, required=True, help="global batch size (sequences)")
    p.add_argument("--mode", default="train", choices=("train", "infer"))
    p.add_argument("--cache-len", type=int, default=None, help="KV cache length in infer mode (default: --seq)")
    p.add_argument("--device", default="v5p", choices=sorted(DEVICE_MEMORY_BYTES))
    p.add_argument("--remat", default="none", choices=REMAT_NAMES, help="rematerialisation policy (default none)")
    p.add_argument("--dtype", default="bfloat16", help="compute dtype: float32 | bfloat16 | float16 (default bfloat16)")
    p.add_argument("--param-dtype", default="bfloat16",
                   help="parameter storage dtype: float32 | bfloat16 | float16 (default bfloat16)")
    p.add_argument("--capacity-factor", type=float, default=None,
                   help="expert-parallel capacity factor (default: exact, worst-case buffers)")
    p.add_argument("--json", action="store_true", help="print exactly one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qwax.config import get_preset
    from qwax.options import RunOptions
    from qwax.sharding.planner import format_plan, plan

    try:
        options = RunOptions(dtype=args.dtype, param_dtype=args.param_dtype, remat=args.remat)
        cfg = get_preset(args.preset)
    except (KeyError, ValueError) as e:
        print(f"qwax plan: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    result = plan(cfg, args.mesh, args.strategy, options=options, seq=args.seq, batch=args.batch, mode=args.mode,
                  cache_len=args.cache_len, device=args.device, num_devices=args.num_devices,
                  rule_overrides=args.rules, capacity_factor=args.capacity_factor)
    print(json.dumps(result) if args.json else format_plan(result))
    return 0
