"""The server's batching scheduler: one worker thread owns the model and runs requests in batches.

Requests queue up; when the worker is free it takes every waiting request that fits `max_batch` rows (a request
with n choices takes n rows), waiting briefly while more keep arriving (see Scheduler), and runs them as one
batch through the engine's batched prefill and decode (qwax.inference.engine). Requests that arrive while a
batch runs join the next one. Each row carries its own sampling settings, PRNG key, token limit, stop ids and stop
strings, so batching never changes a request's tokens (up to floating-point rounding): the row of choice i of a
request with seed s draws from fold_in(key(s), i), wherever it sits in the batch.

Batches are padded to a power-of-two number of rows (the padding rows generate nothing) so that the compiled
steps are shared between batches of similar size.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from typing import Callable, Sequence

import jax
import numpy as np

from qwax.inference.engine import MeshPlacement, check_request, generate_tokens
from qwax.inference.sampling import SamplingParams
from qwax.model import QwaxForCausalLM

log = logging.getLogger("qwax.serve")


@dataclasses.dataclass
class Delta:
    """An event of one choice: new text, and at the end finish_reason ("stop" | "length") with the counts."""

    index: int
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0


@dataclasses.dataclass
class Job:
    """One request: prompt ids, n choices, each with `sampling`, up to max_tokens tokens, stopping at `eos` ids
    (unless ignore_eos) or at any of `stop` (the text before it is kept). on_event([Delta, ...]) is called from
    the worker thread once per decoding step that has news for the job (streaming), or once with all of them
    when every choice has finished (not streaming); on_error(exception) if the batch fails. Setting `cancelled`
    finishes the request's rows."""

    prompt_ids: Sequence[int]
    n: int
    sampling: SamplingParams
    seed: int
    max_tokens: int
    eos: tuple[int, ...]
    stop: tuple[str, ...]
    ignore_eos: bool
    on_event: Callable[[list[Delta]], None]
    on_error: Callable[[BaseException], None]
    streaming: bool = True
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)


class TextTracker:
    """Incremental detokenisation of one choice, with stop strings.

    Each step decodes only a short window: the tokens since the last released text began (`prefix`), with and
    without the newest ones, so decoders that treat the start of a sequence specially (a leading space) see the
    same start both times; the difference is the new text. Text is released only when it does not end in a
    partial UTF-8 character and cannot be the start of a stop string.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: tuple[str, ...]):
        self.decode, self.stop = decode, stop
        self.ids: list[int] = []
        self.prefix = self.read = 0  # token offsets: window start, end of the tokens already in `text`
        self.text = ""  # the decoded text so far
        self.before = ""  # the window's tokens already in `text`, decoded
        self.sent = 0  # characters of `text` already released

    def add(self, token: int) -> tuple[str, bool]:
        """(text to release, whether a stop string ended the choice)."""
        self.ids.append(token)
        now = self.decode(self.ids[self.prefix:])
        if len(now) > len(self.before) and not now.endswith("\ufffd"):
            self.text += now[len(self.before):]
            self.prefix, self.read = self.read, len(self.ids)
            self.before = self.decode(self.ids[self.prefix:self.read])
        for s in self.stop:
            at = self.text.find(s, max(0, self.sent - len(s) + 1))
            if at >= 0:
                return self._release(at), True
        end = len(self.text)
        for s in self.stop:  # hold back a suffix that could still grow into a stop string
            for k in range(min(len(s) - 1, end - self.sent), 0, -1):
                if self.text[end - k:end] == s[:k]:
                    end -= k
                    break
        return self._release(end), False

    def flush(self) -> str:
        """The text still held back (incomplete characters included) when the choice ends without a stop."""
        self.text += self.decode(self.ids[self.prefix:])[len(self.before):]
        self.prefix = self.read = len(self.ids)
        self.before = ""
        return self._release(len(self.text))

    def _release(self, end: int) -> str:
        out = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out


class _Expecting:
    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler

    def __enter__(self) -> None:
        with self.scheduler._cond:
            self.scheduler._preparing += 1

    def __exit__(self, *exc: object) -> None:
        with self.scheduler._cond:
            self.scheduler._preparing -= 1
            self.scheduler._cond.notify()


class Scheduler:
    """Batches jobs onto `model` in a worker thread; `submit` returns at once.

    max_batch: the most rows (choices) a batch runs; a forming batch waits for more jobs while they keep coming
    (gaps under batch_window_s) or are being prepared (see `expecting`), at most max_wait_s after its first;
    decode(ids) -> text: the tokenizer's decoder; placement: mesh layout.
    """

    def __init__(self, model: QwaxForCausalLM, decode: Callable[[list[int]], str], *, max_batch: int = 8,
                 batch_window_s: float = 0.001, max_wait_s: float = 0.05, placement: MeshPlacement | None = None,
                 pad_token_id: int = 0):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model, self.decode, self.max_batch = model, decode, max_batch
        self.batch_window_s, self.max_wait_s = batch_window_s, max_wait_s
        self.placement = placement or MeshPlacement(None)
        self.pad = pad_token_id
        self.batches = 0  # batches run so far (for /health, logs and tests)
        self._jobs: collections.deque[Job] = collections.deque()
        self._preparing = 0  # requests inside `expecting()`
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="qwax-serve-worker", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        return len(self._jobs)

    def submit(self, job: Job) -> None:
        if job.n > self.max_batch:
            raise ValueError(f"n={job.n} exceeds the server's --max-batch {self.max_batch}")
        with self._cond:
            self._jobs.append(job)
            self._cond.notify()

    def expecting(self) -> _Expecting:
        """A context for a request being prepared (parsed, rendered, tokenised) before it is submitted: while any
        is, a forming batch waits for it (up to max_wait_s), so requests that arrive together run together."""
        return _Expecting(self)

    def close(self) -> None:
        """Finish the queued jobs, then stop the worker."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=60)

    # ------------------------------------------------------------------ worker

    def _take_batch(self) -> list[Job] | None:
        """The next batch (None once closed with nothing queued): the first queued job, then jobs that fit while
        they keep arriving or are being prepared."""
        with self._cond:
            while not self._jobs and not self._closed:
                self._cond.wait()
            if not self._jobs:
                return None
            first = self._jobs.popleft()
            jobs, rows = [first], first.n
            start = last = time.monotonic()
            while rows < self.max_batch:
                if self._jobs:
                    if rows + self._jobs[0].n > self.max_batch:
                        break  # it starts the next batch
                    job = self._jobs.popleft()
                    jobs.append(job)
                    rows += job.n
                    last = time.monotonic()
                    continue
                now, cap = time.monotonic(), start + self.max_wait_s
                until = cap if self._preparing > 0 else min(cap, last + self.batch_window_s)
                if now >= until or self._closed:
                    break
                self._cond.wait(until - now)
            return jobs

    def _run(self) -> None:
        while (jobs := self._take_batch()) is not None:
            jobs = [j for j in jobs if not j.cancelled.is_set()]
            if not jobs:
                continue
            try:
                self._run_batch(jobs)
            except Exception as e:  # the batch fails, the server goes on
                log.exception("batch of %d requests failed", len(jobs))
                for job in jobs:
                    job.on_error(e)

    def _run_batch(self, jobs: list[Job]) -> None:
        owners = [(job, i) for job in jobs for i in range(job.n)]
        rows = 1 << (len(owners) - 1).bit_length()  # a power of two: batches of similar size share compilations
        length = max(len(job.prompt_ids) for job in jobs)
        ids = np.full((rows, length), self.pad, np.int32)
        mask = np.zeros((rows, length), np.int32)
        mask[:, -1] = 1  # padding rows: one token, no output
        limits = np.zeros((rows,), np.int64)
        sampling = [SamplingParams()] * rows
        seeds: list[int | jax.Array] = [0] * rows
        for r, (job, choice) in enumerate(owners):
            ids[r, length - len(job.prompt_ids):] = job.prompt_ids
            mask[r, length - len(job.prompt_ids):] = 1
            limits[r] = job.max_tokens
            sampling[r] = job.sampling
            seeds[r] = jax.random.fold_in(jax.random.key(job.seed), choice)
        trackers = [TextTracker(self.decode, job.stop) for job, _ in owners]
        counts = np.zeros((rows,), np.int64)
        finished = np.zeros((rows,), bool)
        finished[len(owners):] = True

        rows_of = {id(job): [r for r, (owner, _) in enumerate(owners) if owner is job] for job in jobs}
        held: dict[int, list[Delta]] = {id(job): [] for job in jobs}  # news not yet delivered

        def finish(r: int, reason: str, news: list[Delta], *, by_stop_string: bool = False) -> None:
            """Row r is done: the text still held back comes out, unless a stop string ended it (then the rest
            after the stop string is dropped)."""
            finished[r] = True
            text = "" if by_stop_string else trackers[r].flush()
            news.append(Delta(owners[r][1], text, reason, int(counts[r])))

        # A job that neither streams nor has stop strings needs no text until it ends: its tokens are decoded
        # once, at the end, rather than token by token.
        incremental = [job.streaming or bool(job.stop) for job, _ in owners]

        def stream(tokens: np.ndarray) -> np.ndarray:
            news: dict[int, list[Delta]] = {}
            for r, (job, choice) in enumerate(owners):
                if finished[r]:
                    continue
                if job.cancelled.is_set():
                    finished[r] = True
                    continue
                out = news.setdefault(id(job), [])
                token = int(tokens[r])
                counts[r] += 1
                if token in job.eos and not job.ignore_eos:
                    finish(r, "stop", out)
                    continue
                if not incremental[r]:
                    trackers[r].ids.append(token)
                    if counts[r] >= job.max_tokens:
                        finish(r, "length", out)
                    continue
                text, stopped = trackers[r].add(token)
                if text:
                    out.append(Delta(choice, text))
                if stopped:
                    finish(r, "stop", out, by_stop_string=True)
                elif counts[r] >= job.max_tokens:
                    finish(r, "length", out)
            for job in jobs:  # one call per job and step: the server's event loop wakes once, not once a token
                if news.get(id(job)):
                    held[id(job)] += news[id(job)]
                    if job.streaming or all(finished[r] for r in rows_of[id(job)]):
                        job.on_event(held.pop(id(job)))
                        held[id(job)] = []
            return finished.copy()

        request = check_request(self.model.config, ids, mask, max_new_tokens=list(limits), sampling=sampling,
                                seed=seeds, eos_token_id=[], pad_token_id=self.pad, stream=stream)
        self.batches += 1
        start = time.perf_counter()
        generate_tokens(self.model, request, self.placement)
        for job in jobs:  # rows the engine ended (their token limit) without the stream deciding
            rest = held[id(job)]
            for r in rows_of[id(job)]:
                if not finished[r]:
                    finish(r, "length", rest)
            if rest:
                job.on_event(rest)
        log.debug("batch of %d rows (%d padded) ran in %.2fs", len(owners), rows, time.perf_counter() - start)
