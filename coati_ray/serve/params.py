"""The request bodies of /v1/chat/completions and /v1/completions, and which of OpenAI's parameters
this server honours.

Every parameter is either supported, accepted only at a value that changes nothing (e.g.
`presence_penalty: 0`, `logprobs: false`, `n: 1`, `tools: []`: clients such as LangChain send
these defaults explicitly), or refused with a 400 naming it (`unsupported_parameter`). A field
OpenAI does not define is refused too (`unknown_parameter`): a parameter silently dropped would
give the caller an answer made under settings it did not ask for. The table is in
docs/serving.md#parameters.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError


def _valid_text(s: str) -> str:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:  # JSON's "\ud800": a lone UTF-16 surrogate is no character
        raise ValueError(f"not valid Unicode: a lone surrogate {s[e.start]!r} at character {e.start}") from None
    return s


Text = Annotated[str, AfterValidator(_valid_text)]


def _only(*harmless: Any, why: str):
    """A validator that lets through only values that change nothing (None, and `harmless`), else
    refuses the parameter with `why` (pydantic adds the field's name as `param`)."""

    def check(value: Any) -> Any:
        if value is None or any(value == h and type(value) is type(h) for h in harmless):
            return value
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        raise PydanticCustomError("unsupported_parameter", "{value} is not supported: {why}",
                                  {"value": shown, "why": why})
    return AfterValidator(check)


_NO_TOOLS = "this server has no tool or function calling"
_ONE = "this server returns one choice per request"
_NO_LOGPROBS = "this server does not return log probabilities"
_NO_PENALTY = "this server samples with temperature, top_p, max_tokens, stop and seed only"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: Text


class StreamOptions(_Strict):
    include_usage: bool = False  # the usage is in the last chunk either way; true adds OpenAI's usage-only chunk


class _Sampling(_Strict):
    model: Text
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    stop: Text | list[Text] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=-(2 ** 63), le=2 ** 64 - 1)  # what a 64-bit generator seed can hold
    user: Text | None = None  # an end-user id for the caller's own records; it changes no answer
    n: Annotated[int | None, _only(1, why=_ONE)] = None
    presence_penalty: Annotated[float | None, _only(0, 0.0, why=_NO_PENALTY)] = None
    frequency_penalty: Annotated[float | None, _only(0, 0.0, why=_NO_PENALTY)] = None
    logit_bias: Annotated[dict[str, float] | None, _only({}, why=_NO_PENALTY)] = None

    def stops(self) -> list[str]:
        s = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [x for x in s if x]

    @field_validator("stream_options")
    @classmethod
    def _only_with_stream(cls, value, info: ValidationInfo):
        if value is not None and not info.data.get("stream"):
            raise PydanticCustomError("invalid_value", "only allowed when stream is true")
        return value


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    logprobs: Annotated[bool | None, _only(False, why=_NO_LOGPROBS)] = None
    top_logprobs: Annotated[int | None, _only(0, why=_NO_LOGPROBS)] = None
    tools: Annotated[list | None, _only([], why=_NO_TOOLS)] = None
    tool_choice: Annotated[Any, _only("none", why=_NO_TOOLS)] = None
    parallel_tool_calls: bool | None = None  # only means something with tools, which are refused
    functions: Annotated[list | None, _only([], why=_NO_TOOLS)] = None
    function_call: Annotated[Any, _only("none", why=_NO_TOOLS)] = None
    response_format: Annotated[dict | None, _only({"type": "text"}, why="only plain text answers")] = None
    modalities: Annotated[list | None, _only(["text"], why="only text answers")] = None
    audio: Annotated[Any, _only(why="only text answers")] = None
    prediction: Annotated[Any, _only(why="predicted outputs are not supported")] = None
    web_search_options: Annotated[Any, _only(why="this server has no web search")] = None
    reasoning_effort: Annotated[Any, _only(why="the model is not a reasoning model with an effort setting")] = None
    verbosity: Annotated[Any, _only(why="the model has no verbosity setting")] = None
    store: Annotated[bool | None, _only(False, why="this server stores no completions")] = None
    metadata: Annotated[dict | None, _only({}, why="this server stores no completions")] = None
    service_tier: Annotated[str | None, _only("auto", "default", why="this server has one tier")] = None

    @field_validator("max_completion_tokens")
    @classmethod
    def _same_as_max_tokens(cls, value, info: ValidationInfo):
        given = info.data.get("max_tokens")
        if value is not None and given is not None and given != value:
            raise PydanticCustomError("invalid_value", "differs from max_tokens ({given}); send one of them",
                                      {"given": given})
        return value

    @model_validator(mode="after")
    def _one_max_tokens(self):
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self


class CompletionRequest(_Sampling):
    prompt: Text
    logprobs: Annotated[int | None, _only(why=_NO_LOGPROBS)] = None
    best_of: Annotated[int | None, _only(1, why=_ONE)] = None
    echo: Annotated[bool | None, _only(False, why="the answer never repeats the prompt")] = None
    suffix: Annotated[str | None, _only("", why="this server has no fill-in-the-middle")] = None
