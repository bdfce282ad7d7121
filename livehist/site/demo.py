"""`livehist demo`: everything once, on simulated events, through the same paths users take.

up -> sar_demo (once) -> meta_set ... -> dataset_start -> live acquisition + PNG
   -> ascan with mg_livehist (NeXus + SPEC + JSON) -> histo_count -> dataset_end
   -> the files are read back and checked
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from livehist.errors import LivehistError
from livehist.site.control import up
from livehist.site.door import Door, set_environment

HISTOGRAMMER = "livehist/histogrammer/1"
METADATA = "livehist/metadata/1"
SCAN_FILES = ["demo.nxs", "demo.spec", "demo.jsonl"]


def live_acquisition(url: str, out: Path, seconds: float = 5.0, say=print) -> Path:
    """Acquire for `seconds` (a preset), show rates and counts as they come, then a PNG."""
    import tango

    from livehist.views import plots

    p = tango.DeviceProxy(url)
    p.set_timeout_millis(10_000)
    if p.state() in (tango.DevState.RUNNING, tango.DevState.ALARM):
        p.Stop()
    if p.state() == tango.DevState.FAULT:
        raise LivehistError(f"{HISTOGRAMMER} is in FAULT: {p.status()}")
    say(f"live acquisition: {p.EventSourceURI} for {seconds:g} s on {HISTOGRAMMER}")
    p.Reset()
    p.write_attributes([("PresetEvents", 0), ("PresetTime", seconds)])
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


def check_files(folder: Path, say=print) -> list[str]:
    """Read every demo file back with its own reader; a line per file."""
    import h5py
    from PyMca5.PyMcaIO import specfile

    lines = []
    with h5py.File(folder / "demo.nxs") as f:
        scans = [e for e in f.values() if "data" in e]
        tof = scans[-1]["data/lh_tof"]
        counts = [e for e in f.values() if "tof" in e and e["tof"].attrs.get("NX_class") == "NXdata"]
        lines.append(f"demo.nxs: {len(f)} entries; scan of {tof.shape[0]} points x {tof.shape[1]} TOF bins, "
                     f"{len(counts)} histogram snapshot(s), sample {scans[-1]['sample/name'][()].decode()}")  # fmt: skip
    sf = specfile.Specfile(str(folder / "demo.spec"))
    lines.append(
        f"demo.spec: {sf.scanno()} scans (PyMca5); first: {sf[0].lines()} points, {sf[0].nbmca()} spectra"
    )
    records = [json.loads(line) for line in (folder / "demo.jsonl").read_text().splitlines()]
    lines.append(f"demo.jsonl: {len(records)} records, every line valid JSON")
    for line in lines:
        say(f"  ok  {line}")
    return lines


DEMO_DEVICES = (HISTOGRAMMER, METADATA, "macroserver/livehist/1", "door/livehist/1")


def _check_demo_devices(config: Path | None) -> None:
    """Before `up`: a --config without the devices the demo drives started its servers, then ended
    in a DevFailed traceback at the Door."""
    from livehist.tangodb import DEFAULT_CONFIG
    from livehist.tangodb import config as dsconfig

    path = Path(config).absolute() if config else DEFAULT_CONFIG
    if not path.is_file():  # a pipe is read once, by `up`: its error then is the one to show
        return
    names = {dev.lower() for _, _, dev in dsconfig.devices(dsconfig.load(path, Path.cwd()))}
    missing = [dev for dev in DEMO_DEVICES if dev not in names]
    if missing:
        raise LivehistError(
            f"the demo drives {', '.join(DEMO_DEVICES)} (the default configuration), and config {path} has no "
            f"{', '.join(missing)}; run `livehist demo` without --config (with its own --state-dir and "
            "--tango-host), or add them to the config"
        )


def demo(
    tango_host: str | None = None,
    config: Path | None = None,
    state_dir: Path | None = None,
    out: Path | None = None,
    say=print,
    web: bool = False,
) -> list[Path]:
    import tango

    if out is not None:
        try:
            str(Path(out).resolve()).encode("latin-1")
        except UnicodeEncodeError:
            raise LivehistError(
                f"--out {str(out)!r}: Tango passes text to Sardana as Latin-1, which cannot hold this "
                "path; choose a folder whose path is Latin-1 (letters such as é, ü are fine)"
            ) from None
        try:  # before `up`: a command that fails must have started nothing
            Path(out).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LivehistError(
                f"--out {str(out)!r} cannot be created ({exc.strerror}); give a folder you can write to"
            ) from None
        if not os.access(out, os.W_OK):
            raise LivehistError(f"--out {str(out)!r} is not writable; give a folder you can write to")
    _check_demo_devices(config)
    site = up(tango_host, config, state_dir, say=say)
    if web:  # started first, so that the acquisition below can be watched live
        from livehist.views.web import start_background

        say(f"web view running (read-only; `livehist down` stops it): open {start_background(site)} to watch")
    host, port = site.host_port
    door = Door(site.url("door/livehist/1"), say=lambda line: say(f"  | {line}"))
    try:
        if not tango.Database(host, port).get_device_alias_list("mot01").value_string:
            say("creating Sardana's demo motors and counters (sar_demo, once)")
            door.run(["sar_demo"], timeout=180)
        m = tango.DeviceProxy(site.url(METADATA))
        if m.state() == tango.DevState.RUNNING:
            name = (json.loads(m.Metadata).get("dataset") or {}).get("name", "")
            if not str(name).startswith("demo_"):  # a user's dataset: never ended by the demo
                raise LivehistError(
                    f"dataset {name!r} is open on {METADATA}; the demo records datasets of its own: end it "
                    "first (spock> dataset_end, or EndDataset on the device) or run the demo on another site"
                )
            m.EndDataset()  # a demo interrupted earlier
        steps = [
            ["meta_set", "proposal", "20260001"],
            ["meta_set", "title", "livehist demo: simulated powder diffraction"],
            ["meta_set", "sample.name", "Si powder (simulated)"],
            ["meta_set", "users", "Demo User (PI)"],
        ]
        if out is not None:
            Path(out).mkdir(parents=True, exist_ok=True)
            steps.append(["meta_set", "data_root", str(Path(out).resolve())])
        steps.append(["dataset_start", time.strftime("demo_%Y%m%d_%H%M%S")])
        for argv in steps:
            say("spock> " + " ".join(f"'{a}'" if " " in a else a for a in argv))
            door.run(argv)
        folder = Path(json.loads(m.Metadata)["dataset"]["folder"])
        set_environment(site.url("macroserver/livehist/1"),
                        {"ScanFile": SCAN_FILES, "ActiveMntGrp": "mg_livehist",
                         "ScanRecorder": ["LivehistRecorder"] * len(SCAN_FILES)})  # fmt: skip
        live_acquisition(site.url(HISTOGRAMMER), folder, say=say)
        for argv in (["ascan", "mot01", "0", "10", "10", "0.1"], ["histo_count", "2"], ["dataset_end"]):
            say("spock> " + " ".join(argv))
            door.run(argv, timeout=300)
    finally:
        door.close()
    say(f"files written in {folder}:")
    files = sorted(p for p in folder.iterdir() if p.is_file())
    for p in files:
        say(f"  {p}  ({p.stat().st_size:,} bytes)")
    say("checking them with their readers:")
    check_files(folder, say)
    if web:
        say("open http://127.0.0.1:8050/ to watch (the web view stays running; `livehist down` stops it)")
    else:
        say("open http://127.0.0.1:8050/ to watch: run `livehist web` first (or `livehist demo --web`)")
    return files
