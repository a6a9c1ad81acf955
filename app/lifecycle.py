"""The server's life: load the model (in a thread, so /health answers meanwhile), start the engine, warm
up, report ready; drain on shutdown. loading -> ready -> draining -> stopped (or failed).

ServerState is what every route reads (`request.app.state.server`): the model, the engine, the phase.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

import model.checkpoint as checkpoint
from app.config import Settings
from app.engine import Engine, EngineStats, GenerationRequest
from app.errors import model_not_found, unavailable
from app.metrics import Metrics
from app.parallel import ParallelRanks, load_shard, rank_threads, world_size
from app.protocol.responses import ModelCard, now
from model.chat import default_system_prompt, detect_chat_format
from model.checkpoint import CheckpointError, LoadedModel
from model.fetch import ensure_default_model
from model.grammar import GrammarCache
from model.sampling import SamplingParams
from model.threads import configure_threads
from model.tokenizer import Tokenizer

log = logging.getLogger("llamaserve")
T = TypeVar("T")

STALL_S = 120.0  # an engine with work that has not finished a step for this long is reported unhealthy
HARD_EXIT_GRACE_S = 15.0  # after a tensor-parallel rank died: past the drain timeout plus this, exit regardless


def hard_exit(reason: str) -> None:
    """Exit now with status 1, skipping clean-up that cannot finish (a thread stuck in a collective)."""
    log.error("%s: still not exited after the drain timeout; exiting now", reason)
    logging.shutdown()
    os._exit(1)


async def run_in_short_lived_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run fn in a thread that exits when done (unlike asyncio.to_thread's pooled workers).

    Every live thread that ran a parallel torch op keeps its own OpenMP pool; with two pools on a small
    machine libgomp throttles spin-waiting, which made the engine thread's decode ~1.7x slower.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def target() -> None:
        try:
            result = fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting coroutine
            loop.call_soon_threadsafe(_settle, future, None, e)
        else:
            loop.call_soon_threadsafe(_settle, future, result, None)

    threading.Thread(target=target, name="llamaserve-load", daemon=True).start()
    return await future


def import_compiler_ahead() -> None:
    """Import torch.compile's modules in a thread of their own while the checkpoint loads: ~1.5 s of
    pure Python that the compiled step's set-up would otherwise spend after loading, on the event loop."""

    def target() -> None:
        import torch._dynamo.repro.after_dynamo  # noqa: F401 - imported for the side effect
        import torch._inductor.compile_fx  # noqa: F401

    threading.Thread(target=target, name="llamaserve-import", daemon=True).start()


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def load_checkpoint(settings: Settings) -> LoadedModel:
    """Load the configured checkpoint (the embedded default model, fetched if absent, when none is set)."""
    configure_threads(settings.threads)  # the CLI did it before torch loaded; here for apps built in-process
    path = settings.model or str(ensure_default_model(settings.cache_dir))
    log.info("loading %s on %s (%s)", path, settings.resolved_device(), settings.resolved_dtype())
    start = time.monotonic()
    # looked up at call time: tests stand in a fake
    loaded = checkpoint.load_model(path, device=settings.resolved_device(), **settings.load_options())
    log_loaded(loaded, start)
    return loaded


def load_checkpoint_sharded(settings: Settings, ranks: ParallelRanks) -> LoadedModel:
    """This process's shard, as rank 0 of `ranks`, after starting the other ranks (app/parallel.py)."""
    configure_threads(rank_threads(settings, ranks.world))
    path = settings.model or str(ensure_default_model(settings.cache_dir))
    log.info(
        "loading %s on %s (%s), sharded over %d ranks", path, settings.resolved_device(), settings.resolved_dtype(), ranks.world
    )
    start = time.monotonic()
    ranks.spawn(path)
    loaded = load_shard(settings, 0, ranks.world, ranks.address, path)
    log_loaded(loaded, start)
    return loaded


def log_loaded(loaded: LoadedModel, start: float) -> None:
    log.info(
        "loaded %s in %.1f s (quantization %s, batch invariant %s)",
        loaded.name,
        time.monotonic() - start,
        loaded.quantization,
        loaded.model.batch_invariant,
    )


class ServerState:
    """The model, the engine and the phase of one app; what every route reads."""

    def __init__(self, settings: Settings, loaded: LoadedModel | None) -> None:
        self.settings = settings
        self.loaded = loaded
        self.engine: Engine | None = None
        self.phase = "loading"
        self.error: str | None = None
        self.metrics = Metrics()
        self.created = now()
        self.ready = asyncio.Event()
        self.on_failure: Callable[[], None] | None = None  # the CLI exits the process
        self._drained: asyncio.Task[None] | None = None
        self.model_name = ""
        self.chat_format = "chatml"
        self.default_system: str | None = None
        self.add_bos = False
        self.max_model_len = 0
        self.grammars: GrammarCache | None = None  # compiled structured-output grammars
        self._stall_watch: tuple[float | None, float] | None = None  # (last step seen busy, since when)
        self.ranks: ParallelRanks | None = None  # the other tensor-parallel ranks, when sharded

    async def start(self) -> None:
        """Load (in a thread, so /health answers meanwhile), start the engine, warm up, then report ready."""
        try:
            # Compiled code is cached on disk beside the weights, so a restart does not compile again: the
            # decode step's graphs, and model/native.py's C++ operators (built while the model loads).
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(self.settings.cache_dir) / "inductor"))
            if self.loaded is None:
                if self.settings.compile and world_size(self.settings) == 1:
                    import_compiler_ahead()
                if world_size(self.settings) > 1:
                    on_death = self._rank_died_threadsafe(asyncio.get_running_loop())
                    self.ranks = ParallelRanks(self.settings, world_size(self.settings), on_death)
                    self.loaded = await run_in_short_lived_thread(load_checkpoint_sharded, self.settings, self.ranks)
                else:
                    self.loaded = await run_in_short_lived_thread(load_checkpoint, self.settings)
            self._configure(self.loaded)
            model = self.loaded.model
            self.engine = Engine(
                self._step_model(model),
                self.loaded.tokenizer,
                max_batch_size=model.max_batch_size,
                max_seq_len=model.max_seq_len,
                max_queue=self.settings.max_queue,
                prefill_chunk=self.settings.prefill_chunk,
                prefix_cache=self.settings.prefix_cache,
                recompute_answers=self.settings.recompute_answers,
            )
            self.engine.start()
            self.metrics.bind(self.engine.stats)
            if self.settings.warmup:
                await self._warmup()
            if self.phase == "failed":  # a tensor-parallel rank died meanwhile (_rank_died)
                return
            self.phase = "ready"
            self.ready.set()
            log.info(
                "ready: serving %s (chat format %s, %d slots x %d tokens)",
                self.model_name,
                self.chat_format,
                model.max_batch_size,
                model.max_seq_len,
            )
        except Exception as e:  # noqa: BLE001 - any load failure must surface in /health and the log
            if isinstance(e, (CheckpointError, OSError)):
                log.error("start-up failed: %s", e)  # the user's mistake: no traceback
            else:
                log.exception("start-up failed")
            self.phase, self.error = "failed", f"{type(e).__name__}: {e}"
            if self.on_failure is not None:
                self.on_failure()

    def _rank_died_threadsafe(self, loop: asyncio.AbstractEventLoop) -> Callable[[str], None]:
        """The watcher's callback (it runs on the watcher thread): fail the server on the event loop."""

        def on_death(reason: str) -> None:
            loop.call_soon_threadsafe(self._rank_died, reason)

        return on_death

    def _rank_died(self, reason: str) -> None:
        """A tensor-parallel rank is gone: the model cannot run a step any more. /health turns red and
        the CLI exits non-zero (an orchestrator restarts the whole group) instead of hanging."""
        if self.phase in ("stopped", "failed"):
            return
        log.error("%s: the model can no longer run; exiting", reason)
        self.phase, self.error = "failed", reason
        self.ready.clear()
        if self.on_failure is not None:
            self.on_failure()
            # NCCL does not fail a collective whose peer died: an engine thread stuck in one would keep
            # the process alive. The clean exit gets the drain timeout and some grace, then this.
            grace = self.settings.drain_timeout + HARD_EXIT_GRACE_S
            timer = threading.Timer(grace, hard_exit, args=(reason,))
            timer.daemon = True  # a clean exit before it fires is not held up
            timer.start()

    def _configure(self, loaded: LoadedModel) -> None:
        tokenizer = loaded.tokenizer
        self.model_name = self.settings.served_model_name or loaded.name
        self.chat_format = self.settings.chat_format or detect_chat_format(loaded.chat_template, tokenizer)
        self.default_system = default_system_prompt(loaded.chat_template) if self.chat_format == "chatml" else None
        explicit_bos = getattr(tokenizer, "add_bos", None)
        self.add_bos = bool(explicit_bos) if explicit_bos is not None else self.chat_format in ("llama3", "llama2")
        self.add_bos = self.add_bos and tokenizer.bos_id is not None
        self.max_model_len = loaded.model.max_seq_len
        self.grammars = GrammarCache(tokenizer, loaded.model.vocab_size)

    def model_card(self) -> ModelCard:
        """/v1/models' entry, with the numeric mode evaluation users need to know they are in."""
        loaded = self.require_loaded()
        return ModelCard(
            id=self.model_name,
            created=self.created,
            max_model_len=self.max_model_len,
            quantization=loaded.quantization,
            batch_invariant=bool(getattr(loaded.model, "batch_invariant", False)),
        )

    def _step_model(self, model: Any) -> Any:
        """What the engine runs: the model, or its StaticStep (fixed-shape compiled decode) when --compile."""
        from model.llama import Transformer
        from model.static_step import StaticStep

        if self.ranks is not None:
            from model.tensor_parallel import ParallelLeader

            # Eager: the compiled block would have to capture the all-reduces (functional collectives), not done yet.
            log.info("tensor parallel over %d ranks: the decode step runs eager", self.ranks.world)
            self.ranks.leader = ParallelLeader(model)
            return self.ranks.leader
        if not self.settings.compile or not isinstance(model, Transformer):  # tests stand in scripted models
            return model
        return StaticStep(model, compile=True)

    async def _warmup(self) -> None:
        """One tiny generation so the first real request does not pay for lazy initialisation."""
        assert self.engine is not None and self.loaded is not None
        start = time.monotonic()
        ids = self.loaded.tokenizer.encode("Hello") or [0]
        handle = self.engine.submit(GenerationRequest(prompt_ids=ids, sampling=SamplingParams(temperature=0.0), max_tokens=2))
        async for _ in handle:
            pass
        log.info("warm-up generation took %.2f s", time.monotonic() - start)

    def require_engine(self) -> Engine:
        """The engine when ready to take requests, else a 503 saying why."""
        if self.phase == "ready" and self.engine is not None:
            return self.engine
        if self.phase == "loading":
            raise unavailable("The model is still loading; retry shortly.", code="model_loading", retry_after=5)
        if self.phase == "failed" and self.engine is not None:  # it was serving: a tensor-parallel rank died
            raise unavailable(f"The model can no longer run: {self.error}", code="model_failed", retry_after=30)
        if self.phase == "failed":
            raise unavailable(f"The model failed to load: {self.error}", code="model_load_failed", retry_after=30)
        raise unavailable("The server is shutting down.", code="server_draining", retry_after=5)

    @property
    def tokenizer(self) -> Tokenizer:
        """The loaded model's tokenizer, whatever the phase (a draining server still finishes responses)."""
        assert self.loaded is not None, "no model loaded yet"
        return self.loaded.tokenizer

    def require_loaded(self) -> LoadedModel:
        self.require_engine()
        assert self.loaded is not None
        return self.loaded

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise model_not_found(name)

    async def drain(self) -> None:
        """Stop admitting (503 draining), let running requests finish up to the drain timeout, cancel the rest."""
        if self._drained is None:
            self._drained = asyncio.ensure_future(self._drain())
        await asyncio.shield(self._drained)

    async def _drain(self) -> None:
        if self.phase != "failed":
            self.phase = "draining"
        self.ready.clear()
        if self.engine is not None:
            log.info("draining: waiting up to %.0f s for running requests", self.settings.drain_timeout)
            await self.engine.drain(self.settings.drain_timeout)
            await asyncio.to_thread(self.engine.shutdown)
            log.info("engine stopped")
        if self.ranks is not None:
            await asyncio.to_thread(self.ranks.stop)
        if self.phase == "draining":
            self.phase = "stopped"

    def _stalled(self, stats: EngineStats) -> bool:
        """True when the engine has had work but no finished step for STALL_S, as seen by health checks.

        Timed from when a check first saw work with this last step, not from the last step itself: after
        a long idle spell the first step of new work is not a stall.
        """
        if not (stats.running or stats.waiting):
            self._stall_watch = None
            return False
        now_ = time.monotonic()
        if self._stall_watch is None or self._stall_watch[0] != stats.last_step_time:
            self._stall_watch = (stats.last_step_time, now_)
        return now_ - self._stall_watch[1] > STALL_S

    def liveness(self) -> tuple[int, dict[str, Any]]:
        """For a liveness probe: unlike `health` (readiness), loading and draining are alive; only a
        dead or stalled engine, or a failed model, asks for a restart."""
        if self.phase == "failed":
            return 503, {"status": "failed", "error": self.error}
        if self.phase == "ready" and self.engine is not None:
            stats = self.engine.stats()
            if not stats.healthy or self._stalled(stats):
                return 503, {"status": "unhealthy"}
        return 200, {"status": "draining" if self.phase == "stopped" else self.phase}

    def health(self) -> tuple[int, dict[str, Any]]:
        if self.phase == "ready" and self.engine is not None:
            stats = self.engine.stats()
            if not stats.healthy or self._stalled(stats):
                return 503, {"status": "unhealthy"}
            return 200, {"status": "ok"}
        body: dict[str, Any] = {"status": "draining" if self.phase == "stopped" else self.phase}
        if self.error:
            body["error"] = self.error
        return 503, body
