"""Request limits, the fair compute gate and time budgets."""

from __future__ import annotations

import threading
import time

import pytest
from tiny_models import build

from moe_viz import Busy, Capacity, ComputeGate, Ensemble, Limits, TimeBudgetExceeded, TopK, generate, run_prompt

LIMITS = Limits(max_new_tokens=16, max_k=4, min_capacity_factor=0.25, max_capacity_factor=4.0, max_ensemble_experts=8)


@pytest.mark.parametrize(
    ("policy", "experts", "message"),
    [
        (TopK(5), 8, "k must satisfy 1 <= k <= 4 on this server; got 5"),
        (Capacity(1.0, k=6), 8, "k must satisfy 1 <= k <= 4"),
        (Capacity(0.1), 8, "capacity factor must satisfy 0.25 <= factor <= 4 on this server; got 0.1"),
        (Capacity(10.0), 8, "got 10"),
        (Ensemble("gate"), 64, "at most 8 experts per layer, and this model has 64"),
        (TopK(9), 8, "k must satisfy 1 <= k <= 8 \\(the number of experts\\)"),
    ],
)
def test_limits_refuse_out_of_range_requests_with_the_allowed_range(policy, experts, message):
    with pytest.raises(ValueError, match=message):
        LIMITS.check_policy(policy, experts)


def test_limits_accept_requests_inside_the_range():
    for policy in (None, TopK(4), Capacity(0.25), Capacity(4.0, k=1), Ensemble("uniform")):
        LIMITS.check_policy(policy, 8)
    LIMITS.check_new_tokens(16)
    with pytest.raises(ValueError, match="max_new_tokens must satisfy 1 <= max_new_tokens <= 16"):
        LIMITS.check_new_tokens(17)


def test_compute_gate_never_runs_more_than_its_slots_and_serves_in_order():
    gate = ComputeGate(slots=2)
    active, peak, order = [0], [0], []
    lock = threading.Lock()

    def work(i: int) -> None:
        with gate.slot():
            with lock:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
                order.append(i)
            time.sleep(0.05)
            with lock:
                active[0] -= 1

    threads = []
    for i in range(8):
        threads.append(threading.Thread(target=work, args=(i,)))
        threads[-1].start()
        time.sleep(0.005)  # arrive in order
    for t in threads:
        t.join()
    assert peak[0] == 2
    assert order == sorted(order)
    assert gate.running == 0 and gate.waiting == 0


def test_compute_gate_reports_queue_place_and_gives_up_after_max_wait():
    gate = ComputeGate(slots=1)
    places: list[int] = []
    release = threading.Event()

    def holder() -> None:
        with gate.slot():
            release.wait(5)

    t = threading.Thread(target=holder)
    t.start()
    time.sleep(0.05)
    with pytest.raises(Busy, match="busy"):
        with gate.slot(max_wait_s=1.2, on_wait=places.append):
            pass
    release.set()
    t.join()
    assert places and set(places) == {1}
    assert gate.waiting == 0 and gate.running == 0
    with gate.slot(max_wait_s=1) as waited:  # free again
        assert waited < 1


def test_time_budget_stops_a_forward_and_a_generation():
    model = build("mixtral")
    with pytest.raises(TimeBudgetExceeded, match="time budget of 0 s"):
        run_prompt(model, "hello", None, time_budget_s=0.0)
    with pytest.raises(TimeBudgetExceeded):
        generate(model, "hello", TopK(2), max_new_tokens=50, time_budget_s=0.0)
    assert run_prompt(model, "hello", None, time_budget_s=60).num_tokens == 5  # ample budget: no effect
