"""Rebuild the embedded default corpus `corpus.jsonl` from the Python standard library's docstrings.

The corpus ships inside the package so that it is byte-identical on every machine (the stdlib differs between
Python releases); this script only documents and reproduces how it was made:

    python -m qwax.data.build_corpus            # writes qwax/data/corpus.jsonl

It walks the stdlib of the running interpreter in sorted path order (skipping tests, demos, codecs tables and
private modules), and emits one document per docstring of at least MIN_CHARS characters, titled with the
object's dotted name, until MAX_CHARS characters. The shipped file was built with CPython 3.11.7. The text is
from the Python standard library, Copyright (c) 2001 Python Software Foundation, distributed under the PSF
License Agreement (see CORPUS_LICENSE.txt).
"""

from __future__ import annotations

import ast
import json
import os
import sysconfig

MIN_CHARS = 200
MAX_CHARS = 1_500_000
SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "encodings", "site-packages", "ensurepip",
             "tkinter", "pydoc_data", "__pycache__", "config-3.11-x86_64-linux-gnu"}


def stdlib_docstrings(root: str):
    """Yield (dotted name, docstring) for modules, classes and functions of the stdlib under `root`."""
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith(("_", ".")))
        paths += [os.path.join(dirpath, f) for f in filenames if f.endswith(".py") and not f.startswith("_")]
    for path in sorted(paths):
        module = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
        try:
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read())
        except (SyntaxError, UnicodeDecodeError):
            continue
        stack = [(module, tree)]
        while stack:
            name, node = stack.pop(0)
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield name, doc
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    if not child.name.startswith("_"):
                        stack.append((f"{name}.{child.name}", child))


def main() -> None:
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus.jsonl")
    total = 0
    with open(out, "w", encoding="utf-8") as f:
        for name, doc in stdlib_docstrings(sysconfig.get_paths()["stdlib"]):
            if len(doc) < MIN_CHARS:
                continue
            text = f"{name}\n\n{doc}"
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
            total += len(text)
            if total >= MAX_CHARS:
                break
    print(f"wrote {out}: {total} characters")


if __name__ == "__main__":
    main()
