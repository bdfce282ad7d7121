"""The sum after a count ends holds every member's final data, and says the count ended only then.

Members are real `Histogrammer` components on simulated sources, read the way the Tango
device serves them (counters and histograms from `last`, State live, UpdateCounter per
publish), so a Stop changes a member's data before its UpdateCounter follows, as it does
in the device. The sum's own threads are stopped so that each read and publish is ours."""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import pytest

from livehist.components.histogrammer import Histogrammer
from livehist.components.histsum import SUMMED, HistogramSum

TOF = {"name": "tof", "kind": "tof", "tof": {"start": 0, "stop": 71_400_000, "bins": 100}}
FIELDS = {**SUMMED, "EventRate": "event_rate", "ElapsedTime": "elapsed"}


class LocalMember:
    """A MemberClient over an in-process Histogrammer, attribute by attribute like the device."""

    def __init__(self, h: Histogrammer) -> None:
        self.h = h

    def _one(self, name: str) -> Any:
        h = self.h
        if name == "UpdateCounter":
            return h.update_counter
        if name == "State":
            return h.state
        if name == "Status":
            return h.status
        if name == "HistogramConfig":
            return h.config_json()
        if name in FIELDS:
            return getattr(h.last, FIELDS[name])
        if name == "PresetTime":
            return h.engine.preset_time
        if name == "PresetEvents":
            return h.engine.preset_events
        if name == "PresetPulses":
            return h.engine.preset_pulses
        return h.last.counts[name]

    def read(self, names: list[str]) -> dict[str, Any]:
        return {n: self._one(n) for n in names if n != "KafkaOffsets"}

    def command(self, name: str, arg: Any = None) -> None:
        {"Start": self.h.start, "Stop": self.h.stop, "Reset": self.h.reset}[name]()

    def write(self, values: dict[str, Any]) -> None:
        self.h.set_presets(
            time_s=values.get("PresetTime"),
            events=values.get("PresetEvents"),
            pulses=values.get("PresetPulses"),
        )

    def close(self) -> None:
        pass


@pytest.fixture
def members():
    hs = {
        f"test/member/{i}": Histogrammer(f"sim://?rate=1e6&seed={i}", json.dumps([TOF]), publish_period=0.2)
        for i in (1, 2)
    }
    yield hs
    for h in hs.values():
        h.close()


def test_a_member_stop_reaches_the_sum_before_it_says_idle(members):
    s = HistogramSum(list(members), lambda name, on_event: LocalMember(members[name]), publish_period=0.2)
    s.close()  # its threads end: every read and publish below is the test's own
    by_name = {m.name: m for m in s.members}
    try:
        for cycle in range(5):
            s.start()
            assert s.running
            time.sleep(0.15 + 0.05 * cycle)
            s.refresh()  # a sum taken mid-count
            before = s.last.events
            for name, h in members.items():
                h.stop()  # the member ends by itself (as at a preset): data first, then state
                s._read(by_name[name])  # before its UpdateCounter moves (its publish thread is late)
                last = h.last
                assert by_name[name].values["EventCount"] == last.events
                assert np.array_equal(by_name[name].values["tof"], last.counts["tof"]), f"cycle {cycle}"
            # the members ended, the sum has not published yet: it still says acquiring, with the old sum
            assert s.running and s.last.events == before
            s.publish()
            assert not s.running
            total = sum(h.last.events for h in members.values())
            assert total > 0 and s.last.events == total
            assert np.array_equal(s.last.counts["tof"], sum(h.last.counts["tof"] for h in members.values()))
            s.reset()
    finally:
        s.close()
