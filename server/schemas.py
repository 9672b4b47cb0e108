"""Request and response models. Requests forbid unknown fields; ids are checked here.

Every string in a request must be encodable as UTF-8: JSON allows escapes of lone
surrogates (``"\\ud800"``), which no tokenizer, database or response can carry, so they
are refused here (``invalid_request``: 400 on the completion routes, as OpenAI, 422
elsewhere) rather than failing later. Integer fields are
strict (``true`` is not 1) and number fields do not take booleans.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    field_validator,
    model_validator,
)

from metarlhf.errors import ConfigError, check_text
from metarlhf.store import check_id

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def valid_user(v: str | None) -> str | None:
    if v is None:
        return v
    try:
        return check_id(v)
    except ConfigError as e:
        raise ValueError(str(e)) from e


def check_utf8(value: Any, where: str = "") -> None:
    """Raise ValueError if any string in ``value`` (nested lists/dicts included) cannot be
    encoded as UTF-8 (a lone surrogate)."""
    if isinstance(value, str):
        check_text(value, where or "a string", ValueError)
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            check_utf8(v, f"{where}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            check_utf8(k, where)
            check_utf8(v, f"{where}.{k}" if where else str(k))


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _utf8(cls, data: Any) -> Any:
        check_utf8(data)
        return data


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] = Field(
        ..., description="text, or an array of text parts [{'type': 'text', 'text': ...}] (joined by newlines)")
    name: str | None = None

    def text(self) -> str:
        """The message as one string; a part that is not text is a ConfigError (400)."""
        if isinstance(self.content, str):
            return self.content
        texts = []
        for i, part in enumerate(self.content):
            if part.get("type") != "text" or not isinstance(part.get("text"), str) or set(part) != {"type", "text"}:
                raise ConfigError(f"message content part {i} must be {{'type': 'text', 'text': <string>}}; "
                                  f"only text parts are supported, got type {part.get('type')!r}")
            texts.append(part["text"])
        return "\n".join(texts)

    def engine_role(self) -> str:
        """OpenAI's ``developer`` role is the system prompt of newer clients."""
        return "system" if self.role == "developer" else self.role


class GenerationFields(Strict):
    """Sampling fields shared by both completion endpoints (OpenAI names)."""

    model: str | None = None
    user: str | None = Field(None, description="end-user id: selects that user's adapter")
    max_tokens: StrictInt | None = Field(None, description="new tokens; default from settings")
    max_completion_tokens: StrictInt | None = Field(None, description="alias of max_tokens (newer OpenAI clients)")
    temperature: StrictFloat | None = Field(None, description="0 = greedy; default 1.0 (OpenAI)")
    top_p: StrictFloat | None = None
    n: StrictInt = 1
    stop: str | list[str] | None = None
    seed: StrictInt | None = Field(None, ge=INT64_MIN, le=INT64_MAX,
                                   description="any int64; mapped to the engine's range [0, 2**63) by modulo")
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    # OpenAI fields that some clients always send (often as null): accepted only with their
    # no-op values (NO_OPS), so that a client asking for something this server cannot do hears so
    presence_penalty: StrictFloat | None = Field(None, description="not supported: only 0 is accepted")
    frequency_penalty: StrictFloat | None = Field(None, description="not supported: only 0 is accepted")
    logprobs: StrictBool | StrictInt | None = Field(None, description="not supported: only false / 0 is accepted")
    top_logprobs: Any = None
    logit_bias: Any = None
    best_of: Any = None
    echo: Any = None
    suffix: Any = None
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    store: Any = None
    metadata: Any = None
    service_tier: Any = None
    modalities: Any = None

    @field_validator("user")
    @classmethod
    def _check_user(cls, v: str | None) -> str | None:
        return valid_user(v)

    @model_validator(mode="after")
    def _no_op_only(self) -> GenerationFields:
        for name, allowed in NO_OPS.items():
            value = getattr(self, name)
            if value is not None and not any(type(value) is type(a) and value == a for a in allowed):
                shown = ", ".join(["null", *(json.dumps(a) for a in allowed)])
                raise ValueError(f"{name} is not supported (accepted: {shown})")
        return self


#: OpenAI request fields this server does not implement, with the values that ask for nothing
#: (null is always accepted). Anything else in them is refused, as are fields OpenAI does not know.
NO_OPS: dict[str, tuple[Any, ...]] = {
    "presence_penalty": (0.0, 0),
    "frequency_penalty": (0.0, 0),
    "logprobs": (False, 0),
    "top_logprobs": (0,),
    "logit_bias": ({},),
    "best_of": (1,),
    "echo": (False,),
    "suffix": ("",),
    "tools": ([],),
    "tool_choice": ("none",),
    "parallel_tool_calls": (),
    "functions": ([],),
    "function_call": ("none",),
    "response_format": ({"type": "text"},),
    "store": (False,),
    "metadata": ({},),
    "service_tier": ("auto", "default"),
    "modalities": (["text"],),
}


class ChatCompletionRequest(GenerationFields):
    messages: list[ChatMessage] = Field(..., min_length=1)


class CompletionRequest(GenerationFields):
    prompt: str | list[str] = Field(..., description="a prompt, or a list of prompts (each gets n choices: "
                                    "choice i*n + j is prompt i's j-th); token-id prompts are not supported")

    @field_validator("prompt")
    @classmethod
    def _some_prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and not v:
            raise ValueError("prompt is an empty list")
        return v

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class FeedbackRequest(Strict):
    """One of: ``{user_id, completion_id, rating}``, ``{user_id, prompt, completion, rating}``,
    ``{user_id, prompt, chosen, rejected}``."""

    user_id: str
    completion_id: str | None = None
    prompt: str | None = None
    completion: str | None = None
    chosen: str | None = None
    rejected: str | None = None
    rating: Literal["up", "down"] | None = None
    choice_index: StrictInt | None = Field(None, ge=0, description="with completion_id and rating: which choice "
                                           "of an n > 1 response is rated (default 0)")
    chosen_index: StrictInt | None = Field(None, ge=0, description="with completion_id: the choice picked ...")
    rejected_index: StrictInt | None = Field(None, ge=0, description="... over this one (a pair)")

    @field_validator("user_id")
    @classmethod
    def _check_user(cls, v: str) -> str:
        return valid_user(v)

    @model_validator(mode="after")
    def _one_shape(self) -> FeedbackRequest:
        given = {k for k in ("completion_id", "prompt", "completion", "chosen", "rejected", "rating",
                             "chosen_index", "rejected_index") if getattr(self, k) is not None}
        shapes = [{"completion_id", "rating"}, {"completion_id", "chosen_index", "rejected_index"},
                  {"prompt", "completion", "rating"}, {"prompt", "chosen", "rejected"}]
        if given not in shapes or (self.choice_index is not None and given != shapes[0]):
            raise ValueError("feedback must be {user_id, completion_id, rating[, choice_index]}, {user_id, "
                             "completion_id, chosen_index, rejected_index}, {user_id, prompt, completion, rating} or "
                             "{user_id, prompt, chosen, rejected}; got fields "
                             + ", ".join(sorted(given | ({"choice_index"} if self.choice_index is not None else set()))))
        if self.chosen_index is not None and self.chosen_index == self.rejected_index:
            raise ValueError("chosen_index and rejected_index must name two different choices")
        if self.chosen is not None and self.chosen == self.rejected:
            raise ValueError("chosen and rejected are the same text: there is no preference to learn")
        return self


class RollbackRequest(Strict):
    kind: Literal["policy", "reward", "both"] = "policy"
    version: StrictInt | None = Field(None, ge=1, description="None = the version before the current one")
