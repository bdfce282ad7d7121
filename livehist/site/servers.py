"""Which device-server executables livehist starts, and the classes each one serves."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from livehist.errors import LivehistError

SARDANA_CLASSES = frozenset(
    {
        "Pool", "MacroServer", "Door", "Controller", "Motor", "PseudoMotor", "CTExpChannel",
        "ZeroDExpChannel", "OneDExpChannel", "TwoDExpChannel", "PseudoCounter",
        "MeasurementGroup", "IORegister", "TriggerGate", "MotorGroup", "Instrument",
    }
)  # fmt: skip

# server executable -> (classes it serves, python module to run it, or None for a script)
KNOWN: dict[str, tuple[frozenset[str], str | None]] = {
    "Sardana": (SARDANA_CLASSES, None),
    "EventHistogrammer": (frozenset({"EventHistogrammer"}), "livehist.devices.histogrammer"),
    "MetadataManager": (frozenset({"MetadataManager"}), "livehist.devices.metadata"),
    "HistogramSum": (frozenset({"HistogramSum"}), "livehist.devices.histsum"),
}


def _find_script(name: str) -> str | None:
    here = str(Path(sys.executable).parent)
    return shutil.which(name, path=os.pathsep.join([here, os.environ.get("PATH", "")]))


def check_servers(servers: dict, path: Path) -> None:
    """Refuse servers livehist cannot start and classes a known server does not serve."""
    for server, instances in servers.items():
        executable = server.split("/")[0]
        if executable in KNOWN:
            classes = KNOWN[executable][0]
            for instance_classes in instances.values():
                for cls in instance_classes:
                    if cls not in classes:
                        raise LivehistError(
                            f"config {path}: server {executable} has no device class {cls!r} "
                            f"(it serves {', '.join(sorted(classes))}); fix the class name"
                        )
        elif _find_script(executable) is None:
            raise LivehistError(
                f"config {path}: unknown server {executable!r}: it is not one of "
                f"{', '.join(KNOWN)} and no executable of that name is on PATH; "
                "install it or remove it from the config"
            )


def argv(server: str) -> list[str]:
    """Command line that starts 'Executable/instance'."""
    executable, instance = server.split("/", 1)
    module = KNOWN.get(executable, (None, None))[1]
    if module:
        return [sys.executable, "-m", module, instance]
    script = _find_script(executable)
    if script is None:
        raise LivehistError(f"cannot find the {executable} executable on PATH; install it")
    with open(script, "rb") as f:
        python_script = b"python" in f.readline()
    # run Python scripts through this interpreter so /proc cmdline equals the argv we record
    return [sys.executable, script, instance] if python_script else [script, instance]
