"""The benchmark suite's builders, checks and reports, at a tiny size.

Asserts what the benchmarks compare (parameter counts, what one training
step changes, merged == unmerged) and what they print, never timings.
"""

import json

import numpy as np
import pytest

from benchmarks import __main__ as runner
from benchmarks import (
    common,
    gpt2_variants,
    inference,
    training,
    training_report,
)
from tests.conftest import to_numpy

# gpt2-mini's structure at keras-hub's test size.
TINY = dict(
    label="tiny",
    num_layers=2,
    hidden_dim=16,
    num_heads=2,
    seq=8,
    batch=2,
    vocab=64,
    targets="query_value",
)
R = gpt2_variants.RANK


def expected_trainable(variant, shape):
    """Trainable parameters of each variant, counted by hand."""
    d, h, ff = shape["hidden_dim"], shape["num_heads"], 4 * shape["hidden_dim"]
    layers, r = shape["num_layers"], R
    if variant == "full":
        block = 4 * (d * d + d) + 2 * d * ff + ff + d + 2 * 2 * d
        embeddings = (shape["vocab"] + shape["seq"]) * d
        return embeddings + layers * block + 2 * d
    query_value = shape["targets"] == "query_value"
    if variant == "keras_lora":  # A (d, r), B (r, outputs) per projection
        if query_value:
            return layers * 2 * (d * r + r * d)
        return layers * (4 * 2 * d * r + 2 * (d + ff) * r)
    if variant == "builtin":
        # Keras: A = kernel.shape[:-1] + (r,), B = (r, kernel.shape[-1]);
        # the adapted layer's bias keeps training.
        qkv = d * h * r + r * (d // h) + d
        if query_value:
            return layers * 2 * qkv
        out, ff_in = d * r + r * d + d, d * r + r * ff + ff
        ff_out = ff * r + r * d + d
        return layers * (3 * qkv + out + ff_in + ff_out)
    if variant == "peft":  # fused c_attn: A (d, r), B (r, 3d)
        if query_value:
            return layers * (d * r + r * 3 * d)
        return layers * (4 * d * r + 2 * d * r + 2 * (d + ff) * r)
    raise ValueError(variant)


def snapshot(variables):
    return [np.array(to_numpy(v)) for v in variables]


# (variant, targets): `full` trains everything whatever the targets.
KERAS_CASES = [
    ("full", "query_value"),
    ("builtin", "query_value"),
    ("builtin", "all_linear"),
    ("keras_lora", "query_value"),
    ("keras_lora", "all_linear"),
]


@pytest.fixture(scope="module")
def one_step():
    """Each Keras variant built once and trained one step (cached)."""
    cache = {}

    def run(variant, targets):
        if (variant, targets) not in cache:
            shape = dict(TINY, targets=targets)
            trainer = gpt2_variants.keras_variant(
                variant, shape, run_eagerly=True
            )
            model = trainer.model
            trainable = list(model.trainable_weights)
            frozen = list(model.non_trainable_weights)
            before = snapshot(trainable), snapshot(frozen)
            loss = trainer.step()
            cache[variant, targets] = dict(
                trainer=trainer,
                shape=shape,
                loss=loss,
                trainable=trainable,
                frozen=frozen,
                before=before,
            )
        return cache[variant, targets]

    return run


@pytest.mark.parametrize("variant,targets", KERAS_CASES)
def test_keras_variants_train_only_what_they_should(one_step, variant, targets):
    run = one_step(variant, targets)
    trainer, shape = run["trainer"], run["shape"]
    assert trainer.trainable_params == expected_trainable(variant, shape)
    assert trainer.total_params >= expected_trainable("full", shape)
    trainable, frozen = run["trainable"], run["frozen"]
    before_trainable, before_frozen = run["before"]
    if variant == "full":
        assert not frozen
    assert np.isfinite(run["loss"])
    for variable, old in zip(frozen, before_frozen, strict=True):
        np.testing.assert_array_equal(to_numpy(variable), old)
    changed = [
        v.path
        for v, old in zip(trainable, before_trainable, strict=True)
        if not np.array_equal(to_numpy(v), old)
    ]
    if variant == "full":
        assert len(changed) == len(trainable)
    else:
        # B starts at zero, so A's first gradient is zero and Adam leaves
        # it; every B moves.
        b_suffix = "lora_b_default" if variant == "keras_lora" else "_b"
        b_paths = [v.path for v in trainable if v.path.endswith(b_suffix)]
        assert b_paths and set(b_paths) <= set(changed)


def test_keras_variants_start_from_the_same_loss(one_step):
    losses = [
        one_step(name, "query_value")["loss"]
        for name in ("full", "builtin", "keras_lora")
    ]
    np.testing.assert_allclose(losses, losses[0], rtol=1e-5)
    # Random weights: about ln(vocabulary) per token.
    assert abs(losses[0] - np.log(TINY["vocab"])) < 0.5


@pytest.mark.parametrize("targets", ["query_value", "all_linear"])
def test_peft_variant_trains_only_lora(targets):
    import torch

    shape = dict(TINY, targets=targets)
    trainer = gpt2_variants.peft_variant(shape)
    assert trainer.trainable_params == expected_trainable("peft", shape)
    before = {
        n: p.detach().clone() for n, p in trainer.model.named_parameters()
    }
    assert np.isfinite(trainer.step())
    for name, param in trainer.model.named_parameters():
        same = torch.equal(param.detach(), before[name])
        if "lora_B" in name:
            assert not same, name
        elif not param.requires_grad:
            assert same, name


def test_inference_variants_agree():
    models = inference.build_models(TINY)
    x, _ = gpt2_variants.keras_batch(TINY)
    out = {n: to_numpy(m(x, training=False)) for n, m in models.items()}
    np.testing.assert_allclose(out["merged"], out["unmerged"], atol=1e-5)
    np.testing.assert_allclose(out["unloaded"], out["unmerged"], atol=1e-5)
    assert np.max(np.abs(out["unmerged"] - out["base"])) > 1e-4
    assert np.max(np.abs(out["builtin"] - out["base"])) > 1e-4
    import keras_lora as kl

    assert kl.lora_layers(models["merged"])
    assert not kl.lora_layers(models["unloaded"])


def test_memory_counters_follow_an_allocation():
    if common.rss_bytes() is None or not common.reset_peak_rss():
        pytest.skip("needs Linux /proc")
    common.release_free_memory()
    common.reset_peak_rss()
    start = common.rss_bytes()
    block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
    assert common.peak_rss_bytes() - start > 60 * 2**20
    del block
    common.release_free_memory()
    common.reset_peak_rss()
    assert common.peak_rss_bytes() - start < 30 * 2**20


# -- reports -------------------------------------------------------------


def fake_training_result(backend, keras_lora_ms, ratios):
    variants = {}
    for name, ms in (("full", 300.0), ("keras_lora", keras_lora_ms)):
        variants[name] = {
            "trainable_params": 1000 if name == "full" else 10,
            "total_params": 1000,
            "first_loss": 10.8,
            "losses": [10.8],
            "memory": {"peak_overhead_mb": 500.0 if name == "full" else 200.0},
            "step": {"median_ms": ms, "p25_ms": ms - 1, "p75_ms": ms + 1},
        }
    step = dict.fromkeys(label for label, _, _ in training_report.RATIOS)
    step.update(ratios)
    memory = dict.fromkeys(step)
    memory["keras_lora/full"] = 0.4
    work_ratios = {"step": step, "memory": memory}
    return {
        "backend": backend,
        "date": "2026-01-01",
        "machine": {
            "cpu": "Test CPU",
            "cores": 2,
            "usable_cores": 2,
            "platform": "Linux",
            "python": "3.11",
            "numpy": "2",
            "keras": "3",
            "backend_versions": {backend: "1.0"},
        },
        "settings": dict(
            training.QUICK,
            keras_compile="test",
            keras_step="train_on_batch",
            peft_step="loop",
            optimizer="Adam",
            loss="CE",
        ),
        "load_average_start": [0.1, 0.1, 0.1],
        "load_average_end": [0.2, 0.1, 0.1],
        "other_processes_cpu_share": 0.01,
        "workloads": {
            "w1": {
                "label": "W1 gpt2-mini",
                "shape": dict(gpt2_variants.WORKLOADS["w1"]),
                "rank": 4,
                "targets": gpt2_variants.TARGETS["query_value"],
                "variants": variants,
                "skipped": {"builtin": "not installed: test"},
                "ratios": work_ratios,
                "targets_met": training_report.evaluate_targets(
                    "w1", work_ratios
                ),
                "checks": {},
                "timing_stats": {"rounds_kept": 3, "contended": False},
            }
        },
    }


def test_training_report_tables_and_targets():
    results = [
        fake_training_result(
            "jax", 150.0, {"keras_lora/full": 0.5, "keras_lora/peft": 0.7}
        ),
        fake_training_result(
            "torch", 250.0, {"keras_lora/full": 0.8, "keras_lora/peft": 0.3}
        ),
    ]
    text = training_report.render_markdown(
        results, "python -m benchmarks training"
    )
    assert "Command: `python -m benchmarks training`" in text
    assert "CPU Test CPU (2 cores, 2 usable)" in text
    lines = text.splitlines()
    row = "| jax | keras_lora | 10 | 150.00 | 149-151 | 200.00 | 10.8000 |"
    assert row in lines
    assert any(
        line.startswith("| torch | builtin (not installed: test) |")
        for line in lines
    )
    assert "| W1 | jax | step keras_lora/full <= 0.65 | 0.50 | yes |" in lines
    assert "| W1 | torch | step keras_lora/full <= 0.65 | 0.80 | **no** |" in (
        lines
    )
    # No built-in run: its target cannot be judged.
    assert "| W1 | jax | step keras_lora/builtin <= 1.00 | n/a | n/a |" in lines
    # keras_lora is fastest on jax, so jax's ratio to PEFT is judged (0.7).
    assert (
        "| W1 | jax | step keras_lora/peft <= 0.60 (fastest keras_lora "
        "backend) | 0.70 | **no** |"
    ) in lines


def test_inference_report():
    result = {
        "backend": "jax",
        "date": "2026-01-01",
        "machine": fake_training_result("jax", 1.0, {})["machine"],
        "settings": dict(inference.QUICK, forward="jit"),
        "shape": dict(gpt2_variants.WORKLOADS["w1"]),
        "rank": 4,
        "variants": {
            n: {"forward": {"median_ms": 100.0 + i}}
            for i, n in enumerate(inference.VARIANTS)
        },
        "ratios": {label: 1.01 for label, _, _ in inference.RATIOS},
        "target": {"ratio": "merged/base", "bound": 1.02, "value": 1.01},
        "checks": {
            "max_abs_diff_merged_vs_unmerged": 1e-6,
            "max_abs_diff_unmerged_vs_base": 0.05,
        },
        "timing_stats": {"rounds_kept": 3, "contended": True},
    }
    result["target"]["met"] = True
    text = inference.render_markdown([result], "cmd")
    lines = text.splitlines()
    assert "| jax | 100.00 | 101.00 | 102.00 | 103.00 | 104.00 |" in lines
    row = next(line for line in lines if line.startswith("| jax | 1.01"))
    assert "merged/base <= 1.02: yes" in row
    assert "3 (contended)" in row


# -- runner ----------------------------------------------------------------


def test_runner_expands_all_and_checks_names():
    args = runner.parse_args(["layer", "all", "--backends", "jax"])
    assert args.workloads == ["layer", "training", "inference"]  # once each
    assert args.backends == ["jax"]
    # The serving benchmarks run only when named.
    assert runner.parse_args([]).workloads == ["training", "inference", "layer"]
    args = runner.parse_args(["all", "server"])
    assert args.workloads == ["training", "inference", "layer", "server"]
    with pytest.raises(SystemExit):
        runner.parse_args(["nonsense"])
    with pytest.raises(SystemExit):
        runner.parse_args(["layer", "--backends", "numpy"])


def test_runner_passes_options_only_to_workloads_that_take_them():
    args = runner.parse_args(["--quick", "--with-w2"])
    training_argv = runner.child_command(
        runner.WORKLOADS["training"], "out.json", args
    )
    layer_argv = runner.child_command(
        runner.WORKLOADS["layer"], "out.json", args
    )
    assert training_argv[-4:] == ["--out", "out.json", "--quick", "--with-w2"]
    assert layer_argv[-3:] == ["--out", "out.json", "--quick"]
    assert "benchmarks.layer_overhead" in layer_argv


def test_runner_skips_a_missing_module(monkeypatch, tmp_path, capsys):
    workloads = dict(runner.WORKLOADS)
    workloads["ghost"] = runner.Workload(
        "benchmarks.no_such_module", "missing", "ghost"
    )
    monkeypatch.setattr(runner, "WORKLOADS", workloads)
    args = runner.parse_args(["ghost", "--out-dir", str(tmp_path)])
    statuses = runner.run_workload(
        "ghost", args, ["jax", "torch"], "cmd", "2026-01-01"
    )
    assert set(statuses) == {"jax", "torch"}
    assert all(s.startswith("skipped") for s in statuses.values())
    assert "skipping" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())


def test_recorded_layer_results_still_render():
    # The W4 files recorded before the runner was generalised.
    import glob
    import os

    from benchmarks import layer_overhead

    paths = sorted(
        glob.glob(os.path.join(runner.RESULTS_DIR, "*-layer-*.json"))
    )
    paths = [p for p in paths if not p.endswith("-quick.json")]
    assert paths
    results = []
    for path in paths:
        with open(path) as f:
            results.append(json.load(f))
    text = layer_overhead.render_markdown(results, "cmd")
    assert "## Ratios (same run)" in text


def test_loss_profile_variants_agree():
    """The three losses `python -m benchmarks.profiles loss` times compute
    the same value (so the profile compares like with like)."""
    from benchmarks import profiles

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 11)).astype("float32")
    labels = rng.integers(0, 11, (2, 3)).astype("int32")
    values = [
        float(to_numpy(fn(labels, logits)))
        for fn in profiles._loss_variants(11).values()
    ]
    np.testing.assert_allclose(values, values[0], rtol=1e-6)


def test_ops_profile_sums_trace_events_by_kind(tmp_path):
    """`profiles ops` reads a JAX trace (gzip JSON) and sums the XLA ops'
    durations (microseconds) by kind, skipping Python and runtime events."""
    import gzip

    from benchmarks import profiles

    events = [
        {"ph": "X", "name": "ynn_fusion.3", "dur": 2000},
        {"ph": "X", "name": "dot.1", "dur": 500},
        {"ph": "X", "name": "copy_bitcast_fusion.7", "dur": 1500},
        {"ph": "X", "name": "transpose_copy_fusion", "dur": 500},
        {"ph": "X", "name": "multiply_add_fusion.2", "dur": 250},
        {"ph": "X", "name": "$trainer.py:749 train_on_batch", "dur": 9e6},
        {"ph": "X", "name": "ThunkExecutor::Execute", "dur": 9e6},
        {"ph": "i", "name": "dot.2", "dur": 9e6},  # not a complete event
    ]
    run_dir = tmp_path / "plugins" / "profile" / "run"
    run_dir.mkdir(parents=True)
    with gzip.open(run_dir / "host.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    totals = profiles._trace_op_times(str(tmp_path))
    assert totals["matmul"] == 2.5
    assert totals["copy/transpose fusions"] == 2.0
    assert totals["other (elementwise, reductions)"] == 0.25
    assert sum(totals.values()) == 4.75


def test_torch_ops_profile_sums_operator_times_by_kind():
    """`profiles ops` on torch: operator self times (microseconds) summed
    into matrix products, the rank-r ones among them, and the rest."""
    from benchmarks import profiles

    events = [
        ("aten::mm", [[512, 768], [768, 3072]], 4000),
        ("aten::mm", [[512, 768], [768, 4]], 300),  # x @ A
        ("aten::addmm", [[3072], [512, 768], [768, 3072]], 1000),
        ("aten::bmm", [[48, 128, 64], [48, 64, 4]], 500),  # 3-D: not LoRA
        ("aten::gelu", [[4, 128, 3072]], 200),
        ("aten::matmul", [[512, 4], [4, 768]], 0),  # dispatch only
    ]
    totals = profiles._torch_op_times(events, rank=4)
    assert totals["matmul"] == 5.8
    assert totals["rank-4 products"] == 0.3
    assert totals["other"] == totals["all"] - 5.8
    assert totals["all"] == 6.0
