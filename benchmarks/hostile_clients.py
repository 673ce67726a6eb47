"""Hostile clients: does bad input hurt good users of `keras-lora serve`?

One uvicorn server on 127.0.0.1 serves the real `Engine` over the demo
GPT-2 (`keras_lora.serving.demo`, random weights, byte tokenizer) with two
adapters. `clients` client threads (in a separate process, so they do not
share the server's GIL) work through a shuffled list of requests, round by
round, alternating two kinds of round:

- `clean`: `good` well-formed completions (greedy and seeded sampling,
  base model and adapters);
- `hostile`: the same `good` completions shuffled with `hostile` bad ones
  (`benchmarks.hostile_requests`): oversize bodies (chunked with no
  Content-Length, and declared), out-of-range and non-finite numbers,
  lone surrogates, a prompt too long to tokenize, JSON nested too deep,
  adapters with non-finite alpha or tensors, and a client that varies
  seed, temperature, top-k and top-p on every request.

Meanwhile a thread polls `GET /health`. Checked (`verdict`): every good
request answers 200, nothing answers 5xx, every hostile request gets a 4xx
(or, for a chunked oversize body, a 413 or a closed connection) except the
varying-sampling ones, which must succeed, `/health` always answers 200,
the good requests' p99 latency in hostile rounds is at most 2x that of the
clean rounds (pooled over rounds), and nothing compiles during the rounds:
generate functions built and, on JAX and TensorFlow, traces of
`generate_step` (which runs as Python only while being traced) are counted
after a warm-up that compiles every batch-size bucket.

`KERAS_BACKEND=jax python -m benchmarks.hostile_clients --out FILE`
(`--quick`: a smoke-test size).
"""

import argparse
import concurrent.futures
import datetime
import json
import multiprocessing
import os
import sys
import tempfile
import threading
import time

from benchmarks.hostile_requests import (
    BODY_LIMIT,
    PROMPTS,
    broken_adapter_copies,
    round_requests,
    send,
)

FULL = {
    "clients": 16,
    "good": 200,
    "hostile": 100,
    "rounds": 2,
    "chunked_mib": 16,
    "max_tokens": 8,
}
QUICK = {
    "clients": 4,
    "good": 24,
    "hostile": 16,
    "rounds": 1,
    "chunked_mib": 2,
    "max_tokens": 4,
}


def run_round(base_url, items, clients, health_interval=0.05):
    """Sends `items` from `clients` threads while polling `/health`.

    Returns `{"records": [[kind, outcome, seconds], ...], "health":
    [[status, seconds], ...], "seconds": wall}`.
    """
    import httpx

    lock = threading.Lock()
    pending = list(reversed(items))
    records, health = [], []
    done = threading.Event()

    def client_loop():
        with httpx.Client(base_url=base_url, timeout=120) as client:
            while True:
                with lock:
                    if not pending:
                        return
                    kind, request = pending.pop()
                start = time.perf_counter()
                outcome = send(client, request)
                elapsed = time.perf_counter() - start
                with lock:
                    records.append([kind, outcome, elapsed])

    def poll_health():
        with httpx.Client(base_url=base_url, timeout=120) as client:
            while not done.wait(health_interval):
                start = time.perf_counter()
                try:
                    status = client.get("/health").status_code
                except Exception as error:  # noqa: BLE001 - recorded
                    status = f"error: {type(error).__name__}"
                health.append([status, time.perf_counter() - start])

    poller = threading.Thread(target=poll_health, daemon=True)
    poller.start()
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(client_loop) for _ in range(clients)]:
            future.result()
    wall = time.perf_counter() - start
    done.set()
    poller.join(30)
    return {"records": records, "health": health, "seconds": wall}


def run_round_in_child(base_url, items, clients):
    """`run_round` in a fresh (spawned) process; returns its result."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(run_round, base_url, items, clients).result()


# -- the server side ---------------------------------------------------------


def count_compilations(causal_lm):
    """Counts generate functions built and `generate_step` traces.

    Wraps the model's `make_generate_function` and `generate_step`. Under
    JAX and TensorFlow `generate_step` runs as Python only while a compiled
    function is traced, so its count is the number of traces; under
    PyTorch (eager) it runs on every call and only `builds` means
    anything. Returns the live `{"builds", "traces"}` counts.
    """
    counts = {"builds": 0, "traces": 0}
    make, step = causal_lm.make_generate_function, causal_lm.generate_step

    def counting_make():
        if causal_lm.generate_function is None:
            counts["builds"] += 1
        return make()

    def counting_step(*args, **kwargs):
        counts["traces"] += 1
        return step(*args, **kwargs)

    causal_lm.make_generate_function = counting_make
    causal_lm.generate_step = counting_step
    return counts


def warm_up(engine, scheduler, adapter_names, settings):
    """Compiles every (sampling kind, batch-size bucket) on the worker."""
    from keras_lora.serving.engine import CompletionRequest

    # At most `clients` rows a pass, padded to a power of two (at most
    # max_batch): one pass of each such size covers every shape.
    rows = min(engine.max_batch, settings["clients"])
    top = min(engine.max_batch, 1 << (rows - 1).bit_length())
    sizes = sorted({min(1 << k, top) for k in range(top.bit_length() + 1)})
    kinds = ({}, {"temperature": 0.8}, {"temperature": 0.8, "top_k": 5})
    for options in kinds:
        for size in sizes:
            requests = [
                CompletionRequest(
                    PROMPTS[i % len(PROMPTS)],
                    [None, *adapter_names][i % (1 + len(adapter_names))],
                    settings["max_tokens"],
                    **options,
                )
                for i in range(size)
            ]
            scheduler.call(engine.complete, requests).result()


def run(settings, log=print, in_child=True, model=None):
    """Runs the rounds; returns the result dict (see `summarize`)."""
    import keras

    from benchmarks import common
    from benchmarks.server_throughput import MODEL, start_server
    from keras_lora.serving import demo
    from keras_lora.serving.engine import Engine
    from keras_lora.serving.server import create_app

    backend = keras.backend.backend()
    model = MODEL if model is None else model
    load_start = common.load_average()
    rounds = []
    with tempfile.TemporaryDirectory() as root:
        log(f"[{backend}] building the demo model and adapters")
        preset, adapters = demo.build_demo(root, 2, **model)
        broken = broken_adapter_copies(
            adapters["a0"], os.path.join(root, "broken")
        )
        engine = Engine.from_preset(preset, slots=2, max_batch=16)
        app = create_app(
            engine,
            max_queue=64,
            max_body_bytes=BODY_LIMIT,
            adapters=adapters,
        )
        scheduler = app.state.scheduler
        counts = count_compilations(engine.causal_lm)
        base_url, stop = start_server(app)
        try:
            log(f"[{backend}] warm-up: every batch bucket and sampling kind")
            warm_up(engine, scheduler, sorted(adapters), settings)
            warm = dict(counts)
            runner = run_round_in_child if in_child else run_round
            for index in range(2 * settings["rounds"]):
                hostile = index % 2 == 1
                items = round_requests(
                    settings, sorted(adapters), broken, hostile, index
                )
                outcome = runner(base_url, items, settings["clients"])
                outcome["hostile"] = hostile
                rounds.append(outcome)
                log(
                    f"  round {index} {'hostile' if hostile else 'clean':7}"
                    f" {len(items)} requests in {outcome['seconds']:.1f} s"
                )
        finally:
            stop()
    compiles = {
        "after_warm_up": warm,
        "during_rounds": {k: counts[k] - warm[k] for k in counts},
    }
    result = summarize(settings, backend, rounds, compiles)
    result["model"] = "demo GPT-2, random weights, byte tokenizer, " + (
        ", ".join(f"{k} {v}" for k, v in model.items()) or "tiny"
    )
    result["machine"] = common.machine_info(backend)
    # Other processes share this machine's cores: the load tells how much.
    result["load_average"] = {"start": load_start, "end": common.load_average()}
    return result


def summarize(settings, backend, rounds, compiles):
    """The JSON result: latencies, outcomes, health, compilations, verdict."""
    good = {"clean": [], "hostile": []}
    outcomes, unexpected, server_errors = {}, [], 0
    for outcome in rounds:
        label = "hostile" if outcome["hostile"] else "clean"
        for kind, result, seconds in outcome["records"]:
            key = str(result)
            outcomes.setdefault(kind, {}).setdefault(key, 0)
            outcomes[kind][key] += 1
            server_errors += isinstance(result, int) and result >= 500
            if kind == "good" and result == 200:
                good[label].append(seconds)
            elif not _expected(kind, result):
                unexpected.append([kind, key])
    health = [s for outcome in rounds for s in outcome["health"]]
    p99 = {k: _percentile(v, 99) for k, v in good.items()}
    ratio = p99["hostile"] / p99["clean"] if good["clean"] else None
    during = compiles["during_rounds"]
    recompiled = during["builds"] + (
        during["traces"] if backend != "torch" else 0
    )
    verdict = {
        "good_failures": sum(
            n for k, n in outcomes.get("good", {}).items() if k != "200"
        ),
        "server_errors_5xx": server_errors,
        "unexpected_hostile_outcomes": len(unexpected),
        "health_non_200": sum(1 for status, _ in health if status != 200),
        "p99_ratio_hostile_over_clean": ratio,
        "compilations_during_rounds": recompiled,
    }
    verdict["passed"] = (
        verdict["good_failures"] == 0
        and server_errors == 0
        and not unexpected
        and verdict["health_non_200"] == 0
        and ratio is not None
        and ratio <= 2.0
        and recompiled == 0
    )
    return {
        "benchmark": "hostile_clients",
        "backend": backend,
        "date": datetime.date.today().isoformat(),
        "settings": settings,
        "good_latency_ms": {
            label: {
                "n": len(times),
                "p50": _percentile(times, 50),
                "p90": _percentile(times, 90),
                "p99": _percentile(times, 99),
                "max": _percentile(times, 100),
            }
            for label, times in good.items()
        },
        "outcomes": outcomes,
        "unexpected": unexpected[:20],
        "health": {
            "polls": len(health),
            "non_200": verdict["health_non_200"],
            "max_ms": _percentile([s for _, s in health], 100),
        },
        "compilations": compiles,
        "round_seconds": [round(r["seconds"], 2) for r in rounds],
        "good_p99_ms_by_round": [
            _percentile(
                [t for k, o, t in r["records"] if k == "good" and o == 200], 99
            )
            for r in rounds
        ],
        "verdict": verdict,
    }


def _expected(kind, result):
    if kind == "varying_sampling":
        return result == 200
    if kind == "chunked_oversize":
        return result in (413, "closed")
    return isinstance(result, int) and 400 <= result < 500


def _percentile(values, q):
    """The `q`-th percentile (nearest rank) in milliseconds; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-q * len(ordered) // 100))
    return round(ordered[rank - 1] * 1e3, 2)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.hostile_clients",
        description="Good and hostile clients against the server on "
        "loopback, on the current KERAS_BACKEND.",
    )
    parser.add_argument("--out", required=True, help="JSON file to write.")
    parser.add_argument("--quick", action="store_true", help="Smoke-test size.")
    for key in FULL:
        parser.add_argument(
            f"--{key.replace('_', '-')}", type=int, help=f"Override {key}."
        )
    args = parser.parse_args(argv)
    settings = dict(QUICK if args.quick else FULL)
    for key in FULL:
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    result = run(settings)
    result["command"] = " ".join(
        [f"KERAS_BACKEND={result['backend']}", "python -m"]
        + ["benchmarks.hostile_clients", *(argv or sys.argv[1:])]
    )
    from benchmarks import common

    common.write_json(args.out, result)
    print(json.dumps(result["verdict"], indent=2))
    print(f"Wrote {args.out}")
    return 0 if result["verdict"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
