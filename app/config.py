"""Server settings: one pydantic-settings class, read from LLAMASERVE_* env vars and overridden by CLI flags."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from model.fetch import default_cache_dir

if TYPE_CHECKING:  # torch itself is imported on use: the CLI sets the OpenMP policy first (model/threads.py)
    import torch


class Settings(BaseSettings):
    """Everything `llamaserve serve` can be told; each field is also `--flag-name` on the command line."""

    model_config = SettingsConfigDict(env_prefix="LLAMASERVE_", protected_namespaces=(), extra="ignore")

    model: str | None = Field(None, description="checkpoint path (.gguf file, HF or Meta dir); default: the embedded SmolLM2")
    cache_dir: Path = Field(
        default_factory=default_cache_dir,
        description="where the default model is fetched to and GGUF weights are cached as fp32 safetensors",
    )
    served_model_name: str | None = Field(None, description="model id clients send and see (default: from the checkpoint)")
    device: str = Field("auto", description="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="auto: bfloat16 on CUDA, float32 on CPU")
    quantization: Literal["auto", "none", "int4"] = Field(
        "auto",
        description="int4: 4-bit weights for small decode batches on CPU (AVX2/AVX-512); "
        "auto: int4 for a Q4_1 GGUF on such a CPU, else none",
    )
    batch_invariant: bool = Field(
        True,
        description="a request's tokens and logprobs are the same bits whatever else shares its batch "
        "(slower at large batches, see docs/performance.md); --no-batch-invariant for the batch-dependent fast paths",
    )
    compile: bool = Field(
        True,
        description="decode on fixed shapes through a torch.compile'd transformer block, compiled at start-up "
        "(Inductor: needs a C++ compiler on CPU; falls back to eager with a logged reason); --no-compile for eager",
    )
    max_batch_size: int = Field(8, ge=1, description="KV-cache slots: requests decoded together")
    max_seq_len: int = Field(2048, ge=8, description="context length per slot (prompt + completion)")
    max_queue: int = Field(256, ge=1, description="requests waiting for a slot before 503")
    max_choices_per_request: int = Field(
        64,
        ge=1,
        description="most completions (prompts x n) one request may ask for, else 400; slots are shared out between requests",
    )
    prefill_chunk: int = Field(512, ge=1, description="prompt tokens per prefill step")
    prefix_cache: bool = Field(
        True,
        description="reuse the keys of a prompt prefix a finished request left in its slot (same outputs, faster first token)",
    )
    recompute_answers: bool = Field(
        True,
        description="while idle, recompute a finished answer's keys with prefill kernels, so that the exact prefix cache "
        "offers the whole exchange to a chat's next turn (batch-invariant models; no effect on outputs)",
    )
    threads: int | None = Field(
        None, ge=1, description="torch CPU threads (default: torch's choice; the cores shared out between tensor-parallel ranks)"
    )
    tensor_parallel_size: int = Field(
        1,
        ge=1,
        description="shard the model over this many processes (torch.distributed: gloo on CPU, NCCL on CUDA, one GPU each); "
        "this process is rank 0 and starts the others. Under torchrun the launcher's WORLD_SIZE wins",
    )
    chat_format: Literal["chatml", "llama3", "llama2"] | None = Field(None, description="override the detected chat format")
    host: str = Field("127.0.0.1", description="bind address")
    port: int = Field(8000, ge=0, le=65535, description="bind port")
    api_key: str | None = Field(
        None,
        description="require `Authorization: Bearer <key>` (not on /health, /metrics, /docs, /openapi.json, "
        "nor the playground's page, which asks for the key)",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list, description="comma-separated allowed CORS origins")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="largest request body accepted (else 413)")
    read_timeout: float = Field(
        30.0, gt=0, description="seconds a client has for its request headers (else the connection closes) and body (else 408)"
    )
    max_connections: int = Field(1024, ge=1, description="connections served at once; more get 503 at once")
    drain_timeout: float = Field(30.0, ge=0, description="seconds to let running requests finish on shutdown")
    keepalive_s: float = Field(10.0, gt=0, description="seconds between SSE keep-alive comments while a stream waits")
    warmup: bool = Field(True, description="run a short generation before reporting ready")
    playground: bool = Field(
        True, description="serve the web playground and its live engine panel at / (GET /engine/snapshot feeds it)"
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field("info", description="log level")

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [origin.strip() for origin in value.split(",") if origin.strip()]
        return value

    @field_validator("cache_dir", mode="before")
    @classmethod
    def _empty_is_default(cls, value: Any) -> Any:
        return default_cache_dir() if value in (None, "") else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    def resolved_device(self) -> str:
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def load_options(self) -> dict[str, Any]:
        """What model.checkpoint.load_model takes from the settings, the device apart (each
        tensor-parallel rank has its own)."""
        return {
            "dtype": self.resolved_dtype(),
            "max_batch_size": self.max_batch_size,
            "max_seq_len": self.max_seq_len,
            "quantization": self.quantization,
            "batch_invariant": self.batch_invariant,
            "cache_dir": self.cache_dir,
        }

    def resolved_dtype(self) -> torch.dtype:
        import torch

        if self.dtype == "auto":
            return torch.bfloat16 if self.resolved_device().startswith("cuda") else torch.float32
        return getattr(torch, self.dtype)
