"""`livehist demo`: up, then a short Sardana scan; prints where the files are."""

from __future__ import annotations

from pathlib import Path

from livehist.control import up
from livehist.door import Door, set_environment


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
