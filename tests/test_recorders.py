"""Recorder framework: every sink through its external reader, SWMR across processes, faults."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import zmq
from livehist.recorders.base import DataPolicy, Recorder, RecorderError, open_sink, sink_classes
from livehist.recorders.records import (
    Column,
    Histogram,
    HistogramDecl,
    Point,
    RecordError,
    ScanEnd,
    ScanStart,
)

from tests.conftest import free_port

BIN = Path(sys.executable).parent
METADATA = {"proposal": "20261234", "title": "Residual stress", "instrument": "SANS2D",
            "sample": {"name": "Si powder", "chemical_formula": "Si", "temperature": 295.0},
            "users": [{"name": "Jane Doe", "role": "PI", "orcid": "0000-0002-1825-0097"}],
            "dataset": {"name": "run_7"}, "wavelength_band": [1.75, 16.5]}  # fmt: skip
TOF_EDGES = np.linspace(0, 72e6, 101)


def scan_start(number: int = 1, title: str = "ascan mot01 0 1 4 0.1", **kw) -> ScanStart:
    cols = [Column("mot01", role="axis", unit="mm", label="Motor 1"), Column("ct01", unit="counts"),
            Column("dt", unit="s", role="time"), Column("spectrum", dtype="int64", shape=(100,), unit="counts"),
            Column("frame", dtype="int32", shape=(8, 6), unit="counts")]  # fmt: skip
    hists = [HistogramDecl("tof", (100,), tof_bins=100, unit="ns", spec={"name": "tof", "kind": "tof"}),
             HistogramDecl("image", (16, 16), spec={"name": "image", "kind": "image"})]  # fmt: skip
    return ScanStart(title, number, cols, metadata=METADATA, histograms=hists, snapshot={"mot02": 1.5, "temp": 295.1},
                     config={"EventSource": "sim://"}, **kw)  # fmt: skip


def point(i: int) -> Point:
    return Point(i, {"mot01": i * 0.25, "ct01": 100.0 + i, "dt": 0.1 * i, "spectrum": np.arange(100) * i,
                     "frame": np.full((8, 6), i, np.int32)}, time=0.1 * i)  # fmt: skip


def histograms() -> list[Histogram]:
    counters = {"events": 4950, "messages": 3, "bad_messages": 0, "dropped_messages": 0, "pulses": 42}
    return [Histogram("tof", np.arange(100), TOF_EDGES, "ns", counters, {"name": "tof"}, 2.5),
            Histogram("image", np.arange(256).reshape(16, 16), None, "ns", counters, {"name": "image"}, 2.5)]  # fmt: skip


def record_scan(targets, n: int = 5, start: ScanStart | None = None, status: str = "ok") -> Recorder:
    r = Recorder([open_sink(t) for t in targets])
    r.start(start or scan_start())
    for i in range(n):
        r.point(point(i))
    for h in histograms():
        r.histogram(h)
    r.end(ScanEnd(status, reason="" if status == "ok" else "stopped by the user"))
    return r


def run_tool(tool: str, path: Path) -> str:
    out = subprocess.run([str(BIN / tool), *({"nxcheck": ["-w"], "nxvalidate": ["-e"]}[tool]), str(path)],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    return re.sub(r"\x1b\[[0-9;]*m", "", out.stdout + out.stderr)


def test_nexus_round_trip_and_external_validators(tmp_path):
    path = tmp_path / "scan.nxs"
    record_scan([path])
    record_scan([path], start=scan_start(1, "second scan, same number"))  # appended, never overwritten
    with h5py.File(path, "r") as f:
        assert list(f) == ["scan_1", "scan_1_2"] and f.attrs["default"] == "scan_1"
        e = f["scan_1"]
        assert e.attrs["NX_class"] == "NXentry" and e.attrs["default"] == "data"
        d = e["data"]
        assert d.attrs["signal"] == "ct01" and list(d.attrs["axes"]) == ["mot01"]
        assert np.array_equal(d["mot01"][()], np.arange(5) * 0.25) and d["mot01"].attrs["units"] == "mm"
        assert d["spectrum"].shape == (5, 100) and d["frame"].shape == (5, 8, 6) and d["frame"][4, 0, 0] == 4
        assert e["tof/data"][42] == 42 and np.array_equal(e["tof/time_of_flight"][()], TOF_EDGES)
        assert e["tof/time_of_flight"].attrs["units"] == "ns" and e["image/data"].shape == (16, 16)
        assert e["livehist/tof/events"][()] == 4950 and e["livehist/tof/acquisition_time"][()] == 2.5
        assert e["livehist/status"][()] == b"ok" and e["end_time"][()].startswith(b"20")
        assert e["experiment_identifier"][()] == b"20261234" and e["collection_identifier"][()] == b"run_7"
        assert e["sample/name"][()] == b"Si powder" and e["sample/temperature"].attrs["units"] == "K"
        assert e["user_1/name"][()] == b"Jane Doe" and e["user_1/ORCID"][()] == b"0000-0002-1825-0097"
        assert e["instrument/name"][()] == b"SANS2D" and e["program_name"].attrs["version"]
        notes = json.loads(e["notes/data"][()])
        assert notes["config"] == {"EventSource": "sim://"} and notes["snapshot"]["mot02"] == 1.5
        assert f["scan_1_2/title"][()] == b"second scan, same number"
    check = run_tool("nxcheck", path)
    assert "Total number of errors: 0" in check and "Total number of warnings: 0" in check, check
    validate = run_tool("nxvalidate", path)
    assert "No application definition" in validate and "rror" not in validate.replace("No application", "")
    from nexusformat.nexus import nxload

    root = nxload(str(path))
    assert root["scan_1"].plottable_data.nxsignal.nxname == "ct01"
    import silx.io

    with silx.io.open(str(path)) as sf:
        assert sf["scan_1/data/ct01"][()].tolist() == [100.0, 101.0, 102.0, 103.0, 104.0]


READER = """
import sys, time, h5py
path = sys.argv[1]
deadline = time.monotonic() + 30
while True:
    try:
        f = h5py.File(path, "r", libver="latest", swmr=True)
        break
    except (OSError, KeyError):
        time.sleep(0.01)
ds = f["scan_1/data/ct01"]
seen = 0
while time.monotonic() < deadline:
    ds.refresh()
    n = ds.shape[0]
    if n > seen:
        print(time.monotonic(), n, flush=True)
        seen = n
    if n >= int(sys.argv[2]):
        break
    time.sleep(0.01)
"""


def test_swmr_reader_in_another_process_sees_every_point_within_half_a_second(tmp_path):
    path = tmp_path / "live.nxs"
    r = Recorder([open_sink(path)])
    r.start(scan_start())
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(path), "12"], stdout=subprocess.PIPE, text=True
    )
    written = []
    try:
        time.sleep(1.0)  # the reader attaches
        for i in range(12):
            r.point(point(i))
            written.append(time.monotonic())
            time.sleep(0.15 if i % 4 else 0.6)  # bursts and quiet gaps (the timer flushes those)
        out, _ = reader.communicate(timeout=30)
    finally:
        r.end(ScanEnd())
    seen = {}
    for line in out.split("\n"):
        if line:
            t, n = line.split()
            for k in range(len(seen), int(n)):
                seen[k] = float(t)
    assert len(seen) == 12
    delays = [seen[k] - written[k] for k in range(12)]
    assert max(delays) < 0.5, delays


def test_spec_file_parses_with_pymca_and_silx(tmp_path):
    from PyMca5.PyMcaIO import specfile
    from silx.io.specfile import SpecFile

    path = tmp_path / "scan.spec"
    record_scan([path], start=scan_start(3, "ascan mot01 0 1 4 0.1\nwith a newline: Ångström"))
    record_scan([path], n=3, start=scan_start(1, "later scan"))  # each scan keeps its own number
    sf = specfile.Specfile(str(path))
    assert sf.scanno() == 4  # two scans, each followed by its TOF histogram scan (images: NeXus only)
    scan = sf[0]
    assert scan.number() == 3 and scan.lines() == 5 and scan.nbmca() == 5
    assert scan.alllabels() == ["mot01", "ct01", "dt"]
    assert scan.datacol(2).tolist() == [100.0, 101.0, 102.0, 103.0, 104.0]
    assert scan.mca(5).tolist() == (np.arange(100) * 4).tolist()
    header = "\n".join(scan.header(""))
    assert "#C proposal: 20261234" in header and "#C sample.name: Si powder" in header
    assert "#C user: name=Jane Doe, role=PI" in header and "#O0 mot02  temp" in header
    assert "with a newline: Ångström" in scan.command()
    hist = sf[1]
    assert hist.command().startswith("histogram tof of scan 3") and hist.lines() == 100
    assert hist.datacol(3).tolist() == list(range(100)) and hist.datacol(1)[1] == TOF_EDGES[1]
    assert [sf[k].number() for k in range(4)] == [3, 3, 1, 1]  # a histogram shares its scan's number
    silx_sf = SpecFile(str(path))
    assert (
        silx_sf.keys() == ["3.1", "3.2", "1.1", "1.2"]
        and silx_sf[0].data.shape == (3, 5)
        and silx_sf[0].mca[4][2] == 8
    )


def test_nonfinite_values_in_every_text_sink(tmp_path):
    from PyMca5.PyMcaIO import specfile

    targets = [tmp_path / "nan.spec", tmp_path / "nan.jsonl", tmp_path / "nan.nxs"]
    r = Recorder([open_sink(t) for t in targets])
    r.start(scan_start())
    p = point(0)
    p.values.update(ct01=float("nan"), dt=float("inf"))
    r.point(p)
    r.point(point(1))
    r.end(ScanEnd())
    assert r.errors == {}
    text = targets[0].read_text()
    # PyMca and silx stop at a nan/inf token: that point is kept as a comment, the others as data
    assert "#C point 0 has non-finite ct01, dt; kept here" in text and text.count("nan inf") == 1
    scan = specfile.Specfile(str(targets[0]))[0]
    assert scan.lines() == 1 and scan.datacol(2).tolist() == [101.0] and scan.nbmca() == 1
    lines = [json.loads(line) for line in targets[1].read_text().splitlines()]
    assert lines[1]["values"]["ct01"] is None and lines[1]["nonfinite"] == ["values.ct01", "values.dt"]
    with h5py.File(targets[2]) as f:
        assert np.isnan(f["scan_1/data/ct01"][0])


def test_json_lines_file_and_zmq_publisher(tmp_path):
    port = free_port()
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(f"tcp://127.0.0.1:{port}")
    path = tmp_path / "scan.jsonl"
    sink = open_sink(path, publish=f"tcp://127.0.0.1:{port}")
    r = Recorder([sink])
    start = scan_start()
    r.start(start)
    time.sleep(0.5)  # ZeroMQ slow joiner: the subscriber connects
    for i in range(3):
        r.point(point(i))
    for h in histograms():
        r.histogram(h)
    r.end(ScanEnd("aborted", reason="Ctrl-C"))
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [x["record"] for x in records] == [
        "start",
        "point",
        "point",
        "point",
        "histogram",
        "histogram",
        "end",
    ]
    assert records[0]["metadata"]["sample"]["name"] == "Si powder" and records[0]["columns"][3]["shape"] == [
        100
    ]
    assert records[3]["values"]["frame"][0][0] == 2 and records[4]["edges"][1] == TOF_EDGES[1]
    assert records[-1]["status"] == "aborted"
    got = []
    while sub.poll(1000):
        got.append(json.loads(sub.recv_string()))
    sub.close(0)
    # the start went out before the subscriber surely had joined (ZeroMQ's slow joiner): it is
    # there when the connection was quick (seen in CI), and everything after it always is
    kinds = [g["record"] for g in got]
    if kinds[:1] == ["start"]:
        assert got[0]["metadata"]["sample"]["name"] == "Si powder"
        kinds = kinds[1:]
    assert kinds == ["point"] * 3 + ["histogram", "histogram", "end"], [g["record"] for g in got]


SPS_WRITER = """
import sys, numpy as np
sys.path.insert(0, sys.argv[2])
from livehist.recorders.base import Recorder, open_sink
from livehist.recorders.records import ScanEnd
from tests.test_recorders import scan_start, point, histograms
r = Recorder([open_sink(f"sps://{sys.argv[1]}")])
r.start(scan_start())
for i in range(3):
    r.point(point(i))
print("running", flush=True)
sys.stdin.readline()
for i in range(3, 6):
    r.point(point(i))
for h in histograms():
    r.histogram(h)
r.end(ScanEnd())
print("written", flush=True)
sys.stdin.readline()
"""


def test_sps_is_readable_from_another_process_while_the_writer_lives():
    from PyMca5.PyMcaIO import sps

    name = f"lhtest{os.getpid()}"
    root = str(Path(__file__).resolve().parents[1])
    writer = subprocess.Popen([sys.executable, "-c", SPS_WRITER, name, root], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert writer.stdout.readline().strip() == "running"  # mid-scan: 3 points so far
        assert sps.getenv(name, "SCAN_D_ENV", "nopts") == "3" and sps.getdata(name, "SCAN_D")[2, 1] == 102.0
        writer.stdin.write("\n")
        writer.stdin.flush()
        assert writer.stdout.readline().strip() == "written"
        assert name in sps.getspeclist()
        assert {"SCAN_D", "SCAN_D_ENV", "spectrum", "frame", "tof", "image"} <= set(sps.getarraylist(name))
        data = sps.getdata(name, "SCAN_D")
        assert data[:6, 1].tolist() == [100.0, 101.0, 102.0, 103.0, 104.0, 105.0]
        assert sps.getenv(name, "SCAN_D_ENV", "nopts") == "6"
        assert sps.getenv(name, "SCAN_D_ENV", "axistitles") == "Motor 1 ct01 dt"
        assert sps.getenv(name, "SCAN_D_ENV", "proposal") == "20261234"
        assert json.loads(sps.getenv(name, "SCAN_D_ENV", "metadata"))["instrument"] == "SANS2D"
        assert sps.getdata(name, "tof")[0, 42] == 42 and sps.getdata(name, "frame")[0, 0] == 5
    finally:
        writer.stdin.write("\n")
        writer.stdin.flush()
        writer.wait(timeout=30)


def test_faults_leave_every_other_file_whole(tmp_path):
    full = tmp_path / "full.spec"
    full.symlink_to("/dev/full")  # a disk with no space left: writes fail with ENOSPC
    good = [tmp_path / "ok.nxs", tmp_path / "ok.spec", tmp_path / "ok.jsonl"]
    r = Recorder([open_sink(t) for t in [full, *good]])
    r.start(scan_start())
    for i in range(4):
        r.point(point(i))
    with pytest.raises(RecordError, match="column 'spectrum' has shape \\(3,\\), declared \\(100,\\)"):
        r.point(Point(4, {**point(4).values, "spectrum": np.arange(3)}))
    with pytest.raises(RecordError, match="no value for column 'ct01'"):
        r.point(Point(4, {k: v for k, v in point(4).values.items() if k != "ct01"}))
    with pytest.raises(RecordError, match="not declared at scan start"):
        r.histogram(Histogram("unknown", np.arange(3)))
    r.point(point(4))
    r.end(ScanEnd("failed", reason="detector died"))
    assert list(r.errors) == [f"SpecSink('{full}')"] and "No space left" in r.errors[f"SpecSink('{full}')"]
    with h5py.File(good[0]) as f:
        assert f["scan_1/data/ct01"].shape == (5,) and f["scan_1/livehist/status"][()] == b"failed"
        assert f["scan_1/livehist/end_reason"][()] == b"detector died"
    from PyMca5.PyMcaIO import specfile

    assert specfile.Specfile(str(good[1]))[0].lines() == 5
    assert len(good[2].read_text().splitlines()) == 1 + 5 + 1  # start, points, end


def test_bad_targets_fail_at_scan_start_before_anything_is_written(tmp_path):
    cases = [
        (tmp_path / "missing" / "scan.nxs", "cannot open"),
        (tmp_path / "missing" / "scan.spec", "cannot open"),
        (tmp_path / "scan.txt", "no recorder for"),
        ("sps://bad name!", "SPS name"),
    ]
    for target, message in cases:
        good = tmp_path / f"good{abs(hash(str(target)))}.jsonl"
        with pytest.raises(RecorderError, match=message):
            Recorder([open_sink(good), open_sink(target)]).start(scan_start())
        assert not good.exists() or good.read_text() == ""  # nothing was written anywhere


LOCKER = """
import sys, h5py, fcntl
if sys.argv[1].endswith(".nxs"):
    f = h5py.File(sys.argv[1], "w")
else:
    f = open(sys.argv[1], "a"); fcntl.flock(f, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.readline()
"""


@pytest.mark.parametrize("name", ["locked.nxs", "locked.spec", "locked.jsonl"])
def test_a_file_locked_by_another_writer_is_refused(tmp_path, name):
    path = tmp_path / name
    other = subprocess.Popen([sys.executable, "-c", LOCKER, str(path)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert other.stdout.readline().strip() == "locked"
        with pytest.raises(RecorderError, match="lock"):
            Recorder([open_sink(path)]).start(scan_start())
    finally:
        other.stdin.write("\n")
        other.stdin.flush()
        other.wait(timeout=30)


def test_data_policy_keeps_files_under_the_root(tmp_path):
    import grp
    import stat

    group = grp.getgrgid(os.getgid()).gr_name
    policy = DataPolicy(tmp_path, "{proposal}/{dataset}", group=group, mode=0o2750)
    path = policy.path("scan.nxs", {"proposal": "20261234", "dataset": "run_7"})
    assert path == tmp_path / "20261234" / "run_7" / "scan.nxs" and path.parent.is_dir()
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o2750
    for bad, message in [("../escape.nxs", "contains '..'"), ("/etc/passwd.nxs", "outside the data root"),
                         ("a/../../b.nxs", "contains '..'")]:  # fmt: skip
        with pytest.raises(RecorderError, match=message):
            policy.path(bad, {"proposal": "P", "dataset": "d"})
    with pytest.raises(RecorderError, match="needs 'dataset'"):
        policy.path("x.nxs", {"proposal": "P"})


def test_a_third_party_sink_plugs_in_through_an_entry_point(tmp_path, monkeypatch):
    (tmp_path / "thirdparty_csv.py").write_text(textwrap.dedent('''
        from livehist.recorders.base import Sink

        class CsvSink(Sink):
            extensions = ("csv",)

            def start(self, record):
                self.f = open(self.target, "w")
                self.names = [c.name for c in record.columns if not c.shape]
                self.f.write(",".join(self.names) + "\\n")

            def point(self, record):
                if record.index == 3:
                    raise RuntimeError("this plug-in breaks at point 3")
                self.f.write(",".join(str(record.values[n]) for n in self.names) + "\\n")

            def histogram(self, record):
                pass

            def end(self, record):
                pass

            def close(self):
                self.f.close()
    '''))  # fmt: skip
    dist = tmp_path / "thirdparty_csv-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-csv\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[livehist.recorders]\ncsv = thirdparty_csv:CsvSink\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    csv, nxs = tmp_path / "scan.csv", tmp_path / "scan.nxs"
    r = record_scan([csv, nxs])
    assert csv.read_text().splitlines() == [
        "mot01,ct01,dt",
        "0.0,100.0,0.0",
        "0.25,101.0,0.1",
        "0.5,102.0,0.2",
    ]
    assert "this plug-in breaks at point 3" in r.errors[f"CsvSink('{csv}')"]
    with h5py.File(nxs) as f:  # the plug-in's failure did not stop the NeXus file
        assert f["scan_1/data/ct01"].shape == (5,) and f["scan_1/livehist/status"][()] == b"ok"


def test_a_plug_in_naming_a_livehist_extension_does_not_replace_it(tmp_path, monkeypatch, caplog):
    """A third-party `nxs` entry point replaced livehist's NeXus writer or not by the order the
    packages were installed, without a word: livehist's stays, the plug-in is named."""
    (tmp_path / "impostor.py").write_text(
        "from livehist.recorders.base import Sink\n\nclass Impostor(Sink):\n    pass\n"
    )
    dist = tmp_path / "impostor-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: impostor\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[livehist.recorders]\nnxs = impostor:Impostor\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with caplog.at_level("WARNING", logger="livehist.recorders"):
        classes = sink_classes()
    assert classes["nxs"].__name__ == "NexusSink"
    assert "'nxs' of impostor is not used" in caplog.text and "extension or scheme of its own" in caplog.text
    r = record_scan([tmp_path / "scan.nxs"])
    assert not r.errors
    with h5py.File(tmp_path / "scan.nxs") as f:
        assert f["scan_1/livehist/status"][()] == b"ok"


def test_an_out_of_order_stream_is_refused_and_the_open_scan_is_kept_whole(tmp_path):
    """A second start, an end twice or before start: RecordError, and nothing changed (a refused
    second start closed every sink of the open scan, whose files then held 1 of 2 points)."""
    targets = [tmp_path / "a.nxs", tmp_path / "a.spec", tmp_path / "a.jsonl"]
    r = Recorder([open_sink(t) for t in targets])
    with pytest.raises(RecordError, match="no scan is open"):
        r.end(ScanEnd())
    r.start(scan_start(1))
    r.point(point(0))
    with pytest.raises(RecordError, match="scan 1 is still open; end it before starting scan 2"):
        r.start(scan_start(2))
    r.point(point(1))
    r.end(ScanEnd())
    with pytest.raises(RecordError, match="no scan is open"):
        r.end(ScanEnd("failed"))
    assert r.errors == {} and set(r.points.values()) == {2}
    with h5py.File(targets[0], "r") as f:
        entry = f["scan_1"]
        assert entry["livehist/status"][()].rstrip(b"\0") == b"ok" and entry["data/mot01"].shape == (2,)
    lines = [json.loads(x) for x in targets[2].read_text().splitlines()]
    assert [x["record"] for x in lines] == ["start", "point", "point", "end"]


@pytest.mark.parametrize(
    "column, value, message",
    [
        (Column("n", dtype="int64"), 1.7, "1.7 does not fit int64"),
        (Column("h", dtype="float16"), 70000, "70000 does not fit float16"),
        (Column("f", dtype="float32"), 1e300, "1e+300 does not fit float32"),
        (Column("b", dtype="int8"), 300, "column 'b' is not int8"),
        (Column("u", dtype="int64"), 2**64, "column 'u' is not int64"),
        (Column("w", dtype="int64"), 2**70, "declare the column with a wider dtype"),
        (Column("g", dtype="float64"), 2**63 + 1, None),  # float64 rounds it: refused too
    ],
)
def test_a_value_the_declared_dtype_cannot_hold_is_refused_naming_the_column(
    tmp_path, column, value, message
):
    r = Recorder([open_sink(tmp_path / "v.jsonl")])
    r.start(ScanStart("dtypes", 1, [column]))
    with pytest.raises(RecordError) as err:
        r.point(Point(0, {column.name: value}))
    assert (message or "does not fit float64") in str(err.value) and repr(column.name) in str(err.value)
    r.point(Point(0, {column.name: 1}))  # the scan goes on
    r.end(ScanEnd())
    assert [json.loads(x)["record"] for x in (tmp_path / "v.jsonl").read_text().splitlines()] == [
        "start", "point", "end"
    ]  # fmt: skip


def test_json_lines_are_one_record_a_line_whatever_the_text(tmp_path):
    """NEL and the Unicode line and paragraph separators, left as they are by JSON, broke a
    record in two for a reader splitting lines as str.splitlines() does."""
    title = "a\x85b\u2028c\u2029d\re\x0bf"
    r = Recorder([open_sink(tmp_path / "u.jsonl")])
    r.start(ScanStart(title, 1, [Column("x")], metadata={"title": title}))
    r.point(Point(0, {"x": 1.0}))
    r.end(ScanEnd())
    lines = (tmp_path / "u.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(x)["record"] for x in lines] == ["start", "point", "end"]
    start = json.loads(lines[0])
    assert (start["title"], start["metadata"]["title"]) == (title, title)


def test_bad_columns_and_histograms_are_refused_when_declared():
    for name in (".", "..", "SCAN_D"):
        with pytest.raises(RecordError, match="column name"):
            Column(name)
    for dtype in ("U8", "O", "datetime64[s]"):
        with pytest.raises(RecordError, match="is not numeric"):
            Column("c", dtype=dtype)
    for name in ("a/b", "..", ""):
        with pytest.raises(RecordError, match="histogram name"):
            HistogramDecl(name, (5,))
    for shape in ((), (0,), (1 << 40,), (2, 2, 2)):
        with pytest.raises(RecordError, match="shape must be"):
            HistogramDecl("h", shape)
    with pytest.raises(RecordError, match="histogram names must be unique"):
        ScanStart("t", 1, [], histograms=[HistogramDecl("h", (5,)), HistogramDecl("h", (5,))])
    with pytest.raises(RecordError, match="name both a column and a histogram"):
        ScanStart("t", 1, [Column("tof")], histograms=[HistogramDecl("tof", (5,))])
    start = ScanStart("t", 1, [], histograms=[HistogramDecl("h", (3,), tof_bins=3)])
    edges = np.array([0.0, 1.0, 2.0, 3.0])
    for counts, message in (([1, np.nan, 3], "whole numbers"), ([1, 1.5, 3], "whole numbers"),
                            ([1, -3, 3], "from 0 to 2\\*\\*63-1"), (np.array([1, 2**63 + 5, 3], np.uint64), "2\\*\\*63-1")):  # fmt: skip
        with pytest.raises(RecordError, match=message):
            Histogram("h", np.asarray(counts), edges).checked(start)
    with pytest.raises(RecordError, match="finite and increasing"):
        Histogram("h", np.array([1, 2, 3]), np.array([0.0, np.nan, 2.0, 3.0])).checked(start)
    assert Histogram("h", np.array([1.0, 2.0, 3.0]), edges).checked(start).counts.tolist() == [1, 2, 3]


def test_a_sardana_integer_channel_that_failed_to_read_is_nan_not_zero(tmp_path):
    """Sardana gives None for a channel that failed to read; an integer channel recorded it as 0."""
    from types import SimpleNamespace as NS

    from livehist.recorders.sardana_adapter import ScanMapping

    m = ScanMapping()
    env = {"datadesc": [NS(name="ct01", label="ct01", dtype="int64", shape=[]),
                        NS(name="ct02", label="ct02", dtype="float64", shape=[])],
           "counters": ["ct01", "ct02"], "title": "ct 1", "serialno": 3}  # fmt: skip
    start = m.start(env, {}, {})
    assert [c.dtype for c in start.columns] == ["float64", "float64"]
    r = Recorder([open_sink(tmp_path / "s.nxs"), open_sink(tmp_path / "s.jsonl")])
    r.start(start)
    r.point(m.point(NS(recordno=0, data={"ct01": 17, "ct02": 1.0})))
    r.point(m.point(NS(recordno=1, data={"ct01": None, "ct02": None})))
    r.end(ScanEnd())
    with h5py.File(tmp_path / "s.nxs", "r") as f:
        ct01 = f["scan_3/data/ct01"][()]
    assert ct01[0] == 17 and np.isnan(ct01[1])
    last = json.loads((tmp_path / "s.jsonl").read_text().splitlines()[2])
    assert last["values"]["ct01"] is None and "values.ct01" in last["nonfinite"], last


DISK_FULL = """
import json, resource, signal, sys, time
import numpy as np
from livehist.recorders.base import Recorder, open_sink
from livehist.recorders.records import Column, Point, ScanEnd, ScanStart
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit a write fails (EFBIG), as on a full disk
folder, limit, kinds, pause = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(","), float(sys.argv[4])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
r = Recorder([open_sink(f"{folder}/f.{k}") for k in kinds])
r.start(ScanStart("fill", 1, [Column("x"), Column("s", dtype="int64", shape=(3000,))]))
rng = np.random.default_rng(1)
for i in range(400):
    r.point(Point(i, {"x": float(i), "s": rng.integers(1, 1000, 3000)}))
    if i % 50 == 49:
        time.sleep(pause)  # the NeXus sink writes what it buffered
r.end(ScanEnd())
print(json.dumps({"errors": r.errors, "points": r.points}))
"""


def test_a_full_disk_leaves_whole_records_and_files_that_say_what_they_hold(tmp_path):
    """A full disk (here: the process's file size limit) while recording: HDF5 crashed the process
    after a write it could not make, and SPEC / JSON lines kept a torn last point."""
    from PyMca5.PyMcaIO import specfile

    def run(folder, limit, kinds, pause):
        folder.mkdir()
        out = subprocess.run([sys.executable, "-c", DISK_FULL, str(folder), str(limit), kinds, str(pause)],
                             capture_output=True, text=True, timeout=120)  # fmt: skip
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.splitlines()[-1])

    text = run(tmp_path / "text", 3_000_000, "spec,jsonl", 0.0)
    spec, jsonl = tmp_path / "text/f.spec", tmp_path / "text/f.jsonl"
    n_spec, n_jsonl = text["points"][f"SpecSink('{spec}')"], text["points"][f"JsonLinesSink('{jsonl}')"]
    assert 0 < n_spec < 400 and 0 < n_jsonl < 400 and len(text["errors"]) == 2, text
    scan = specfile.Specfile(str(spec))[0]
    assert scan.lines() == n_spec and scan.nbmca() == n_spec  # no torn point read as whole
    assert spec.read_bytes().endswith(b"\n")
    lines = [json.loads(x) for x in jsonl.read_text().splitlines()]  # every line whole
    assert [x["record"] for x in lines] == ["start"] + ["point"] * n_jsonl

    from livehist.recorders.nexus import DISK_RESERVE

    nxs = run(tmp_path / "nxs", DISK_RESERVE + 1_500_000, "nxs", 0.5)  # crashed with SIGSEGV before
    path = tmp_path / "nxs/f.nxs"
    (error,) = nxs["errors"].values()
    assert "left on its disk" in error, nxs
    with h5py.File(path, "r") as f:  # opens without repair: closed in order
        e = f["scan_1"]
        written = int(e["livehist/points"][()])
        assert (
            e["livehist/status"][()].rstrip(b"\0") == b"failed"
            and b"not written" in e["livehist/end_reason"][()]
        )
        assert e["data/s"].shape == (written, 3000) and e["data/x"][()].tolist() == list(range(written))
        assert (e["data/s"][()] > 0).all()  # every row kept holds data, none is a never-written 0
    assert nxs["points"][f"NexusSink('{path}')"] == written and 0 < written < 400


def test_appending_never_glues_a_record_to_a_foreign_last_line(tmp_path):
    jsonl, spec = tmp_path / "a.jsonl", tmp_path / "a.spec"
    jsonl.write_text('{"record": "foreign"}')  # no newline at its end
    spec.write_bytes(b"\x89PNG\r\n")
    with pytest.raises(RecorderError, match="is not a SPEC file"):
        record_scan([spec])
    assert spec.read_bytes() == b"\x89PNG\r\n"
    record_scan([jsonl], n=2)
    assert [json.loads(x)["record"] for x in jsonl.read_text().splitlines()] == [
        "foreign", "start", "point", "point", "histogram", "histogram", "end"
    ]  # fmt: skip


def test_a_scan_file_holds_only_what_arrived(tmp_path):
    """A declared histogram that never came is not left as zeros; custom data HDF5 has no type
    for is kept as JSON text; a long reason is cut between characters; a NUL title is refused."""
    path = tmp_path / "h.nxs"
    r = Recorder([open_sink(path)])
    r.start(scan_start())
    r.point(point(0))
    r.histogram(histograms()[1])  # "image" only: "tof" never comes
    r.end(ScanEnd("ok", reason="é" * 400, custom={"none": None, "mixed": [1, "a"], "n": [1, 2]}))
    assert r.errors == {}
    with h5py.File(path, "r") as f:
        e = f["scan_1"]
        assert "tof" not in e and "tof" not in e["livehist"] and "image" in e
        assert json.loads(e["livehist"].attrs["histograms_never_received"]) == ["tof"]
        assert e["livehist/end_reason"][()].decode("utf-8") == "é" * 256  # 512 bytes, whole characters
        c = e["custom_data"]
        assert (
            c["none"][()] == b"null"
            and json.loads(c["mixed"][()]) == [1, "a"]
            and c["n"][()].tolist() == [1, 2]
        )
    for title in ("a\x00b", "\ud800"):
        with pytest.raises(RecordError, match="scan title"):
            scan_start(title=title)


def test_sps_keeps_its_environment_whole_and_refuses_what_it_cannot_hold():
    """Metadata over one environment string (1 KiB) was cut mid-JSON and stopped the strings
    after it (status and aborted of a failed scan never written); arrays past 256 were lost."""
    from PyMca5.PyMcaIO import sps

    name = f"lhenv{os.getpid()}"
    big = {**METADATA, "notes": "x" * 2000}
    r = Recorder([open_sink(f"sps://{name}")])
    r.start(ScanStart("env", 1, [Column("x")], metadata=big))
    r.point(Point(0, {"x": 1.0}))
    r.end(ScanEnd("failed", reason="detector died", custom={"long": "y" * 5000}))
    assert r.errors == {}
    md = json.loads(sps.getenv(name, "SCAN_D_ENV", "metadata"))  # valid JSON, saying it is a summary
    assert md["proposal"] == "20261234" and "cut" in md
    assert (
        sps.getenv(name, "SCAN_D_ENV", "status") == "failed"
        and sps.getenv(name, "SCAN_D_ENV", "aborted") == "1"
    )
    assert len(sps.getenv(name, "SCAN_D_ENV", "custom_long")) < 1024
    many = [Column(f"s{i}", shape=(4,)) for i in range(300)]
    with pytest.raises(RecorderError, match="SPS holds 256 arrays per name and this scan needs 302"):
        Recorder([open_sink(f"sps://{name}x")]).start(ScanStart("many", 2, many))
    with pytest.raises(RecorderError, match="at most 31 characters"):
        Recorder([open_sink(f"sps://{name}y")]).start(ScanStart("long", 3, [Column("s" * 40, shape=(4,))]))
    # 20 characters, 40 bytes: created an array named 'ααα...' glued to the SPS name, then failed
    with pytest.raises(RecorderError, match="at most 31 characters .bytes in UTF-8.: 'α+' has 40"):
        Recorder([open_sink(f"sps://{name}z")]).start(ScanStart("utf8", 4, [Column("α" * 20, shape=(4,))]))
    assert f"{name}z" not in sps.getspeclist()


def test_spec_user_lines_keep_names_with_commas_whole(tmp_path):
    """'#C user: name=Doe, Jane, role=PI' read as a user 'Doe' and a stray 'Jane'; a name such as
    'Eve, role=PI' made the line claim a role nobody gave: such values are quoted."""
    md = {
        **METADATA,
        "users": [{"name": "Doe, Jane", "role": "PI"}, {"name": "Eve, role=PI"}, {"name": "Li Wei"}],
    }
    path = tmp_path / "users.spec"
    record_scan([path], start=dataclasses.replace(scan_start(), metadata=md))
    users = [line for line in path.read_text().splitlines() if line.startswith("#C user: ")]
    assert users == [
        '#C user: name="Doe, Jane", role=PI',
        '#C user: name="Eve, role=PI"',
        "#C user: name=Li Wei",
    ]


def test_spec_lines_hold_what_was_given_for_bools_odd_keys_and_text_snapshots(tmp_path):
    """A bool column was written 'True' (PyMca: 'cannot get lines for scan'); a metadata key, sample
    key, custom key or histogram unit holding a newline wrote lines of their own ('#S 99 fake' read
    as a second scan); a text value in the pre-scan snapshot shifted every #P position after it."""
    from PyMca5.PyMcaIO import specfile

    start = ScanStart("odd", 7, [Column("on", dtype="bool"), Column("x"), Column("mask", dtype="bool", shape=(3,))],
                      metadata={"k\n#S 99 fake\n#N 1\n#L a\n42": 1, "sample": {"n\n#S 98 x": "y"}},
                      histograms=[HistogramDecl("h", (2,), tof_bins=2, unit="u s\n#S 97 x")],
                      snapshot={"m1": 1.5, "name": "hello world", "m3": 3.0})  # fmt: skip
    path = tmp_path / "odd.spec"
    r = Recorder([open_sink(path)])
    r.start(start)
    r.point(Point(0, {"on": True, "x": 1.0, "mask": [True, False, True]}))
    r.point(Point(1, {"on": False, "x": 2.0, "mask": [False, False, True]}))
    r.histogram(Histogram("h", np.array([4, 5]), np.array([0.0, 1.0, 2.0]), unit="u s\n#S 97 x"))
    r.end(ScanEnd(custom={"c\n#S 96 x": 1}))
    assert r.errors == {}
    sf = specfile.Specfile(str(path))
    assert [sf[i].header("S")[0] for i in range(sf.scanno())] == ["#S 7 odd", "#S 7 histogram h of scan 7"]
    scan = sf[0]
    assert scan.data().tolist() == [[1.0, 0.0], [1.0, 2.0]]
    assert scan.nbmca() == 2 and scan.mca(1).tolist() == [1.0, 0.0, 1.0]
    assert dict(zip(scan.allmotors(), scan.allmotorpos(), strict=True)) == {"m1": 1.5, "m3": 3.0}
    assert "#C snapshot name: hello world" in path.read_text()
    assert sf[1].alllabels() == ["bin_low_u_s_#S_97_x", "bin_high_u_s_#S_97_x", "counts"]


def test_edges_that_do_not_fit_the_bins_are_refused_when_sent(tmp_path):
    """Edges not matching the counts passed (the histogram had no TOF axis declared, or the
    declaration's tof_bins was not its last axis): SPEC failed at the scan's end and was dropped
    without its end lines, while NeXus kept counts beside a time_of_flight of another binning."""
    with pytest.raises(RecordError, match="tof_bins 4 but the last axis of shape .3, 5. has 5 bins"):
        HistogramDecl("h", (3, 5), tof_bins=4)
    paths = [tmp_path / "e.spec", tmp_path / "e.nxs", tmp_path / "e.jsonl"]
    r = Recorder([open_sink(p) for p in paths])
    r.start(ScanStart("edges", 1, [Column("x")], histograms=[HistogramDecl("h", (5,))]))
    r.point(Point(0, {"x": 1.0}))
    with pytest.raises(RecordError, match="'h': 3 edges for 5 bins on its last axis; give 6"):
        r.histogram(Histogram("h", np.arange(5), np.arange(3.0)))
    r.histogram(Histogram("h", np.arange(5), np.arange(6.0)))
    r.end(ScanEnd())
    assert r.errors == {} and "#C scan ended at" in paths[0].read_text()


@pytest.mark.parametrize(
    "metadata, says",
    [({"proposal": 20261234}, r"metadata\['proposal'\] must be text"),
     ({"sample": "Si"}, r"metadata\['sample'\] must be an object"),
     ({"dataset": "run_7"}, r"metadata\['dataset'\] must be an object"),
     ({"sample": {"temperature": "300 K"}}, r"temperature'\] must be a number in K"),
     ({"users": ["Jane"]}, r"metadata\['users'\] must be a list of objects"),
     ({"raw": b"\x01"}, r"metadata\['raw'\] is a bytes; .* convert it"),
     ({"n": np.int64(3)}, r"metadata\['n'\] is a int64"),
     ({"users": [{"name": "a\x00b"}]}, r"metadata\['users'\]\[0\]\['name'\] .* without NUL"),
     ({"proposal": "p\ud800"}, r"metadata\['proposal'\] .* lone surrogates")],
)  # fmt: skip
def test_metadata_no_file_can_hold_is_refused_when_the_scan_is_declared(tmp_path, metadata, says):
    """Each of these dropped one or two sinks at scan start with a bare TypeError, AttributeError or
    ValueError (their files removed) while the other files recorded the scan."""
    with pytest.raises(RecordError, match=says):
        ScanStart("md", 1, [Column("x")], metadata=metadata)
    with pytest.raises(RecordError, match="column x: unit 'm\\\\x00m' must be text without NUL"):
        Column("x", unit="m\x00m")


def test_a_caller_refilling_one_array_per_point_gets_every_point_recorded(tmp_path):
    """Points and snapshots kept references to the caller's arrays: NeXus (which buffers points)
    wrote [3, 3, 3] for points 0 to 3 of a refilled buffer, SPEC (which writes snapshots at the
    end) the counts the histogram had at the end, not when it was sent."""
    from PyMca5.PyMcaIO import specfile

    paths = [tmp_path / "r.nxs", tmp_path / "r.spec"]
    r = Recorder([open_sink(p) for p in paths])
    r.start(
        ScanStart("reuse", 1, [Column("s", shape=(3,))], histograms=[HistogramDecl("h", (2,), tof_bins=2)])
    )
    buf, counts = np.zeros(3), np.array([1, 2])
    for i in range(4):
        buf[:] = i
        r.point(Point(i, {"s": buf}))
    r.histogram(Histogram("h", counts, np.array([0.0, 1.0, 2.0])))
    counts[:] = 99
    r.end(ScanEnd())
    with h5py.File(paths[0], "r") as f:
        assert f["scan_1/data/s"][()].tolist() == [[i] * 3 for i in range(4)]
    assert specfile.Specfile(str(paths[1]))[1].datacol(3).tolist() == [1.0, 2.0]


def test_an_sps_name_held_by_another_process_is_refused():
    """A second process (another MacroServer) on the same SPS name got NAME(pid) from SPS, which no
    reader looks at, and recorded as if published."""
    from PyMca5.PyMcaIO import sps

    name = f"lhclash{os.getpid()}"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from PyMca5.PyMcaIO import sps
        sps.create("{name}", "SCAN_D", 4, 2, sps.DOUBLE, 0)
        print("ready", flush=True)
        sys.stdin.read()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(RecorderError, match=f"SPS name '{name}' is held by another process"):
            Recorder([open_sink(f"sps://{name}")]).start(ScanStart("clash", 1, [Column("x")]))
    finally:
        holder.communicate("", timeout=10)
    assert name not in sps.getspeclist()
    first = Recorder([open_sink(f"sps://{name}")])
    first.start(ScanStart("one", 1, [Column("x")]))
    first.end(ScanEnd())
    again = Recorder([open_sink(f"sps://{name}")])  # the same process may reuse its own name
    again.start(ScanStart("three", 3, [Column("x")]))
    again.end(ScanEnd())
    assert again.errors == {} and sps.getenv(name, "SCAN_D_ENV", "title") == "three"
