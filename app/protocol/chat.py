"""`/v1/chat/completions` and `/v1/completions`: OpenAI request shapes, validated here so
that nothing malformed reaches a worker."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from app.protocol.values import INT32_MAX, INT64_MAX, INT64_MIN

Role = Literal["system", "developer", "user", "assistant", "tool"]


class ContentPart(BaseModel):
    """A part of a message's content: text, or another kind (an image) that only an
    engine that takes it accepts."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(min_length=1)
    text: str | None = None


class ChatMessage(BaseModel):
    #: Other fields (an assistant's `tool_calls`, `reasoning_content`) travel on to
    #: engines that read them.
    model_config = ConfigDict(extra="allow")

    role: Role
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or "" for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: str = Field(default="response", min_length=1, max_length=64)
    description: str | None = None
    #: `schema` on the wire; the attribute would shadow pydantic's own.
    json_schema: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs json_schema")
        return self


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["function"] = "function"
    function: FunctionSpec


class NamedFunction(BaseModel):
    name: str = Field(min_length=1)


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["function"] = "function"
    function: NamedFunction


#: What `stop` accepts, as the schema says it (validated by `_stop_list` below).
STOP_SCHEMA = {
    "anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "maxItems": 4, "items": {"type": "string", "minLength": 1}},
        {"type": "null"},
    ],
    "title": "Stop",
}

#: Names the servers pass to chat templates themselves, and apply_chat_template's own
#: parameters: from `chat_template_kwargs` they would collide with those.
RESERVED_TEMPLATE_KWARGS = frozenset(
    {
        "messages",
        "conversation",
        "tools",
        "tool_choice",
        "functions",
        "function_call",
        "documents",
        "add_generation_prompt",
        "continue_final_message",
        "bos_token",
        "eos_token",
        "raise_exception",
        "strftime_now",
        "chat_template",
        "tokenize",
        "padding",
        "truncation",
        "max_length",
        "return_tensors",
        "return_dict",
        "return_assistant_tokens_mask",
        "tokenizer_kwargs",
    }
)

TemplateValue = str | int | float | bool | None


def _stop_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
        raise ValueError("stop must be a non-empty string or a list of them")
    if len(value) > 4:
        raise ValueError("stop takes at most 4 sequences")
    return list(value)


class SamplingFields(BaseModel):
    """Fields both endpoints share.

    Fields not declared here (vLLM's `top_k`, `min_tokens`, `ignore_eos`,
    `repetition_penalty`, `guided_json`, ...) are kept, not dropped: a relay
    engine's server reads them, and other engines refuse what they cannot honour
    (`unhonoured_fields`), so nothing a caller asked for is silently ignored.
    """

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: str = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, gt=0, le=INT32_MAX)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: Annotated[list[str], WithJsonSchema(STOP_SCHEMA)] = Field(default_factory=list)
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    n: int = Field(default=1, ge=1, le=128)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    user: str | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, value: Any) -> list[str]:
        return _stop_list(value)

    def forwarded(self, model: str) -> dict[str, Any]:
        """The body as the caller sent it (what was set, extra fields included), for a
        relay engine's server, which serves the model under `model`."""
        body = self.model_dump(mode="json", exclude_unset=True, by_alias=True)
        body["model"] = model
        if not self.stop:
            body.pop("stop", None)
        return body


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, gt=0, le=INT32_MAX)
    response_format: ResponseFormat | None = None
    #: Extra variables for the model's chat template (e.g. `enable_thinking`).
    chat_template_kwargs: dict[str, TemplateValue] | None = None
    tools: list[Tool] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    @field_validator("chat_template_kwargs")
    @classmethod
    def _own_template_kwargs(
        cls, value: dict[str, TemplateValue] | None
    ) -> dict[str, TemplateValue] | None:
        taken = sorted(set(value or {}) & RESERVED_TEMPLATE_KWARGS)
        if taken:
            raise ValueError(f"{', '.join(taken)} cannot be set through chat_template_kwargs")
        return value

    @model_validator(mode="after")
    def _has_user_turn(self) -> ChatCompletionRequest:
        if all(m.role in ("system", "developer") for m in self.messages):
            raise ValueError("messages needs at least one user, assistant or tool message")
        if isinstance(self.tool_choice, NamedToolChoice) or self.tool_choice == "required":
            if not self.tools:
                raise ValueError("tool_choice names a tool, but no tools are given")
            if isinstance(
                self.tool_choice, NamedToolChoice
            ) and self.tool_choice.function.name not in {t.function.name for t in self.tools}:
                raise ValueError(
                    f"tool_choice names {self.tool_choice.function.name!r}, which is not in tools"
                )
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        return self

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingFields):
    prompt: str | list[str]
    max_tokens: int | None = Field(default=16, gt=0, le=INT32_MAX)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("exactly one prompt is supported per request")
        text = value if isinstance(value, str) else value[0]
        if not text:
            raise ValueError("prompt must not be empty")
        return value

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


#: Values that ask for nothing: sending one is the same as leaving the field out.
NEUTRAL_VALUES: dict[str, Any] = {"n": 1, "top_logprobs": 0}


def _neutral(field: str, value: Any) -> bool:
    if value is None or value is False or value == [] or value == {}:
        return True
    if field == "tool_choice":  # with no tools (refused by name), nothing to choose from
        return value in ("none", "auto")
    return field in NEUTRAL_VALUES and value == NEUTRAL_VALUES[field]


def unhonoured_fields(body: SamplingFields, honoured: frozenset[str]) -> list[str]:
    """Fields the caller set to something an engine honouring only `honoured` cannot do."""
    extra = body.model_extra or {}
    sent = set(body.model_fields_set) | set(extra)
    asked = []
    for field in sorted(sent - honoured):
        value = extra[field] if field in extra else getattr(body, field, None)
        if not _neutral(field, value):
            asked.append(field)
    return asked


class GenerationTask(BaseModel):
    """What the API queues for a chat worker: messages or a raw prompt, and sampling."""

    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] = Field(default_factory=list)
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    json_mode: bool = False
    #: A JSON schema the output must satisfy (implies `json_mode`).
    json_schema: dict[str, Any] | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    stream: bool = False


class RelayTask(BaseModel):
    """What the API queues for a relay engine: the body for its server, as sent."""

    path: Literal["/v1/chat/completions", "/v1/completions"]
    body: dict[str, Any]
    stream: bool = False

    def upstream_body(self) -> dict[str, Any]:
        body = dict(self.body)
        body["stream"] = self.stream
        if not self.stream:
            body.pop("stream_options", None)
        return body
