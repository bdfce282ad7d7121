"""Record what an EventHistogrammer holds, with the metadata of a MetadataManager, as a scan.

This is how histogram snapshots reach files outside a step scan (the `histo_count` macro
and scripts): one ScanStart with every histogram declared and the metadata snapshot, one
Histogram record each (counts, edges, counters, spec, acquisition time), one ScanEnd.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from livehist.recorders.base import Recorder, open_sink
from livehist.recorders.records import Histogram, HistogramDecl, ScanEnd, ScanStart

COUNTERS = {"events": "EventCount", "messages": "MessageCount", "bad_messages": "BadMessageCount",
            "dropped_messages": "DroppedMessageCount", "pulses": "PulseCount"}  # fmt: skip


def histogram_records(histogrammer) -> tuple[list[HistogramDecl], list[Histogram]]:
    """Declarations and snapshots of every histogram of a device (a tango.DeviceProxy)."""
    specs = json.loads(histogrammer.HistogramConfig)
    names = [*COUNTERS.values(), "ElapsedTime"]
    values = {a.name: a.value for a in histogrammer.read_attributes(names)}
    counters = {k: int(values[v]) for k, v in COUNTERS.items()}
    decls, records = [], []
    for spec in specs:
        name = spec["name"]
        counts = np.asarray(histogrammer.read_attribute(name).value)
        edges = None
        unit = (spec.get("tof") or {}).get("unit", "ns")
        if spec.get("tof") is not None:
            edges = np.asarray(histogrammer.read_attribute(f"{name}_edges").value)
        decls.append(HistogramDecl(name, counts.shape, tof_bins=0 if edges is None else edges.size - 1,
                                   unit=unit, spec=spec))  # fmt: skip
        records.append(Histogram(name, counts, edges, unit, counters, spec, float(values["ElapsedTime"])))
    return decls, records


def provenance(histogrammer) -> dict:
    """Where the counts come from, for the file: a HistogramSum's members and, per member and
    partition, the Kafka offsets counted; an EventHistogrammer's own Kafka offsets."""
    attrs = {a.lower() for a in histogrammer.get_attribute_list()}
    for name in ("Provenance", "KafkaOffsets"):
        if name.lower() in attrs:
            value = json.loads(histogrammer.read_attribute(name).value or "{}")
            if name == "Provenance":
                return {"Members": list(value.get("members", {})), "provenance": value}
            return {"provenance": value} if value.get("offsets") else {}
    return {}


def metadata_snapshot(metadata_device) -> dict:
    return json.loads(metadata_device.GetMetadata()) if metadata_device is not None else {}


BLACK_BOX_RE = re.compile(r"^(?P<time>.*?) : Operation command_inout\S* \(cmd = (?P<cmd>\w+)\)"
                          r".*?requested from (?P<client>.*)$")  # fmt: skip


@dataclass
class CountOutcome:
    """How a timed count ended: status for the record, and a reason saying what happened."""

    status: str  # ok | interrupted
    counted: float  # seconds actually counted
    reason: str = ""


def count_outcome(seconds: float, elapsed: float, most_elapsed: float, black_box: list[str],
                  running_for: float = 0.0) -> CountOutcome:  # fmt: skip
    """Judge a `histo_count SECONDS`: `elapsed` now, `most_elapsed` the most seen while it ran,
    `black_box` the device's last commands (newest first, `DeviceProxy.black_box`),
    `running_for` how long the caller saw it RUNNING (ElapsedTime is published in steps)."""
    if elapsed >= seconds * 0.999 - 1e-3:
        return CountOutcome("ok", elapsed)
    culprit = None
    for line in black_box:  # newest first: the first Stop/Init/Reset after our Start tells
        m = BLACK_BOX_RE.match(line)
        if not m:
            continue
        if m["cmd"] == "Start":
            break
        if m["cmd"] in ("Stop", "Init", "Reset", "Configure"):
            culprit = m
            break
    if elapsed + 1e-3 < max(most_elapsed, running_for):  # counts went back: re-initialised or reset
        by = (f"{culprit['cmd']} from {culprit['client']} at {culprit['time']}" if culprit
              else "a restart or Init of the device")  # fmt: skip
        counted = max(most_elapsed, min(running_for, seconds))
        return CountOutcome("interrupted", counted,
                            f"interrupted by {by} after {counted:.2f} s of {seconds:g} s; the device's "
                            f"histograms were cleared then, so this record holds only the {elapsed:.2f} s counted "
                            "after it")  # fmt: skip
    by = f"{culprit['cmd']} from {culprit['client']} at {culprit['time']}" if culprit else "an unknown client"
    return CountOutcome("interrupted", elapsed, f"interrupted by {by} after {elapsed:.2f} s of {seconds:g} s")


def reconfigured(before: str, after: str) -> list[str]:
    """Histograms of `after` (HistogramConfig JSON at a count's end) that did not count since
    `before` (at its start): new ones, and those a Configure gave another binning (their counts
    started again from zero; a histogram whose binning was kept kept its counts)."""
    from livehist.engine.histograms import same_binning
    from livehist.engine.spec import parse_one

    try:
        old = {s["name"]: s for s in json.loads(before)}
        new = json.loads(after)
    except (ValueError, TypeError, KeyError):
        return []
    out = []
    for spec in new:
        name = spec.get("name")
        was = old.get(name)
        if was == spec:
            continue
        try:
            if was is not None and same_binning(parse_one(was, name), parse_one(spec, name)):
                continue
        except ValueError:
            pass
        out.append(name)
    return out


def record_histograms(
    histogrammer,
    targets: Iterable[str | os.PathLike],
    title: str,
    scan_number: int,
    metadata_device=None,
    status: str = "ok",
    reason: str = "",
    metadata: dict | None = None,
) -> Recorder:
    """Record the histograms as one scan; `metadata` (already fetched) or else the snapshot of
    `metadata_device` goes into every file."""
    decls, records = histogram_records(histogrammer)
    config = {"device": histogrammer.dev_name(), "EventSource": histogrammer.EventSourceURI,
              "Histograms": [d.spec for d in decls]}  # fmt: skip
    config.update(provenance(histogrammer))
    if metadata is None:
        metadata = metadata_snapshot(metadata_device)
    recorder = Recorder([open_sink(t) for t in targets])
    recorder.start(ScanStart(title, scan_number, [], metadata=metadata,
                             histograms=decls, config=config))  # fmt: skip
    for record in records:
        recorder.histogram(record)
    recorder.end(ScanEnd(status, reason=reason))
    return recorder
