"""Reading the JSON files of a checkpoint directory (config, tokenizer config, generation config) with errors
that name the file."""

from __future__ import annotations

import json
from typing import Any


def read_json_object(path: str, error: type[Exception] = ValueError) -> dict[str, Any]:
    """The JSON object in `path`; raises `error` naming the file when it is not valid JSON or not an object."""
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise error(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise error(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data
