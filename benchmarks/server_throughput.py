"""Server throughput: `keras-lora serve` under a bounded concurrent client.

One uvicorn server on 127.0.0.1 serves the real `Engine` over a tiny
random GPT-2 (`keras_lora.serving.demo`) with several adapters. A local
client keeps `concurrency` requests in flight (one thread and HTTP
connection each) until `requests` completions are done, cycling through
the base model and every adapter (greedy, `max_tokens` each). Two modes
share the same server, engine and worker thread:

- `batched`: the scheduler gathers up to `max_batch` requests, whatever
  their adapters, into one engine pass;
- `max_batch_1`: the scheduler runs one request per pass.

Modes alternate round by round (after an untimed warm-up round each);
reported: requests/s, completion tokens/s, latency quartiles and the mean
batch size, as medians over the rounds.

Run through `python -m benchmarks` (one process per backend), or directly:
`KERAS_BACKEND=jax python -m benchmarks.server_throughput --out r.json`.
"""

import argparse
import concurrent.futures
import datetime
import multiprocessing
import socket
import statistics
import sys
import tempfile
import threading
import time

from benchmarks import common

# The demo GPT-2 (random weights, byte tokenizer) at a size where the
# model's compute, not HTTP handling, is most of a request's cost.
MODEL = {
    "num_layers": 4,
    "num_heads": 4,
    "hidden_dim": 256,
    "intermediate_dim": 1024,
}
FULL = {
    "adapters": 8,
    "requests": 128,
    "concurrency": 16,
    "max_tokens": 16,
    "max_batch": 32,
    "rounds": 3,
}
QUICK = {
    "adapters": 4,
    "requests": 24,
    "concurrency": 8,
    "max_tokens": 8,
    "max_batch": 32,
    "rounds": 1,
}
MODES = ("batched", "max_batch_1")
# At most 7 tokens each (the demo tokenizer: one per byte), so prompt plus
# completion stay within one of the engine's sequence-length buckets and a
# pass's shape depends on its batch size only.
PROMPTS = ["Hello", "def f()", "LoRA", "import", "Once", "x = 1"]


def start_server(app):
    """Runs `app` with uvicorn on 127.0.0.1 in a thread; returns a stop fn."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", access_log=False)
    )
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, daemon=True
    )
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)

    def stop():
        server.should_exit = True
        thread.join(30)
        sock.close()

    return f"http://127.0.0.1:{port}", stop


def request_bodies(count, adapter_names, max_tokens):
    """`count` greedy requests cycling through base + every adapter."""
    choices = [None, *adapter_names]
    return [
        {
            "prompt": PROMPTS[i % len(PROMPTS)],
            "adapter": choices[i % len(choices)],
            "max_tokens": max_tokens,
        }
        for i in range(count)
    ]


def run_load(base_url, bodies, concurrency):
    """Sends `bodies` with at most `concurrency` in flight; times it.

    Runs in a separate process (see `run_load_in_child`), so the client's
    threads do not compete with the server for this process's GIL.
    """
    import httpx

    lock = threading.Lock()
    pending = list(reversed(bodies))
    latencies, tokens, failures = [], [], []

    def client_loop():
        with httpx.Client(base_url=base_url, timeout=600) as client:
            while True:
                with lock:
                    if not pending:
                        return
                    body = pending.pop()
                start = time.perf_counter()
                response = client.post("/v1/completions", json=body)
                elapsed = time.perf_counter() - start
                with lock:
                    if response.status_code != 200:
                        failures.append(response.status_code)
                        continue
                    latencies.append(elapsed)
                    tokens.append(response.json()["usage"]["completion_tokens"])

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(client_loop) for _ in range(concurrency)]:
            future.result()
    wall = time.perf_counter() - start
    return {
        "seconds": wall,
        "requests": len(latencies),
        "failures": len(failures),
        "failure_statuses": sorted(set(failures)),
        "completion_tokens": sum(tokens),
        "requests_per_s": len(latencies) / wall,
        "tokens_per_s": sum(tokens) / wall,
        "latency": common.summarize(latencies) if latencies else None,
    }


def run_load_in_child(base_url, bodies, concurrency):
    """`run_load` in a fresh (spawned) process; returns its result."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(run_load, base_url, bodies, concurrency).result()


def run(settings, log=print):
    import keras

    from keras_lora.serving import demo
    from keras_lora.serving.engine import Engine
    from keras_lora.serving.server import create_app

    backend = keras.backend.backend()
    result = {
        "benchmark": "server_throughput",
        "backend": backend,
        "date": datetime.date.today().isoformat(),
        "timestamp": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": common.machine_info(backend),
        "settings": {
            **settings,
            "model": "GPT-2 with random weights and a byte tokenizer "
            "(keras_lora.serving.demo), "
            + ", ".join(f"{k} {v}" for k, v in MODEL.items())
            + ", max_sequence_length 64; adapters rank 4 on query/value",
            "client": "a separate process, one thread and keep-alive "
            "connection per concurrent request",
            "sampling": "greedy",
            "batch_window_ms": 5.0,
        },
        "load_average_start": common.load_average(),
    }
    monitor = common.CpuMonitor()
    with tempfile.TemporaryDirectory() as root:
        log(f"[{backend}] building the demo model and adapters")
        preset, adapters = demo.build_demo(root, settings["adapters"], **MODEL)
        engine = Engine.from_preset(
            preset,
            slots=settings["adapters"],
            max_batch=settings["max_batch"],
        )
        app = create_app(
            engine,
            max_batch=settings["max_batch"],
            max_queue=max(64, settings["concurrency"]),
            batch_window=0.005,
            adapters=adapters,
        )
        scheduler = app.state.scheduler
        base_url, stop = start_server(app)
        try:
            log(f"[{backend}] compiling every batch-size bucket")
            warm_up(engine, scheduler, sorted(adapters), settings)
            result["modes"] = _measure(
                base_url, scheduler, sorted(adapters), settings, log
            )
        finally:
            stop()
    common.record_end_load(result, monitor)
    batched = result["modes"]["batched"]["requests_per_s"]
    single = result["modes"]["max_batch_1"]["requests_per_s"]
    result["speedup_requests_per_s"] = batched / single
    log(
        f"[{backend}] batched / max_batch_1 requests/s: {batched / single:.2f}x"
    )
    return result


def warm_up(engine, scheduler, adapter_names, settings):
    """Runs one pass per batch-size bucket (powers of two, as the engine
    pads), on the server's worker, so no timed round compiles."""
    from keras_lora.serving.engine import CompletionRequest

    bodies = request_bodies(
        settings["max_batch"], adapter_names, settings["max_tokens"]
    )
    largest = min(settings["max_batch"], settings["concurrency"])
    # A batch of n rows runs padded to the next power of two (at most
    # max_batch): one pass of each size below covers every shape.
    sizes = {min(1 << k, largest) for k in range(largest.bit_length() + 1)}
    for size in sorted(sizes):
        requests = [
            CompletionRequest(b["prompt"], b["adapter"], b["max_tokens"])
            for b in bodies[:size]
        ]
        scheduler.call(engine.complete, requests).result()


def _measure(base_url, scheduler, adapter_names, settings, log):
    bodies = request_bodies(
        settings["requests"], adapter_names, settings["max_tokens"]
    )
    batch_limit = {"batched": settings["max_batch"], "max_batch_1": 1}
    rounds = {mode: [] for mode in MODES}
    # An untimed warm-up round per mode compiles what each mode needs.
    for round_index in range(-1, settings["rounds"]):
        order = MODES if round_index % 2 else MODES[::-1]
        for mode in order:
            # Only between rounds, with no request in flight.
            scheduler.max_batch = batch_limit[mode]
            before = dict(scheduler.stats)
            load = run_load_in_child(base_url, bodies, settings["concurrency"])
            batches = scheduler.stats["batches"] - before["batches"]
            served = scheduler.stats["requests"] - before["requests"]
            load["engine_passes"] = batches
            load["mean_batch"] = served / batches if batches else None
            label = "warm-up" if round_index < 0 else f"round {round_index}"
            log(
                f"  {label} {mode:<12} {load['requests_per_s']:7.2f} req/s "
                f"{load['tokens_per_s']:8.1f} tok/s, mean batch "
                f"{load['mean_batch'] or 0:.1f}, failures {load['failures']}"
            )
            if round_index >= 0:
                rounds[mode].append(load)
    scheduler.max_batch = settings["max_batch"]
    modes = {}
    for mode, loads in rounds.items():
        modes[mode] = {
            "max_batch": batch_limit[mode],
            "requests_per_s": statistics.median(
                r["requests_per_s"] for r in loads
            ),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in loads),
            "latency_median_ms": statistics.median(
                r["latency"]["median_ms"] for r in loads
            ),
            "latency_p75_ms": statistics.median(
                r["latency"]["p75_ms"] for r in loads
            ),
            "mean_batch": statistics.median(r["mean_batch"] for r in loads),
            "failures": sum(r["failures"] for r in loads),
            "rounds": loads,
        }
    return modes


# -- markdown -------------------------------------------------------------


def render_markdown(results, command):
    """The combined markdown report for a list of per-backend results."""
    settings = results[0]["settings"]
    machine = results[0]["machine"]
    lines = [
        "# Server throughput",
        "",
        f"Command: `{command}`",
        "",
        f"Date: {results[0]['date']}",
        "",
        f"Machine: CPU {machine['cpu']} ({machine['cores']} cores, "
        f"{machine['usable_cores']} usable), {machine['platform']}, "
        f"Python {machine['python']}, Keras {machine['keras']}.",
        "",
        f"`keras-lora serve` on 127.0.0.1 (uvicorn, one process per "
        f"backend) over {settings['model']}, with {settings['adapters']} "
        f"adapters. A local client (its own process) keeps "
        f"{settings['concurrency']} "
        f"requests in flight (one thread and connection each) until "
        f"{settings['requests']} completions of {settings['max_tokens']} "
        f"tokens ({settings['sampling']}) are done, cycling through the "
        f"base model and every adapter. `batched`: the scheduler puts up "
        f"to {settings['max_batch']} requests, whatever their adapters, "
        f"in one engine pass ({settings['batch_window_ms']:.0f} ms "
        f"window); `max_batch_1`: one request per pass. Same server and "
        f"engine; modes alternate, {settings['rounds']} timed round(s) "
        f"each after a warm-up round; medians over rounds. Client, server "
        f"and engine share the machine's CPU.",
        "",
        "Other work on the machine (CPU used by other processes, the "
        "benchmark's client process included, as a share of all cores; "
        "load average at start -> end): "
        + "; ".join(
            f"{r['backend']} {_share(r.get('other_processes_cpu_share'))} "
            f"({_load(r.get('load_average_start'))} -> "
            f"{_load(r.get('load_average_end'))})"
            for r in results
        )
        + ".",
        "",
    ]
    rows = []
    for result in results:
        for mode, info in result["modes"].items():
            rows.append(
                {
                    "backend": result["backend"],
                    "mode": mode,
                    "requests_per_s": info["requests_per_s"],
                    "tokens_per_s": info["tokens_per_s"],
                    "latency": info["latency_median_ms"],
                    "mean_batch": info["mean_batch"],
                    "failures": info["failures"],
                }
            )
    lines.append(
        common.markdown_table(
            rows,
            [
                ("backend", "backend"),
                ("mode", "mode"),
                ("requests_per_s", "requests/s"),
                ("tokens_per_s", "tokens/s"),
                ("latency", "median latency ms"),
                ("mean_batch", "mean batch"),
                ("failures", "failed requests"),
            ],
        )
    )
    lines.append(
        "Batched / max_batch_1 requests/s: "
        + ", ".join(
            f"{r['backend']} {r['speedup_requests_per_s']:.2f}x"
            for r in results
        )
        + "."
    )
    lines.append("")
    return "\n".join(lines)


def _share(value):
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _load(values):
    return "n/a" if not values else "/".join(f"{v:.2f}" for v in values)


# -- command line -----------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.server_throughput",
        description="Server throughput, batched scheduler vs max-batch 1, "
        "on the current KERAS_BACKEND.",
    )
    parser.add_argument("--out", required=True, help="JSON file to write.")
    parser.add_argument(
        "--quick", action="store_true", help="A small load (smoke test)."
    )
    for key in FULL:
        parser.add_argument(
            f"--{key.replace('_', '-')}", type=int, help=f"Override {key}."
        )
    args = parser.parse_args(argv)
    settings = dict(QUICK if args.quick else FULL)
    for key in FULL:
        value = getattr(args, key)
        if value is not None:
            settings[key] = value
    settings["quick"] = args.quick
    result = run(settings)
    common.write_json(args.out, result)
    print(f"Wrote {args.out}")
    failures = sum(m["failures"] for m in result["modes"].values())
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
