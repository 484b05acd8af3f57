"""Split a Qwen3.5 completion into its reasoning (the think block) and its content, whole or as it streams.

The model writes ``<think>\\nREASONING\\n</think>\\n\\nCONTENT``. The chat template may open the block itself: with
thinking on the generation prompt ends ``<|im_start|>assistant\\n<think>\\n`` and the completion starts inside the
reasoning (no ``<think>`` of its own); with thinking off it ends ``<think>\\n\\n</think>\\n\\n`` and the completion
is all content. `think_open` tells the two apart from the prompt text.

Rules (the same for `split_reasoning` and `ReasoningStream`):
- a block opens when the prompt opened it (``started_in_reasoning``) or when the completion, after leading
  whitespace, starts with ``<think>``; a ``<think>`` later in the text is plain text;
- reasoning is the text up to the first ``</think>``, with leading and trailing newlines stripped; a block that
  never closes (the completion ran out of tokens) is all reasoning;
- content is the text after ``</think>`` with its leading newlines stripped;
- with no block at all, the whole text (unchanged) is content and the reasoning is None (an empty block gives "").
"""

from __future__ import annotations

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

_START, _REASONING, _CONTENT_LEAD, _CONTENT = range(4)


def think_open(prompt_text: str) -> bool:
    """Whether the prompt leaves a think block open: its last ``<think>`` comes after its last ``</think>``.

    ("<think>" is not a substring of "</think>", so the two searches cannot see each other's markers.)
    """
    return prompt_text.rfind(THINK_OPEN) > prompt_text.rfind(THINK_CLOSE)


def split_reasoning(text: str, *, started_in_reasoning: bool) -> tuple[str | None, str]:
    """A whole completion -> (reasoning, content); reasoning is None when there is no think block (module rules)."""
    if not started_in_reasoning:
        rest = text.lstrip()
        if not rest.startswith(THINK_OPEN):
            return None, text
        text = rest[len(THINK_OPEN):]
    end = text.find(THINK_CLOSE)
    if end < 0:
        return text.strip("\n"), ""
    return text[:end].strip("\n"), text[end + len(THINK_CLOSE):].lstrip("\n")


def partial_suffix(text: str, marker: str) -> int:
    """The length of the longest suffix of `text` that is a proper prefix of `marker` (0: none).

    That suffix is all a stream must hold back: any earlier text cannot be part of a `marker` still to come.
    """
    for k in range(min(len(text), len(marker) - 1), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


class ReasoningStream:
    """`split_reasoning` incrementally: text deltas in, (reasoning_delta, content_delta) out.

    The reasoning deltas of all `feed` calls and the final `finish` concatenate to the reasoning of
    `split_reasoning` on the whole text (or "" where that gives None), and the content deltas to its content.
    Text is held back only while it is undecided: a tail that could begin ``</think>`` (or, before anything else,
    leading whitespace that could precede ``<think>``), trailing newlines of the reasoning (stripped if the block
    ends right after them), and newlines right after ``</think>`` (always stripped).
    """

    def __init__(self, started_in_reasoning: bool):
        self._state = _REASONING if started_in_reasoning else _START
        self._buf = ""  # text received but not yet released
        self._reasoning_begun = False  # a reasoning delta was released (its leading newlines are then done)
        self._finished = False

    @property
    def in_reasoning(self) -> bool:
        """Whether the stream is inside an open think block (for a server deciding how to label held text)."""
        return self._state == _REASONING

    def _reasoning(self, text: str) -> str:
        """Release reasoning text, dropping the block's leading newlines (`text` never ends in a newline
        unless it is the block's final piece, so the first non-empty piece ends them)."""
        if not self._reasoning_begun:
            text = text.lstrip("\n")
            self._reasoning_begun = bool(text)
        return text

    def feed(self, delta: str) -> tuple[str, str]:
        """Take the next piece of generated text; return the (reasoning, content) text it releases."""
        if self._finished:
            raise RuntimeError("ReasoningStream.feed after finish")
        self._buf += delta
        reasoning = ""
        if self._state == _START:
            rest = self._buf.lstrip()
            if rest.startswith(THINK_OPEN):
                self._state, self._buf = _REASONING, rest[len(THINK_OPEN):]
            elif THINK_OPEN.startswith(rest):
                return "", ""  # whitespace or a beginning of "<think>": could still open a block
            else:
                self._state = _CONTENT
        if self._state == _REASONING:
            end = self._buf.find(THINK_CLOSE)
            if end < 0:
                # Release all but a possible beginning of "</think>" and the newlines just before it.
                head = self._buf[:len(self._buf) - partial_suffix(self._buf, THINK_CLOSE)]
                out = head.rstrip("\n")
                self._buf = self._buf[len(out):]
                return self._reasoning(out), ""
            reasoning = self._reasoning(self._buf[:end].rstrip("\n"))
            self._state, self._buf = _CONTENT_LEAD, self._buf[end + len(THINK_CLOSE):]
        if self._state == _CONTENT_LEAD:
            self._buf = self._buf.lstrip("\n")
            if not self._buf:
                return reasoning, ""
            self._state = _CONTENT
        content, self._buf = self._buf, ""
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """The end of the completion: release what was held back, as `split_reasoning` would classify it."""
        if self._finished:
            return "", ""
        self._finished = True
        buf, self._buf = self._buf, ""
        if self._state == _START:
            return "", buf  # never became "<think>": the whole text is content
        if self._state == _REASONING:
            return self._reasoning(buf.rstrip("\n")), ""  # unterminated block: all reasoning
        return "", ""  # _CONTENT_LEAD holds only newlines to strip; _CONTENT holds nothing
