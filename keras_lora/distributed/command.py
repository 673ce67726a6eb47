"""The `keras-lora train-distributed` subcommand (JAX).

Runs `keras_lora.distributed.job` in this process, as one process of a
multi-process job (`--coordinator`/`--num-processes`/`--process-id`, the
`KERAS_DISTRIBUTION_*` environment variables, or `--multi-host` to let
JAX find the cluster on Cloud TPU and SLURM), or starts `--local-processes`
copies of itself on this machine, each with `--devices-per-process`
simulated CPU devices, to try a multi-process job without a cluster.
Also runnable as `python -m keras_lora.distributed.command`.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import time

NAME = "train-distributed"
MODULE = "keras_lora.distributed.command"
EPILOG = """examples:
  # 2 processes x 4 simulated CPU devices on this machine (gloo):
  keras-lora train-distributed --local-processes 2 --devices-per-process 4
  # one process of a 2-host GPU job (run on each host with its own id):
  keras-lora train-distributed --model ./llama_preset --data train.txt \\
      --coordinator 10.0.0.1:1234 --num-processes 2 --process-id 0
  # Cloud TPU pod or SLURM: JAX finds the other hosts itself
  keras-lora train-distributed --model ./llama_preset --multi-host
"""


def register(subparsers):
    """Adds `train-distributed` to the `keras-lora` subcommands."""
    parser = subparsers.add_parser(
        NAME,
        help="LoRA training sharded over devices and processes (JAX)",
        description="Train LoRA on a keras-hub causal LM under "
        "keras.distribution: data parallel, or model parallel with the "
        "backbone's layout map (adapter layouts follow the base kernels). "
        "Every process runs this same command.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(func=run_command)
    return parser


def add_arguments(parser):
    job = parser.add_argument_group("the job (the same in every process)")
    job.add_argument(
        "--model",
        default="tiny-gpt2",
        help="tiny-gpt2, tiny-llama (random tiny models for smoke runs) or "
        "a keras-hub CausalLM preset directory (default: %(default)s)",
    )
    job.add_argument(
        "--parallel",
        choices=("none", "data", "model"),
        default="model",
        help="none: one device; data: weights replicated, batches split; "
        "model: weights sharded over a (batch, model) mesh "
        "(default: %(default)s)",
    )
    job.add_argument(
        "--model-axis",
        type=_positive_int,
        help="devices on the mesh's model axis (default: those of one process)",
    )
    job.add_argument("--steps", type=_positive_int, default=5)
    job.add_argument(
        "--batch-size",
        type=_positive_int,
        default=8,
        help="rows per global batch, split across processes "
        "(default: %(default)s)",
    )
    job.add_argument("--sequence-length", type=_positive_int, default=16)
    job.add_argument("--rank", type=_positive_int, default=4)
    job.add_argument("--alpha", type=float, default=8.0)
    job.add_argument(
        "--target-modules",
        help="comma-separated layer names (default: LoraConfig's, query,value)",
    )
    job.add_argument("--learning-rate", type=float, default=1e-2)
    job.add_argument("--seed", type=int, default=0)
    job.add_argument(
        "--data", help="text file to train on (needs a preset's tokenizer)"
    )
    job.add_argument(
        "--save-adapter", metavar="DIR", help="process 0 saves the adapter"
    )
    job.add_argument(
        "--report", metavar="FILE", help="process 0 writes results as JSON"
    )
    cluster = parser.add_argument_group("joining a multi-process job")
    cluster.add_argument("--coordinator", help="HOST:PORT of process 0")
    cluster.add_argument("--num-processes", type=_positive_int)
    cluster.add_argument("--process-id", type=int)
    cluster.add_argument(
        "--multi-host",
        action="store_true",
        help="join a job whose processes JAX finds itself (Cloud TPU, SLURM)",
    )
    local = parser.add_argument_group("trying it on this machine")
    local.add_argument(
        "--local-processes",
        type=_positive_int,
        help="start this many processes here (CPU, localhost coordinator)",
    )
    local.add_argument(
        "--devices-per-process",
        type=_positive_int,
        default=4,
        help="simulated CPU devices per local process (default: %(default)s)",
    )


def run_command(args):
    processes = max(args.local_processes or 1, args.num_processes or 1)
    if args.parallel == "none" and (processes > 1 or args.multi_host):
        print(
            f"keras-lora {NAME}: --parallel none trains on one device; "
            "with several processes use --parallel data or model.",
            file=sys.stderr,
        )
        return 2
    if args.local_processes:
        return launch_local(args)
    process = _initialize(args)
    from keras_lora.distributed import job

    results = job.run(
        job_config(args),
        log=(lambda line: print(line, flush=True)) if process == 0 else _quiet,
    )
    if args.report and process == 0:
        _write_report(args.report, results)
    return 0


def job_config(args):
    from keras_lora.distributed.job import JobConfig

    targets = tuple(
        t.strip() for t in args.target_modules.split(",") if t.strip()
    )
    return JobConfig(
        model=args.model,
        parallel=args.parallel,
        model_axis=args.model_axis,
        steps=args.steps,
        batch_size=args.batch_size,
        sequence_length=args.sequence_length,
        rank=args.rank,
        alpha=args.alpha,
        target_modules=targets,
        learning_rate=args.learning_rate,
        seed=args.seed,
        data=args.data,
        save_adapter=args.save_adapter,
    )


def launch_local(args, timeout=None):
    """Runs the job in `args.local_processes` processes on this machine
    (CPU, `args.devices_per_process` simulated devices each); returns the
    exit status (the first failure stops the others)."""
    count = args.local_processes
    port = _free_port()
    children = []
    for index in range(count):
        argv = [sys.executable, "-m", MODULE, *child_argv(args)]
        if count > 1:
            argv += [
                "--coordinator",
                f"127.0.0.1:{port}",
                "--num-processes",
                str(count),
                "--process-id",
                str(index),
            ]
        env = dict(os.environ)
        env["JAX_PLATFORMS"] = "cpu"
        env["KERAS_BACKEND"] = "jax"
        flags = env.get("XLA_FLAGS", "")
        env["XLA_FLAGS"] = (
            f"{flags} --xla_force_host_platform_device_count="
            f"{args.devices_per_process}"
        ).strip()
        children.append(subprocess.Popen(argv, env=env))
    return _wait_all(children, timeout)


def child_argv(args):
    """The job's options as command-line arguments (for a child)."""
    argv = []
    for option in (
        "model",
        "parallel",
        "model_axis",
        "steps",
        "batch_size",
        "sequence_length",
        "rank",
        "alpha",
        "target_modules",
        "learning_rate",
        "seed",
        "data",
        "save_adapter",
        "report",
    ):
        value = getattr(args, option)
        if value is not None:
            argv += ["--" + option.replace("_", "-"), str(value)]
    return argv


def _initialize(args):
    """Joins the multi-process job when asked to; returns the process id."""
    joining = (
        args.multi_host
        or args.coordinator
        or args.num_processes
        or args.process_id is not None
        or os.environ.get("KERAS_DISTRIBUTION_JOB_ADDRESSES")
    )
    if not joining:
        return 0
    from keras_lora.distributed import cluster

    cluster.initialize(args.coordinator, args.num_processes, args.process_id)
    import jax

    return jax.process_index()


def _wait_all(children, timeout):
    start = time.monotonic()
    status = 0
    pending = list(children)
    while pending:
        for child in list(pending):
            code = child.poll()
            if code is None:
                continue
            pending.remove(child)
            if code != 0 and status == 0:
                status = code
                for other in pending:  # they would wait for it forever
                    other.terminate()
        if timeout is not None and time.monotonic() - start > timeout:
            for child in pending:
                child.kill()
            return 124
        time.sleep(0.1)
    return status


def _write_report(path, results):
    from keras_lora.files.atomic import atomic_write_file

    def write(tmp, scratch):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
            f.write("\n")

    atomic_write_file(path, write)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _quiet(line):
    del line


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer, got {text!r}"
        )
    return value


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog=f"keras-lora {NAME}",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    return run_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
