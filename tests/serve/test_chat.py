"""`qwax chat`: a scripted multi-turn session through its stdin / stdout."""

from __future__ import annotations

import io

import pytest

from qwax.cli import build_parser

pytestmark = pytest.mark.slow


def _run(checkpoint, lines: list[str], *flags: str) -> tuple[int, str]:
    from qwax.serve import chat

    args = build_parser().parse_args(["chat", "--checkpoint", str(checkpoint), "--max-tokens", "6",
                                      "--temperature", "0", *flags])
    out = io.StringIO()
    code = chat.run(args, stdin=io.StringIO("".join(line + "\n" for line in lines)), stdout=out)
    return code, out.getvalue()


def test_chat_streams_answers_keeps_history_and_resets(checkpoint, capsys):
    path, _ = checkpoint
    code, out = _run(path, ["hello", "and again", "/reset", "hello", "/exit"], "--no-thinking",
                     "--system", "be brief")
    err = capsys.readouterr().err
    assert code == 0
    answers = [a for a in out.split("> ") if a.strip()]
    assert len(answers) == 3  # /reset and /exit print no answer
    assert answers[0] == answers[2]  # after /reset the same first turn gives the same greedy answer
    assert err.count("tokens/s") == 3 and "(history cleared)" in err


def test_thinking_output_is_marked_when_not_a_terminal(checkpoint):
    path, _ = checkpoint
    code, out = _run(path, ["hello"], "--thinking")
    assert code == 0
    assert "[thinking]" in out  # the prompt opened the think block: the first tokens are reasoning


def test_missing_checkpoint(capsys):
    args = build_parser().parse_args(["chat", "--checkpoint", "/nonexistent"])
    from qwax.serve import chat

    assert chat.run(args) == 2
    assert "does not exist" in capsys.readouterr().err
