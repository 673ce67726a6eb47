"""`run_comparison`: base model, data, both fine-tunes, report.

    from keras_lora.comparison import ComparisonConfig, run_comparison
    results = run_comparison(ComparisonConfig(), "compare_out")

Steps:

1. The base model (`base_model.prepare_base`): the small GPT-2 shipped
   with the package (pre-trained offline on Python's documentation and
   most of its standard library), one pre-trained here (`--base scratch`,
   cached), or a keras-hub preset.
2. The fine-tuning corpus (by default requests for standard-library
   functions the base read, answered by their source; or the packages it
   never read; or the user's text, see `data`) is tokenized with
   the base model's tokenizer and cut into windows; the end of the stream
   is held out for validation. The base model's validation loss and
   samples are measured here, once.
3. Full fine-tuning, then LoRA, each by `phase.run_phase` - in a fresh
   worker process by default (`isolation="subprocess"`), so each phase's
   peak memory is measured on its own; `isolation="in-process"` runs them
   here (quicker, for tests; memory then includes what earlier phases
   left behind).
4. `report.write_report`: terminal table, `comparison.json`, PNG plots.
"""

import gc
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

from keras_lora.comparison import base_model, data, report, tokenizer
from keras_lora.comparison.phase import MODES, run_phase
from keras_lora.comparison.progress import Clock, status

ISOLATION_MODES = ("subprocess", "in-process")


def run_comparison(
    config,
    output_dir,
    cache_dir=None,
    isolation="subprocess",
    progress=True,
    plots=True,
    overwrite=False,
):
    """Runs the comparison and writes its report to `output_dir`.

    Args:
        config: a `ComparisonConfig`.
        output_dir: where `comparison.json`, `comparison.txt`, the PNG plots
            and the LoRA adapter go (created if needed).
        cache_dir: where the pre-trained base model is cached (default:
            `$KERAS_LORA_CACHE/comparison` or `~/.cache/keras_lora/...`).
        isolation: `"subprocess"` (each fine-tune in its own process) or
            `"in-process"`.
        progress: print progress lines and bars.
        plots: write the PNG plots.
        overwrite: replace an earlier comparison's results in `output_dir`
            (otherwise that is an error, see `check_output_dir`).

    Returns:
        The results dict (also written to `output_dir/comparison.json`).
    """
    import keras

    if isolation not in ISOLATION_MODES:
        raise ValueError(
            f"run_comparison: isolation must be one of {ISOLATION_MODES}, "
            f"got {isolation!r}."
        )
    clock = Clock()
    output_dir = check_output_dir(output_dir, report.OUTPUT_NAMES, overwrite)
    os.makedirs(output_dir, exist_ok=True)
    preset, base_info = base_model.prepare_base(config, cache_dir, progress)
    clock.lap("base_model")

    with tempfile.TemporaryDirectory(prefix=".work-", dir=output_dir) as work:
        windows_path = os.path.join(work, "windows.npz")
        base = prepare_data_and_base(
            config, preset, windows_path, progress, clock
        )
        phases = {}
        for mode in MODES:
            spec = {
                "mode": mode,
                "config": config.to_dict(),
                "preset": preset,
                "windows": windows_path,
                "output_dir": output_dir,
                "progress": progress,
            }
            if isolation == "subprocess":
                phases[mode] = _run_worker(spec, work, progress)
            else:
                phases[mode] = run_phase(spec)
                gc.collect()
            clock.lap(mode)

    results = {
        "backend": keras.backend.backend(),
        "isolation": isolation,
        "config": config.to_dict(),
        "preset": preset,
        "base_info": base_info,
        "base": base,
        "full": phases["full"],
        "lora": phases["lora"],
        "expected_lora_params": config.lora_parameter_count(
            base["num_layers"], base["hidden_dim"], base["intermediate_dim"]
        ),
        "seconds": clock.laps,
        "wall_seconds": sum(clock.laps.values()),
    }
    results["summary"] = report.summarize(results)
    report.write_report(results, output_dir, plots=plots)
    return results


def check_output_dir(output_dir, names, overwrite=False):
    """`output_dir` as an absolute path, unless it holds an earlier run.

    An earlier run's files (any of `names`) are never replaced silently:
    without `overwrite` this raises `FileExistsError` naming the files and
    the two ways out.
    """
    output_dir = os.path.abspath(os.fspath(output_dir))
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise FileExistsError(
            f"--output-dir: '{output_dir}' is a file, not a directory; "
            "choose another --output-dir."
        )
    if overwrite or not os.path.isdir(output_dir):
        return output_dir
    earlier = sorted(set(os.listdir(output_dir)) & set(names))
    if earlier:
        raise FileExistsError(
            f"--output-dir: '{output_dir}' already holds an earlier run's "
            f"results ({', '.join(earlier)}). Choose another --output-dir, "
            "or pass --overwrite to replace them."
        )
    return output_dir


def prepare_data_and_base(
    config, preset, windows_path, progress, clock, samples=True
):
    """Tokenizes the corpus, saves the windows, measures the base model.

    The same held-out windows (the end of the token stream) are what every
    fine-tune of this run is evaluated on.
    """
    import keras

    import keras_lora as kl
    from keras_lora.comparison import training

    keras.utils.set_random_seed(config.seed)
    causal_lm = base_model.load_causal_lm(preset, config.sequence_length)
    longest = causal_lm.backbone.max_sequence_length
    if config.sequence_length > longest:
        raise ValueError(
            f"--sequence-length {config.sequence_length} is longer than the "
            f"base model's max_sequence_length ({longest}); pass "
            f"--sequence-length {longest} or less."
        )
    documents = data.finetuning_documents(
        config.data, config.data_bytes, config.corpus
    )
    source = data.corpus_description(config.data, config.corpus)
    status(
        f"data: {len(documents)} documents, "
        f"{sum(len(d) for d in documents):,} characters from {source}",
        progress,
    )
    token_ids = tokenizer.encode_documents(
        causal_lm.preprocessor.tokenizer, documents
    )
    train, val = data.split_windows(
        data.windows(token_ids, config.sequence_length),
        config.validation_fraction,
        config.max_validation_windows,
    )
    np.savez(windows_path, train=train, validation=val)
    clock.lap("data")

    status("base model: evaluating on the held-out windows", progress)
    model = training.compile_for_evaluation(training.training_model(causal_lm))
    before = training.evaluate_loss(model, val, config.batch_size)
    clock.lap("base_evaluate")
    if samples:
        status("base model: generating samples", progress)
        samples = training.generate_samples(
            causal_lm,
            config.prompts,
            config.generate_length,
            top_k=config.sample_top_k,
            seed=config.sample_seed,
        )
        clock.lap("base_generate")
    else:
        samples = []
    trainable, total = kl.count_parameters(causal_lm)
    backbone = causal_lm.backbone
    result = {
        "total_params": int(total),
        "num_layers": int(backbone.num_layers),
        "hidden_dim": int(backbone.hidden_dim),
        "intermediate_dim": int(backbone.intermediate_dim),
        "vocabulary_size": int(backbone.vocabulary_size),
        "data_source": source,
        "data_tokens": int(len(token_ids)),
        "train_windows": int(len(train)),
        "validation_windows": int(len(val)),
        "validation_tokens": int(val[:, 1:].size),
        "validation_before": before,
        "samples": samples,
    }
    del model, causal_lm
    gc.collect()
    return result


def _run_worker(spec, work, progress):
    """Runs `phase.run_phase(spec)` in `python -m ...worker`; relays output."""
    import keras

    mode = spec["mode"]
    spec_path = os.path.join(work, f"spec-{mode}.json")
    result_path = os.path.join(work, f"result-{mode}.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    env = dict(os.environ)
    env["KERAS_BACKEND"] = keras.backend.backend()
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    command = [
        sys.executable,
        "-m",
        "keras_lora.comparison.worker",
        spec_path,
        result_path,
    ]
    status(f"{mode}: starting a worker process", progress)
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env
    )
    tail = b""
    try:
        while True:
            chunk = os.read(process.stdout.fileno(), 4096)
            if not chunk:
                break
            tail = (tail + chunk)[-8000:]
            if progress:
                sys.stdout.write(chunk.decode("utf-8", errors="replace"))
                sys.stdout.flush()
        returncode = process.wait()
    finally:
        # Interrupted (Ctrl-C, a notebook's stop button): stop the worker too.
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
    if returncode != 0 or not os.path.isfile(result_path):
        raise RuntimeError(
            f"The {mode} fine-tuning worker failed (exit status "
            f"{returncode}). Its last output:\n"
            + tail.decode("utf-8", errors="replace")
        )
    with open(result_path) as f:
        return json.load(f)
