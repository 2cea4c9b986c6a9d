"""WorkTracker: what a replica reports through Ray Serve's `record_autoscaling_stats` hook."""
from __future__ import annotations

import pytest

from autoscaling.policy import TOKEN_BUDGET, WORK_PAIRS, WORK_REQUESTS, WORK_TOKENS
from autoscaling.work import WorkTracker


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


def test_reports_the_time_weighted_mean_since_the_last_report(clock):
    work = WorkTracker(clock=clock)
    clock.now += 1
    work.add(tokens=1000, pairs=10)  # held from t=1 to t=3 of a 4 s window
    clock.now += 2
    work.done(tokens=1000, pairs=10)
    clock.now += 1
    assert work.autoscaling_stats() == {WORK_TOKENS: 500.0, WORK_PAIRS: 5.0, WORK_REQUESTS: 0.5}


def test_a_burst_between_two_reports_is_not_missed(clock):
    work = WorkTracker(clock=clock)
    clock.now += 9
    with work.track(tokens=4000, pairs=40):
        clock.now += 1  # 1 s of a 10 s window: an instantaneous sample at either end would read 0
    assert work.held[WORK_TOKENS] == 0
    assert work.autoscaling_stats()[WORK_TOKENS] == pytest.approx(400.0)


def test_each_report_opens_a_new_window(clock):
    work = WorkTracker(clock=clock)
    work.add(tokens=300, pairs=3)
    clock.now += 5
    assert work.autoscaling_stats()[WORK_TOKENS] == 300.0
    work.done(tokens=300, pairs=3)
    clock.now += 5
    assert work.autoscaling_stats()[WORK_TOKENS] == 0.0


def test_overlapping_requests_add_up(clock):
    work = WorkTracker(clock=clock)
    work.add(tokens=100, pairs=1)
    clock.now += 1
    work.add(tokens=900, pairs=9)
    clock.now += 1
    assert work.held == {WORK_TOKENS: 1000.0, WORK_PAIRS: 10.0, WORK_REQUESTS: 2.0}
    assert work.autoscaling_stats() == {WORK_TOKENS: 550.0, WORK_PAIRS: 5.5, WORK_REQUESTS: 1.5}


def test_a_zero_length_window_reports_what_is_held_now(clock):
    work = WorkTracker(clock=clock)
    work.add(tokens=70, pairs=7)
    assert work.autoscaling_stats()[WORK_PAIRS] == 7.0


def test_a_failing_request_is_released_too(clock):
    work = WorkTracker(clock=clock)
    with pytest.raises(RuntimeError):
        with work.track(tokens=50, pairs=5):
            raise RuntimeError("scoring failed")
    assert work.held == {WORK_TOKENS: 0.0, WORK_PAIRS: 0.0, WORK_REQUESTS: 0.0}


def test_reports_the_token_budget_when_given_and_only_floats():
    stats = WorkTracker(token_budget=8192).autoscaling_stats()
    assert stats[TOKEN_BUDGET] == 8192.0
    # Ray disables the hook for good if any value is not an int or float.
    assert all(type(v) is float for v in stats.values())
    assert TOKEN_BUDGET not in WorkTracker().autoscaling_stats()
    with pytest.raises(ValueError):
        WorkTracker(token_budget=0)
