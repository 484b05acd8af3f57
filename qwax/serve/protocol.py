"""The OpenAI API's request bodies as pydantic models, and its error body.

Requests are validated strictly: a field of the OpenAI API that qwax cannot honour (logprobs, a JSON response
format, a forced tool choice) or a field that neither API knows is refused with a 400 naming it, rather than
silently ignored. The vLLM extensions that harnesses send are accepted: top_k, repetition_penalty,
chat_template_kwargs, ignore_eos, add_generation_prompt, continue_final_message.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from qwax.inference.sampling import SamplingParams

ROLES = ("system", "developer", "user", "assistant", "tool")


class APIError(Exception):
    """An error answered with `status` and the OpenAI error body {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def validation_error(e: ValidationError) -> APIError:
    """The first problem of a pydantic ValidationError as a 400 naming the field (e.g. messages.1.role)."""
    first = e.errors()[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = f"unknown or unsupported field {param!r}"
    return APIError(400, f"{param}: {message}" if param else message, param=param)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FunctionCall(_Strict):
    name: str
    arguments: str | dict[str, Any] = "{}"

    def arguments_dict(self, where: str) -> dict[str, Any]:
        """The arguments as a mapping (the chat template renders each one); a JSON string is parsed."""
        if isinstance(self.arguments, dict):
            return self.arguments
        try:
            value = json.loads(self.arguments or "{}")
        except json.JSONDecodeError as e:
            raise APIError(400, f"{where}: arguments must be a JSON object: {e}", param=where) from None
        if not isinstance(value, dict):
            raise APIError(400, f"{where}: arguments must be a JSON object, got {type(value).__name__}",
                           param=where)
        return value


class MessageToolCall(_Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")  # templates may read extra keys (e.g. reasoning fields)

    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    @field_validator("role")
    @classmethod
    def _known_role(cls, role: str) -> str:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
        return role

    @field_validator("content")
    @classmethod
    def _text_parts(cls, content: Any) -> Any:
        if isinstance(content, list):
            for part in content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(f"only text content parts ({{'type': 'text', 'text': ...}}) are supported, "
                                     f"got {str(part)[:80]}")
        return content

    def for_template(self, where: str) -> dict[str, Any]:
        """The message as the chat template reads it: `developer` is a system turn, tool-call arguments are
        mappings, unset fields absent."""
        out = self.model_dump(exclude_none=True)
        if out["role"] == "developer":
            out["role"] = "system"
        if self.tool_calls:
            out["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.function.name,
                                               "arguments": c.function.arguments_dict(
                                                   f"{where}.tool_calls.{i}.function")}}
                                 for i, c in enumerate(self.tool_calls)]
        return out


class FunctionDef(_Strict):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"] = "function"
    function: FunctionDef


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _Sampled(_Strict):
    """The fields shared by both endpoints."""

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    user: str | None = None  # accepted for compatibility; nothing depends on it

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: Any) -> Any:
        stops = [stop] if isinstance(stop, str) else (stop or [])
        if len(stops) > 16 or any(not s for s in stops):
            raise ValueError("stop must be up to 16 non-empty strings")
        return stop

    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def sampling(self, defaults: SamplingParams) -> SamplingParams:
        """The request's settings over the checkpoint's defaults; top_k 0 or -1 means no limit (vLLM's -1)."""
        settings = defaults.updated(temperature=self.temperature, top_p=self.top_p,
                                    presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                                    repetition_penalty=self.repetition_penalty)
        if self.top_k is None:
            return settings
        return dataclasses.replace(settings, top_k=None if self.top_k <= 0 else self.top_k)


class ChatCompletionRequest(_Sampled):
    messages: list[Message] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto"] | dict[str, Any] | None = None
    max_completion_tokens: int | None = Field(default=None, ge=1)
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    parallel_tool_calls: bool | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None

    @model_validator(mode="after")
    def _supported(self) -> ChatCompletionRequest:
        if self.logprobs or self.top_logprobs:
            raise ValueError("logprobs are not supported by qwax serve")
        if self.response_format is not None and self.response_format.get("type") != "text":
            raise ValueError("only response_format {'type': 'text'} is supported (no constrained decoding)")
        if isinstance(self.tool_choice, dict):
            raise ValueError("a named tool_choice needs constrained decoding, which qwax serve does not do; "
                             "use 'auto' or 'none'")
        if self.continue_final_message and self.add_generation_prompt and "add_generation_prompt" in \
                self.model_fields_set:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be true")
        if self.max_tokens is not None and self.max_completion_tokens is not None and \
                self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_tokens and max_completion_tokens differ; pass one")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Sampled):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None

    @model_validator(mode="after")
    def _supported(self) -> CompletionRequest:
        if self.logprobs is not None:
            raise ValueError("logprobs are not supported by qwax serve")
        if self.suffix:
            raise ValueError("suffix (insertion) is not supported by qwax serve")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of is not supported by qwax serve (it must equal n)")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt must not be empty")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens
