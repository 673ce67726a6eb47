"""What the hostile-clients benchmark sends: good and hostile requests.

`round_requests` makes one round's shuffled list of `(kind, request)`
pairs: `good` well-formed completions (`good_requests`), plus, in a
hostile round, `hostile` bad ones cycling through `HOSTILE_KINDS`
(`hostile_request`). `send` sends one with an httpx client and returns
its status code (or `"closed"` when the server closed the connection
first). `broken_adapter_copies` writes the adapter directories the
adapter kinds point at.
"""

import hashlib
import json
import os
import random
import shutil
import socket

# Short prompts (one token per byte) and few new tokens: every pass fits
# one sequence-length bucket, so the warm-up compiles every shape.
PROMPTS = ["Hello", "def f()", "LoRA", "import", "Once", "x = 1"]
BODY_LIMIT = 1 << 20
HOSTILE_KINDS = (
    "chunked_oversize",
    "declared_oversize",
    "top_k_1e6",
    "top_k_2**64",
    "seed_2**63",
    "max_tokens_2**64",
    "temperature_NaN",
    "top_p_Infinity",
    "lone_surrogate",
    "prompt_900kb",
    "json_nested_deep",
    "adapter_alpha_inf",
    "adapter_tensor_nan",
    "varying_sampling",
)


# -- requests ----------------------------------------------------------------


def good_requests(count, adapter_names, max_tokens):
    """`count` valid completions: greedy, and seeded sampling every 4th."""
    choices = [None, *adapter_names]
    requests = []
    for i in range(count):
        body = {
            "prompt": PROMPTS[i % len(PROMPTS)],
            "adapter": choices[i % len(choices)],
            "max_tokens": max_tokens,
        }
        if i % 4 == 3:
            body.update(temperature=0.8, top_k=20, seed=i)
        requests.append(("good", {"json": body}))
    return requests


def hostile_request(kind, index, rng, broken, max_tokens, chunked_mib):
    """The request of one hostile kind (see `send`)."""
    prompt = {"prompt": "Hello", "max_tokens": max_tokens}
    raw = {
        "temperature_NaN": '{"prompt": "Hello", "temperature": NaN}',
        "top_p_Infinity": '{"prompt": "Hello", "top_p": Infinity}',
        "lone_surrogate": json.dumps({"prompt": "a\ud800b"}),
        "json_nested_deep": "[" * 100_000,
    }
    fields = {
        "top_k_1e6": {"top_k": 10**6, "temperature": 1.0},
        "top_k_2**64": {"top_k": 2**64, "temperature": 1.0},
        "seed_2**63": {"seed": 2**63, "temperature": 1.0},
        "max_tokens_2**64": {"max_tokens": 2**64},
        "prompt_900kb": {"prompt": "x" * 900_000},
    }
    if kind == "chunked_oversize":
        return {"chunked_bytes": chunked_mib << 20}
    if kind == "declared_oversize":
        return {"content": b" " * (2 * BODY_LIMIT)}
    if kind in raw:
        return {"content": raw[kind].encode()}
    if kind in fields:
        return {"json": {**prompt, **fields[kind]}}
    if kind.startswith("adapter_"):
        path = broken[kind.removeprefix("adapter_")]
        return {
            "path": "/v1/adapters",
            "json": {"name": f"x{index}", "path": path},
        }
    # varying_sampling: valid, with new sampling values every time.
    options = {"seed": rng.randrange(2**63), "temperature": rng.uniform(0.1, 2)}
    if rng.random() < 0.5:
        options.update(top_k=rng.randrange(1, 200), top_p=rng.uniform(0.1, 1))
    return {"json": {**prompt, **options}}


def round_requests(settings, adapter_names, broken, hostile, seed):
    """One round's requests, shuffled: `[(kind, request), ...]`."""
    rng = random.Random(seed)
    items = good_requests(
        settings["good"], adapter_names, settings["max_tokens"]
    )
    for i in range(settings["hostile"] if hostile else 0):
        kind = HOSTILE_KINDS[i % len(HOSTILE_KINDS)]
        request = hostile_request(
            kind,
            i,
            rng,
            broken,
            settings["max_tokens"],
            settings["chunked_mib"],
        )
        items.append((kind, request))
    rng.shuffle(items)
    return items


def broken_adapter_copies(source, root):
    """Copies of adapter directory `source`, each broken one way.

    Returns `{what: directory}`: `alpha_inf`, `alpha_nan`, `alpha_1e308`
    (the config's alphas), `tensor_nan`, `tensor_inf` (one entry of one
    tensor, with the recorded sha256 updated so the file is consistent).
    """
    import numpy as np
    import safetensors.numpy

    def edit_config(target, change):
        config = os.path.join(target, "adapter_config.json")
        with open(config) as f:
            meta = json.load(f)
        change(meta)
        with open(config, "w") as f:
            json.dump(meta, f)  # writes Infinity and NaN, as a client may

    copies = {}
    alphas = {"inf": float("inf"), "nan": float("nan"), "1e308": 1e308}
    for label, alpha in alphas.items():
        target = copies[f"alpha_{label}"] = os.path.join(root, f"alpha_{label}")
        shutil.copytree(source, target)

        def set_alpha(meta, alpha=alpha):
            for spec in meta["layers"].values():
                spec["alpha"] = alpha

        edit_config(target, set_alpha)
    for label, value in (("nan", np.nan), ("inf", np.inf)):
        target = copies[f"tensor_{label}"] = os.path.join(
            root, f"tensor_{label}"
        )
        shutil.copytree(source, target)
        weights = os.path.join(target, "adapter_model.safetensors")
        tensors = safetensors.numpy.load_file(weights)
        key = sorted(tensors)[0]
        tensors[key] = tensors[key].copy()
        tensors[key].flat[0] = value
        safetensors.numpy.save_file(tensors, weights)
        with open(weights, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()

        def set_digest(meta, digest=digest):
            if "safetensors_sha256" in meta:
                meta["safetensors_sha256"] = digest

        edit_config(target, set_digest)
    return copies


def send(client, request):
    """Sends one request; returns its status code, or `"closed"` when the
    server closed the connection before answering (a chunked oversize
    body), or `"error: ..."` for anything else."""
    if "chunked_bytes" in request:
        return _send_chunked(client.base_url, request["chunked_bytes"])
    kwargs = {"headers": {"content-type": "application/json"}}
    if "json" in request:
        kwargs = {"json": request["json"]}
    else:
        kwargs["content"] = request["content"]
    path = request.get("path", "/v1/completions")
    try:
        return client.post(path, **kwargs).status_code
    except Exception as error:  # noqa: BLE001 - recorded as an outcome
        return f"error: {type(error).__name__}: {error}"


def _send_chunked(base_url, size):
    """A chunked JSON body of `size` bytes, no Content-Length, raw."""
    piece = b"x" * 65536
    with socket.create_connection((base_url.host, base_url.port)) as sock:
        sock.settimeout(60)
        try:
            sock.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\n"
                b"Content-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
            )
            for _ in range(size // len(piece)):
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the server stopped reading; its answer may be waiting
        try:
            head = sock.recv(65536)
        except OSError:
            return "closed"
    if not head:
        return "closed"
    return int(head.split(b" ", 2)[1])
