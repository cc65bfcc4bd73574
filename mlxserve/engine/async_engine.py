"""AsyncEngine: the server's handle on the one engine thread (an actor that owns every MLX object).

    event loop (API side)                              engine thread
    reserve(n)  -> Reservation (admission, 503 early)
    submit(groups) --Add--> inbox ----------------->  EngineCore.add_request(first of each group)
    RequestStream <-- call_soon_threadsafe(batch) ---  Accepted | EngineOutput | Failed, once per step
    stream.close() --Abort--> inbox --------------->  EngineCore.abort_request (pages freed)

The model is loaded and the ``EngineCore`` built on the engine thread: MLX streams are per thread, so
lazy arrays made elsewhere cannot be evaluated there. A group is the ``n`` samples of one prompt; its
first request computes the prompt, the others ("forks") are added once that request has its first
token, so they find the prompt's pages in the prefix cache. Detokenization and stop strings run on
the event loop (``RequestStream``); a stop string aborts the request in the engine.

Faults: an exception in ``step()`` fails the requests that step was running (``EngineStepError``)
and the loop goes on; ``max_consecutive_failures`` failing steps in a row, or any exception outside
a step, kill the engine: every open stream gets ``EngineDeadError`` and new requests are refused.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mlxserve.engine.core import EngineConfig, EngineCore
from mlxserve.engine.engine_loop import (
    Abort,
    Accepted,
    Add,
    EngineWorker,
    Failed,
    Shutdown,
    Sink,
)
from mlxserve.engine.metrics import EngineMetrics
from mlxserve.engine.request import EngineOutput, EngineRequest, FinishReason
from mlxserve.errors import (
    ConfigError,
    EngineDeadError,
    EngineStepError,
    InvalidRequestError,
    MlxServeError,
    ModelLoadingError,
    OverloadedError,
    ShuttingDownError,
)
from mlxserve.tokenizer.detokenizer import IncrementalDetokenizer
from mlxserve.tokenizer.wrapper import Tokenizer

__all__ = ["AsyncEngine", "AsyncEngineConfig", "ChoiceDelta", "EngineState", "RequestStream", "Reservation"]

logger = logging.getLogger("mlxserve.engine")


@dataclass(frozen=True, slots=True)
class AsyncEngineConfig:
    max_queue: int = 64  # requests admitted beyond the engine's running slots; more -> 503
    retry_after_s: int = 1  # Retry-After of 503 answers
    max_consecutive_failures: int = 3  # failing steps in a row before the engine is declared dead
    idle_poll_s: float = 0.5  # the engine thread's heartbeat period when it has nothing to do

    def validate(self) -> AsyncEngineConfig:
        for name in ("max_queue", "retry_after_s", "max_consecutive_failures"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "max_queue" else 1):
                raise ConfigError(f"`{name}` must be a non-negative integer, got {value!r}", param=name)
        return self


class EngineState(str, enum.Enum):
    LOADING = "loading"
    READY = "ready"
    STOPPING = "stopping"
    STOPPED = "stopped"
    DEAD = "dead"


# ---- the API side ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChoiceDelta:
    """New output of one choice. ``token_ids`` are the new tokens that carry text (an EOS/stop token is
    left out) and ``logprobs`` theirs, when the request asked; ``num_new_tokens`` counts every new token."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...] | None
    finish_reason: str | None  # "stop" | "length" on the choice's last delta
    num_new_tokens: int
    num_prompt_tokens: int
    num_cached_tokens: int


@dataclass(slots=True)
class _Choice:
    index: int
    detokenizer: IncrementalDetokenizer
    want_logprobs: bool
    finished: bool = False


class Reservation:
    """Room for ``num_requests`` requests, taken before tokenization; ``release()`` is idempotent."""

    __slots__ = ("_engine", "_released", "num_requests")

    def __init__(self, engine: AsyncEngine, num_requests: int) -> None:
        self._engine = engine
        self.num_requests = num_requests
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._engine._num_reserved -= self.num_requests

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.release()


class RequestStream:
    """The engine requests of one API request, as one stream of ``ChoiceDelta``s (choice index =
    position in the flattened groups). ``close()`` aborts what is unfinished; it is idempotent."""

    def __init__(
        self, engine: AsyncEngine, groups: Sequence[Sequence[EngineRequest]], sink: Sink, reservation: Reservation
    ) -> None:
        self._engine = engine
        self._sink = sink
        self._reservation = reservation
        self._choices: dict[str, _Choice] = {}
        for request in (r for group in groups for r in group):
            detok = IncrementalDetokenizer(engine.tokenizer, stop=request.sampling.stop)
            self._choices[request.request_id] = _Choice(len(self._choices), detok, request.sampling.logprobs)
        self._unfinished = set(self._choices)
        self._closed = False

    @property
    def num_choices(self) -> int:
        return len(self._choices)

    async def _wait_accepted(self) -> None:
        event = await self._sink.queue.get()
        if isinstance(event, Failed):
            self._unfinished.clear()
            self.close()
            raise event.error
        assert isinstance(event, Accepted), event

    async def deltas(self) -> AsyncIterator[ChoiceDelta]:
        """Every choice's deltas until each has finished; raises the engine's error if one fails."""
        try:
            while self._unfinished:
                event = await self._sink.queue.get()
                if isinstance(event, Failed):
                    if event.request_id is not None:
                        self._unfinished.discard(event.request_id)
                    raise event.error
                delta = self._on_output(event)
                if delta is not None:
                    yield delta
        finally:
            self.close()

    def _on_output(self, output: EngineOutput) -> ChoiceDelta | None:
        choice = self._choices.get(output.request_id)
        if choice is None or choice.finished:
            return None  # e.g. a token that was on its way when a stop string aborted the request
        if output.finish_reason is FinishReason.ABORT:
            raise EngineStepError("the engine aborted this request", retry_after=None)
        token_ids = output.new_token_ids[:-1] if output.stop_token_id is not None else output.new_token_ids
        delta = choice.detokenizer.update(token_ids)
        text, finish = delta.text, output.finish_reason.value if output.finish_reason else None
        if delta.stop_string is not None:
            finish = "stop"
            if not output.finished:
                self._engine._abort((output.request_id,))
        elif finish is not None:
            tail = choice.detokenizer.finish()
            text += tail.text
            finish = "stop" if tail.stop_string is not None else finish
        if finish is not None:
            choice.finished = True
            self._unfinished.discard(output.request_id)
        logprobs = None
        if choice.want_logprobs and output.new_logprobs is not None:
            logprobs = tuple(float(v) for v in output.new_logprobs[: len(token_ids)])
        return ChoiceDelta(
            index=choice.index, text=text, token_ids=tuple(token_ids), logprobs=logprobs, finish_reason=finish,
            num_new_tokens=len(output.new_token_ids), num_prompt_tokens=output.num_prompt_tokens,
            num_cached_tokens=output.num_cached_tokens,
        )

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._unfinished:
            self._engine._abort(tuple(self._unfinished))
            self._unfinished.clear()
        self._reservation.release()
        self._engine._sinks.discard(self._sink)

    def __del__(self) -> None:  # a stream dropped without close() must not pin engine slots
        if not getattr(self, "_closed", True):
            self.close()


@dataclass(slots=True)
class _Status:
    """Fields the engine thread publishes for the API side (single assignments: safe to read)."""

    state: EngineState = EngineState.LOADING
    error: str | None = None
    heartbeat: float = field(default_factory=time.monotonic)
    metrics: EngineMetrics | None = None
    max_model_len: int | None = None
    description: str = ""


class AsyncEngine:
    """Runs ``EngineCore(model_loader(), engine_config)`` on its own thread and serves it to asyncio."""

    def __init__(
        self,
        model_loader: Callable[[], object],
        engine_config: EngineConfig,
        tokenizer: Tokenizer,
        config: AsyncEngineConfig = AsyncEngineConfig(),
        *,
        on_death: Callable[[], None] | None = None,
    ) -> None:
        self._model_loader = model_loader
        self.engine_config = engine_config.validate()
        self.tokenizer = tokenizer
        self.config = config.validate()
        self.max_running = engine_config.max_num_seqs
        self.capacity = engine_config.max_num_seqs + config.max_queue
        self._on_death = on_death
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._status = _Status()
        self._loaded = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sinks: set[Sink] = set()
        self._num_reserved = 0
        self.core: EngineCore | None = None  # engine thread only; tests reach in to inject faults

    @classmethod
    def from_model_path(
        cls, path: str | Path, engine_config: EngineConfig, tokenizer: Tokenizer | None = None,
        config: AsyncEngineConfig = AsyncEngineConfig(), **kwargs,
    ) -> AsyncEngine:
        from mlxserve.models.loader import load_model

        tokenizer = tokenizer or Tokenizer.from_pretrained(path)
        return cls(lambda: load_model(Path(path)).model, engine_config, tokenizer, config, **kwargs)

    # ---- life cycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread (it loads the model first); idempotent."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._thread_main, name="mlxserve-engine", daemon=True)
            self._thread.start()

    def wait_loaded(self, timeout: float | None = None) -> None:
        """Block until the model is loaded; raise its load error, or EngineDeadError."""
        if not self._loaded.wait(timeout):
            raise ModelLoadingError("the model is still loading")
        if self._status.state is not EngineState.READY:
            raise EngineDeadError(f"the engine failed to start: {self._status.error}", retry_after=None)

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """The event loop that streams live on (the server's); taken from the first submit otherwise."""
        self._loop = loop

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine thread; open streams end with ShuttingDownError."""
        if self._status.state in (EngineState.LOADING, EngineState.READY):
            self._status.state = EngineState.STOPPING
        self._inbox.put(Shutdown())
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, timeout)
        if self._status.state is EngineState.STOPPING:
            self._status.state = EngineState.STOPPED

    def _thread_main(self) -> None:
        try:
            self.core = EngineCore(self._model_loader(), self.engine_config)
        except BaseException as e:
            logger.error("the engine failed to start: %s: %s", type(e).__name__, e)
            self._status.error = str(e) if isinstance(e, MlxServeError) else f"{type(e).__name__}: {e}"
            self._status.state = EngineState.DEAD
            self._loaded.set()
            return
        self._status.max_model_len = self.core.scheduler_config.max_model_len
        self._status.description = self.core.describe()
        self._publish()
        if self._status.state is EngineState.LOADING:
            self._status.state = EngineState.READY
        self._loaded.set()
        worker = EngineWorker(
            self.core, self._inbox, max_consecutive_failures=self.config.max_consecutive_failures,
            idle_poll_s=self.config.idle_poll_s,
        )
        try:
            worker.run(self._publish)
        except BaseException as e:
            self._die(e, worker)
            return
        self._status.state = EngineState.STOPPED
        worker.refuse_pending(ShuttingDownError("the server is shutting down", retry_after=None))

    def _publish(self) -> None:
        self._status.heartbeat = time.monotonic()
        self._status.metrics = self.core.metrics()

    def _die(self, error: BaseException, worker: EngineWorker) -> None:
        logger.critical("the engine loop died: %s: %s", type(error).__name__, error)
        self._status.error = f"{type(error).__name__}: {error}"
        self._status.state = EngineState.DEAD  # before any stream hears of the failure
        worker.flush()
        worker.refuse_pending(EngineDeadError("the engine has stopped", retry_after=None))
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._fail_open_streams)
            except RuntimeError:
                pass
        if self._on_death is not None:
            self._on_death()

    def _fail_open_streams(self) -> None:
        error = EngineDeadError("the engine has stopped; the server must be restarted", retry_after=None)
        for sink in list(self._sinks):
            sink.queue.put_nowait(Failed(error))

    # ---- status ----------------------------------------------------------------------------------

    @property
    def state(self) -> EngineState:
        if self._status.state is EngineState.READY and self._thread is not None and not self._thread.is_alive():
            return EngineState.DEAD
        return self._status.state

    @property
    def max_model_len(self) -> int:
        if self._status.max_model_len is None:
            raise ModelLoadingError("the model is still loading")
        return self._status.max_model_len

    @property
    def description(self) -> str:
        """EngineCore.describe(): the KV budget line (empty until loaded)."""
        return self._status.description

    @property
    def heartbeat(self) -> float:
        """``time.monotonic()`` of the engine loop's last iteration."""
        return self._status.heartbeat

    def metrics(self) -> EngineMetrics | None:
        """The engine's numbers after its latest iteration (None before the first)."""
        return self._status.metrics

    @property
    def num_reserved(self) -> int:
        """Requests admitted by reserve() and not yet finished (running + waiting in the engine)."""
        return self._num_reserved

    def check_available(self) -> None:
        """Raise the 503 that new requests get now, if any."""
        state = self.state
        if state is EngineState.READY:
            return
        if state is EngineState.LOADING:
            raise ModelLoadingError("the model is still loading", retry_after=self.config.retry_after_s)
        if state is EngineState.DEAD:
            raise EngineDeadError("the engine has stopped; the server must be restarted", retry_after=None)
        raise ShuttingDownError("the server is shutting down", retry_after=None)

    # ---- requests ---------------------------------------------------------------------------------

    def reserve(self, num_requests: int) -> Reservation:
        """Admit ``num_requests`` engine requests or raise at once (503), before any tokenization.
        Runs on the event loop, so the check and the increment are atomic."""
        self.check_available()
        if num_requests > self.capacity:
            raise InvalidRequestError(
                f"the request needs {num_requests} sequences but the server runs at most {self.capacity}", param="n"
            )
        if self._num_reserved + num_requests > self.capacity:
            raise OverloadedError(
                f"the server is at capacity ({self.max_running} running, {self.config.max_queue} queued); retry later",
                retry_after=self.config.retry_after_s,
            )
        self._num_reserved += num_requests
        return Reservation(self, num_requests)

    async def submit(self, groups: Sequence[Sequence[EngineRequest]], reservation: Reservation) -> RequestStream:
        """Hand the requests to the engine; returns once it has accepted them (its refusals, e.g.
        a prompt too long for the KV cache, are raised here, before any response is sent)."""
        self.check_available()
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        sink = Sink(loop)
        stream = RequestStream(self, groups, sink, reservation)
        self._sinks.add(sink)
        self._inbox.put(Add(tuple(tuple(g) for g in groups), sink))
        try:
            await stream._wait_accepted()
        except BaseException:
            stream.close()
            raise
        return stream

    def _abort(self, request_ids: tuple[str, ...]) -> None:
        self._inbox.put(Abort(request_ids))
