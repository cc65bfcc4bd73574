"""The engine thread's side of AsyncEngine: the messages that cross threads, and the loop that owns
the EngineCore.

Inbox (API -> engine): ``Add`` (groups of requests and the Sink their events go to), ``Abort``,
``Shutdown``. Events (engine -> API, through ``Sink``): ``Accepted``, ``EngineOutput``, ``Failed``;
delivered once per loop iteration with a single ``call_soon_threadsafe`` per event loop.
"""

from __future__ import annotations

import asyncio
import logging
import queue
from collections.abc import Callable
from dataclasses import dataclass

from mlxserve.engine.core import EngineCore
from mlxserve.engine.request import EngineRequest
from mlxserve.errors import EngineStepError, MlxServeError, ShuttingDownError

__all__ = ["Abort", "Accepted", "Add", "EngineDied", "EngineWorker", "Failed", "Shutdown", "Sink"]

logger = logging.getLogger("mlxserve.engine")


class Sink:
    """Where one RequestStream's events land: an asyncio.Queue fed from the engine thread."""

    __slots__ = ("loop", "queue")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()


@dataclass(frozen=True, slots=True)
class Add:
    groups: tuple[tuple[EngineRequest, ...], ...]  # each group: one prompt's n samples
    sink: Sink


@dataclass(frozen=True, slots=True)
class Abort:
    request_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Shutdown:
    pass


@dataclass(frozen=True, slots=True)
class Accepted:
    """Every group's first request is in the engine: the request passed the engine's own checks."""


@dataclass(frozen=True, slots=True)
class Failed:
    error: MlxServeError
    request_id: str | None = None  # None: the whole stream


def _deliver(items: list[tuple[Sink, object]]) -> None:
    for sink, event in items:
        sink.queue.put_nowait(event)


class EngineDied(Exception):
    """Steps kept failing: the engine cannot go on."""


class EngineWorker:
    """The engine thread's state: the core, where each request's events go, forks not yet added."""

    def __init__(
        self, core: EngineCore, inbox: queue.SimpleQueue, *, max_consecutive_failures: int, idle_poll_s: float
    ) -> None:
        self.core = core
        self.inbox = inbox
        self.max_consecutive_failures = max_consecutive_failures
        self.idle_poll_s = idle_poll_s
        self.sinks: dict[str, Sink] = {}
        self.forks: dict[str, list[EngineRequest]] = {}  # first request id -> forks waiting for its first token
        self.outbox: list[tuple[Sink, object]] = []
        self.num_failures = 0

    def run(self, on_iteration: Callable[[], None]) -> None:
        """Serve until a Shutdown arrives; raises EngineDied when steps keep failing."""
        while True:
            for message in self._receive():
                if isinstance(message, Shutdown):
                    self._drop_all(ShuttingDownError("the server is shutting down", retry_after=None))
                    self.flush()
                    return
                self._handle(message)
            if self.core.has_unfinished_requests():
                self._step()
            self.flush()
            on_iteration()

    def _receive(self) -> list[object]:
        messages = []
        try:
            if not self.core.has_unfinished_requests():
                messages.append(self.inbox.get(timeout=self.idle_poll_s))
            while True:
                messages.append(self.inbox.get_nowait())
        except queue.Empty:
            pass
        return messages

    def _handle(self, message: object) -> None:
        if isinstance(message, Add):
            self._add(message)
        elif isinstance(message, Abort):
            self._abort(message.request_ids)

    def refuse_pending(self, error: MlxServeError) -> None:
        """After the loop ended: answer the adds still in the inbox, so no stream waits forever."""
        try:
            while True:
                message = self.inbox.get_nowait()
                if isinstance(message, Add):
                    self.outbox.append((message.sink, Failed(error)))
        except queue.Empty:
            pass
        self.flush()

    def _add(self, message: Add) -> None:
        added = []
        try:
            for group in message.groups:
                self.core.add_request(group[0])
                added.append(group[0].request_id)
        except Exception as e:
            for request_id in added:
                self.core.abort_request(request_id)
            if not isinstance(e, MlxServeError):
                logger.exception("adding a request failed")
                e = MlxServeError("internal error while adding the request")
            self.outbox.append((message.sink, Failed(e)))
            return
        for group in message.groups:
            for request in group:
                self.sinks[request.request_id] = message.sink
            if len(group) > 1:
                self.forks[group[0].request_id] = list(group[1:])
        self.outbox.append((message.sink, Accepted()))

    def _abort(self, request_ids: tuple[str, ...]) -> None:
        for request_id in request_ids:
            self.core.abort_request(request_id)
            self.sinks.pop(request_id, None)
        gone = set(request_ids)
        for request_id in request_ids:
            for fork in self.forks.pop(request_id, ()):  # their first is gone: they compute the prompt themselves
                if fork.request_id not in gone and fork.request_id in self.sinks:
                    self._add_fork(fork)
        for waiting in self.forks.values():
            waiting[:] = [f for f in waiting if f.request_id not in gone]

    def _add_fork(self, fork: EngineRequest) -> None:
        try:
            self.core.add_request(fork)
        except MlxServeError as e:
            self.outbox.append((self.sinks.pop(fork.request_id), Failed(e, fork.request_id)))

    def _step(self) -> None:
        try:
            outputs = self.core.step()
        except Exception as e:
            self._on_step_failure(e)
            return
        self.num_failures = 0
        for output in outputs:
            sink = self.sinks.pop(output.request_id, None) if output.finished else self.sinks.get(output.request_id)
            if sink is not None:
                self.outbox.append((sink, output))
            for fork in self.forks.pop(output.request_id, ()):  # the prompt's pages are cached now
                if fork.request_id in self.sinks:
                    self._add_fork(fork)

    def _on_step_failure(self, error: Exception) -> None:
        self.num_failures += 1
        # One log line per failure; the traceback only for the first of a run, so no log flood.
        logger.error(
            "engine step failed (%d in a row): %s: %s", self.num_failures, type(error).__name__, error,
            exc_info=self.num_failures == 1,
        )
        failed = EngineStepError("the engine failed while generating this request; retry it", retry_after=None)
        # The step's requests are the running ones; with none running it failed admitting waiting ones.
        scheduler = self.core.scheduler
        for request in list(scheduler.running or scheduler.waiting):
            self.core.abort_request(request.request_id)
            self._fail(request.request_id, failed)
        if self.num_failures >= self.max_consecutive_failures:
            raise EngineDied(f"{self.num_failures} engine steps failed in a row") from error

    def _fail(self, request_id: str, error: MlxServeError) -> None:
        sink = self.sinks.pop(request_id, None)
        if sink is not None:
            self.outbox.append((sink, Failed(error, request_id)))
        for fork in self.forks.pop(request_id, ()):
            self._fail(fork.request_id, error)

    def _drop_all(self, error: MlxServeError) -> None:
        for request_id in list(self.sinks):
            self.core.abort_request(request_id)
            self._fail(request_id, error)

    def flush(self) -> None:
        if not self.outbox:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Sink, object]]] = {}
        for item in self.outbox:
            by_loop.setdefault(item[0].loop, []).append(item)
        self.outbox = []
        for loop, items in by_loop.items():  # one wake-up per loop per step, not one per request
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that loop is closed: nobody is listening any more
                pass
