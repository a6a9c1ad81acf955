"""`llamaserve serve [flags]` / `python -m app [flags]`: settings from env + flags, then uvicorn.

Every Settings field is a flag (`max_batch_size` -> `--max-batch-size`); a flag beats its
LLAMASERVE_* environment variable. SIGTERM/SIGINT drain first (new requests get 503, running ones
finish up to --drain-timeout), then uvicorn exits; a second signal exits at once.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import typing
from types import FrameType
from typing import Any, Sequence

import uvicorn
from pydantic import ValidationError

from app.config import Settings
from app.parallel import torchrun_rank
from model.memory import configure_memory
from model.threads import configure_threads

log = logging.getLogger("llamaserve")


def _flag_type(annotation: Any) -> tuple[Any, list[str] | None]:
    """argparse type and choices for a Settings annotation."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        return str, [str(a) for a in typing.get_args(annotation)]
    literal = next((a for a in args if typing.get_origin(a) is typing.Literal), None)
    if literal is not None:
        return str, [str(a) for a in typing.get_args(literal)]
    base = args[0] if args else annotation
    if base in (int, float):
        return base, None
    return str, None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llamaserve serve",
        description="OpenAI-compatible LLM inference server (also: python -m app [flags])",
        argument_default=argparse.SUPPRESS,
    )
    add_setting_flags(parser)
    return parser


def add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per Settings field; only flags actually given reach Settings (env fills the rest)."""
    for name, info in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = f"{info.description or ''} (env LLAMASERVE_{name.upper()})"
        if info.annotation is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, help=help_text)
            continue
        kind, choices = _flag_type(info.annotation)
        parser.add_argument(flag, dest=name, type=kind, choices=choices, help=help_text)


def settings_from_args(argv: Sequence[str]) -> Settings:
    """Settings from flags over env; a leading `serve` (the console script's subcommand) is optional."""
    argv = list(argv)
    if argv[:1] == ["serve"]:
        argv = argv[1:]
    return Settings(**vars(build_parser().parse_args(argv)))


def serve(settings: Settings) -> int:
    """Run uvicorn in this process until a signal; 1 if the model failed to load.

    Imports the app (and so torch) only now: main() sets the OpenMP policy first (model/threads.py).
    """
    from app.connections import uvicorn_config
    from app.server import create_app

    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    app = create_app(settings)
    config = uvicorn_config(app, settings)
    server = DrainingServer(config, app.state.server)
    app.state.server.on_failure = server.fail
    server.run()
    return server.exit_code


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first exit signal drains the engine before uvicorn stops serving."""

    def __init__(self, config: uvicorn.Config, state: Any) -> None:
        super().__init__(config)
        self.state = state
        self.exit_code = 0
        self._draining = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining or self.should_exit:  # second signal: stop now
            self.force_exit = self.should_exit = True
            return
        self._draining = True
        log.info("signal %d: draining before exit (again to force)", sig)
        asyncio.get_event_loop().call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain_then_exit()))

    async def _drain_then_exit(self) -> None:
        try:
            await self.state.drain()
        finally:
            self.should_exit = True

    def fail(self) -> None:
        """The model failed to load: exit non-zero instead of answering 503 forever."""
        self.exit_code = 1
        self.should_exit = True


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = settings_from_args(sys.argv[1:] if argv is None else argv)
    except ValidationError as e:
        print(f"llamaserve: invalid settings:\n{e}", file=sys.stderr)
        return 2
    launched = torchrun_rank()
    if launched is not None and launched[0] > 0:  # torchrun started this process as a follower rank: no HTTP
        from app.parallel import follower_main_from_torchrun

        return follower_main_from_torchrun(settings)
    configure_memory()  # before torch loads (configure_threads imports it when given a count): bounded native caches
    configure_threads(settings.threads)
    return serve(settings)


if __name__ == "__main__":
    sys.exit(main())
