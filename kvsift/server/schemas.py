"""HTTP schemas (pydantic): OpenAI's completion / chat request shapes plus kvsift's extra body fields.

Extra fields accepted on completions and chat (through ``extra_body`` in the openai client):

* ``kv_method``: method spec, e.g. ``"snapkv"`` or ``"snapkv+sentencekv"`` (default: the server's)
* ``kv_budget``: tokens (``1024``), a ratio (``0.25``) or a percentage (``"25%"``)
* ``kv_options``: method options, e.g. ``{"window": 32}``
* ``context_id``: answer from a reusable context made by ``POST /v1/contexts``
* ``ignore_eos``: keep generating past end-of-sequence (benchmarks)
* ``min_tokens``: do not sample end-of-sequence before this many tokens (vLLM's field)

Unknown OpenAI fields are ignored (clients send many optional ones); unknown ``kv_*`` fields are an
error, so that a typo in kvsift's own options does not pass silently. OpenAI fields that change the
answer's shape or meaning and that kvsift does not implement (``logprobs``, ``top_logprobs``,
``response_format`` other than text, ``tools``, ``logit_bias``, ...) are refused, not ignored.

Types are strict (``"stream": "yes"`` is not a boolean, ``"1"`` is not a number), and every text
must be valid Unicode: a lone UTF-16 surrogate (``"\\ud800"`` in JSON) is a 400, not a tokenizer crash.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, Strict, StrictBool, StrictFloat, StrictInt,
                      StrictStr, field_validator, model_validator)
from pydantic_core import PydanticCustomError

SEED_LIMIT = 2**63  # seeds are 64-bit signed integers in the engine (torch.Generator.manual_seed)


def _unicode(v: str) -> str:
    """Reject text that is not valid Unicode (a lone surrogate cannot be encoded as UTF-8)."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        raise PydanticCustomError("invalid_unicode", "text is not valid Unicode: lone surrogate {ch} at character {at}",
                                  {"ch": ascii(v[e.start]), "at": e.start}) from None
    return v


Text = Annotated[StrictStr, AfterValidator(_unicode)]
Float = Annotated[float, Strict()]
BudgetField = StrictInt | StrictFloat | Text | None


class _Base(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=(), allow_inf_nan=False)

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
    include_usage: StrictBool = False


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Text

    @field_validator("type")
    @classmethod
    def _text_only(cls, v):
        if v != "text":
            raise ValueError(f"response_format type {v!r} is not supported (only 'text')")
        return v


class _GenerationFields(_Base):
    model: Text | None = None
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: Float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: Float = Field(default=1.0, gt=0.0, le=1.0)
    n: StrictInt = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: Text | list[Text] | None = None
    seed: StrictInt | None = Field(default=None, ge=0, lt=SEED_LIMIT)
    presence_penalty: Float | None = None
    frequency_penalty: Float | None = None
    logit_bias: dict[str, Any] | None = None
    response_format: ResponseFormat | None = None
    user: Text | None = None
    # kvsift
    kv_method: Text | None = None
    kv_budget: BudgetField = None
    kv_options: dict[Text, Any] | None = None
    context_id: Text | None = None
    ignore_eos: StrictBool = False
    min_tokens: StrictInt = Field(default=0, ge=0)

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, v):
        if v:
            raise ValueError("logit_bias is not supported")
        return v

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
    prompt: Text | list[Text] | list[StrictInt] | list[list[StrictInt]]
    echo: StrictBool = False
    logprobs: StrictInt | None = None
    suffix: Text | None = None
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
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_GenerationFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=512)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = None
    tools: list[Any] | None = None

    @model_validator(mode="after")
    def _unsupported(self):
        if self.logprobs:
            raise ValueError("logprobs are not supported")
        if self.top_logprobs is not None:
            raise ValueError("top_logprobs is not supported (it also needs logprobs=true, which is not supported)")
        if self.tools:
            raise ValueError("tools are not supported")
        return self


class ContextRequest(_Base):
    """``POST /v1/contexts``: prefill a document once, keep its (compressed) KV."""

    model: Text | None = None
    document: Text | list[StrictInt]
    kv_method: Text | None = None
    kv_budget: BudgetField = None
    kv_options: dict[Text, Any] | None = None
    chat: StrictBool | None = None      # default: the model has a chat template
    persist: StrictBool = True
    metadata: dict[Text, Text] | None = Field(default=None, max_length=16)

    @field_validator("document")
    @classmethod
    def _doc(cls, v):
        if len(v) == 0:
            raise ValueError("document must not be empty")
        return v
