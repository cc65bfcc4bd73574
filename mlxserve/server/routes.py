"""The HTTP routes: /v1/chat/completions, /v1/completions, /v1/models, /health, /ready.

Each generation route: check the model name, build SamplingParams (every 400 before any work),
reserve engine room (503 before tokenizing), tokenize in a worker thread, check the context length,
submit, then stream or collect. Routes raise typed errors; ``server/errors.py`` renders them.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from mlxserve.engine.async_engine import AsyncEngine, RequestStream
from mlxserve.engine.llm import _fork_params
from mlxserve.engine.request import EngineRequest
from mlxserve.errors import ContextLengthError, InvalidRequestError, ModelNotFoundError
from mlxserve.sampling.params import SamplingParams
from mlxserve.server.config import ServerConfig
from mlxserve.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIModel,
)
from mlxserve.server.serving import (
    Job,
    UsageCounter,
    chat_body,
    chat_events,
    collect,
    completion_body,
    completion_events,
    until_disconnect,
)
from mlxserve.server.sse import SSEResponse
from mlxserve.tokenizer.wrapper import Tokenizer

__all__ = ["ServerState", "router"]

logger = logging.getLogger("mlxserve.server")
router = APIRouter()
CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client left first"; nobody receives it


@dataclass(frozen=True, slots=True)
class ServerState:
    config: ServerConfig
    engine: AsyncEngine
    tokenizer: Tokenizer
    created: int  # unix time the server started: the models' "created"

    def check_model(self, name: str) -> None:
        served = self.config.served_model_name
        if name != served:  # never a path or hub id: a request cannot make the server load anything
            raise ModelNotFoundError(f"the model {name[:64]!r} does not exist; this server serves {served!r}",
                                     param="model")


def _state(request: Request) -> ServerState:
    return request.app.state.mlxserve


def _log_unknown_fields(body: OpenAIModel, route: str) -> None:
    names = body.unknown_fields()
    if names:  # repr() escapes CR/LF, so a field name cannot forge a log line
        logger.warning("%s: ignoring unknown fields %s", route, ", ".join(repr(n[:64]) for n in names[:16]))


# ---- health ---------------------------------------------------------------------------------------


@router.get("/health")
async def health() -> dict:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> dict:
    """Readiness: the model is loaded and the engine loop is alive (else 503 with the reason)."""
    _state(request).engine.check_available()
    return {"status": "ready"}


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    return {"object": "list", "data": [_model_card(_state(request))]}


@router.get("/v1/models/{model:path}")
async def retrieve_model(model: str, request: Request) -> dict:
    state = _state(request)
    state.check_model(model)
    return _model_card(state)


def _model_card(state: ServerState) -> dict:
    return {"id": state.config.served_model_name, "object": "model", "created": state.created, "owned_by": "mlxserve"}


# ---- generation -----------------------------------------------------------------------------------


@router.post("/v1/chat/completions")
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    state = _state(request)
    state.check_model(body.model)
    _log_unknown_fields(body, "chat.completions")
    params = body.to_sampling_params(default_max_tokens=1)  # every 400 now; max_tokens is settled per prompt
    messages = body.template_messages()
    job = Job(_new_id("chatcmpl"), int(time.time()), body.model, body.n, body.include_usage)
    with state.engine.reserve(body.n) as reservation:
        prompt = await anyio.to_thread.run_sync(state.tokenizer.encode_chat, messages)
        groups = [_group(state, job, 0, prompt, params, body.requested_max_tokens, "messages")]
        stream = await state.engine.submit(groups, reservation)
    if body.stream:
        return _sse(state, stream, chat_events(stream, job, state.tokenizer))
    return await _collect(request, state, stream, job, chat_body)


@router.post("/v1/completions")
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    state = _state(request)
    state.check_model(body.model)
    _log_unknown_fields(body, "completions")
    params = body.to_sampling_params(default_max_tokens=1)  # every 400 now; max_tokens is settled per prompt
    prompts = body.prompts()
    job = Job(_new_id("cmpl"), int(time.time()), body.model, body.n, body.include_usage)
    with state.engine.reserve(body.n * len(prompts)) as reservation:
        token_lists = [await _encode_prompt(state.tokenizer, p) for p in prompts]
        groups = [
            _group(state, job, i, ids, params, body.max_tokens, "prompt") for i, ids in enumerate(token_lists)
        ]
        stream = await state.engine.submit(groups, reservation)
    if body.stream:
        return _sse(state, stream, completion_events(stream, job, state.tokenizer))
    return await _collect(request, state, stream, job, completion_body)


async def _encode_prompt(tokenizer: Tokenizer, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        return await anyio.to_thread.run_sync(tokenizer.encode, prompt)
    bad = next((t for t in prompt if not 0 <= t < tokenizer.vocab_size), None)
    if bad is not None:
        raise InvalidRequestError(f"prompt token id {bad} is outside the vocabulary", param="prompt")
    return prompt


def _group(
    state: ServerState, job: Job, prompt_index: int, prompt: Sequence[int], params: SamplingParams,
    requested_max_tokens: int | None, prompt_param: str,
) -> list[EngineRequest]:
    """The ``n`` engine requests of one prompt, after its length is checked against the context."""
    params = replace(params, max_tokens=_max_tokens(state, len(prompt), requested_max_tokens, prompt_param))
    params.validate_for_vocab(state.tokenizer.vocab_size)
    eos = frozenset(state.tokenizer.eos_token_ids) | frozenset(params.stop_token_ids)
    first = prompt_index * job.n
    return [
        EngineRequest(f"{job.response_id}-{first + i}", tuple(prompt), _fork_params(params, i), eos_token_ids=eos)
        for i in range(job.n)
    ]


def _max_tokens(state: ServerState, num_prompt: int, requested: int | None, prompt_param: str) -> int:
    max_len = state.engine.max_model_len
    if requested is None and num_prompt < max_len:
        return max_len - num_prompt  # OpenAI's default: whatever room the context leaves
    if requested is None:
        raise ContextLengthError(
            f"this model's maximum context length is {max_len} tokens, but the prompt has {num_prompt}",
            param=prompt_param,
        )
    if num_prompt + requested > max_len:
        raise ContextLengthError(
            f"this model's maximum context length is {max_len} tokens, but {num_prompt + requested} were requested "
            f"({num_prompt} in the prompt, {requested} for the completion)",
            param=prompt_param if num_prompt >= max_len else "max_tokens",
        )
    return requested


def _sse(state: ServerState, stream: RequestStream, events) -> SSEResponse:
    return SSEResponse(events, on_close=stream.close, write_timeout_s=state.config.write_timeout_s)


async def _collect(request: Request, state: ServerState, stream: RequestStream, job: Job, make_body) -> Response:
    usage = UsageCounter(job.n)
    try:
        choices = await until_disconnect(request, lambda: collect(stream, usage))
    finally:
        stream.close()
    if choices is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return JSONResponse(make_body(job, choices, usage, state.tokenizer))


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"
