"""`qwax train [RECIPE] [--steps N] [--workdir DIR] [--resume] [key=value ...]`."""

from __future__ import annotations

import argparse
import sys


def run(args: argparse.Namespace) -> int:
    from qwax.train.loop import TrainingError, train
    from qwax.train.recipes import RECIPES, get_recipe

    items = list(args.items)
    name = "tiny"
    if items and "=" not in items[0]:
        name = items.pop(0)
    try:
        recipe = get_recipe(name, items)
    except (KeyError, ValueError) as e:
        print(f"qwax train: {e.args[0] if e.args else e}", file=sys.stderr)
        if isinstance(e, KeyError):
            print(f"recipes: {', '.join(sorted(RECIPES))}", file=sys.stderr)
        return 2
    try:
        train(recipe, args.workdir, resume=args.resume, steps=args.steps, progress=not args.no_progress)
    except TrainingError as e:
        print(f"qwax train: {e}", file=sys.stderr)
        return 1
    return 0


class _TrainParser(argparse.ArgumentParser):
    """Accepts key=value overrides anywhere, also after options (`qwax train tiny --steps 9 seed=1`)."""

    def parse_known_args(self, args=None, namespace=None):
        ns, extra = super().parse_known_args(args, namespace)
        is_item = lambda a: "=" in a and not a.startswith("-")  # noqa: E731
        ns.items = list(getattr(ns, "items", []) or []) + [a for a in extra if is_item(a)]
        return ns, [a for a in extra if not is_item(a)]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="train a model from a recipe (default: tiny, on the embedded corpus)",
        description="Train a recipe. RECIPE is one of qwax.train.recipes.RECIPES (default: tiny); key=value "
                    "items override recipe fields, model.FIELD=value model config fields or run options, "
                    "options.FIELD=value run options (qwax.RunOptions: dtype, param_dtype, remat, scan_layers, "
                    "gdn_chunk_size, *_impl) (e.g. qwax train tiny steps=50 model.hidden_size=64 model.remat=full).")
    p.__class__ = _TrainParser
    p.add_argument("items", nargs="*", metavar="RECIPE | key=value", help="recipe name, then overrides")
    p.add_argument("--steps", type=int, default=None, help="train up to this many optimizer steps")
    p.add_argument("--workdir", default="qwax-run", help="run directory (default: ./qwax-run)")
    p.add_argument("--resume", action="store_true", help="continue the run in --workdir from its last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    # Training keeps XLA:CPU's freed temporaries (qwax.cpu_allocator); generation does not, see there.
    p.set_defaults(func=run, keep_freed_memory=True)
