"""The event loop's side of a request: a handle to iterate its outputs and to cancel it.

The engine thread hands each output to the loop with call_soon_threadsafe, so the loop never blocks
on the model. Several handles may share one queue (every choice of one HTTP request): the HTTP layer
then reads all of them in arrival order from that queue (app/streaming.py), with no second queue.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, AsyncIterator, Union

from app.engine.request import GenerationOutput

if TYPE_CHECKING:
    from app.engine.engine import Engine

END = object()  # the iterator ends without an output (its owner cancelled it)
Item = Union[GenerationOutput, BaseException, object]  # an output, a failure, or END
OutputQueue = asyncio.Queue  # of (RequestHandle, Item)


class RequestHandle:
    """What submit returns: iterate it for outputs; cancel() (or closing the iterator) frees the slot."""

    def __init__(
        self, request_id: str, engine: Engine, loop: asyncio.AbstractEventLoop, queue: OutputQueue | None = None
    ) -> None:
        self.request_id = request_id
        self.cancelled = False
        self.done = False  # the final output, a failure or END has been taken from the queue
        self._engine = engine
        self._loop = loop
        self.queue: OutputQueue = queue if queue is not None else asyncio.Queue()

    def cancel(self) -> None:
        """Idempotent; the engine frees the slot at its next step and the iterator ends."""
        if not self.cancelled and not self.done:
            self.cancelled = True
            self._engine.wake()

    def settle(self, item: Any) -> GenerationOutput | None:
        """What one queued item means for this handle: an output to pass on, or None when it has ended.

        Raises the failure it carries. Outputs still queued after cancel() are dropped.
        """
        if item is END or self.cancelled:
            self.done = True
            return None
        if isinstance(item, BaseException):
            self.done = True
            raise item
        if item.finish_reason is not None:
            self.done = True
        return item

    def __aiter__(self) -> AsyncIterator[GenerationOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[GenerationOutput]:
        """Outputs of this handle alone (its queue must not be shared)."""
        try:
            while not self.done:
                _, item = await self.queue.get()
                output = self.settle(item)
                if output is None:
                    return
                yield output
        finally:
            if not self.done:
                self.cancel()

    def put(self, item: Item) -> None:
        """From the engine thread."""
        try:
            self._loop.call_soon_threadsafe(self.queue.put_nowait, (self, item))
        except RuntimeError:  # the event loop is closed: nobody listens any more
            self.cancelled = True
