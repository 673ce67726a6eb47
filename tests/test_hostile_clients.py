"""The hostile-clients benchmark, and a small bounded run of it."""

import pytest

from benchmarks import hostile_clients
from benchmarks.hostile_requests import HOSTILE_KINDS

SMALL = {
    "clients": 4,
    "good": 8,
    "hostile": len(HOSTILE_KINDS),
    "rounds": 1,
    "chunked_mib": 2,
    "max_tokens": 2,
}


def test_percentile_is_nearest_rank_in_ms():
    values = [i / 1000 for i in range(1, 101)]  # 1..100 ms
    assert hostile_clients._percentile(values, 99) == 99.0
    assert hostile_clients._percentile(values, 50) == 50.0
    assert hostile_clients._percentile([0.5], 99) == 500.0
    assert hostile_clients._percentile([], 99) is None


@pytest.fixture(scope="module")
def small_run():
    return hostile_clients.run(
        SMALL, log=lambda *_: None, in_child=False, model={}
    )


def test_small_hostile_run(small_run):
    """Every good request served, no 5xx, every hostile one refused (or, for
    varying sampling, served), /health always 200, nothing compiled. The
    latency ratio is reported, not asserted: tests never check timings."""
    verdict = small_run["verdict"]
    assert verdict["good_failures"] == 0, small_run["outcomes"]
    assert verdict["server_errors_5xx"] == 0, small_run["outcomes"]
    assert verdict["unexpected_hostile_outcomes"] == 0, small_run["unexpected"]
    assert verdict["health_non_200"] == 0
    assert small_run["health"]["polls"] > 0
    assert verdict["compilations_during_rounds"] == 0, small_run["compilations"]
    outcomes = small_run["outcomes"]
    assert outcomes["good"] == {"200": 2 * SMALL["good"]}
    assert set(outcomes) == {"good", *HOSTILE_KINDS}
    assert outcomes["varying_sampling"] == {"200": 1}
    assert outcomes["adapter_alpha_inf"] == {"422": 1}
    latency = small_run["good_latency_ms"]
    assert latency["clean"]["n"] == latency["hostile"]["n"] == SMALL["good"]
