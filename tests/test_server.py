"""The HTTP server, driven over real sockets with httpx.

One uvicorn server per module, on 127.0.0.1 and a free port, in a
background thread, serving the real `Engine` over a tiny random GPT-2
(`keras_lora.serving.demo`). Cases the real engine cannot produce (an
engine exception) use a second server over a small fake engine.
"""

import argparse
import concurrent.futures
import contextlib
import dataclasses
import json
import os
import shutil
import socket
import threading
import time

import httpx
import pytest
import uvicorn

from benchmarks.hostile_requests import broken_adapter_copies
from keras_lora.serving import command, demo, errors
from keras_lora.serving.engine import Completion, CompletionRequest, Engine
from keras_lora.serving.scheduler import Scheduler
from keras_lora.serving.server import create_app

MAX_QUEUE = 8
MAX_BATCH = 8
# Short prompts and few new tokens keep every pass in the engine's first
# sequence-length bucket, so few shapes compile (a byte tokenizer: one
# token per character).
PROMPTS = ["Hello", "The cat", "import", "LoRA", "x = 1"]


@contextlib.contextmanager
def running(app):
    """Serves `app` on 127.0.0.1 (a free port) in a thread; yields a client."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, daemon=True
    )
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive(), "uvicorn did not start"
        assert time.monotonic() < deadline, "uvicorn start timed out"
        time.sleep(0.01)
    base_url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base_url, timeout=60) as client:
            yield client
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    preset, adapters = demo.build_demo(str(root), num_adapters=3)
    return root, preset, adapters


@pytest.fixture(scope="module")
def served(demo_files):
    _, preset, adapters = demo_files
    engine = Engine.from_preset(preset, slots=2, max_batch=MAX_BATCH)
    app = create_app(
        engine,
        model_name="tiny-gpt2",
        max_queue=MAX_QUEUE,
        batch_window=0.1,
        adapters={"a0": adapters["a0"], "a1": adapters["a1"]},
    )
    with running(app) as client:
        yield client, app.state.scheduler, engine


def on_worker(scheduler, fn, *args):
    """Runs an engine call on the server's own worker thread."""
    return scheduler.call(fn, *args).result(timeout=120)


@contextlib.contextmanager
def blocked(scheduler):
    """Holds the worker thread until the block exits."""
    release = threading.Event()
    scheduler.call(release.wait, 120)
    try:
        yield
    finally:
        release.set()


def wait_for(condition, timeout=60):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.005)


def post_all(base_url, bodies):
    """POSTs every body concurrently (one thread each); returns responses."""

    def post(body):
        return httpx.post(f"{base_url}/v1/completions", json=body, timeout=120)

    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(post, bodies))


def error_of(response):
    body = response.json()
    assert set(body) == {"error"}, body
    assert body["error"]["code"] == response.status_code
    return body["error"]


def assert_healthy(client):
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"
    good = client.post(
        "/v1/completions", json={"prompt": "ok", "max_tokens": 2}
    )
    assert good.status_code == 200, good.text


# -- endpoints ---------------------------------------------------------------


def test_health(served):
    client, scheduler, _ = served
    body = client.get("/health").json()
    assert body["status"] == "ok"
    assert body["model"] == "tiny-gpt2"
    assert body["max_queue"] == MAX_QUEUE
    assert body["max_batch"] == MAX_BATCH
    assert scheduler.alive


def test_list_adapters(served):
    client, _, _ = served
    response = client.get("/v1/adapters")
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    by_name = {a["name"]: a for a in body["data"]}
    assert {"a0", "a1"} <= set(by_name)
    assert by_name["a0"]["rank"] == 4
    assert {"name", "rank", "alpha", "source", "resident"} <= set(by_name["a0"])


def test_completion_response(served):
    client, scheduler, engine = served
    prompt = "Hello"
    # Sampling options travel to the engine: with a seed, the text equals
    # the engine's own answer to the same request.
    options = {"temperature": 0.9, "top_k": 5, "top_p": 0.9, "seed": 3}
    response = client.post(
        "/v1/completions",
        json={"prompt": prompt, "adapter": "a0", "max_tokens": 5, **options},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"].startswith("cmpl-")
    assert body["object"] == "text_completion"
    assert body["model"] == "tiny-gpt2"
    assert body["adapter"] == "a0"
    [choice] = body["choices"]
    assert choice["index"] == 0
    alone = on_worker(
        scheduler,
        engine.complete,
        [CompletionRequest(prompt, "a0", 5, **options)],
    )[0]
    assert choice["text"] == alone.text
    assert choice["finish_reason"] == alone.finish_reason
    usage = body["usage"]
    assert usage["prompt_tokens"] == on_worker(
        scheduler, engine.count_tokens, prompt
    )
    assert usage["completion_tokens"] == alone.completion_tokens <= 5
    assert usage["total_tokens"] == (
        usage["prompt_tokens"] + usage["completion_tokens"]
    )


def test_mixed_batch_equals_each_alone(served):
    """Concurrent requests for different adapters, batched into one pass,
    answer what the engine gives for each request alone (greedy)."""
    client, scheduler, engine = served
    pairs = [(0, None), (0, "a0"), (0, "a1"), (1, "a0"), (2, None), (1, "a1")]
    bodies = [
        {"prompt": PROMPTS[p], "adapter": a, "max_tokens": 6} for p, a in pairs
    ]
    adapters = [a for _, a in pairs]
    alone = [
        on_worker(
            scheduler,
            engine.complete,
            [CompletionRequest(b["prompt"], b["adapter"], b["max_tokens"])],
        )[0].text
        for b in bodies
    ]
    # The adapters change the output (else this test would prove little):
    # the same prompt with the base model, a0 and a1.
    assert len(set(alone[:3])) == 3, alone[:3]

    batches_before = scheduler.stats["batches"]
    with blocked(scheduler):
        pool = concurrent.futures.ThreadPoolExecutor(1)
        future = pool.submit(post_all, str(client.base_url), bodies)
        wait_for(lambda: scheduler.admitted == len(bodies))
    responses = future.result(timeout=120)
    pool.shutdown()
    # All were queued while the worker was held: one `engine.complete`.
    assert scheduler.stats["batches"] == batches_before + 1
    assert [r.status_code for r in responses] == [200] * len(bodies)
    texts = [r.json()["choices"][0]["text"] for r in responses]
    assert texts == alone
    assert [r.json()["adapter"] for r in responses] == adapters


def test_load_use_and_delete_adapter(served, demo_files):
    client, _, _ = served
    _, _, adapters = demo_files
    response = client.post(
        "/v1/adapters", json={"name": "a2", "path": adapters["a2"]}
    )
    assert response.status_code == 201, response.text
    assert response.json()["name"] == "a2"
    names = [a["name"] for a in client.get("/v1/adapters").json()["data"]]
    assert "a2" in names
    body = {"prompt": "The cat", "adapter": "a2", "max_tokens": 3}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["adapter"] == "a2"

    response = client.delete("/v1/adapters/a2")
    assert response.status_code == 200
    assert response.json() == {"name": "a2", "deleted": True}
    names = [a["name"] for a in client.get("/v1/adapters").json()["data"]]
    assert "a2" not in names
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 404
    assert "a2" in error_of(response)["message"]


# -- bad input ---------------------------------------------------------------


def _corrupt_copies(root, adapters):
    """Adapter directories broken in different ways."""
    truncated = os.path.join(root, "bad", "truncated")
    shutil.copytree(adapters["a0"], truncated, dirs_exist_ok=True)
    weights = os.path.join(truncated, "adapter_model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    no_config = os.path.join(root, "bad", "no_config")
    shutil.copytree(adapters["a0"], no_config, dirs_exist_ok=True)
    os.remove(os.path.join(no_config, "adapter_config.json"))
    bad_json = os.path.join(root, "bad", "bad_json")
    shutil.copytree(adapters["a0"], bad_json, dirs_exist_ok=True)
    with open(os.path.join(bad_json, "adapter_config.json"), "w") as f:
        f.write("{not json")
    return truncated, no_config, bad_json


def test_bad_input(served, demo_files):
    """Each bad request: its status, the words its message names, and the
    field it names as `param`."""
    client, _, engine = served
    root, _, adapters = demo_files
    truncated, no_config, bad_json = _corrupt_copies(str(root), adapters)
    limit = engine.max_prompt_tokens
    json_type = {"content-type": "application/json"}
    completions, load = "/v1/completions", "/v1/adapters"

    def fields(**values):
        return {"json": {"prompt": "x", **values}}

    def adapter(name, path):
        return {"json": {"name": name, "path": path}}

    long_prompt = {"json": {"prompt": "word " * (limit + 5)}}
    huge_body = {"content": b" " * (2 << 20), "headers": json_type}
    # (method, path, request arguments, status, words, param)
    cases = [
        ("POST", completions, fields(adapter="nope"), 404, ["nope"], "adapter"),
        (
            "POST",
            completions,
            {"content": b'{"prompt": ', "headers": json_type},
            400,
            ["JSON"],
            "body",
        ),
        (
            "POST",
            completions,
            {"content": b"x=1"},
            422,
            ["JSON object"],
            "body",
        ),
        ("POST", completions, {"json": ["x"]}, 422, ["JSON object"], "body"),
        ("POST", completions, {"json": {}}, 422, ["prompt"], "prompt"),
        (
            "POST",
            completions,
            {"json": {"prompt": 7}},
            422,
            ["prompt"],
            "prompt",
        ),
        ("POST", completions, fields(adapter=3), 422, ["adapter"], "adapter"),
        (
            "POST",
            completions,
            fields(max_tokens="5"),
            422,
            ["max_tokens"],
            "max_tokens",
        ),
        (
            "POST",
            completions,
            fields(max_tokens=0),
            422,
            ["max_tokens"],
            "max_tokens",
        ),
        (
            "POST",
            completions,
            fields(max_tokens=True),
            422,
            ["max_tokens"],
            "max_tokens",
        ),
        (
            "POST",
            completions,
            fields(temperature=-1),
            422,
            ["temperature"],
            "temperature",
        ),
        ("POST", completions, fields(top_k=0), 422, ["top_k"], "top_k"),
        ("POST", completions, fields(top_p=1.5), 422, ["top_p"], "top_p"),
        ("POST", completions, fields(seed="s"), 422, ["seed"], "seed"),
        ("POST", completions, fields(stream=True), 422, ["stream"], "stream"),
        ("POST", completions, long_prompt, 400, [str(limit)], "prompt"),
        (
            "POST",
            completions,
            fields(max_tokens=10**6),
            400,
            ["max_tokens"],
            "max_tokens",
        ),
        ("POST", completions, huge_body, 413, ["bytes"], "body"),
        (
            "POST",
            load,
            adapter("t", truncated),
            422,
            ["adapter_model.safetensors"],
            "path",
        ),
        (
            "POST",
            load,
            adapter("t", no_config),
            422,
            ["adapter_config.json"],
            "path",
        ),
        (
            "POST",
            load,
            adapter("t", bad_json),
            422,
            ["adapter_config.json"],
            "path",
        ),
        (
            "POST",
            load,
            adapter("t", str(root / "absent")),
            422,
            ["absent"],
            "path",
        ),
        ("POST", load, {"json": {"name": "t"}}, 422, ["path"], "path"),
        ("POST", load, adapter("../t", adapters["a2"]), 422, ["name"], "name"),
        ("POST", load, adapter("a0", adapters["a2"]), 409, ["a0"], "name"),
        ("DELETE", "/v1/adapters/nope", {}, 404, ["nope"], "name"),
        ("GET", completions, {}, 405, [], None),
        ("GET", "/v2/nothing", {}, 404, [], None),
    ]
    for method, path, kwargs, status, words, param in cases:
        response = client.request(method, path, **kwargs)
        label = f"{method} {path} {kwargs.get('json', '')!s:.60}"
        assert response.status_code == status, (label, response.text)
        error = error_of(response)
        for word in words:
            assert word in error["message"], (label, error["message"])
        assert error["param"] == param, (label, error)
    # A failed load registered nothing; the server still serves.
    names = [a["name"] for a in client.get("/v1/adapters").json()["data"]]
    assert "t" not in names
    assert_healthy(client)


def _raw_json(text):
    return {
        "content": text.encode(),
        "headers": {"content-type": "application/json"},
    }


# (request arguments for POST /v1/completions, status, param). Numbers of
# any size, non-finite numbers, text UTF-8 cannot encode, odd keys: each a
# 4xx naming its field, never a 500.
HOSTILE_FIELDS = [
    ({"json": {"prompt": "x", "top_k": 10**6}}, 400, "top_k"),
    ({"json": {"prompt": "x", "top_k": 2**64}}, 400, "top_k"),
    (_raw_json('{"prompt": "x", "top_k": 1e6}'), 422, "top_k"),
    ({"json": {"prompt": "x", "seed": 2**63}}, 422, "seed"),
    ({"json": {"prompt": "x", "seed": 2**64}}, 422, "seed"),
    ({"json": {"prompt": "x", "seed": -1}}, 422, "seed"),
    ({"json": {"prompt": "x", "max_tokens": 2**64}}, 400, "max_tokens"),
    ({"json": {"prompt": "x", "temperature": 1e6}}, 422, "temperature"),
    (_raw_json('{"prompt": "x", "temperature": NaN}'), 422, "temperature"),
    (_raw_json('{"prompt": "x", "temperature": 1e400}'), 422, "temperature"),
    (_raw_json('{"prompt": "x", "top_p": Infinity}'), 422, "top_p"),
    (_raw_json('{"prompt": "x", "top_p": -Infinity}'), 422, "top_p"),
    ({"json": {"prompt": "x", "top_p": 0}}, 422, "top_p"),
    # json.dumps escapes lone surrogates (httpx cannot send them).
    (_raw_json(json.dumps({"prompt": "a\ud800b"})), 400, "prompt"),
    (
        _raw_json(json.dumps({"prompt": "x", "adapter": "a\udc80"})),
        422,
        "adapter",
    ),
    ({"json": {"prompt": "x", "adapter": "a" * 1000}}, 422, "adapter"),
    (_raw_json(json.dumps({"prompt": "x", "\ud800": 1})), 422, "body"),
    ({"json": {"prompt": "x" * 300_000}}, 400, "prompt"),
    (_raw_json("[" * 100_000), 400, "body"),
    (_raw_json('{"prompt": "x", "seed": ' + "9" * 5000 + "}"), 400, "body"),
]


@pytest.mark.parametrize("request_, status, param", HOSTILE_FIELDS)
def test_hostile_fields_are_4xx_naming_the_field(
    served, request_, status, param
):
    client, _, _ = served
    response = client.post("/v1/completions", **request_)
    assert response.status_code == status, response.text
    assert error_of(response)["param"] == param


def test_extreme_valid_values_are_served(served):
    client, _, engine = served
    for options in (
        {"seed": 2**31},
        {"seed": 2**63 - 1},
        {"seed": 2**32 + 5, "top_k": engine.vocabulary_size, "top_p": 1.0},
        {"seed": 0, "temperature": 100.0},
        {"seed": 1, "temperature": 1e-300},  # float32 0: greedy in effect
    ):
        body = {"prompt": "Hello", "max_tokens": 3, "temperature": 0.8}
        response = client.post("/v1/completions", json={**body, **options})
        assert response.status_code == 200, (options, response.text)


def _read_response(sock):
    """Status, headers and body of one HTTP/1.1 response on `sock`."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside the response body"
        body += chunk
    return int(lines[0].split()[1]), headers, body


def test_chunked_body_over_the_limit_is_refused_before_it_ends(served):
    """A body with no Content-Length (chunked) that passes the limit gets
    413 at once: the server does not wait for the rest (here the client
    never sends the end), and closes the connection."""
    client, _, _ = served
    limit = 1 << 20  # create_app's default max_body_bytes
    piece = b"x" * 65536
    with socket.create_connection(("127.0.0.1", client.base_url.port)) as sock:
        sock.settimeout(20)
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        for _ in range(limit // len(piece) + 1):  # one piece past the limit
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        status, headers, body = _read_response(sock)
        assert status == 413, body
        error = json.loads(body)["error"]
        assert error["param"] == "body"
        assert str(limit) in error["message"]
        assert headers.get("connection") == "close"
        try:  # closed (reset, when unread data was left): never read
            rest = sock.recv(65536)
        except ConnectionResetError:
            rest = b""
        assert rest == b""
    assert_healthy(client)


def test_chunked_body_within_the_limit_is_served(served):
    client, _, _ = served

    def pieces():
        yield b'{"prompt": "Hel'
        yield b'lo", "max_tokens": 2}'

    response = client.post(
        "/v1/completions",
        content=pieces(),
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 200, response.text


def test_non_finite_adapters_are_refused_and_not_registered(served, demo_files):
    client, _, _ = served
    root, _, adapters = demo_files
    copies = broken_adapter_copies(adapters["a2"], str(root / "non_finite"))
    for what, path in copies.items():
        response = client.post(
            "/v1/adapters", json={"name": what, "path": path}
        )
        assert response.status_code == 422, (what, response.text)
        error = error_of(response)
        assert error["param"] == "path"
        assert path in error["message"], (what, error["message"])
        listing = client.get("/v1/adapters")
        assert listing.status_code == 200, listing.text
        assert what not in [a["name"] for a in listing.json()["data"]]
    assert_healthy(client)


def test_queue_full_answers_429(served):
    client, scheduler, _ = served
    bodies = [
        {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 2}
        for i in range(MAX_QUEUE)
    ]
    batches = scheduler.stats["batches"]
    pool = concurrent.futures.ThreadPoolExecutor(1)
    with blocked(scheduler):
        future = pool.submit(post_all, str(client.base_url), bodies)
        wait_for(lambda: scheduler.admitted == MAX_QUEUE)
        response = client.post("/v1/completions", json={"prompt": "one more"})
        assert response.status_code == 429
        assert response.headers["retry-after"] == "1"
        assert f"max_queue={MAX_QUEUE}" in error_of(response)["message"]
        # An engine call queued behind completions runs after them.
        marker = scheduler.call(lambda: scheduler.stats["batches"])
    # The admitted requests all complete once the worker is free, in one
    # `engine.complete` (they were all queued), before the marker.
    assert marker.result(120) == batches + 1
    responses = future.result(timeout=120)
    pool.shutdown()
    assert [r.status_code for r in responses] == [200] * MAX_QUEUE
    wait_for(lambda: scheduler.admitted == 0)
    assert client.get("/health").json()["status"] == "ok"


def test_bounded_concurrent_load(served):
    """32 well-formed requests from 8 client threads: no failures."""
    client, _, _ = served
    adapters = [None, "a0", "a1"]
    bodies = [
        {
            "prompt": PROMPTS[i % len(PROMPTS)],
            "adapter": adapters[i % 3],
            "max_tokens": 1 + i % 4,
        }
        for i in range(32)
    ]
    base_url = str(client.base_url)

    def worker(chunk):
        with httpx.Client(base_url=base_url, timeout=120) as own:
            return [own.post("/v1/completions", json=b) for b in chunk]

    chunks = [bodies[i::8] for i in range(8)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answered = list(pool.map(worker, chunks))
    pairs = [
        (body, response)
        for chunk, responses in zip(chunks, answered, strict=True)
        for body, response in zip(chunk, responses, strict=True)
    ]
    assert len(pairs) == 32
    failures = [r.text for _, r in pairs if r.status_code != 200]
    assert failures == []
    for body, response in pairs:
        answer = response.json()
        assert answer["adapter"] == body["adapter"]
        assert answer["usage"]["completion_tokens"] <= body["max_tokens"]
    assert client.get("/health").json()["status"] == "ok"


# -- engine failures (a fake engine: the real one has no such failure) ------


@dataclasses.dataclass
class _Fake:
    """FAKE engine, only for failures a real model cannot produce on demand:
    `complete` raises for the prompt "boom" (whole batch) and answers the
    reversed prompt otherwise."""

    max_batch: int = 8
    max_prompt_tokens: int = 32
    max_total_tokens: int = 64

    def list_adapters(self):
        return []

    def count_tokens(self, prompt):
        return len(prompt)

    def validate(self, request):
        if request.adapter is not None:
            raise errors.UnknownAdapterError(f"unknown {request.adapter!r}")

    def complete(self, requests):
        if any(r.prompt == "boom" for r in requests):
            raise RuntimeError("device on fire")
        return [
            Completion(r.prompt[::-1], len(r.prompt), 1, "length", r.adapter)
            for r in requests
        ]


def test_engine_exception_is_500_and_isolated():
    app = create_app(_Fake(), max_queue=8, batch_window=0.02)
    scheduler = app.state.scheduler
    with running(app) as client:
        response = client.post("/v1/completions", json={"prompt": "boom"})
        assert response.status_code == 500
        message = error_of(response)["message"]
        assert "RuntimeError: device on fire" in message
        # In one batch with a failing request, the others still succeed.
        bodies = [{"prompt": p} for p in ("abc", "boom", "xyz")]
        with blocked(scheduler):
            pool = concurrent.futures.ThreadPoolExecutor(1)
            future = pool.submit(post_all, str(client.base_url), bodies)
            wait_for(lambda: scheduler.admitted == 3)
        responses = future.result(timeout=60)
        pool.shutdown()
        assert [r.status_code for r in responses] == [200, 500, 200]
        assert responses[0].json()["choices"][0]["text"] == "cba"
        assert responses[2].json()["choices"][0]["text"] == "zyx"
        assert client.get("/health").json()["status"] == "ok"
    assert not scheduler.alive  # stopped with the app


# -- scheduler and command line ----------------------------------------------


def test_scheduler_arguments(served):
    _, _, engine = served
    with pytest.raises(ValueError, match="between 1 and the engine's"):
        Scheduler(engine, max_batch=MAX_BATCH + 1)
    with pytest.raises(ValueError, match="max_queue must be at least 1"):
        Scheduler(engine, max_queue=0)
    with pytest.raises(ValueError, match="batch_window must be >= 0"):
        Scheduler(engine, batch_window=-1)


def serve_parser():
    parser = argparse.ArgumentParser(prog="keras-lora")
    command.register(parser.add_subparsers())
    return parser


def test_serve_arguments():
    parser = serve_parser()
    args = parser.parse_args(["serve", "--preset", "p"])
    assert (args.host, args.port, args.max_batch) == ("127.0.0.1", 8000, 32)
    assert (args.max_queue, args.slots, args.batch_window_ms) == (64, 8, 5.0)
    assert args.func is command.serve
    for bad in (
        ["serve"],
        ["serve", "--preset", "p", "--adapter", "noequals"],
        ["serve", "--preset", "p", "--adapter", "a=/does/not/exist"],
        ["serve", "--preset", "p", "--max-queue", "0"],
        ["serve", "--preset", "p", "--batch-window-ms", "-1"],
        ["serve", "--preset", "p", "--demo", "d"],
    ):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
    assert command.is_loopback("127.0.0.1")
    assert command.is_loopback("::1")
    assert command.is_loopback("localhost")
    assert not command.is_loopback("0.0.0.0")
    assert not command.is_loopback("192.168.1.4")


def test_serve_command_builds_the_server(demo_files):
    """`keras-lora serve` wiring: preset, start-up adapters and limits."""
    _, preset, adapters = demo_files
    args = serve_parser().parse_args(
        ["serve", "--preset", preset, "--adapter", f"b={adapters['a2']}"]
        + ["--max-batch", "4", "--max-queue", "5", "--slots", "2"]
    )
    app = command.build_server(args).config.app
    with running(app) as client:
        health = client.get("/health").json()
        assert health["status"] == "ok"
        assert (health["max_batch"], health["max_queue"]) == (4, 5)
        assert health["model"] == os.path.basename(preset)
        data = client.get("/v1/adapters").json()["data"]
        assert [a["name"] for a in data] == ["b"]
        assert data[0]["source"].endswith("a2")


def test_serve_exits_nonzero_when_the_port_is_taken(demo_files):
    _, preset, _ = demo_files
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = serve_parser().parse_args(
            ["serve", "--preset", preset, "--port", str(port)]
            + ["--log-level", "critical"]
        )
        assert command.serve(args) != 0


def test_serve_demo_builds_a_model_and_adapters(tmp_path):
    args = serve_parser().parse_args(["serve", "--demo", str(tmp_path)])
    app = command.build_server(args).config.app
    with running(app) as client:
        data = client.get("/v1/adapters").json()["data"]
        assert sorted(a["name"] for a in data) == ["a0", "a1"]
        assert client.get("/health").json()["model"] == "preset"
    assert os.path.isfile(os.path.join(tmp_path, "preset", "config.json"))
