"""The soak's judge (benchmarks/soak.py): which failures a fault explains, how fast each link
showed it, when its flow passed again, and which failures are false alarms."""

from __future__ import annotations

from pathlib import Path

from benchmarks.soak import COMPRESS, Run, Window, attribute, detection_goals

ON, OFF = 1000.0, 1020.0
GOALS = {"shop/create": 20.55, "shop/hook": 10.55}


def run(at: float, took: float = 0.1, broken: str | None = None, flow: str = "shop") -> Run:
    outcome = "success" if broken is None else "failure"
    step, reason = broken.split(":") if broken else (None, None)
    return Run(flow, "stable", at, at + took, outcome, step, reason)


def test_failures_in_a_fault_are_its_breaks_and_the_rest_false_alarms() -> None:
    runs = [
        run(990.0),
        run(995.0, broken="create:http_status"),  # before the fault: a false alarm
        run(999.0, took=10.5, broken="hook:not_received"),  # started before, ended during
        run(1001.0, broken="create:http_status"),
        run(1019.9, took=20.0, broken="create:timeout"),  # started while on, ends after
        run(1021.0, took=1.0, broken="create:connect_error"),  # off, but not passed yet
        run(1023.0),  # passed again, and twice more: recovered 3 s after the fault went off
        run(1024.0),
        run(1025.0),
        run(1030.0, broken="create:http_status"),  # after recovery: a false alarm
        run(1001.0, flow="other"),
    ]
    window = Window("API answers 503", ON, OFF)
    false = attribute(runs, [window], GOALS)
    assert [(r.started_at, r.broken_step) for r in false] == [(995.0, "create"), (1030.0, "create")]
    assert window.links["shop/hook"] == {
        "detected_s": 9.5, "reasons": {"not_received": 1}, "failed_runs": 1, "goal_s": 10.55,
        "earlier_hops_s": 0.0, "held_s": 0.0, "passed_s": 0.0,
    }  # fmt: skip
    create = window.links["shop/create"]
    assert create["detected_s"] == 1.1
    assert create["reasons"] == {"http_status": 1, "timeout": 1, "connect_error": 1}
    assert window.detected_s == 1.1
    assert window.recovery_s == {"shop/stable": 3.0}
    assert window.relapses == []


def test_a_failure_before_the_flow_passed_three_in_a_row_is_the_faults_relapse() -> None:
    """The broker came back, the flow passed once, then a produce was answered with an error
    (Tansu, 11.6 s after its restart with empty storage): the fault's tail, listed as a
    relapse, and the flow recovered only when it passed three runs in a row."""
    runs = [
        run(1005.0, broken="create:connect_error"),
        run(1021.0),  # a first pass
        run(1022.0, broken="create:error"),  # the broker's error: a relapse, not a false alarm
        run(1023.0),
        run(1024.0),
        run(1025.0),
        run(1040.0, broken="create:error"),  # after three in a row: a false alarm
    ]
    window = Window("broker stopped", ON, OFF)
    false = attribute(runs, [window], GOALS)
    assert [r.started_at for r in false] == [1040.0]
    assert window.relapses == ["shop/create (error)"]
    assert window.recovery_s == {"shop/stable": 3.0}


def test_a_breaks_goal_counts_the_detecting_runs_earlier_hops() -> None:
    """The run that saw a dropped webhook spent 1.6 s on its API hops before its 10 s wait
    began: its reach was 1.6 s longer, which is not the monitor being late."""
    late = Run("shop", "stable", 1000.4, 1000.4 + 1.6 + 10.0, "failure", "hook", "not_received",
               broken_offset_s=1.6)  # fmt: skip
    window = Window("webhooks dropped", ON, OFF)
    assert attribute([late], [window], GOALS) == []
    hook = window.links["shop/hook"]
    assert hook["detected_s"] == 12.0  # over the link's 10.55 s, within this run's reach
    assert hook["earlier_hops_s"] == 1.6 and hook["goal_s"] == 12.15  # 10.55 + 1.6


def test_a_break_is_detected_when_its_step_ended_not_its_runs_cleanup() -> None:
    """The hop broke 10.1 s in; the run's cleanup on the hung API ended it at 19.9 s. The hops
    reach /metrics before cleanup, so the break was said at 10.1 s."""
    held = Run("shop", "stable", 1000.0, 1019.9, "failure", "hook", "not_received",
               broken_offset_s=0.1, broken_end_s=10.1)  # fmt: skip
    window = Window("API hangs", ON, OFF)
    assert attribute([held], [window], GOALS) == []
    assert window.links["shop/hook"]["detected_s"] == 10.1


def test_late_allows_only_what_the_soaks_clock_cannot_resolve() -> None:
    from benchmarks.soak import SLACK_S, late

    assert not late({"goal_s": 10.57, "detected_s": 10.6})
    assert late({"goal_s": 10.57, "detected_s": 10.57 + SLACK_S + 0.01})
    assert not late({"goal_s": None, "detected_s": 99.0})


def test_a_run_in_flight_when_the_fault_came_holds_the_next_one_back() -> None:
    """A flow's runs never overlap: the run waiting 10 s on a webhook when the broker stopped
    held the next start (which broke `create`) back by 9 s."""
    in_flight = run(999.0, took=10.0, broken="hook:not_received")
    late = run(1009.5, took=1.0, broken="create:connect_error")
    window = Window("broker stopped", ON, OFF)
    assert attribute([in_flight, late], [window], GOALS) == []
    create = window.links["shop/create"]
    assert create["detected_s"] == 10.5 and create["held_s"] == 9.0
    assert create["goal_s"] == 29.55  # 20.55 + 9.0


def test_a_slow_flow_recovers_by_passing_every_run_before_the_next_fault() -> None:
    """A flow every 30 s runs once between faults a minute apart: that one pass is its
    recovery, and its break in the next fault is that fault's, not a relapse of the first."""
    first, second = Window("API slow", ON, OFF), Window("webhooks forged", ON + 60, OFF + 60)
    runs = [
        run(ON + 5, broken="create:assertion"),
        run(ON + 35),  # the only run between the faults
        run(ON + 65, broken="hook:signature"),
    ]
    assert attribute(runs, [first, second], GOALS) == []
    assert first.recovery_s == {"shop/stable": 15.0} and first.relapses == []
    assert list(second.links) == ["shop/hook"] and second.relapses == []


def test_a_link_that_still_passed_under_the_fault_is_judged_from_its_last_pass() -> None:
    """A slow API backs the worker's queue up until a webhook misses its 10 s (the soak's
    `order_via_kafka/confirmation`, said 19.2 s into the fault against a goal of 11.1 s): the
    runs that started 1-8.5 s into the fault passed, so the link worked then, and the next run
    could not start before the last of them ended: the goal counts from that end."""
    runs = [run(ON + 1.0, took=2.0), run(ON + 3.5, took=4.0), run(ON + 8.5, took=0.4)]
    runs.append(run(ON + 9.0, took=10.1, broken="hook:not_received"))
    window = Window("API slow", ON, OFF)
    assert attribute(runs, [window], GOALS) == []
    hook = window.links["shop/hook"]
    assert hook["detected_s"] == 19.1 and hook["passed_s"] == 8.9
    assert hook["goal_s"] == 19.45  # 10.55 + 8.9
    from benchmarks.soak import late

    assert not late(hook)
    assert late(hook | {"detected_s": 19.8})  # the goal still binds from the last pass


def test_a_fault_nothing_noticed_has_no_detection() -> None:
    window = Window("webhooks dropped", ON, OFF)
    assert attribute([run(1005.0), run(1010.0)], [window], GOALS) == []
    assert window.links == {} and window.detected_s is None


def test_goals_are_interval_jitter_and_the_steps_deadline(tmp_path: Path) -> None:
    from monitor.demo.runner import demo_flows_file

    path = demo_flows_file(
        "http://127.0.0.1:1", "127.0.0.1:2", tmp_path, f"sqlite:///{tmp_path}/o.db"
    )
    text = path.read_text()
    for slow, fast in COMPRESS.items():
        text = text.replace(slow, fast)
    path.write_text(text)
    goals = detection_goals(path)
    assert goals["checkout/fulfilment_webhook"] == 10.55  # 500 ms + 10 % jitter + within 10 s
    assert goals["checkout/create_order"] == 20.55  # no within: the run's timeout
    assert goals["shop_health/lookup"] == 5.55
