"""What the hostile-clients benchmark sends."""

import json
import os

import numpy as np
import safetensors.numpy

from benchmarks import hostile_requests
from benchmarks.hostile_requests import HOSTILE_KINDS
from keras_lora.serving import demo

SETTINGS = {
    "good": 16,
    "hostile": len(HOSTILE_KINDS),
    "chunked_mib": 2,
    "max_tokens": 4,
}


def test_round_requests_hold_every_kind_once():
    items = hostile_requests.round_requests(
        SETTINGS, ["a0"], {"alpha_inf": "/x", "tensor_nan": "/y"}, True, seed=0
    )
    kinds = [kind for kind, _ in items]
    assert kinds.count("good") == SETTINGS["good"]
    assert sorted(set(kinds) - {"good"}) == sorted(HOSTILE_KINDS)
    assert len(items) == SETTINGS["good"] + SETTINGS["hostile"]
    clean = hostile_requests.round_requests(SETTINGS, ["a0"], {}, False, seed=0)
    assert {kind for kind, _ in clean} == {"good"}


def test_broken_adapter_copies(tmp_path):
    _, adapters = demo.build_demo(str(tmp_path / "demo"), num_adapters=1)
    copies = hostile_requests.broken_adapter_copies(
        adapters["a0"], str(tmp_path / "broken")
    )
    for label in ("inf", "nan", "1e308"):
        path = os.path.join(copies[f"alpha_{label}"], "adapter_config.json")
        with open(path) as f:
            alphas = {s["alpha"] for s in json.load(f)["layers"].values()}
        assert {str(a) for a in alphas} == {str(float(label))}
    for label in ("nan", "inf"):
        weights = os.path.join(
            copies[f"tensor_{label}"], "adapter_model.safetensors"
        )
        tensors = safetensors.numpy.load_file(weights)
        assert sum(int((~np.isfinite(t)).sum()) for t in tensors.values()) == 1
