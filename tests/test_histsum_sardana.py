"""mg_livehist on a HistogramSum: the default configuration with a second histogrammer and a
sum over both, pointed at the sum by the one `histogrammer` line of the Sardana section.
Real Pool, MacroServer and Door; the livehist controllers are unchanged."""

from __future__ import annotations

import json
import os
import signal
import time

import numpy as np
import pytest
import tango
from livehist.tangodb import DEFAULT_CONFIG

from livehist.site import control
from livehist.site.door import Door
from livehist.site.process import Managed


def _config() -> dict:
    cfg = json.loads(DEFAULT_CONFIG.read_text())
    servers = cfg["servers"]
    first = servers["EventHistogrammer"]["livehist"]["EventHistogrammer"]["livehist/histogrammer/1"]
    second = json.loads(json.dumps(first))
    second["properties"]["EventSource"] = ["sim://?rate=1e6&seed=2"]
    servers["EventHistogrammer"]["bank2"] = {"EventHistogrammer": {"livehist/histogrammer/2": second}}
    members = ["livehist/histogrammer/1", "livehist/histogrammer/2"]
    servers["HistogramSum"] = {
        "livehist": {"HistogramSum": {"livehist/sum/1": {"properties": {"Members": members}}}}
    }
    cfg["livehist"]["sardana"]["histogrammer"] = "livehist/sum/1"  # the one line
    return cfg


@pytest.fixture(scope="module")
def site(sites) -> control.Site:
    return sites.up(_config(), timeout=180)


def proxy(site, name: str) -> tango.DeviceProxy:
    p = tango.DeviceProxy(site.url(name))
    p.set_timeout_millis(10_000)
    return p


def count(site, seconds: float) -> dict[str, float]:
    door = Door(site.url("door/livehist/1"), say=None)
    try:
        door.run(["ct", str(seconds)], timeout=120)
    finally:
        door.close()
    return {c: proxy(site, c).Value for c in ("lh_timer", "lh_events")}


def test_mg_livehist_counts_on_the_sum(site):
    s = proxy(site, "livehist/sum/1")
    h1, h2 = proxy(site, "livehist/histogrammer/1"), proxy(site, "livehist/histogrammer/2")
    assert proxy(site, "controller/livehistcountertimercontroller/lh_ctctrl").get_property("Histogrammer")[
        "Histogrammer"
    ] == ["livehist/sum/1"]
    values = count(site, 1.0)
    assert s.state() == tango.DevState.ON, s.status()
    assert h1.EventCount > 0 and h2.EventCount > 0  # both members counted
    assert values["lh_events"] == s.EventCount == h1.EventCount + h2.EventCount
    assert 1.0 <= values["lh_timer"] < 3.0
    assert np.array_equal(s.tof, h1.tof + h2.tof)
    lh_tof = proxy(site, "lh_tof").Value
    assert np.array_equal(lh_tof, s.tof)


def test_a_count_goes_on_with_a_member_down(site):
    s = proxy(site, "livehist/sum/1")
    h1 = proxy(site, "livehist/histogrammer/1")
    pid = Managed(site.state_dir, "EventHistogrammer-bank2").pid()
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while s.state() != tango.DevState.ALARM:
        assert time.monotonic() < deadline, s.status()
        time.sleep(0.1)
    assert "livehist/histogrammer/2" in s.status() and not s.Acquiring
    values = count(site, 0.5)  # idle ALARM is not mistaken for a running acquisition
    assert h1.EventCount > 0 and values["lh_events"] == s.EventCount == h1.EventCount  # the Reset left h2 out
    assert s.state() == tango.DevState.ALARM  # still: the member is still down
    control.up(site.tango_host, site.config_path, site.state_dir, say=lambda s: None)
    deadline = time.monotonic() + 30
    while s.state() != tango.DevState.ON:
        assert time.monotonic() < deadline, s.status()
        time.sleep(0.1)
    assert proxy(site, "livehist/histogrammer/2").EventCount == 0  # fresh; nothing stale in the sum
    assert s.EventCount == h1.EventCount
