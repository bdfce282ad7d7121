"""`livehist demo`: up, a live acquisition of simulated events, a Sardana scan; prints the files."""

from __future__ import annotations

from pathlib import Path

from livehist.control import up
from livehist.door import Door, set_environment
from livehist.errors import LivehistError

HISTOGRAMMER = "livehist/histogrammer/1"


def live_acquisition(url: str, out: Path, seconds: float = 5.0, say=print) -> Path:
    """Acquire for `seconds` (a preset), show rates and counts as they come, then a PNG."""
    import time

    import tango

    from livehist import plots

    p = tango.DeviceProxy(url)
    p.set_timeout_millis(10_000)
    if p.state() in (tango.DevState.RUNNING, tango.DevState.ALARM):
        p.Stop()
    if p.state() == tango.DevState.FAULT:
        raise LivehistError(f"{HISTOGRAMMER} is in FAULT: {p.status()}")
    say(f"live acquisition: {p.EventSourceURI} for {seconds:g} s on {HISTOGRAMMER}")
    p.Reset()
    p.PresetTime = seconds
    p.Start()
    deadline = time.monotonic() + seconds + 20
    while p.state() in (tango.DevState.RUNNING, tango.DevState.ALARM):
        if time.monotonic() > deadline:
            p.Stop()
            raise LivehistError(f"{HISTOGRAMMER} did not end its {seconds} s preset; status: {p.status()}")
        time.sleep(1.0)
        counts = p.read_attributes(["EventRate", "EventCount", "ElapsedTime", "DroppedMessageCount"])
        rate, events, elapsed, dropped = (a.value for a in counts)
        say(
            f"  {elapsed:5.1f} s  {rate:9.3g} events/s  {events:>12,} events  {dropped} dropped  [{p.state()}]"
        )
    say(f"  {p.status()}")
    path = plots.plot(plots.from_device(p), out / "live_histograms.png",
                      title=f"{HISTOGRAMMER}: {p.EventCount:,} events in {p.ElapsedTime:.1f} s")  # fmt: skip
    say(f"picture of the histograms: {path}")
    return path


def demo(
    tango_host: str | None = None,
    config: Path | None = None,
    state_dir: Path | None = None,
    out: Path | None = None,
    say=print,
) -> list[Path]:
    import tango

    site = up(tango_host, config, state_dir, say=say)
    out = Path(out) if out else site.state_dir / "demo"
    out.mkdir(parents=True, exist_ok=True)
    host, port = site.host_port
    live_acquisition(site.url(HISTOGRAMMER), out, say=say)
    door = Door(site.url("door/livehist/1"), say=lambda line: say(f"  | {line}"))
    try:
        if not tango.Database(host, port).get_device_alias_list("mot01").value_string:
            say("creating Sardana's demo elements (sar_demo, once)")
            door.run(["sar_demo"])
        set_environment(
            site.url("macroserver/livehist/1"),
            {"ScanDir": str(out), "ScanFile": ["demo_scan.h5", "demo_scan.spec"],
             "ActiveMntGrp": "mntgrp01"},
        )  # fmt: skip
        say("Sardana step scan: ascan mot01 0 10 10 0.1")
        door.run(["ascan", "mot01", "0", "10", "10", "0.1"])
    finally:
        door.close()
    files = sorted(p for p in out.iterdir() if p.is_file())
    say("files written:")
    for p in files:
        say(f"  {p}  ({p.stat().st_size} bytes)")
    return files
