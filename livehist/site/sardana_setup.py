"""Create livehist's Sardana elements and default environment (run by `livehist up`).

The config's `livehist.sardana` section (beside dsconfig's `servers`) names Pool
controllers with their channels, measurement groups, and MacroServer environment
defaults. Its `histogrammer` key names the device the livehist controllers read (unless a
controller sets its own `Histogrammer` property) and the macros' `LivehistHistogrammer`
default: pointing it at a HistogramSum makes `mg_livehist` count on the sum. Pool elements are made with the Pool's own commands (as `defctrl`, `defelem`
and `defmeas` do), only when missing; environment variables are set only when unset, so
`up` never undoes what users changed.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable

from livehist.errors import LivehistError


def _names(values) -> set[str]:
    return {json.loads(v)["name"] for v in (values or ())}


def environment(ms) -> dict:
    kind, data = ms.read_attribute("Environment").value
    if kind != "pickle":
        raise LivehistError(f"MacroServer Environment is {kind!r}, expected pickle")
    env = pickle.loads(data)
    return env.get("new", env)


def ensure(site, say: Callable[[str], None]) -> list[str]:
    """Create what is missing; returns a line per change."""
    import tango

    cfg = (site.config.get("livehist") or {}).get("sardana")
    if not cfg:
        return []
    done: list[str] = []
    pool = tango.DeviceProxy(site.url(cfg["pool"]))
    pool.set_timeout_millis(30_000)
    ctrls = _names(pool.ControllerList)
    channels = _names(pool.ExpChannelList)
    histogrammer = cfg.get("histogrammer")
    for c in cfg.get("controllers", []):
        if c["name"] not in ctrls:
            properties = dict(c.get("properties", {}))
            if histogrammer and c.get("library") == "LivehistCtrl.py":
                properties.setdefault("Histogrammer", histogrammer)
            props = [str(x) for kv in properties.items() for x in kv]
            try:
                pool.CreateController([c["type"], c["library"], c["class"], c["name"], *props])
            except tango.DevFailed as exc:
                raise LivehistError(
                    f"Pool {cfg['pool']} cannot create controller {c['name']} ({c['class']} from "
                    f"{c['library']}): {exc.args[0].desc.strip()}; check PoolPath"
                ) from None
            done.append(f"controller {c['name']} ({c['class']})")
        for axis, name in c.get("elements", {}).items():
            if name not in channels:
                try:
                    pool.CreateElement([c["type"], c["name"], str(axis), name])
                except tango.DevFailed as exc:
                    raise LivehistError(
                        f"Pool {cfg['pool']} cannot create channel {name} ({c['name']} axis {axis}): "
                        f"{exc.args[0].desc.strip()}; fix livehist/sardana/controllers in the config "
                        "(the servers keep running; `livehist up` again after the fix)"
                    ) from None
                channels.add(name)
                done.append(f"channel {name} ({c['name']} axis {axis})")
    groups = _names(pool.MeasurementGroupList)
    for name, members in cfg.get("measurement_groups", {}).items():
        if name in groups:
            continue
        known = _names(pool.ExpChannelList) | _names(pool.MotorList)
        # the Pool accepted an unknown member without a word and created nothing: every `up`
        # "created" the group again, and scans failed later on an ActiveMntGrp that is not there
        unknown = [m for m in members if m not in known and "/" not in m]  # "/": a Tango attribute
        if unknown:
            raise LivehistError(
                f"measurement group {name}: Pool {cfg['pool']} has no channel {', '.join(map(repr, unknown))} "
                f"(it has {', '.join(sorted(known)) or 'none'}); fix livehist/sardana/measurement_groups in "
                "the config (the servers keep running; `livehist up` again after the fix)"
            )
        try:
            pool.CreateMeasurementGroup([name, *members])
        except tango.DevFailed as exc:
            raise LivehistError(
                f"Pool {cfg['pool']} cannot create measurement group {name}: {exc.args[0].desc.strip()}"
            ) from None
        if name not in _names(pool.MeasurementGroupList):
            raise LivehistError(
                f"Pool {cfg['pool']} did not create measurement group {name} ({', '.join(members)}); "
                f"read the Sardana log in {site.state_dir / 'logs'}"
            )
        done.append(f"measurement group {name}: {', '.join(members)}")
    defaults = dict(cfg.get("environment", {}))
    if histogrammer:
        defaults.setdefault("LivehistHistogrammer", histogrammer)
    if defaults:
        ms = tango.DeviceProxy(site.url(cfg["macroserver"]))
        current = environment(ms)
        missing = {k: v for k, v in defaults.items() if k not in current}
        if missing:
            ms.write_attribute("Environment", ("pickle", pickle.dumps({"new": missing}, protocol=0)))
            done.append("environment: " + ", ".join(sorted(missing)))
    for line in done:
        say(f"Sardana: created {line}")
    return done
