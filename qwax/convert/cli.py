"""`qwax convert hf-to-orbax | orbax-to-hf | hf-to-hf SRC DST`: streaming checkpoint conversion.

    qwax convert hf-to-orbax Qwen3.5-35B-A3B/ ckpt/orbax            # scanned layout, dtypes as stored
    qwax convert hf-to-orbax SRC DST --layout unscanned --dtype bfloat16
    qwax convert orbax-to-hf ckpt/orbax out/ --max-shard-size 5GB
    qwax convert hf-to-hf SRC DST --max-shard-size 2GB --experts fused
"""

from __future__ import annotations

import argparse
import re
import sys

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000, '500MiB' -> 524_288_000, '1000' -> 1000 (the units transformers accepts)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"size {text!r}: expected a number with an optional unit "
                                         f"(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
    size = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if size <= 0:
        raise argparse.ArgumentTypeError(f"size {text!r} must be positive")
    return size


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("convert", help="convert checkpoints between Hugging Face safetensors and orbax",
                              description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="direction", metavar="DIRECTION")
    specs = (
        ("hf-to-orbax", "safetensors checkpoint directory -> qwax orbax checkpoint (OCDBT)"),
        ("orbax-to-hf", "qwax orbax checkpoint -> safetensors checkpoint directory"),
        ("hf-to-hf", "re-shard (or cast, or change the expert layout of) a safetensors checkpoint"),
    )
    for name, help_text in specs:
        q = sub.add_parser(name, help=help_text, description=help_text)
        q.add_argument("src", metavar="SRC")
        q.add_argument("dst", metavar="DST", help="created atomically; must not exist unless --force")
        q.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                       help="storage dtype of the output (default: as stored); float32 A_log and GDN norm "
                            "weights stay float32")
        q.add_argument("--force", action="store_true", help="replace DST if it exists")
        q.add_argument("--no-progress", action="store_true", help="no progress bar")
        if name == "hf-to-orbax":
            q.add_argument("--layout", choices=["scanned", "unscanned"], default="scanned",
                           help="parameter layout: scanned stacks repeating layer groups (default)")
        else:
            q.add_argument("--max-shard-size", type=parse_size, default=None, metavar="SIZE",
                           help="largest safetensors shard, e.g. 5GB (default: one file)")
            q.add_argument("--experts", choices=["fused", "per_expert"], default=None,
                           help="routed-expert key layout (default: that of the source checkpoint)")
        q.set_defaults(func=run)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def run(args: argparse.Namespace) -> int:
    from qwax.convert import stream
    from qwax.convert.safetensors_io import CheckpointError

    common = dict(dtype=args.dtype, overwrite=args.force, progress=not args.no_progress)
    try:
        if args.direction == "hf-to-orbax":
            stats = stream.convert_hf_to_orbax(args.src, args.dst, scan_layers=args.layout == "scanned", **common)
        elif args.direction == "orbax-to-hf":
            stats = stream.convert_orbax_to_hf(args.src, args.dst, experts=args.experts,
                                               max_shard_bytes=args.max_shard_size, **common)
        else:
            stats = stream.convert_hf_to_hf(args.src, args.dst, experts=args.experts,
                                            max_shard_bytes=args.max_shard_size, **common)
    except (CheckpointError, FileExistsError, FileNotFoundError) as e:
        print(f"qwax convert {args.direction}: {e}", file=sys.stderr)
        return 1
    print(f"qwax convert {args.direction}: {args.src} -> {args.dst}: {stats.summary()}", file=sys.stderr)
    return 0
