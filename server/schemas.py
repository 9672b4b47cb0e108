"""Request and response models. Requests forbid unknown fields; ids are checked here."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from metarlhf.errors import ConfigError
from metarlhf.store import check_id


def valid_user(v: str | None) -> str | None:
    if v is None:
        return v
    try:
        return check_id(v)
    except ConfigError as e:
        raise ValueError(str(e)) from e


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class GenerationFields(Strict):
    """Sampling fields shared by both completion endpoints (OpenAI names)."""

    model: str | None = None
    user: str | None = Field(None, description="end-user id: selects that user's adapter")
    max_tokens: int | None = Field(None, description="new tokens; default from settings")
    max_completion_tokens: int | None = Field(None, description="alias of max_tokens (newer OpenAI clients)")
    temperature: float | None = Field(None, description="0 = greedy; default 1.0 (OpenAI)")
    top_p: float | None = None
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None

    @field_validator("user")
    @classmethod
    def _check_user(cls, v: str | None) -> str | None:
        return valid_user(v)


class ChatCompletionRequest(GenerationFields):
    messages: list[ChatMessage] = Field(..., min_length=1)


class CompletionRequest(GenerationFields):
    prompt: str


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

    @field_validator("user_id")
    @classmethod
    def _check_user(cls, v: str) -> str:
        return valid_user(v)

    @model_validator(mode="after")
    def _one_shape(self) -> FeedbackRequest:
        given = {k for k in ("completion_id", "prompt", "completion", "chosen", "rejected", "rating")
                 if getattr(self, k) is not None}
        shapes = [{"completion_id", "rating"}, {"prompt", "completion", "rating"}, {"prompt", "chosen", "rejected"}]
        if given not in shapes:
            raise ValueError("feedback must be {user_id, completion_id, rating}, {user_id, prompt, completion, "
                             "rating} or {user_id, prompt, chosen, rejected}; got fields " + ", ".join(sorted(given)))
        return self


class RollbackRequest(Strict):
    kind: Literal["policy", "reward", "both"] = "policy"
    version: int | None = Field(None, ge=1, description="None = the version before the current one")
