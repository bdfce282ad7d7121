"""What is written is true (issue 14), at the recorder level, read back by outside readers:
no fake entries in foreign files, no clashing names, one writer per file, a crashed SWMR
writer repaired with every flushed point, no leftover empty files, one scan number."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from livehist.recorders.base import Recorder, RecorderError, open_sink
from livehist.recorders.records import HistogramDecl, ScanEnd

from tests.conftest import run_cli
from tests.test_recorders import histograms, point, record_scan, run_tool, scan_start

ROOT = str(Path(__file__).resolve().parents[1])


def test_a_foreign_hdf5_file_is_refused_before_anything_is_written(tmp_path):
    foreign = tmp_path / "foreign.nxs"
    with h5py.File(foreign, "w") as f:  # plain h5py: superblock version 0, no livehist creator
        f["counts"] = np.arange(5)
        f.create_group("entry1").attrs["NX_class"] = "NXentry"
    before = foreign.read_bytes()
    others = [tmp_path / "a.jsonl", tmp_path / "a.spec"]
    with pytest.raises(RecorderError, match="was not written by livehist.*give a new file name"):
        record_scan([foreign, *others])
    assert foreign.read_bytes() == before  # not a byte changed, no fake entry
    assert not any(p.exists() for p in others)  # no empty leftovers of the other formats
    with h5py.File(foreign, "r") as f:
        assert sorted(f) == ["counts", "entry1"]


@pytest.mark.parametrize("name", ["sample", "points", "Data", "user_1", "status"])
def test_a_histogram_named_like_an_entry_group_is_refused(tmp_path, name):
    start = scan_start()
    start.histograms.append(HistogramDecl(name, (4,), spec={"name": name, "kind": "tof"}))
    path = tmp_path / "clash.nxs"
    with pytest.raises(RecorderError, match=f"histogram '{name}' cannot be recorded in NeXus.*rename"):
        Recorder([open_sink(path), open_sink(tmp_path / "clash.jsonl")]).start(start)
    assert not path.exists() and not (tmp_path / "clash.jsonl").exists()


def test_failed_start_leaves_no_empty_files_but_keeps_existing_ones(tmp_path):
    (tmp_path / "old.spec").write_text("#F old.spec\n")
    targets = [tmp_path / "new.jsonl", tmp_path / "new.spec", tmp_path / "old.spec", tmp_path / "x" / "y.nxs"]
    with pytest.raises(RecorderError, match="cannot open .*y.nxs"):
        Recorder([open_sink(t) for t in targets]).start(scan_start())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.spec"]
    assert (tmp_path / "old.spec").read_text() == "#F old.spec\n"


HOLDER = """
import sys
sys.path.insert(0, sys.argv[1])
from livehist.recorders.base import Recorder, open_sink
from tests.test_recorders import scan_start, point
r = Recorder([open_sink(sys.argv[2])])
r.start(scan_start(1))
r.point(point(0))
print("writing", flush=True)
sys.stdin.readline()
"""


def test_two_writers_on_one_nexus_file_the_second_is_refused(tmp_path):
    path = tmp_path / "shared.nxs"
    first = Recorder([open_sink(path)])
    first.start(scan_start(1))
    first.point(point(0))
    with pytest.raises(RecorderError, match="being written by another scan of this server"):
        Recorder([open_sink(path)]).start(scan_start(2))  # a second Door in the same MacroServer
    first.end(ScanEnd())
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, ROOT, str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "writing"
        with pytest.raises(RecorderError, match="another livehist recorder \\(another process\\)"):
            Recorder([open_sink(path)]).start(scan_start(3))
    finally:
        holder.kill()
        holder.wait()
    with h5py.File(path, "r", swmr=True) as f:  # only the two real entries, none from refused writers
        assert sorted(f) == ["scan_1", "scan_1_2"]
        assert f["scan_1/livehist/status"][()] == b"ok" and f["scan_1/data/ct01"].shape == (1,)


WRITER = """
import sys, time
sys.path.insert(0, sys.argv[1])
from livehist.recorders.base import Recorder, open_sink
import numpy as np
from livehist.recorders.records import Histogram
from tests.test_recorders import scan_start, point
snapshot = sys.argv[2] == "snapshot"  # one image snapshot with no counters (the record allows none)
r = Recorder([open_sink(t) for t in sys.argv[3:]])
r.start(scan_start(7))
if snapshot:
    r.histogram(Histogram("image", np.arange(256).reshape(16, 16)))
i = 0
while True:
    r.point(point(i))
    i += 1
    if i == 300:
        print("running", flush=True)
    time.sleep(0.001)
"""


def _kill_a_writer(tmp_path: Path, stem: str, snapshot: bool = False) -> list[Path]:
    targets = [tmp_path / f"{stem}.nxs", tmp_path / f"{stem}.spec", tmp_path / f"{stem}.jsonl"]
    writer = subprocess.Popen([sys.executable, "-c", WRITER, ROOT, "snapshot" if snapshot else "-",
                               *map(str, targets)], stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert writer.stdout.readline().strip() == "running"
        time.sleep(0.5)  # at least one timed flush after the 300th point
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    return targets


def _points_in_json(path: Path) -> list[dict]:
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["record"] == "point"]


def test_sigkilled_writer_is_repaired_by_the_cli_and_keeps_every_flushed_point(tmp_path):
    nxs, spec, jsonl = _kill_a_writer(tmp_path, "killed")
    with pytest.raises(OSError, match="already open for write"):
        h5py.File(nxs, "r")  # what an ordinary reader sees before the repair
    out = run_cli("repair", str(nxs))
    assert out.returncode == 0, out.stderr
    assert "cleared the consistency flags" in out.stdout and "/scan_7 marked incomplete" in out.stdout
    json_points = _points_in_json(jsonl)
    with h5py.File(nxs, "r") as f:  # an ordinary reader, no SWMR
        e = f["scan_7"]
        n = int(e["livehist/points"][()])
        assert e["livehist/status"][()] == b"incomplete"
        assert (
            b"killed or crashed" in e["livehist/end_reason"][()]
            and f"{n} points".encode() in e["livehist/end_reason"][()]
        )
        assert 300 <= n <= len(json_points) and e["data/ct01"].shape == (n,)
        assert e["data/ct01"][()].tolist() == [p["values"]["ct01"] for p in json_points[:n]]
        assert e["data/frame"][n - 1].tolist() == np.full((8, 6), n - 1).tolist()
        # the histograms declared at start never came: no zero-filled group claims 0 counts
        assert (
            "tof" not in e
            and "image" not in e
            and "removed: image, tof" in e["livehist/end_reason"][()].decode()
        )
    from nexusformat.nexus import nxload

    root = nxload(str(nxs))
    assert str(root["scan_7/livehist/status"].nxvalue) == "incomplete"
    assert "Total number of errors: 0" in run_tool("nxcheck", nxs)
    from PyMca5.PyMcaIO import specfile

    assert specfile.Specfile(str(spec))[0].lines() >= n  # SPEC and JSON keep every point as before
    again = run_cli("repair", str(nxs))
    assert again.returncode == 0 and "nothing to repair" in again.stdout


def test_repair_and_plot_keep_a_snapshot_written_without_counters(tmp_path):
    """A snapshot whose record carried no counters (events stays -1) is still data: its
    snapshot_time says it was written, so repair keeps it and plot draws it."""
    nxs, _, _ = _kill_a_writer(tmp_path, "counterless", snapshot=True)
    out = run_cli("repair", str(nxs))
    assert out.returncode == 0, out.stderr
    with h5py.File(nxs, "r") as f:
        e = f["scan_7"]
        assert e["image/data"][()].tolist() == np.arange(256).reshape(16, 16).tolist()
        assert "tof" not in e and "removed: tof" in e["livehist/end_reason"][()].decode()
    res = run_cli("plot", str(nxs), "--out", str(tmp_path / "png"))
    assert res.returncode == 0 and "image" in res.stdout and "tof" not in res.stdout, res.stderr


def test_the_next_scan_repairs_a_crashed_file_and_appends(tmp_path):
    nxs, _, _ = _kill_a_writer(tmp_path, "crashed")
    r = record_scan([nxs], start=scan_start(8))
    assert r.errors == {} and r.recorded == [str(nxs)]
    with h5py.File(nxs, "r") as f:
        assert sorted(f) == ["scan_7", "scan_8"]
        assert f["scan_7/livehist/status"][()] == b"incomplete" and f["scan_7/livehist/points"][()] >= 300
        assert f["scan_8/livehist/status"][()] == b"ok" and f["scan_8/data/ct01"].shape == (5,)
        assert f["scan_8/tof/data"][()].tolist() == histograms()[0].counts.tolist()


def test_repair_refuses_a_file_under_a_live_writer_and_non_files(tmp_path):
    path = tmp_path / "live.nxs"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, ROOT, str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "writing"
        out = run_cli("repair", str(path))
        assert out.returncode == 1 and "being written right now" in out.stderr
    finally:
        holder.kill()
        holder.wait()
    out = run_cli("repair", str(tmp_path / "missing.nxs"))
    assert out.returncode == 1 and "does not exist" in out.stderr
    (tmp_path / "text.nxs").write_text("not hdf5")
    out = run_cli("repair", str(tmp_path / "text.nxs"))
    assert out.returncode == 1 and "not an HDF5 file" in out.stderr


def test_one_scan_number_in_nexus_spec_and_json(tmp_path):
    from silx.io.specfile import SpecFile

    targets = [tmp_path / "n.nxs", tmp_path / "n.spec", tmp_path / "n.jsonl"]
    for number in (4, 5):
        record_scan(targets, start=scan_start(number))
    with h5py.File(targets[0], "r") as f:
        assert sorted(f) == ["scan_4", "scan_5"]
    sf = SpecFile(str(targets[1]))
    assert sf.keys() == ["4.1", "4.2", "5.1", "5.2"]  # each TOF histogram under its scan's number
    assert sf[1].scan_header_dict["S"].startswith("4 histogram tof of scan 4")
    starts = [r for r in map(json.loads, targets[2].read_text().splitlines()) if r["record"] == "start"]
    assert [s["scan_number"] for s in starts] == [4, 5]


def test_plot_skips_datasets_at_the_root(tmp_path):
    path = tmp_path / "mixed.nxs"
    record_scan([path])
    with h5py.File(path, "a") as f:
        f["root_dataset"] = np.arange(3)
    out = run_cli("plot", str(path), "--out", str(tmp_path / "png"))
    assert out.returncode == 0, out.stderr
    assert [p.name for p in (tmp_path / "png").iterdir()] == ["mixed_scan_1.png"]
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f["x"] = np.arange(3)
    out = run_cli("plot", str(plain))
    assert out.returncode == 1 and "holds no livehist histogram snapshots" in out.stderr
    assert "Traceback" not in out.stderr


SWMR_READER = """
import json, sys
import h5py
f = h5py.File(sys.argv[1], "r", swmr=True, libver="latest")
e = f[sys.argv[2]]
for _ in sys.stdin:
    for ds in (e["livehist/points"], *e["data"].values(), e["tof/data"], e["livehist/tof/events"],
               e["livehist/tof/snapshot_time"]):
        ds.refresh()
    print(json.dumps({"points": int(e["livehist/points"][()]), "rows": min(d.shape[0] for d in e["data"].values()),
                      "snapshot": bool(e["livehist/tof/snapshot_time"][()].strip(b"\\0")),
                      "events": int(e["livehist/tof/events"][()]), "tof_sum": int(e["tof/data"][()].sum())}),
          flush=True)
"""


def test_a_swmr_reader_never_sees_more_points_or_counters_than_the_file_holds(tmp_path):
    """What another process reads while a scan is written: the point count and a snapshot's
    counters claimed data whose rows (and counts) were only in the writer's cache; a reader
    polling a scan saw points=8 beside datasets of 7 rows."""
    path = tmp_path / "live.nxs"
    r = Recorder([open_sink(path)])
    r.start(scan_start(3))
    sink = r.sinks[0]
    reader = subprocess.Popen([sys.executable, "-c", SWMR_READER, str(path), "scan_3"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    seen = []
    flush = sink.file.flush

    def checked_flush():  # what any reader may see at this moment: the state before this flush
        reader.stdin.write("check\n")
        reader.stdin.flush()
        seen.append(json.loads(reader.stdout.readline()))
        flush()

    try:
        sink.file.flush = checked_flush
        for i in range(3):
            time.sleep(0.25)  # each point is flushed (FLUSH_PERIOD 0.2 s)
            r.point(point(i))
        tof, image = histograms()
        r.histogram(tof)
        r.histogram(image)
        r.end(ScanEnd())
    finally:
        reader.stdin.close()
        reader.wait(timeout=10)
    assert len(seen) >= 4, seen
    for state in seen:
        assert state["points"] <= state["rows"], seen  # never a point count beyond the rows
        if state["snapshot"] or state["events"] != -1:  # counters only beside the counts they describe
            assert state["tof_sum"] == int(tof.counts.sum()), seen
    assert r.errors == {}
    with h5py.File(path, "r") as f:
        assert f["scan_3/livehist/points"][()] == 3 and f["scan_3/data/ct01"].shape == (3,)


def _sardana_recorder(path: Path):
    """livehist's Sardana recorder under Sardana's own DataHandler and RecordList (as the
    MacroServer runs it, without the servers)."""
    sys.path.insert(0, str(Path(ROOT) / "recorders" / "sardana"))
    from datetime import datetime

    from livehist_recorders import LivehistRecorder
    from sardana.macroserver.scan.recorder.datarecorder import DataHandler
    from sardana.macroserver.scan.scandata import ColumnDesc, RecordEnvironment, RecordList

    dh = DataHandler()
    dh.addRecorder(LivehistRecorder(str(path)))
    env = RecordEnvironment()
    env.update(datadesc=[ColumnDesc(name="point_nb", label="#Pt No", dtype="int64"),
                         ColumnDesc(name="mot01", label="mot01"), ColumnDesc(name="ct01", label="ct01")],
               serialno=12, title="ascan mot01 0 1 1 0.1", starttime=datetime.now(), ref_moveables=["mot01"],
               counters=["ct01"], ScanFile=[path.name], ScanDir=str(path.parent))  # fmt: skip
    return dh, RecordList(dh, env)


@pytest.mark.parametrize("ext", ["nxs", "spec", "jsonl"])
def test_custom_data_added_after_a_sardana_scan_ended_reaches_the_file(tmp_path, ext):
    """Sardana's scan macros add custom data after the scan loop, when the record list has
    already ended (its ascan_with_addcustomdata, ascanct_midtrigger): livehist's recorder
    dropped it without a word, where Sardana's own recorders append it."""
    from datetime import datetime

    path = tmp_path / f"s.{ext}"
    dh, rl = _sardana_recorder(path)
    rl.start()
    for i in range(2):
        rl.addRecord({"point_nb": i, "mot01": float(i), "ct01": 10.0 + i, "timestamp": 0.1 * i})
    rl.setEnvironValue("endstatus", "Normal")
    rl.setEnvironValue("endtime", datetime.now())
    rl.end()
    dh.addCustomData("fit ok", "fit_status")
    dh.addCustomData(np.arange(4) * 0.5, "fitted")
    if ext == "nxs":
        with h5py.File(path, "r") as f:
            e = f["scan_12"]
            assert e["livehist/status"][()] == b"ok" and e["data/ct01"][()].tolist() == [10.0, 11.0]
            assert e["custom_data/fit_status"][()] == b"fit ok"
            assert e["custom_data/fitted"][()].tolist() == [0.0, 0.5, 1.0, 1.5]
        assert "Total number of errors: 0" in run_tool("nxcheck", path)
    elif ext == "spec":
        from PyMca5.PyMcaIO import specfile

        text = path.read_text()
        assert '#C custom fit_status: "fit ok"' in text and "#C custom fitted: [0.0, 0.5, 1.0, 1.5]" in text
        assert specfile.Specfile(str(path))[0].lines() == 2
    else:
        records = [json.loads(line) for line in path.read_text().splitlines()]
        assert [r["record"] for r in records] == ["start", "point", "point", "end", "custom", "custom"]
        assert records[-1] == {
            "record": "custom",
            "scan_number": 12,
            "name": "fitted",
            "value": [0.0, 0.5, 1.0, 1.5],
        }


def test_a_swmr_reader_attached_at_the_end_does_not_make_the_end_fail(tmp_path):
    """An end with custom data or a histogram never received reopens the file without SWMR; a
    reader following the scan (a live plot) made that fail: the custom data was lost and the
    never-sent histogram kept its zeros as if counted."""
    path = tmp_path / "followed.nxs"
    r = Recorder([open_sink(path)])
    r.start(scan_start(4))
    r.point(point(0))
    r.histogram(histograms()[0])  # the image never comes
    reader = subprocess.Popen([sys.executable, "-c", SWMR_READER, str(path), "scan_4"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        reader.stdin.write("check\n")
        reader.stdin.flush()
        assert json.loads(reader.stdout.readline())["points"] == 1  # attached and reading
        r.end(ScanEnd(custom={"fit": [1.0, 2.0]}))
    finally:
        reader.stdin.close()
        reader.wait(timeout=10)
    assert r.errors == {}
    with h5py.File(path, "r") as f:
        e = f["scan_4"]
        assert e["livehist/status"][()] == b"ok" and e["custom_data/fit"][()].tolist() == [1.0, 2.0]
        assert "image" not in e and json.loads(e["livehist"].attrs["histograms_never_received"]) == ["image"]


def test_a_foreign_json_lines_file_is_refused_and_left_as_it_was(tmp_path):
    """ScanFile notes.jsonl naming a user's own text file: scans were appended after its lines."""
    notes = tmp_path / "notes.jsonl"
    notes.write_text("my own notes, not json\nline 2\n")
    with pytest.raises(RecorderError, match="not a livehist JSON lines file.*new file name"):
        record_scan([notes, tmp_path / "n.spec"])
    assert notes.read_text() == "my own notes, not json\nline 2\n" and not (tmp_path / "n.spec").exists()
    ours = tmp_path / "ours.jsonl"
    record_scan([ours])
    record_scan([ours])  # livehist's own file: appended
    assert [json.loads(line)["record"] for line in ours.read_text().splitlines()].count("start") == 2


def test_a_folder_named_like_a_scan_file_is_called_a_folder(tmp_path):
    for name in ("x.nxs", "x.spec", "x.jsonl"):
        (tmp_path / name).mkdir()
        with pytest.raises(RecorderError, match="it is a folder|Is a directory"):
            record_scan([tmp_path / name])
        assert not list((tmp_path / name).iterdir())
