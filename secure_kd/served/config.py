"""The `served` block of a teacher (or attack victim) config: where the OpenAI-compatible server is.

    teacher:
      source: served
      served:
        base_url: http://127.0.0.1:8080      # no credentials in the URL
        model: smollm2                       # the server's model name
        api_key_env: SECURE_KD_SERVED_KEY    # the NAME of an environment variable, never the key
        dialect: llama_cpp_python            # or vllm
        tokenizer: smollm2                   # the served model's tokenizer, as a local directory
        reference: smollm2                   # optional: the same weights in-process, for the KL check

The key is read from the environment when the client is built and kept only in the request header;
it is never part of a config dump, a result, the provenance or a log line. This module imports
nothing from the rest of secure_kd, so `secure_kd.config` can import it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Dialect = Literal["llama_cpp_python", "vllm"]
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class ServedConfig(BaseModel):
    """An OpenAI-compatible completions server that returns prompt log-probabilities."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    base_url: str = Field(..., description="e.g. http://127.0.0.1:8080 (the /v1 routes are added)")
    model: str = Field(..., min_length=1, description="the model name the server knows")
    api_key_env: str | None = Field(
        None, description="name of the environment variable holding the API key (never the key itself)"
    )
    dialect: Dialect = Field(
        "llama_cpp_python",
        description="llama_cpp_python: /v1/completions with echo + logprobs (llama-cpp-python's server); "
        "vllm: /v1/completions with prompt_logprobs and token-id prompts",
    )
    tokenizer: str = Field(
        "smollm2", description="the served model's tokenizer: 'smollm2' or a local Hugging Face directory"
    )
    reference: str | None = Field(
        None,
        description="optional in-process model with the same weights ('smollm2' or a directory): the cache "
        "build measures the KL between its top-k and the server's and refuses a server above max_topk_kl",
    )
    max_topk_kl: float = Field(
        0.25,
        gt=0,
        description="refuse a served teacher this far from `reference` (measured: 0.10 for the same Q4_1 "
        "weights in llama.cpp vs torch, 1.2 for those weights served with half the RoPE frequency)",
    )
    drift_tolerance: float = Field(
        0.01,
        gt=0,
        description="refuse a served teacher whose answers on the probe text moved more than this KL "
        "away from those recorded in the cache manifest",
    )
    connect_timeout_s: float = Field(5.0, gt=0)
    read_timeout_s: float = Field(120.0, gt=0)
    max_retries: int = Field(2, ge=0, le=10, description="retries of a request that failed to connect")
    max_queries: int | None = Field(
        None, gt=0, description="budget: answered positions (one query per prefix), as in the query API"
    )
    max_top_k: int | None = Field(
        None, gt=0, description="the server's limit on logprobs per position (vLLM: --max-logprobs, 20)"
    )

    @field_validator("base_url")
    @classmethod
    def _plain_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"base_url {value!r} must be an http:// or https:// URL with a host")
        if parts.username or parts.password:
            raise ValueError(
                "base_url must not carry credentials (user:password@); put the key in an environment "
                "variable and name it in api_key_env"
            )
        if parts.query or parts.fragment:
            raise ValueError(f"base_url {value!r} must not have a query string or fragment")
        return value.rstrip("/").removesuffix("/v1")

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, value: str | None) -> str | None:
        if value is not None and not _ENV_NAME.match(value):
            raise ValueError(
                "api_key_env is the NAME of an environment variable (letters, digits, underscores, e.g. "
                "SECURE_KD_SERVED_KEY), not the key itself; export the key under that name"
            )
        return value

    @model_validator(mode="after")
    def _local_paths(self) -> ServedConfig:
        for name in ("tokenizer", "reference"):
            value = getattr(self, name)
            if value is not None and value != "smollm2" and not Path(value).is_dir():
                raise ValueError(
                    f"{name} {value!r} is neither 'smollm2' nor an existing directory; give the served "
                    "model's local Hugging Face directory (or 'smollm2')"
                )
        return self

    def describe(self) -> dict:
        """What provenance records about the server: everything but the key (and not its variable's
        value: only whether one was configured)."""
        return {
            "base_url": self.base_url,
            "model": self.model,
            "dialect": self.dialect,
            "api_key_env": self.api_key_env,
            "tokenizer": self.tokenizer,
            "reference": self.reference,
        }
