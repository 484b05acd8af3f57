"""`qwax` command line: `qwax train | generate | chat | serve | convert | plan ...`.

Each subcommand lives beside the code it drives and registers itself through a `register(subparsers)` function
that adds its parser and sets `func`; this file only wires them up, so adding a command touches one line here.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from qwax.cpu_allocator import keep_freed_memory

# (module, description); each module defines register(subparsers).
SUBCOMMANDS = (
    ("qwax.train.cli", "train a model from a recipe"),
    ("qwax.inference.cli", "generate text from a checkpoint"),
    ("qwax.convert.cli", "convert checkpoints between Hugging Face and orbax"),
    ("qwax.sharding.cli", "plan memory of a model on a device mesh"),
    ("qwax.serve.cli", "serve a checkpoint over the OpenAI API"),
    ("qwax.serve.chat", "chat with a checkpoint in the terminal"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwax", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name, _ in SUBCOMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:  # a real missing dependency inside an existing command
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not argv:
        argv = ["train"]  # the main job: train the tiny recipe on the embedded corpus, then sample from it
    args = parser.parse_args(argv)
    if getattr(args, "keep_freed_memory", False):  # set by training commands; must precede any computation
        keep_freed_memory()
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
