"""A scan folder that fills up while histo_count records: a site of its own, whose Sardana
server gets a file size limit (EFBIG stands for a full disk, as in test_recorders); the limit
cannot be raised again without privileges, so no other test uses this site."""

from __future__ import annotations

import json
import subprocess

import pytest
import tango

from livehist.site import control
from tests.test_sardana import Session


@pytest.fixture(scope="module")
def site(sites) -> control.Site:
    return sites.up()


def test_a_file_that_fills_up_while_a_count_is_recorded_is_said_to_hold_part_of_it(site, tmp_path):
    """With the disk full after the scan's start line, the JSON lines file held the start of the
    count and no end, yet histo_count said 'failed, nothing of this scan is in it'."""
    spock = Session(site)
    try:
        spock.env(ScanDir=str(tmp_path), ScanFile=["f.spec", "f.jsonl"], SharedMemory="")
        spock.run("histo_count", "0.2")
        jsonl = tmp_path / "f.jsonl"
        limit = jsonl.stat().st_size + 8000  # room for the next start line, not for its histograms
        pid = json.loads((site.state_dir / "run" / "Sardana-livehist.json").read_text())["pid"]
        subprocess.run(["prlimit", f"--pid={pid}", f"--fsize={limit}"], check=True)
        spock.run("histo_count", "0.2")
        said = [line for line in spock.lines if "JsonLinesSink" in line]
        records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    finally:
        spock.close()
    assert records[-1]["record"] == "start" and records[-1]["scan_number"] == 2  # its start, no end
    assert len(said) == 1 and "nothing of this scan is in it" not in said[0], said
    assert "holds this scan only in part" in said[0] and "File too large" in said[0], said
    m = tango.DeviceProxy(site.url("macroserver/livehist/1"))
    assert m.state() != tango.DevState.FAULT
