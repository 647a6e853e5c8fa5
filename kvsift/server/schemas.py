"""HTTP schemas (pydantic): OpenAI's completion / chat request shapes plus kvsift's extra body fields.

Extra fields accepted on completions and chat (through ``extra_body`` in the openai client):

* ``kv_method``: method spec, e.g. ``"snapkv"`` or ``"snapkv+sentencekv"`` (default: the server's)
* ``kv_budget``: tokens (``1024``), a ratio (``0.25``) or a percentage (``"25%"``)
* ``kv_options``: method options, e.g. ``{"window": 32}``
* ``context_id``: answer from a reusable context made by ``POST /v1/contexts``
* ``ignore_eos``: keep generating past end-of-sequence (benchmarks)

Unknown OpenAI fields are ignored (clients send many optional ones); unknown ``kv_*`` fields are an
error, so that a typo in kvsift's own options does not pass silently.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, field_validator, model_validator

BudgetField = StrictInt | StrictFloat | StrictStr | None


class _Base(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())

    @model_validator(mode="after")
    def _no_unknown_kv_fields(self):
        extra = self.model_extra or {}
        bad = sorted(k for k in extra if k.startswith("kv_") or k == "context")
        if bad:
            raise ValueError(f"unknown field(s) {bad}; kvsift's fields are kv_method, kv_budget, kv_options, "
                             f"context_id")
        return self


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _GenerationFields(_Base):
    model: str | None = None
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: StrictInt = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None
    # kvsift
    kv_method: StrictStr | None = None
    kv_budget: BudgetField = None
    kv_options: dict[str, Any] | None = None
    context_id: StrictStr | None = None
    ignore_eos: bool = False

    @field_validator("n")
    @classmethod
    def _n(cls, v):
        if v != 1:
            raise ValueError("only n=1 is supported")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if v is None:
            return []
        v = [v] if isinstance(v, str) else v
        if len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in v):
            raise ValueError("stop sequences must be non-empty")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _penalty(cls, v):
        if v not in (None, 0, 0.0):
            raise ValueError("penalties are not supported (use 0 or leave unset)")
        return v


class CompletionRequest(_GenerationFields):
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    echo: bool = False
    logprobs: StrictInt | None = None
    suffix: str | None = None
    best_of: StrictInt | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list):
            if not v:
                raise ValueError("prompt must not be empty")
            if not isinstance(v[0], int) and len(v) > 16:
                raise ValueError("at most 16 prompts per request")
            if any(isinstance(x, (list, str)) and len(x) == 0 for x in v):
                raise ValueError("prompts must not be empty")
        elif not v:
            raise ValueError("prompt must not be empty")
        return v

    @model_validator(mode="after")
    def _unsupported(self):
        if self.echo:
            raise ValueError("echo is not supported")
        if self.logprobs is not None:
            raise ValueError("logprobs are not supported")
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.best_of not in (None, 1):
            raise ValueError("best_of is not supported")
        return self


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_GenerationFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=512)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    tools: list[Any] | None = None

    @model_validator(mode="after")
    def _unsupported(self):
        if self.logprobs:
            raise ValueError("logprobs are not supported")
        if self.tools:
            raise ValueError("tools are not supported")
        return self


class ContextRequest(_Base):
    """``POST /v1/contexts``: prefill a document once, keep its (compressed) KV."""

    model: str | None = None
    document: StrictStr | list[StrictInt]
    kv_method: StrictStr | None = None
    kv_budget: BudgetField = None
    kv_options: dict[str, Any] | None = None
    chat: bool | None = None            # default: the model has a chat template
    persist: bool = True
    metadata: dict[str, StrictStr] | None = Field(default=None, max_length=16)

    @field_validator("document")
    @classmethod
    def _doc(cls, v):
        if len(v) == 0:
            raise ValueError("document must not be empty")
        return v
