"""The benchmark harness's own logic: the rate search and the start-up log reading."""

import argparse
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import common  # noqa: E402
import rate  # noqa: E402
import run  # noqa: E402


def search_args(**overrides) -> argparse.Namespace:
    values = {"start": 1000, "ceiling": 32000, "precision": 250, "retries": 0} | overrides
    return argparse.Namespace(**values)


def fake_probe(limit: int, flaky: set[int] = frozenset(), written: float = 1.0):
    """A subject that sustains every rate up to ``limit``; a rate in ``flaky`` fails its
    first probe only; the writers reach ``written`` of the offered rate."""
    seen: list[int] = []

    def probe(name, offered, args):
        passed = offered <= limit and not (offered in flaky and offered not in seen)
        seen.append(offered)
        return {"offered_per_s": offered, "written_per_s": int(offered * written),
                "passed": passed}
    return probe, seen


@pytest.mark.parametrize("limit", [700, 1000, 5300, 9999, 17000])
def test_search_brackets_the_limit_within_the_precision(monkeypatch, limit):
    probe, _ = fake_probe(limit)
    monkeypatch.setattr(rate, "probe", probe)
    found = rate.search("bare", search_args())
    low, high = found["sustained_per_s"], found["first_failing_per_s"]
    assert low <= limit < high
    assert high - low <= 500
    assert not found["writer_bound"]


def test_search_stops_at_the_ceiling_and_says_the_writers_bound_it(monkeypatch):
    probe, _ = fake_probe(10**9)
    monkeypatch.setattr(rate, "probe", probe)
    found = rate.search("bare", search_args(ceiling=8000))
    assert found["sustained_per_s"] == 8000 and found["first_failing_per_s"] is None
    assert found["writer_bound"]


def test_a_failing_probe_is_repeated_before_its_rate_fails(monkeypatch):
    probe, seen = fake_probe(5300, flaky={4000})
    monkeypatch.setattr(rate, "probe", probe)
    assert rate.search("bare", search_args(retries=1))["sustained_per_s"] >= 4000
    assert seen.count(4000) == 2
    probe, _ = fake_probe(5300, flaky={4000})
    monkeypatch.setattr(rate, "probe", probe)
    assert rate.search("bare", search_args(retries=0))["sustained_per_s"] < 4000


def test_writers_short_of_the_first_failing_rate_bound_the_result(monkeypatch):
    probe, _ = fake_probe(5300, written=0.9)
    monkeypatch.setattr(rate, "probe", probe)
    assert rate.search("bare", search_args())["writer_bound"]


def test_log_timeline_reads_json_lines_and_the_longest_silence(tmp_path):
    log = tmp_path / "agent.log"
    lines = [{"time": "2026-12-07T10:34:48.413Z", "msg": "agent started"},
             {"time": "2026-12-07T10:34:48.447Z", "msg": "cluster2 is ready"},
             {"time": "2026-12-07T10:34:55.907Z", "msg": "eBPF programs loaded"}]
    log.write_text("not json\n" + "".join(json.dumps(line) + "\n" for line in lines))
    timeline = common.log_timeline(log)
    assert [msg for _, msg in timeline] == [line["msg"] for line in lines]
    assert timeline[2][0] - timeline[0][0] == pytest.approx(7.494)
    assert "7.46 s" in run.longest_wait([list(entry) for entry in timeline])
    assert '"eBPF programs loaded"' in run.longest_wait([list(entry) for entry in timeline])
