"""Path delay and loss: the emulator's policy, its rules, the plan and the CLI. Pure, no root."""

from __future__ import annotations

import argparse
import json
import random

import pytest

from mptcp_proxy.cli import lab_cmd
from mptcp_proxy.errors import ConfigError, LabError
from mptcp_proxy.lab import Lab, LabPlan, PathSpec, plan_lab
from mptcp_proxy.lab.impair import (
    DelayLine,
    QueueCounters,
    QueueSpec,
    parse_queue_counters,
    plan_queues,
    render_rules,
)

MS = 0.001


def line(delay_ms: float = 10.0, loss_pct: float = 0.0, seed: int = 1) -> DelayLine:
    return DelayLine(delay_ms, loss_pct, random.Random(seed))


# --------------------------------------------------------------------------
# DelayLine: the policy, driven with `now`
# --------------------------------------------------------------------------

def test_a_packet_leaves_after_exactly_the_delay():
    d = line(10)
    assert d.arrive(1, now=100.0)
    assert d.next_due() == pytest.approx(100.0 + 10 * MS)
    assert d.release(100.0 + 9.999 * MS) is None
    assert d.release(100.0 + 10 * MS) == 1
    assert d.next_due() is None and d.held == 0


def test_packets_leave_in_order_and_one_batch_covers_all_that_are_due():
    d = line(10)
    for i, t in enumerate((0.0, 1 * MS, 2 * MS, 30 * MS), start=1):
        d.arrive(i, t)
    assert d.release(12.5 * MS) == 3      # accept ids 1..3 in one verdict
    assert d.held == 1
    assert d.release(12.5 * MS) is None   # nothing new is due
    assert d.release(40 * MS) == 4
    assert (d.received, d.released, d.lost, d.max_held) == (4, 4, 0, 4)


def test_zero_delay_releases_at_once():
    d = line(0)
    d.arrive(7, 5.0)
    assert d.release(5.0) == 7


def test_release_all_empties_the_line():
    d = line(1000)
    d.arrive(1, 0.0)
    d.arrive(2, 0.0)
    assert d.release_all() == 2 and d.held == 0
    assert d.release_all() is None


def test_no_loss_means_no_draw_ever_drops():
    d = line(0, 0.0)
    assert all(d.arrive(i, 0.0) for i in range(10_000))


def test_loss_is_random_at_the_configured_rate_and_reproducible():
    runs = []
    for _ in range(2):
        d = line(5, 10.0, seed=42)
        runs.append([d.arrive(i, 0.0) for i in range(20_000)])
    assert runs[0] == runs[1]                      # seeded: the same packets are lost
    lost = runs[0].count(False)
    assert 0.09 < lost / 20_000 < 0.11
    d = line(5, 10.0, seed=43)
    assert [d.arrive(i, 0.0) for i in range(20_000)] != runs[0]


def test_lost_packets_are_not_held():
    d = line(10, 50.0, seed=3)
    kept = [i for i in range(1, 101) if d.arrive(i, 0.0)]
    assert d.held == len(kept) and d.lost == 100 - len(kept)
    assert d.release(1.0) == kept[-1]


@pytest.mark.parametrize("delay, loss", [(-1, 0), (10_001, 0), (0, -0.1), (0, 100), (0, 150)])
def test_line_refuses_what_cannot_be_emulated(delay, loss):
    with pytest.raises(LabError, match="out of range"):
        line(delay, loss)


# --------------------------------------------------------------------------
# Rules and plan
# --------------------------------------------------------------------------

def test_rules_queue_what_arrives_on_each_interface_without_bypass():
    specs = [QueueSpec("ns", "path0", 0, 10), QueueSpec("ns", "path2", 2, 0, 1)]
    assert render_rules(specs) == (
        "*mangle\n"
        ":MPX_IMPAIR - [0:0]\n"
        "-A PREROUTING -j MPX_IMPAIR\n"
        "-A MPX_IMPAIR -i path0 -j NFQUEUE --queue-num 0\n"
        "-A MPX_IMPAIR -i path2 -j NFQUEUE --queue-num 2\n"
        "COMMIT\n")
    assert "bypass" not in render_rules(specs)


def test_only_impaired_paths_get_queues_one_at_each_end():
    plan = plan_lab("golden", [PathSpec(rate_mbit=20, delay_ms=10), PathSpec(),
                               PathSpec(loss_pct=1.5)])
    assert plan_queues(plan) == [
        QueueSpec("mpx-golden-p", "path0", 0, 10.0, 0.0),   # client -> proxy
        QueueSpec("mpx-golden-c", "path0", 0, 10.0, 0.0),   # proxy -> client
        QueueSpec("mpx-golden-p", "path2", 2, 0.0, 1.5),
        QueueSpec("mpx-golden-c", "path2", 2, 0.0, 1.5),
    ]
    assert plan_queues(plan_lab("golden", [PathSpec(rate_mbit=20), PathSpec()])) == []


def test_operator_wifi_path_is_queued_at_the_router():
    plan = plan_lab("golden", [PathSpec(delay_ms=20), PathSpec(delay_ms=5)], "operator")
    assert [(q.ns, q.queue, q.delay_ms) for q in plan_queues(plan)] == [
        ("mpx-golden-p", 0, 20.0), ("mpx-golden-c", 0, 20.0),
        ("mpx-golden-w", 1, 5.0), ("mpx-golden-c", 1, 5.0)]


def test_queue_spec_survives_the_command_line():
    spec = QueueSpec("mpx-a-c", "path1", 1, 12.25, 0.5)
    assert QueueSpec.from_arg(spec.to_arg()) == spec
    for bad in ("mpx-a-c:path1:1:12", "ns:if:x:1:1", "ns:if:1:-5:0"):
        with pytest.raises(LabError):
            QueueSpec.from_arg(bad)


def test_kernel_queue_counters_parse():
    text = ("    0   1591     3 1     0     5     7  6603 1\n"
            "    2   1591     0 1     0     0     0    12 1\n")
    assert parse_queue_counters(text) == {
        0: QueueCounters(queue=0, portid=1591, waiting=3, copy_mode=1, copy_range=0,
                         dropped=5, user_dropped=7, id_sequence=6603),
        2: QueueCounters(2, 1591, 0, 1, 0, 0, 0, 12),
    }
    assert parse_queue_counters("") == {}


# --------------------------------------------------------------------------
# PathSpec and the state file
# --------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [{"delay_ms": -1}, {"delay_ms": 10_000.5},
                                    {"loss_pct": -1}, {"loss_pct": 100}])
def test_path_spec_refuses_absurd_delay_and_loss(kwargs):
    with pytest.raises(LabError, match="out of range"):
        PathSpec(**kwargs)


def test_path_spec_defaults_are_an_unimpaired_path():
    assert PathSpec() == PathSpec(rate_mbit=None, delay_ms=0.0, loss_pct=0.0)
    assert not PathSpec(rate_mbit=20).impaired
    assert PathSpec(delay_ms=0.5).impaired and PathSpec(loss_pct=0.1).impaired
    assert PathSpec(delay_ms=10_000, loss_pct=99.9).impaired


def test_delay_and_loss_round_trip_through_the_state_file():
    plan = plan_lab("rt", [PathSpec(rate_mbit=50, delay_ms=12.5, loss_pct=0.25), PathSpec()])
    again = LabPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan
    assert (again.paths[0].delay_ms, again.paths[0].loss_pct) == (12.5, 0.25)


def test_a_state_file_from_before_delay_and_loss_still_loads():
    data = plan_lab("old", [PathSpec(rate_mbit=20)]).to_dict()
    for path in data["paths"]:
        del path["spec"]["delay_ms"], path["spec"]["loss_pct"]
    assert LabPlan.from_dict(data) == plan_lab("old", [PathSpec(rate_mbit=20)])


def test_a_state_file_with_an_absurd_delay_is_refused():
    data = plan_lab("bad", [PathSpec()]).to_dict()
    data["paths"][0]["spec"]["delay_ms"] = -3
    with pytest.raises(LabError, match="out of range"):
        LabPlan.from_dict(data)


# --------------------------------------------------------------------------
# CLI: --delay and --loss follow --rate
# --------------------------------------------------------------------------

@pytest.fixture
def parser():
    p = argparse.ArgumentParser(prog="mptcp-proxy")
    lab_cmd.register(p.add_subparsers(dest="command"))
    return p


def test_up_takes_delay_and_loss(parser):
    args = parser.parse_args(["lab", "up", "--delay", "10", "20", "--loss", "1"])
    assert (args.delay, args.loss) == ([10.0, 20.0], [1.0])
    assert parser.parse_args(["lab", "up"]).delay is None


@pytest.mark.parametrize("paths, rates, delays, losses, expected", [
    (None, None, [10], None, [(None, 10, 0), (None, 10, 0)]),
    (None, None, [10, 20, 30], None, [(None, 10, 0), (None, 20, 0), (None, 30, 0)]),
    (None, [20], [5, 15], [1], [(20, 5, 1), (20, 15, 1)]),
    (3, None, None, [0.5], [(None, 0, 0.5)] * 3),
    (None, [20, 30], [10], [0, 2], [(20, 10, 0), (30, 10, 2)]),
    (1, None, [0], [0], [(None, 0, 0)]),
])
def test_path_specs_with_delay_and_loss(paths, rates, delays, losses, expected):
    assert lab_cmd.path_specs(paths, rates, delays, losses) == [
        PathSpec(rate_mbit=r, delay_ms=d, loss_pct=x) for r, d, x in expected]


@pytest.mark.parametrize("paths, rates, delays, losses, key", [
    (None, None, [10, 20], [1, 2, 3], "--loss"),
    (None, [20, 30], [1, 2, 3], None, "--delay"),
    (3, None, [10, 20], None, "--delay"),
    (None, None, [-1], None, "--delay"),
    (None, None, [10_001], None, "--delay"),
    (None, None, None, [100], "--loss"),
    (None, None, None, [-0.5], "--loss"),
])
def test_path_specs_delay_and_loss_errors_name_the_option(paths, rates, delays, losses, key):
    with pytest.raises(ConfigError) as info:
        lab_cmd.path_specs(paths, rates, delays, losses)
    assert info.value.key == key


def test_facts_show_delay_and_loss_per_path():
    plan = plan_lab("facts", [PathSpec(rate_mbit=20, delay_ms=10),
                              PathSpec(delay_ms=2.5, loss_pct=1), PathSpec()])
    lab = Lab(plan, owner_pid=None, persistent=True, owned=False)  # not built: pure
    lab.impair_pid = 4242
    text = lab_cmd.format_facts(lab)
    lines = text.splitlines()
    assert lines[2].endswith("20 Mbit/s, 10 ms delay each way")
    assert lines[3].endswith("unshaped, 2.5 ms delay each way, 1% loss each way")
    assert lines[4].endswith("unshaped")
    assert "pid 4242" in text and "mpx-facts.impair.log" in text
    assert lab.facts()["paths"][1]["spec"] == {"rate_mbit": None, "delay_ms": 2.5,
                                                "loss_pct": 1}
