"""The HTTP server over real sockets (uvicorn on 127.0.0.1): protocol, usage, stop strings, forks,
the error table with a canary after each case, disconnects, overload and engine faults."""

from __future__ import annotations

import json
import threading
import time
import uuid

import httpx
import pytest
from _live_server import API_KEY, MAX_BODY_BYTES, MODEL_NAME, live_server, slowed_engine

import mlxserve

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MESSAGES = [{"role": "user", "content": "Tell me about the sky and the sea."}]
CANARY = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "canary"}], "max_tokens": 4,
          "temperature": 0, "logprobs": True}


def chat(**fields) -> dict:
    return {"model": MODEL_NAME, "messages": MESSAGES, "temperature": 0, "max_tokens": 10, **fields}


def sse(response: httpx.Response) -> list:
    """The data payloads of an SSE body: parsed JSON, or the string "[DONE]"."""
    events = []
    for block in response.text.split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            data = block[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def canary(client: httpx.Client) -> list:
    r = client.post(CHAT, json=CANARY)
    assert r.status_code == 200, r.text
    return [(t["bytes"], t["logprob"]) for t in r.json()["choices"][0]["logprobs"]["content"]]


@pytest.fixture(scope="module")
def canary_tokens(server):
    with server.client() as c:
        return canary(c)


# ---- responses -------------------------------------------------------------------------------------


def test_chat_response_has_openais_shape_and_exact_usage(client, server):
    fresh = [{"role": "user", "content": f"a prompt no other test sends {uuid.uuid4().hex}"}]  # no cache hit
    r = client.post(CHAT, json=chat(messages=fresh))
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    num_prompt = len(server.engine.tokenizer.encode_chat(fresh))
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion" and body["model"] == MODEL_NAME
    (choice,) = body["choices"]
    assert (choice["index"], choice["message"]["role"], choice["finish_reason"], choice["logprobs"]) == (
        0, "assistant", "length", None)
    assert body["usage"] == {"prompt_tokens": num_prompt, "completion_tokens": 10, "total_tokens": num_prompt + 10,
                             "prompt_tokens_details": {"cached_tokens": 0}}


def test_greedy_text_equals_mlxserve_generate(client, reference):
    model, tokenizer = reference
    chat_text = client.post(CHAT, json=chat(max_tokens=16)).json()["choices"][0]["message"]["content"]
    assert chat_text == mlxserve.generate(model, tokenizer, MESSAGES, max_tokens=16)
    r = client.post(COMPLETIONS, json={"model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": 16,
                                       "temperature": 0})
    assert r.json()["choices"][0]["text"] == mlxserve.generate(model, tokenizer, "Once upon a time", max_tokens=16)


def test_chat_stream_protocol_and_streamed_text_equals_the_whole(client):
    whole = client.post(CHAT, json=chat()).json()
    r = client.post(CHAT, json=chat(stream=True, stream_options={"include_usage": True}))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1 and {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0]["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                     "finish_reason": None}]
    assert chunks[-2]["choices"] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 10
    assert chunks[-1]["usage"]["prompt_tokens"] == whole["usage"]["prompt_tokens"]
    assert all(c["usage"] is None for c in chunks[:-1])
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[1:-2])
    assert text == whole["choices"][0]["message"]["content"]


def test_without_include_usage_a_stream_has_no_usage(client):
    events = sse(client.post(CHAT, json=chat(stream=True, max_tokens=3)))
    assert events[-1] == "[DONE]" and all("usage" not in e for e in events[:-1])


@pytest.fixture
def tokenizer(server):
    return server.engine.tokenizer


def test_completion_stream_equals_the_whole(client, tokenizer):
    body = {"model": MODEL_NAME, "prompt": "The sea", "max_tokens": 12, "temperature": 0}
    whole = client.post(COMPLETIONS, json=body).json()
    events = sse(client.post(COMPLETIONS, json={**body, "stream": True, "stream_options": {"include_usage": True}}))
    assert events[-1] == "[DONE]" and events[-2]["usage"] == whole["usage"]
    assert events[-3]["choices"] == [{"index": 0, "text": "", "logprobs": None, "finish_reason": "length"}]
    assert "".join(e["choices"][0]["text"] for e in events[:-2]) == whole["choices"][0]["text"]
    assert whole["usage"]["prompt_tokens"] == len(tokenizer.encode("The sea"))


def test_prefix_cache_hits_show_in_usage(client, server):
    messages = [{"role": "user", "content": "A prompt long enough to fill a few pages of the KV cache, " * 2}]
    num_prompt = len(server.engine.tokenizer.encode_chat(messages))
    first = client.post(CHAT, json=chat(messages=messages, max_tokens=2)).json()["usage"]
    second = client.post(CHAT, json=chat(messages=messages, max_tokens=2)).json()["usage"]
    assert first["prompt_tokens"] == second["prompt_tokens"] == num_prompt
    assert first["prompt_tokens_details"]["cached_tokens"] == 0
    assert second["prompt_tokens_details"]["cached_tokens"] == (num_prompt - 1) // 16 * 16


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_cut_the_text_and_are_never_emitted(client, stream):
    full = client.post(CHAT, json=chat(max_tokens=24)).json()["choices"][0]["message"]["content"]
    start = next(i for i in range(4, len(full) - 3) if "\ufffd" not in full[i : i + 3])
    stop = full[start : start + 3]
    r = client.post(CHAT, json=chat(max_tokens=24, stop=[stop, "never-appears"], stream=stream))
    if stream:
        events = sse(r)
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[1:-2])
        finish = events[-2]["choices"][0]["finish_reason"]
    else:
        text, finish = r.json()["choices"][0]["message"]["content"], r.json()["choices"][0]["finish_reason"]
    assert (text, finish) == (full[: full.find(stop)], "stop")


def test_n_samples_are_distinct_and_reproducible_with_a_seed(client, tokenizer):
    body = chat(n=3, temperature=1.0, seed=11, max_tokens=8)
    one, two = client.post(CHAT, json=body).json(), client.post(CHAT, json=body).json()
    texts = [c["message"]["content"] for c in one["choices"]]
    assert [c["index"] for c in one["choices"]] == [0, 1, 2]
    assert texts == [c["message"]["content"] for c in two["choices"]] and len(set(texts)) == 3
    assert one["usage"]["completion_tokens"] == 24
    assert one["usage"]["prompt_tokens"] == len(tokenizer.encode_chat(MESSAGES))  # counted once


def test_n_in_a_stream_gives_every_choice_its_role_and_finish(client):
    events = sse(client.post(CHAT, json=chat(n=2, stream=True, max_tokens=4, temperature=1.0, seed=3)))
    roles = [e["choices"][0]["index"] for e in events[:-1] if e["choices"][0]["delta"].get("role")]
    finishes = [e["choices"][0]["index"] for e in events[:-1] if e["choices"][0]["finish_reason"]]
    assert sorted(roles) == [0, 1] and sorted(finishes) == [0, 1] and events[-1] == "[DONE]"


def test_chat_logprobs_are_the_chosen_tokens_and_their_bytes_make_the_text(client, reference):
    body = client.post(CHAT, json=chat(max_tokens=8, logprobs=True)).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"] == 8
    raw = b"".join(bytes(t["bytes"]) for t in content)
    assert raw.decode("utf-8", errors="replace") == body["choices"][0]["message"]["content"]
    model, tokenizer = reference
    expected = [r.logprob for r in mlxserve.stream_generate(model, tokenizer, MESSAGES, max_tokens=8)]
    assert [t["logprob"] for t in content] == pytest.approx(expected, abs=1e-4)
    assert {len(t["top_logprobs"]) for t in content} == {0}


def test_completions_take_several_prompts_and_token_ids(client, tokenizer):
    ids, other = tokenizer.encode("The sea"), tokenizer.encode("Once")
    r = client.post(COMPLETIONS, json={"model": MODEL_NAME, "prompt": [ids, other], "max_tokens": 3,
                                       "temperature": 0, "n": 2, "logprobs": 0})
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["usage"]["prompt_tokens"] == len(ids) + len(other)
    texts = client.post(COMPLETIONS, json={"model": MODEL_NAME, "prompt": ["The sea", "Once"], "max_tokens": 3,
                                           "temperature": 0}).json()["choices"]
    assert [t["text"] for t in texts] == [body["choices"][0]["text"], body["choices"][2]["text"]]
    assert body["usage"]["completion_tokens"] == 12
    assert body["choices"][0]["text"] == body["choices"][1]["text"]  # greedy forks agree
    assert len(body["choices"][0]["logprobs"]["token_logprobs"]) == 3


def test_same_greedy_tokens_at_concurrency_one_and_eight(server):
    prompts = [f"Prompt number {i} about {'sky' if i % 2 else 'sea'}" for i in range(8)]

    def complete(c, p):
        r = c.post(COMPLETIONS, json={"model": MODEL_NAME, "prompt": p, "max_tokens": 12, "temperature": 0})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    with server.client() as c:
        alone = [complete(c, p) for p in prompts]
    together: list = [None] * 8

    def worker(i):
        with server.client() as c:
            together[i] = complete(c, prompts[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert together == alone


def test_models_health_and_ready(client, server):
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json() == {"status": "ready"}
    card = {"id": MODEL_NAME, "object": "model", "created": server.uvicorn_server.config.app.state.mlxserve.created,
            "owned_by": "mlxserve"}
    assert client.get("/v1/models").json() == {"object": "list", "data": [card]}
    assert client.get(f"/v1/models/{MODEL_NAME}").json() == card
    assert client.get("/v1/models/org/other").json()["error"]["code"] == "model_not_found"


# ---- the error table --------------------------------------------------------------------------------


def _raw(content: bytes, content_type: str = "application/json"):
    return dict(content=content, headers={"Content-Type": content_type})


LONG = [{"role": "user", "content": "word " * 300}]
ERROR_CASES = {
    # case: (request kwargs, status, type, param, code)
    "invalid JSON": (dict(path=CHAT, **_raw(b'{"model": ')), 400, "invalid_request_error", None, None),
    "JSON array": (dict(path=CHAT, **_raw(b"[1, 2]")), 400, "invalid_request_error", None, None),
    "JSON string": (dict(path=CHAT, **_raw(b'"hi"')), 400, "invalid_request_error", None, None),
    "max_tokens as string": (dict(json=chat(max_tokens="10")), 400, "invalid_request_error", "max_tokens", None),
    "temperature -1": (dict(json=chat(temperature=-1)), 400, "invalid_request_error", "temperature", None),
    "top_p 2": (dict(json=chat(top_p=2)), 400, "invalid_request_error", "top_p", None),
    "n 0": (dict(json=chat(n=0)), 400, "invalid_request_error", "n", None),
    "n 10**9": (dict(json=chat(n=10**9)), 400, "invalid_request_error", "n", None),
    "messages []": (dict(json=chat(messages=[])), 400, "invalid_request_error", "messages", None),
    "unknown role": (dict(json=chat(messages=[{"role": "wizard", "content": "x"}])), 400,
                     "invalid_request_error", "messages[0].role", None),
    "content as dict": (dict(json=chat(messages=[{"role": "user", "content": {"a": 1}}])), 400,
                        "invalid_request_error", "messages[0].content", None),
    "missing model": (dict(json={"messages": MESSAGES}), 400, "invalid_request_error", "model", None),
    "top_logprobs 10**6": (dict(json=chat(logprobs=True, top_logprobs=10**6)), 400, "invalid_request_error",
                           "top_logprobs", None),
    "max_tokens 2**63": (dict(json=chat(max_tokens=2**63)), 400, "invalid_request_error", "max_tokens", None),
    "seed 2**64": (dict(json=chat(seed=2**64)), 400, "invalid_request_error", "seed", None),
    "17 stop strings": (dict(json=chat(stop=[str(i) for i in range(17)])), 400, "invalid_request_error", "stop", None),
    "logit_bias out of vocab": (dict(json=chat(logit_bias={"100000": 1})), 400, "invalid_request_error",
                                "logit_bias", None),
    "tools": (dict(json=chat(tools=[{"type": "function", "function": {"name": "f"}}])), 400,
              "invalid_request_error", "tools", None),
    "response_format": (dict(json=chat(response_format={"type": "json_object"})), 400, "invalid_request_error",
                        "response_format", None),
    "prompt ids out of vocab": (dict(path=COMPLETIONS, json={"model": MODEL_NAME, "prompt": [1, 99999]}), 400,
                                "invalid_request_error", "prompt", None),
    "unknown model": (dict(json=chat(model="org/other")), 404, "invalid_request_error", "model", "model_not_found"),
    "model is a path": (dict(json=chat(model="../../etc")), 404, "invalid_request_error", "model", "model_not_found"),
    "missing key": (dict(json=chat(), api_key=None), 401, "invalid_request_error", None, "invalid_api_key"),
    "wrong key": (dict(json=chat(), api_key="nope"), 401, "invalid_request_error", None, "invalid_api_key"),
    "prompt too long": (dict(json=chat(messages=LONG, max_tokens=None)), 400, "invalid_request_error", "messages",
                        "context_length_exceeded"),
    "prompt + max_tokens too long": (dict(json=chat(messages=[{"role": "user", "content": "word " * 100}],
                                                    max_tokens=200)),
                                     400, "invalid_request_error", "max_tokens", "context_length_exceeded"),
    "body over the limit": (dict(path=CHAT, **_raw(b" " * (MAX_BODY_BYTES + 1))), 413, "invalid_request_error",
                            None, "payload_too_large"),
    "text/plain body": (dict(path=CHAT, **_raw(b"{}", "text/plain")), 415, "invalid_request_error", None,
                        "unsupported_media_type"),
    "unknown route": (dict(path="/v1/nothing"), 404, "invalid_request_error", None, "not_found"),
    "wrong method": (dict(path=CHAT, method="GET"), 405, "invalid_request_error", None, "method_not_allowed"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_error_table_then_canary(server, canary_tokens, case):
    kwargs, status, type_, param, code = ERROR_CASES[case]
    kwargs = dict(kwargs)
    path, method = kwargs.pop("path", CHAT), kwargs.pop("method", "POST")
    with server.client(api_key=kwargs.pop("api_key", API_KEY)) as c:
        r = c.request(method, path, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert (error["type"], error["param"], error["code"]) == (type_, param, code)
    assert set(error) == {"message", "type", "param", "code"} and "Traceback" not in error["message"]
    with server.client() as c:
        assert canary(c) == canary_tokens
        assert c.get("/ready").status_code == 200
    server.wait_idle()


def test_context_errors_give_the_counts(client, server):
    num_prompt = len(server.engine.tokenizer.encode_chat(LONG))
    r = client.post(CHAT, json=chat(messages=LONG, max_tokens=None))
    assert r.json()["error"]["message"] == (
        f"this model's maximum context length is 256 tokens, but the prompt has {num_prompt}")
    small = [{"role": "user", "content": "word " * 100}]
    num_small = len(server.engine.tokenizer.encode_chat(small))
    r = client.post(CHAT, json=chat(messages=small, max_tokens=200))
    assert r.json()["error"]["message"] == (
        f"this model's maximum context length is 256 tokens, but {num_small + 200} were requested "
        f"({num_small} in the prompt, 200 for the completion)")


def test_a_chunked_body_over_the_limit_is_cut_off(client):
    def chunks():
        for _ in range(4):
            yield b" " * (MAX_BODY_BYTES // 2)

    r = client.post(CHAT, content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"


def test_unknown_fields_are_served_and_logged_escaped(client, caplog):
    with caplog.at_level("WARNING", logger="mlxserve.server"):
        r = client.post(CHAT, json=chat(max_tokens=1, **{"foo\r\nFORGED": 1}))
    assert r.status_code == 200
    assert ["chat.completions: ignoring unknown fields 'foo\\r\\nFORGED'"] == [
        rec.getMessage() for rec in caplog.records if rec.name == "mlxserve.server"]


# ---- exposure ---------------------------------------------------------------------------------------


def test_every_route_but_health_needs_the_key(server):
    from mlxserve.server.routes import router

    app = server.uvicorn_server.config.app
    routes = [r for r in (*app.routes, *router.routes) if hasattr(r, "path")]  # docs routes + ours
    paths = sorted({(r.path.replace("{model:path}", "x"), sorted(r.methods)[0]) for r in routes})
    assert ("/health", "GET") in paths and ("/openapi.json", "GET") in paths
    with server.client(api_key=None) as c:
        statuses = {path: c.request(method, path).status_code for path, method in paths}
        assert c.get("/v1/models", params={"api_key": API_KEY}).status_code == 401
        assert c.get("/v1/models", headers={"Authorization": f"Basic {API_KEY}"}).status_code == 401
        assert c.get("/v1/models", headers={"Authorization": f"bearer {API_KEY}"}).status_code == 200
    assert statuses == {path: 200 if path == "/health" else 401 for path, _ in paths}


@pytest.mark.parametrize(("host", "status"), [
    ("evil.example", 403), ("127.0.0.1.nip.io", 403), ("localhost:8080", 200), ("127.0.0.1", 200), ("[::1]:80", 200),
])
def test_foreign_host_headers_are_refused_before_auth(server, host, status):
    with server.client(api_key=None) as c:
        r = c.get("/health", headers={"Host": host})
        assert r.status_code == status
        if status == 403:
            assert r.json()["error"]["code"] == "forbidden"
            assert c.get("/v1/models", headers={"Host": host}).status_code == 403  # not 401


def test_cors_answers_listed_origins_only(ckpt, server):
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    with server.client(api_key=None) as c:  # no origins listed: CORS is off
        r = c.options(CHAT, headers={"Origin": "https://good.example", **preflight})
        assert "access-control-allow-origin" not in r.headers
    with live_server(ckpt, cors_origins=("https://good.example",)) as s, s.client(api_key=None) as c:
        good = c.options(CHAT, headers={"Origin": "https://good.example", **preflight})
        evil = c.options(CHAT, headers={"Origin": "https://evil.example", **preflight})
    assert (good.status_code, good.headers["access-control-allow-origin"]) == (200, "https://good.example")
    assert "access-control-allow-origin" not in evil.headers and "access-control-allow-credentials" not in good.headers


# ---- disconnects, overload, faults ---------------------------------------------------------------------


def test_disconnect_mid_stream_aborts_and_frees_pages(server):
    with slowed_engine(server.engine, 0.01), server.client() as c:
        with c.stream("POST", CHAT, json=chat(stream=True, max_tokens=200)) as r:
            data = []
            for line in r.iter_lines():
                if line.startswith("data: "):
                    data.append(line)
                if len(data) == 3:
                    break
        server.wait_idle(timeout=1.0)
    timing = server.engine.metrics().recent_timings[-1]
    assert timing.finish_reason == "abort" and timing.num_output_tokens < 200


def test_disconnect_of_a_non_streaming_request_aborts_it(server):
    with slowed_engine(server.engine, 0.01), server.client(timeout=0.3) as c:
        with pytest.raises(httpx.ReadTimeout):
            c.post(CHAT, json=chat(max_tokens=200))
        server.wait_idle(timeout=1.0)
    assert server.engine.metrics().recent_timings[-1].finish_reason == "abort"


def test_overload_is_refused_fast_with_retry_after(server):
    capacity = server.engine.capacity
    with slowed_engine(server.engine, 0.01), server.client() as c:
        streams = [c.send(c.build_request("POST", CHAT, json=chat(stream=True, max_tokens=200)), stream=True)
                   for _ in range(capacity)]
        refused, elapsed = [], []
        for _ in range(3):
            start = time.monotonic()
            refused.append(c.post(CHAT, json=chat()))
            elapsed.append(time.monotonic() - start)
        for s in streams:
            s.close()
        server.wait_idle(timeout=2.0)
    assert {(r.status_code, r.headers["retry-after"], r.json()["error"]["code"]) for r in refused} == {
        (503, "1", "server_is_overloaded")}
    assert min(elapsed) < 0.1 and [s.status_code for s in streams] == [200] * capacity  # refused before any work


def _fail_step_number(engine, n: int):
    original = engine.core.step
    calls = []

    def step():
        calls.append(1)
        if len(calls) == n:
            raise RuntimeError("[metal::malloc] injected")
        return original()

    engine.core.step = step


@pytest.mark.parametrize("stream", [True, False])
def test_a_failed_step_ends_its_request_with_an_error_and_the_server_goes_on(server, canary_tokens, stream):
    _fail_step_number(server.engine, 3)
    try:
        with server.client() as c:
            r = c.post(CHAT, json=chat(stream=stream, max_tokens=20))
            if stream:
                events = sse(r)
                assert r.status_code == 200 and events[-1] == "[DONE]"
                assert events[-2] == {"error": {
                    "message": "the engine failed while generating this request; retry it",
                    "type": "server_error", "param": None, "code": "generation_failed"}}
            else:
                assert (r.status_code, r.json()["error"]["code"]) == (503, "generation_failed")
            del server.engine.core.step
            assert canary(c) == canary_tokens
    finally:
        server.engine.core.__dict__.pop("step", None)
    server.wait_idle()


def test_a_dead_engine_fails_ready_and_new_requests(ckpt):
    with live_server(ckpt, max_consecutive_failures=1) as s, s.client() as c:
        s.engine.wait_loaded()

        def broken():
            raise RuntimeError("injected")

        s.engine.core.step = broken
        first = c.post(CHAT, json=chat())
        ready, again = c.get("/ready"), c.post(CHAT, json=chat())
    assert (first.status_code, first.json()["error"]["code"]) == (503, "generation_failed")
    assert (ready.status_code, ready.json()["error"]["code"]) == (503, "engine_unavailable")
    assert (again.status_code, again.json()["error"]["code"]) == (503, "engine_unavailable")


def test_ready_is_503_while_the_model_loads(ckpt):
    from mlxserve.models.loader import load_model

    release = threading.Event()

    def held_loader():
        assert release.wait(timeout=10)
        return load_model(ckpt).model

    with live_server(ckpt, model_loader=held_loader) as s, s.client() as c:
        ready, request = c.get("/ready"), c.post(CHAT, json=chat())
        release.set()
        s.engine.wait_loaded(timeout=5)
        after = c.get("/ready")
    assert (ready.status_code, ready.headers["retry-after"]) == (503, "1")
    assert ready.json()["error"]["code"] == "model_loading"
    assert (request.status_code, request.json()["error"]["code"]) == (503, "model_loading")
    assert after.status_code == 200
