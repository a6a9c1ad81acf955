"""Continuous batching over KV-cache slots: `Engine.step()` = schedule (scheduler.py), run
(model_runner.py), postprocess (output_processor.py); a request's state and errors in request.py, the
event loop's handle in handle.py."""

from app.engine.engine import Engine, EngineStats
from app.engine.handle import RequestHandle
from app.engine.model_runner import CausalLM
from app.engine.request import (
    ContextLengthExceeded,
    EngineDraining,
    EngineOverloaded,
    GenerationOutput,
    GenerationRequest,
    InvalidRequest,
    RequestFailed,
    RequestStatus,
    RequestTimings,
)
from model.sampling import SamplingParams, TokenLogprob

__all__ = [
    "CausalLM",
    "ContextLengthExceeded",
    "Engine",
    "EngineDraining",
    "EngineOverloaded",
    "EngineStats",
    "GenerationOutput",
    "GenerationRequest",
    "InvalidRequest",
    "RequestFailed",
    "RequestHandle",
    "RequestStatus",
    "RequestTimings",
    "SamplingParams",
    "TokenLogprob",
]
