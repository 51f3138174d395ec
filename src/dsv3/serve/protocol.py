"""Request and response bodies of the OpenAI-compatible API (pydantic v2).

Field names and defaults follow OpenAI's API reference and the DeepSeek API (V3 era: `stop` up to
16 strings, `usage.prompt_cache_hit_tokens` / `prompt_cache_miss_tokens`); the few extensions are
vLLM's (top_k, repetition_penalty, min_tokens, ignore_eos, stop_token_ids,
include_stop_str_in_output, skip_special_tokens, return_token_ids). Unknown request fields are
ignored, as vLLM and SGLang do, so clients written for other servers keep working.

The constraints here (ranges, list lengths) are what the OpenAPI schema publishes and what a
request is validated against before it reaches the engine; anything outside them is a 400 in
OpenAI's error shape.
"""
from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_STOP = 16          # DeepSeek API: up to 16 stop sequences
MAX_N = 16             # choices per request (OpenAI allows 128; every choice is a full engine request)
MAX_TOP_LOGPROBS = 20  # OpenAI chat: top_logprobs in [0, 20]; completions' logprobs is capped the same

Float = Annotated[float, Field(allow_inf_nan=False)]


class _Req(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Resp(BaseModel):
    model_config = ConfigDict(extra="allow")


# ---------------------------------------------------------------- errors
class ErrorInfo(_Resp):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(_Resp):
    error: ErrorInfo


# ---------------------------------------------------------------- shared request parts
class StreamOptions(_Req):
    include_usage: bool = False


class FunctionDefinition(_Req):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Req):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(_Req):
    name: str


class NamedToolChoice(_Req):
    type: Literal["function"] = "function"
    function: NamedFunction


class ResponseFormat(_Req):
    type: Literal["text", "json_object", "json_schema"] = "text"


class _Sampling(_Req):
    """Sampling fields common to chat and completions."""
    model: str | None = Field(None, description="a served model name (default: the only one served)")
    temperature: Float | None = Field(None, ge=0, le=2, description="0 = greedy; default 1")
    top_p: Float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = Field(None, description=f"up to {MAX_STOP} stop sequences")
    seed: int | None = Field(None, ge=-(2 ** 63), le=2 ** 64 - 1)
    presence_penalty: Float = Field(0.0, ge=-2, le=2)
    frequency_penalty: Float = Field(0.0, ge=-2, le=2)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # extensions (vLLM's names)
    top_k: int | None = Field(None, ge=-1, description="sample among the k most likely tokens (0 or -1: off)")
    repetition_penalty: Float | None = Field(None, gt=0, le=100)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = Field(None, max_length=256)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    return_token_ids: bool = Field(False, description="add prompt_token_ids and token_ids to the choices")

    @model_validator(mode="after")
    def _check_stop(self):
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stop) > MAX_STOP:
            raise ValueError(f"stop: at most {MAX_STOP} sequences, got {len(stop)}")
        if any(s == "" for s in stop):
            raise ValueError("stop: sequences must be non-empty strings")
        return self

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


# ---------------------------------------------------------------- chat
class TextPart(_Req):
    type: Literal["text"]
    text: str


class ToolCallFunction(_Req):
    name: str
    arguments: str = Field(description="the arguments as a JSON string")


class ToolCall(_Req):
    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_Req):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    def text(self) -> str | None:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="deprecated by OpenAI in favour of max_completion_tokens")
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        if self.tool_choice not in (None, "none", "auto") and not self.tools:
            raise ValueError("tool_choice other than 'none'/'auto' needs tools")
        return self


class ChatLogprobTop(_Resp):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprob(ChatLogprobTop):
    top_logprobs: list[ChatLogprobTop] = []


class ChoiceLogprobs(_Resp):
    content: list[ChatLogprob] | None = None


class ResponseToolCall(_Resp):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ResponseMessage(_Resp):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ResponseToolCall] = []


class ChatChoice(_Resp):
    index: int
    message: ResponseMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls", "abort"] | None = None


class Usage(_Resp):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_cache_hit_tokens: int = 0
    prompt_cache_miss_tokens: int = 0
    prompt_tokens_details: dict[str, int] | None = None


class ChatCompletionResponse(_Resp):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ChatCompletionChunk(_Resp):
    """One Server-Sent Event of a streamed chat completion (choices == [] in the usage chunk)."""
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[dict[str, Any]]
    usage: Usage | None = None


# ---------------------------------------------------------------- completions
class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="a string, a list of strings, token ids, or a list of token-id lists")
    max_tokens: int | None = Field(16, ge=0, description="0 with echo: score the prompt only")
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_N)
    logit_bias: dict[str, float] | None = None

    @model_validator(mode="after")
    def _check(self):
        p = self.prompt
        if isinstance(p, list) and (len(p) == 0 or any(isinstance(x, list) and len(x) == 0 for x in p)):
            raise ValueError("prompt: empty lists are not prompts")
        if self.suffix:
            raise ValueError("suffix is not supported (DeepSeek-V3 has no fill-in-the-middle tokens)")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of different from n is not supported")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported")
        return self

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class CompletionLogprobs(_Resp):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(_Resp):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None


class CompletionResponse(_Resp):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage


# ---------------------------------------------------------------- models, tokenizer
class ModelCard(_Resp):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "dsv3"
    root: str
    parent: str | None = None
    max_model_len: int


class ModelList(_Resp):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeRequest(_Req):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = Field(True, description="add BOS as the tokenizer config says (prompt only)")
    add_generation_prompt: bool = Field(True, description="end the chat with the assistant's turn (messages)")
    tools: list[Tool] | None = None
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class TokenizeResponse(_Resp):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Req):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(_Resp):
    prompt: str
