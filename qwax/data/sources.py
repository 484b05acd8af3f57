"""Document sources: local text, jsonl and parquet files, and the embedded default corpus.

A source yields documents (strings) in a fixed order: files in the order given (a directory expands to its files
in sorted order), documents in file order. Text files (.txt, .md, ...) are one document each, or several when
`separator` is set; jsonl and parquet rows give one document each from their `text_field`.
"""

from __future__ import annotations

import json
import os
from typing import Iterator, Sequence

DEFAULT_CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus.jsonl")
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")


def expand_paths(paths: Sequence[str], *, default: str = DEFAULT_CORPUS,
                 suffixes: tuple[str, ...] = TEXT_SUFFIXES + (".jsonl", ".parquet")) -> list[str]:
    """Files named by `paths` (comma lists allowed); a directory contributes its files ending in one of
    `suffixes`, sorted. The name "default" stands for the file `default` (the embedded corpus unless told)."""
    out: list[str] = []
    for entry in paths:
        for path in filter(None, (p.strip() for p in str(entry).split(","))):
            if path == "default":
                out.append(default)
            elif os.path.isdir(path):
                for dirpath, dirnames, filenames in os.walk(path):
                    dirnames.sort()
                    out += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(suffixes)]
            elif os.path.isfile(path):
                out.append(path)
            else:
                raise FileNotFoundError(f"data source {path!r}: no such file or directory")
    return out


def read_file(path: str, text_field: str = "text", separator: str | None = None) -> Iterator[str]:
    """Documents of one file (see module docstring)."""
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                if text_field not in row:
                    raise KeyError(f"{path}:{line_no}: no field {text_field!r} (fields: {sorted(row)})")
                yield row[text_field]
    elif path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(f"reading {path} needs pyarrow: pip install 'qwax[parquet]'") from None
        table = pq.read_table(path, columns=[text_field])
        yield from table.column(text_field).to_pylist()
    else:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if separator:
            yield from (doc for doc in text.split(separator) if doc.strip())
        else:
            yield text


def read_documents(paths: Sequence[str], text_field: str = "text", separator: str | None = None) -> list[str]:
    """All non-empty documents of `paths`, in order. "default" names the embedded corpus."""
    docs = []
    for path in expand_paths(paths):
        docs += [d for d in read_file(path, text_field, separator) if d and d.strip()]
    if not docs:
        raise ValueError(f"data sources {list(paths)} hold no documents")
    return docs
