"""`qwax serve`'s HTTP application: the OpenAI chat completions and completions APIs on Starlette.

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health. With an API key every
/v1 route needs `Authorization: Bearer KEY` (401 otherwise). Bad input gets a 4xx with the OpenAI error body
{"error": {"message", "type", "param", "code"}} and the server goes on serving. Chat output is split into
`reasoning_content` (the think block; see qwax.inference.reasoning) and `content`, and tool calls in the
qwen3_coder format become `tool_calls` (qwax.inference.tool_calls) when the request declares tools. Streams are
server-sent events: `data: {chunk}` lines and a final `data: [DONE]`. Each request logs one line on the
`qwax.serve` logger (tokens, time).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import secrets
import time
from typing import Any, AsyncIterator, Callable, TypeVar

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from qwax.inference.chat_template import ChatTemplate, ChatTemplateError
from qwax.inference.generation_config import GenerationDefaults
from qwax.inference.reasoning import ReasoningStream, think_open
from qwax.inference.tool_calls import ToolCallStream
from qwax.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest, validation_error
from qwax.serve.scheduler import Delta, Job, Scheduler

log = logging.getLogger("qwax.serve")
BodyT = TypeVar("BodyT", ChatCompletionRequest, CompletionRequest)


@dataclasses.dataclass
class ServeSettings:
    """model_name: the id /v1/models lists; api_key: None = no auth; max_body_bytes: larger bodies get 413;
    default_max_tokens: the output budget when a request sets none (capped by the context left)."""

    model_name: str
    api_key: str | None = None
    max_body_bytes: int = 4 << 20
    default_max_tokens: int = 1024


@dataclasses.dataclass
class ServedModel:
    """What the routes need: the scheduler (which owns the model), the tokenizer's encode / decode, the chat
    template (None: the checkpoint has none, chat requests get 400), the checkpoint's generation defaults, the
    stop ids and the context length."""

    scheduler: Scheduler
    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    chat_template: Callable[[bool], ChatTemplate] | None
    defaults: GenerationDefaults
    eos: tuple[int, ...]
    context_length: int
    vocab_size: int


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON: 413 past `limit` bytes (checked while reading, so a body without Content-Length is bounded
    too), 400 when it is not JSON."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body of {declared} bytes exceeds the server's limit of {limit} bytes",
                       code="request_too_large")
    body = bytearray()
    try:
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise APIError(413, f"request body exceeds the server's limit of {limit} bytes",
                               code="request_too_large")
    except ClientDisconnect:
        raise APIError(400, "the client disconnected before sending the whole body") from None
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None


class Choice:
    """The output of one choice, parsed as it streams: reasoning and content deltas, then tool calls."""

    def __init__(self, index: int, prompt_text: str | None, tools: list[dict] | None):
        self.index = index
        self.reasoning = ReasoningStream(think_open(prompt_text)) if prompt_text is not None else None
        self.tools = ToolCallStream(tools) if tools else None
        self.reasoning_text, self.content = "", ""
        self.tool_calls: list = []
        self.finish_reason: str | None = None
        self.completion_tokens = 0

    def feed(self, text: str, final: bool = False) -> dict[str, Any]:
        """A text delta -> the chat delta fields it releases (reasoning_content, content, tool_calls)."""
        if self.reasoning is None:
            return {"content": text} if text else {}
        reasoning, content = self.reasoning.feed(text)
        if final:
            more_r, more_c = self.reasoning.finish()
            reasoning, content = reasoning + more_r, content + more_c
        calls = []
        if self.tools is not None:
            content, calls = self.tools.feed(content)
            if final:
                more_c, more_calls = self.tools.finish()
                content, calls = content + more_c, calls + more_calls
        self.reasoning_text += reasoning
        self.content += content
        delta: dict[str, Any] = {}
        if reasoning:
            delta["reasoning_content"] = reasoning
        if content:
            delta["content"] = content
        if calls:
            first = len(self.tool_calls)
            self.tool_calls += calls
            delta["tool_calls"] = [{"index": first + i, **c.to_openai()} for i, c in enumerate(calls)]
        return delta

    def finish(self, event: Delta) -> dict[str, Any]:
        delta = self.feed(event.text, final=True)
        # A turn that called tools and then stopped reports "tool_calls"; one cut off stays "length".
        self.finish_reason = "tool_calls" if self.tool_calls and event.finish_reason == "stop" else \
            event.finish_reason
        self.completion_tokens = event.completion_tokens
        return delta


def create_app(served: ServedModel, settings: ServeSettings) -> Starlette:
    """The ASGI application serving `served` with `settings`."""

    def error_response(e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    def check_auth(request: Request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        if not secrets.compare_digest(header.encode(), f"Bearer {settings.api_key}".encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                           type="authentication_error", code="invalid_api_key")

    def check_model(name: str | None) -> None:
        if name is not None and name != settings.model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves {settings.model_name!r}",
                           param="model", code="model_not_found")

    def token_budget(body: Any, prompt_tokens: int) -> int:
        room = served.context_length - prompt_tokens
        if room < 1:
            raise APIError(400, f"the prompt is {prompt_tokens} tokens, the model's context is "
                                f"{served.context_length} tokens: no room for output", param="messages",
                           code="context_length_exceeded")
        limit = body.token_limit
        if limit is None:
            cap = served.defaults.max_new_tokens or settings.default_max_tokens
            return min(room, cap)
        if limit > room:
            raise APIError(400, f"max_tokens={limit} + the prompt's {prompt_tokens} tokens exceed the model's "
                                f"context of {served.context_length} tokens (at most {room})",
                           param="max_tokens", code="context_length_exceeded")
        return limit

    def make_job(body: Any, prompt_ids: list[int], loop: asyncio.AbstractEventLoop,
                 events: asyncio.Queue) -> Job:
        if body.n > served.scheduler.max_batch:
            raise APIError(400, f"n={body.n} exceeds the server's --max-batch {served.scheduler.max_batch}",
                           param="n")
        try:
            sampling = body.sampling(served.defaults.sampling)
        except ValueError as e:
            raise APIError(400, str(e)) from None
        bad = [t for t in prompt_ids if not 0 <= t < served.vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary [0, {served.vocab_size})",
                           param="prompt")
        put = lambda item: loop.call_soon_threadsafe(events.put_nowait, item)  # noqa: E731
        return Job(prompt_ids=prompt_ids, n=body.n, sampling=sampling,
                   seed=body.seed if body.seed is not None else secrets.randbits(31),
                   max_tokens=token_budget(body, len(prompt_ids)), eos=served.eos, stop=body.stop_strings(),
                   ignore_eos=body.ignore_eos, on_event=put, on_error=put, streaming=body.stream)

    async def events_of(job: Job, events: asyncio.Queue) -> AsyncIterator[Delta]:
        """The (submitted) job's events until every choice has finished; the job is cancelled if the consumer
        stops."""
        remaining = job.n
        try:
            while remaining:
                news = await events.get()
                if isinstance(news, BaseException):
                    raise APIError(500, f"generation failed: {type(news).__name__}: {news}") from news
                for event in news:
                    if event.finish_reason is not None:
                        remaining -= 1
                    yield event
        finally:
            if remaining:
                job.cancelled.set()

    async def read_body(request: Request, model: type[BodyT]) -> BodyT:
        """The request body validated as `model`, for the model this server serves (else a 4xx)."""
        try:
            body = model.model_validate(await read_json(request, settings.max_body_bytes))
        except ValidationError as e:
            raise validation_error(e) from None
        check_model(body.model)
        return body

    def log_line(route: str, status: int, prompt: int, completion: int, start: float) -> None:
        log.info("%s %d prompt_tokens=%d completion_tokens=%d time=%.3fs", route, status, prompt, completion,
                 time.perf_counter() - start)

    async def respond(route: str, request: Request, handler: Callable) -> Response:
        start = time.perf_counter()
        try:
            check_auth(request)
            response, counts = await handler(request, start)
        except APIError as e:
            log_line(route, e.status, 0, 0, start)
            return error_response(e)
        if counts is not None:
            log_line(route, response.status_code, *counts, start)
        return response

    def sse(chunk: dict[str, Any]) -> str:
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    def usage(prompt: int, completion: int) -> dict[str, int]:
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    # ------------------------------------------------------------------ chat completions

    async def chat_handler(request: Request, start: float) -> tuple[Response, tuple[int, int] | None]:
        with served.scheduler.expecting():  # a batch forming now waits for this request
            body, prompt_text, prompt_ids, tools = await prepare_chat(request)
            loop, events = asyncio.get_running_loop(), asyncio.Queue()
            job = make_job(body, prompt_ids, loop, events)
            served.scheduler.submit(job)  # inside: the batch sees the job before the request stops counting
        return await answer_chat(body, prompt_text, prompt_ids, tools, job, events, start)

    async def prepare_chat(request: Request) -> tuple[ChatCompletionRequest, str, list[int], list | None]:
        body = await read_body(request, ChatCompletionRequest)
        if served.chat_template is None:
            raise APIError(400, "this checkpoint has no chat template: use /v1/completions", param="messages")
        tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
        messages = [m.for_template(f"messages.{i}") for i, m in enumerate(body.messages)]
        kwargs = dict(body.chat_template_kwargs or {})
        for reserved in ("messages", "tools", "add_generation_prompt", "continue_final_message"):
            if reserved in kwargs:
                raise APIError(400, f"chat_template_kwargs.{reserved} is a request field of its own",
                               param=f"chat_template_kwargs.{reserved}")
        add_prompt = body.add_generation_prompt and not body.continue_final_message
        try:
            prompt_text = served.chat_template(bool(tools)).render(
                messages, tools=tools, add_generation_prompt=add_prompt,
                continue_final_message=body.continue_final_message, **kwargs)
        except ChatTemplateError as e:
            raise APIError(400, f"the chat template refused the messages: {e}", param="messages") from None
        return body, prompt_text, served.encode(prompt_text), tools

    async def answer_chat(body: ChatCompletionRequest, prompt_text: str, prompt_ids: list[int], tools: list | None,
                          job: Job, events: asyncio.Queue, start: float
                          ) -> tuple[Response, tuple[int, int] | None]:
        parse_tools = tools if body.tool_choice != "none" else None
        choices = [Choice(i, prompt_text, parse_tools) for i in range(body.n)]
        rid, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        head = {"id": rid, "created": created, "model": settings.model_name}

        if not body.stream:
            texts = [""] * body.n  # parsed once at the end: no per-token parsing for a whole answer
            async for event in events_of(job, events):
                texts[event.index] += event.text
                if event.finish_reason:
                    choices[event.index].finish(dataclasses.replace(event, text=texts[event.index]))
            completion = sum(c.completion_tokens for c in choices)
            out = {**head, "object": "chat.completion", "choices": [{
                "index": c.index, "finish_reason": c.finish_reason, "logprobs": None,
                "message": {"role": "assistant", "content": c.content if c.content or not c.tool_calls else None,
                            "reasoning_content": c.reasoning_text or None,
                            "tool_calls": [t.to_openai() for t in c.tool_calls]}} for c in choices],
                "usage": usage(len(prompt_ids), completion)}
            return JSONResponse(out), (len(prompt_ids), completion)

        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def chunks() -> AsyncIterator[str]:
            chunk = {**head, "object": "chat.completion.chunk"}
            for c in choices:
                yield sse({**chunk, "choices": [{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                                 "finish_reason": None, "logprobs": None}]})
            try:
                async for event in events_of(job, events):
                    c = choices[event.index]
                    delta = c.finish(event) if event.finish_reason else c.feed(event.text)
                    if delta or event.finish_reason:
                        yield sse({**chunk, "choices": [{"index": c.index, "delta": delta, "logprobs": None,
                                                         "finish_reason": c.finish_reason}]})
            except APIError as e:
                yield sse(e.body())
            completion = sum(c.completion_tokens for c in choices)
            if include_usage:
                yield sse({**chunk, "choices": [], "usage": usage(len(prompt_ids), completion)})
            yield "data: [DONE]\n\n"
            log_line("POST /v1/chat/completions (stream)", 200, len(prompt_ids), completion, start)

        return StreamingResponse(chunks(), media_type="text/event-stream"), None

    # ------------------------------------------------------------------ completions

    async def completions_handler(request: Request, start: float) -> tuple[Response, tuple[int, int] | None]:
        with served.scheduler.expecting():
            body, prompt_text, prompt_ids = await prepare_completion(request)
            loop, events = asyncio.get_running_loop(), asyncio.Queue()
            job = make_job(body, prompt_ids, loop, events)
            served.scheduler.submit(job)
        return await answer_completion(body, prompt_text, prompt_ids, job, events, start)

    async def prepare_completion(request: Request) -> tuple[CompletionRequest, str, list[int]]:
        body = await read_body(request, CompletionRequest)
        prompt = body.prompt
        if isinstance(prompt, list) and len(prompt) > 1 and not isinstance(prompt[0], int):
            raise APIError(400, "one prompt per request (use n for several completions of it)", param="prompt")
        if isinstance(prompt, list):
            prompt = prompt[0] if not isinstance(prompt[0], int) else prompt
        prompt_ids = served.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not prompt_ids:
            raise APIError(400, "the prompt encodes to no tokens", param="prompt")
        return body, prompt if isinstance(prompt, str) else served.decode(prompt_ids), prompt_ids

    async def answer_completion(body: CompletionRequest, prompt_text: str, prompt_ids: list[int], job: Job,
                                events: asyncio.Queue, start: float) -> tuple[Response, tuple[int, int] | None]:
        rid, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": settings.model_name}
        echo = prompt_text if body.echo else ""

        if not body.stream:
            texts, reasons, counts = [echo] * body.n, [None] * body.n, [0] * body.n
            async for event in events_of(job, events):
                texts[event.index] += event.text
                if event.finish_reason:
                    reasons[event.index], counts[event.index] = event.finish_reason, event.completion_tokens
            out = {**head, "choices": [{"index": i, "text": texts[i], "finish_reason": reasons[i], "logprobs": None}
                                       for i in range(body.n)], "usage": usage(len(prompt_ids), sum(counts))}
            return JSONResponse(out), (len(prompt_ids), sum(counts))

        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def chunks() -> AsyncIterator[str]:
            completion = 0
            if echo:
                for i in range(body.n):
                    yield sse({**head, "choices": [{"index": i, "text": echo, "finish_reason": None,
                                                    "logprobs": None}]})
            try:
                async for event in events_of(job, events):
                    completion += event.completion_tokens
                    if event.text or event.finish_reason:
                        yield sse({**head, "choices": [{"index": event.index, "text": event.text, "logprobs": None,
                                                        "finish_reason": event.finish_reason}]})
            except APIError as e:
                yield sse(e.body())
            if include_usage:
                yield sse({**head, "choices": [], "usage": usage(len(prompt_ids), completion)})
            yield "data: [DONE]\n\n"
            log_line("POST /v1/completions (stream)", 200, len(prompt_ids), completion, start)

        return StreamingResponse(chunks(), media_type="text/event-stream"), None

    # ------------------------------------------------------------------ models, health

    async def models_handler(request: Request, start: float) -> tuple[Response, None]:
        return JSONResponse({"object": "list", "data": [{
            "id": settings.model_name, "object": "model", "created": 0, "owned_by": "qwax",
            "max_model_len": served.context_length}]}), None

    async def chat(request: Request) -> Response:
        return await respond("POST /v1/chat/completions", request, chat_handler)

    async def completions(request: Request) -> Response:
        return await respond("POST /v1/completions", request, completions_handler)

    async def models(request: Request) -> Response:
        return await respond("GET /v1/models", request, models_handler)

    async def health(request: Request) -> Response:
        scheduler = served.scheduler
        return JSONResponse({"status": "ok", "batches": scheduler.batches, "queued": scheduler.queued})

    async def not_found(request: Request, exc: Exception) -> Response:
        return error_response(APIError(404, f"no route {request.method} {request.url.path}"))

    async def wrong_method(request: Request, exc: Exception) -> Response:
        return error_response(APIError(405, f"{request.method} is not allowed on {request.url.path}"))

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]),
                             Route("/v1/completions", completions, methods=["POST"]),
                             Route("/v1/models", models, methods=["GET"]),
                             Route("/health", health, methods=["GET"])],
                     exception_handlers={404: not_found, 405: wrong_method})
