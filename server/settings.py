"""Server settings, read from the environment (prefix ``METARLHF_``) by pydantic-settings.

Examples::

    METARLHF_API_KEYS='{"sk-alice-app": "acme", "sk-other": "globex"}'   # key -> tenant
    METARLHF_ADAPT_THRESHOLD=4  METARLHF_PORT=8000  METARLHF_POLICY_DIR=/models/my-llama
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from metarlhf.errors import ConfigError
from metarlhf.io import file_in_the_way
from metarlhf.runtime import parse_device
from metarlhf.store import check_id


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="METARLHF_", extra="forbid")

    host: str = Field("127.0.0.1", description="bind address of `metarlhf serve`")
    port: int = Field(8000, ge=0, le=65535)
    api_keys: dict[str, str] = Field(default_factory=dict, description="API key -> tenant; empty: serve makes one")
    policy_dir: str | None = Field(None, description="local HF policy dir; None = embedded SmolLM2-135M-Instruct")
    encoder_dir: str | None = Field(None, description="local HF encoder dir, or 'embedded-policy' (SmolLM2); "
                                    "None = embedded all-MiniLM-L6-v2")
    reward_init: str | None = Field(None, description="reward init dir for the encoder, or 'scratch'; None = the "
                                    "shipped init (adapters/meta/reward) if made for the encoder, else scratch")
    device: str = Field("auto", description="where the policy runs (serving engine and adaptation copy): auto "
                        "(CUDA if available), cpu, cuda or cuda:N; the reward model stays on the CPU")
    model_name: str = Field("metarlhf", description="`model` reported in responses")
    adapter_root: str = Field("adapters", description="adapter store root (users/<tenant>/<user>/<kind>/v<N>)")
    feedback_url: str | None = Field(None, description="sqlite:///path (postgresql:// is not implemented); "
                                     "None = <adapter_root>/feedback.db")
    sqlite_synchronous: str = Field("FULL", description="SQLite synchronous pragma (FULL: fsync every commit)")
    index_path: str | None = Field(None, description="preference index file; None = <adapter_root>/preferences.safetensors")
    adapt_threshold: int = Field(4, ge=1, description="new feedback records that trigger a background adaptation")
    adapt_workers: int = Field(1, ge=1, le=8)
    adapt_max_records: int = Field(64, ge=1)
    adapt_policy_steps: int | None = Field(None, ge=1, description="None = policy.AdaptConfig default")
    adapt_reward_steps: int | None = Field(None, ge=1, description="None = the init's inner steps")
    neighbor_init_below: int = Field(8, ge=0, description="users with fewer records start from a neighbour's adapter")
    neighbors_k: int = Field(3, ge=1, le=100)
    adapter_keep: int = Field(3, ge=1, description="versions kept per user and kind")
    engine_capacity: int = Field(32, ge=1, description="resident adapters in the engine's LRU")
    engine_backend: str = Field("bgmv")
    max_context: int | None = Field(None, ge=16)
    max_batch: int = Field(16, ge=1, description="rows per engine.generate call")
    batch_wait_ms: float = Field(8.0, ge=0, description="how long the batcher waits to fill a batch")
    queue_limit: int = Field(64, ge=1, description="queued + running generations; beyond: 429")
    max_tokens_limit: int = Field(512, ge=1)
    default_max_tokens: int = Field(64, ge=1)
    max_n: int = Field(4, ge=1)
    max_prompts: int = Field(16, ge=1, description="prompts in one /v1/completions request (a list)")
    max_body_bytes: int = Field(1 << 20, ge=1024)

    @field_validator("api_keys")
    @classmethod
    def _tenants_are_ids(cls, v: dict[str, str]) -> dict[str, str]:
        for key, tenant in v.items():
            if len(key) < 8:
                raise ValueError("API keys must be at least 8 characters")
            check_id(tenant, "tenant")
        return v

    @field_validator("adapter_root")
    @classmethod
    def _root_is_a_directory(cls, v: str) -> str:
        """Refused here, at start-up, rather than by SQLite after the models have loaded."""
        blocker = file_in_the_way(v)
        if blocker is not None:
            raise ValueError(f"adapter_root {v!r}: {str(blocker)!r} is a file, not a directory")
        return v

    @field_validator("device")
    @classmethod
    def _device_name(cls, v: str) -> str:
        try:
            parse_device(v)  # the name only; whether the device exists is checked at start-up
        except ConfigError as e:
            raise ValueError(str(e)) from e
        return v

    @property
    def feedback_location(self) -> str:
        return self.feedback_url or f"sqlite:///{Path(self.adapter_root) / 'feedback.db'}"

    @property
    def index_location(self) -> Path:
        return Path(self.index_path) if self.index_path else Path(self.adapter_root) / "preferences.safetensors"


@lru_cache
def get_settings() -> Settings:
    return Settings()
