"""The metadata model without Tango: validation, merge, audit trail, dataset life cycle."""

from __future__ import annotations

import copy
import grp
import json
import os
import re
import stat
import threading
from pathlib import Path

import jsonschema
import pytest

from livehist.components.metadata import MetadataError, MetadataStore, Rules, format_user, parse_user, schema
from livehist.errors import LivehistError


def test_merge_validates_and_keeps_free_form_keys():
    saved = []
    store = MetadataStore(save=saved.append)
    assert store.state == "STANDBY"
    changes = store.merge({"proposal": "20261234", "title": "Powder", "sample": {"name": "Si", "temperature": 295},
                           "users": ["Jane Doe (PI)", {"name": "Li Wei", "role": "student", "orcid": "0000-0001"}],
                           "beam_energy_meV": 25.3, "tags": ["a", "b"]})  # fmt: skip
    assert {c.key for c in changes} == {"proposal", "title", "sample.name", "sample.temperature", "users",
                                        "beam_energy_meV", "tags"}  # fmt: skip
    assert store.state == "ON" and saved[-1]["metadata"]["beam_energy_meV"] == 25.3
    snap = store.snapshot()
    assert snap["sample"] == {"name": "Si", "temperature": 295.0}
    assert snap["users"][0] == {"name": "Jane Doe", "role": "PI"}
    jsonschema.validate(snap, schema())  # what we keep is what the schema promises
    assert (
        store.merge({"sample": {"description": "NIST 640f"}}) and store.snapshot()["sample"]["name"] == "Si"
    )
    assert store.merge({"title": "Powder"}) == []  # no change, no audit entry
    snap["sample"]["name"] = "changed"  # a snapshot is a copy
    assert store.get("sample")["name"] == "Si"


@pytest.mark.parametrize(
    "update, message",
    [
        ({"proposal": "../../etc"}, "does not match the pattern"),
        ({"proposal": 20261234}, "proposal must be a string"),
        ({"title": "x" * 5000}, "over the limit of 4096"),
        ({"sample": {"temperature": "hot"}}, "sample.temperature must be a number"),
        ({"sample": {"colour": "red"}}, "sample.colour is not a sample field"),
        ({"sample": "Si"}, "sample must be an object"),
        ({"users": [{"name": "A", "shoe_size": 42}]}, "users[0].shoe_size is not a user field"),
        ({"users": [{"role": "PI"}]}, "users[0] must be an object with a name"),
        ({"users": "Jane"}, "users must be a list"),
        ({"data_root": "relative/path"}, "data_root must be an absolute path"),
        ({"bad key!": 1}, "is not allowed"),
        ({"nested": {"a": {"b": 1}}}, "one level of list/object"),
        ({"dataset": "x"}, "set by StartDataset"),
        ({"title": "a\x00b"}, "contains U+0000 (NUL)"),
        ('{"sample": {"name": "\\ud800x"}}', "half of a UTF-16 pair"),
        ({"free": {"k\x00": 1}}, "free key contains U+0000"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "needs a JSON object"),
        ({"proposal": "P1\n"}, "does not match the pattern"),  # re.match's '$' let a newline through
        ({"beam\n": 1}, "is not allowed"),
        ({"\u03b1key": 1}, "not allowed; keys start with an ASCII letter (a-z, A-Z)"),  # said 'letters
        ({"sample": {"temperature": 10**400}}, "finite number of kelvin"),  # was OverflowError
        ({"free": 10**400}, "an integer of 401 digits"),
        ("[" * 100_000, "nested too deep"),  # was RecursionError
    ],
)
def test_bad_metadata_is_refused_whole_and_named(update, message):
    store = MetadataStore()
    store.merge({"proposal": "P1", "title": "kept"})
    before = store.stored()
    with pytest.raises(MetadataError) as exc:
        store.merge(update if isinstance(update, str) else {"title": "not applied", **update})
    assert message in str(exc.value)
    assert store.stored() == before  # all keys or none


def test_caps_on_keys_and_total_size():
    store = MetadataStore(Rules(max_free_keys=3, max_total_bytes=2000))
    store.merge({"a": 1, "b": 2, "c": 3})
    with pytest.raises(MetadataError, match="4 free-form keys, over the limit of 3"):
        store.merge({"d": 4})
    store.merge({"c": None})  # null removes a free-form key, making room
    store.merge({"d": 4})
    assert "c" not in store.snapshot() and store.audit[-2].key == "c" and store.audit[-2].new is None
    with pytest.raises(MetadataError, match="over the limit of 2000"):
        store.merge({"a": "x" * 1500, "b": "y" * 1500})


def test_audit_trail_is_bounded_and_survives_a_restore():
    saved = []
    store = MetadataStore(Rules(audit_length=5), save=saved.append)
    for i in range(12):
        store.merge({"title": f"t{i}"}, client=f"10.0.0.{i}")
    trail = [c.to_json() for c in store.audit]
    assert len(trail) == 5 and trail[-1]["new"] == "t11" and trail[-1]["old"] == "t10"
    assert trail[-1]["client"] == "10.0.0.11" and trail[-1]["time"].endswith("+00:00")
    again = MetadataStore(Rules(audit_length=5), stored=json.loads(json.dumps(saved[-1])))
    assert again.stored() == store.stored()


def test_concurrent_writers_with_room_keep_every_key():
    store = MetadataStore(Rules(max_free_keys=500))
    threads = [threading.Thread(target=lambda k=k: [store.merge({f"w{k}_{i}": i}, client=f"w{k}") for i in range(50)])
               for k in range(4)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {f"w{k}_{i}" for k in range(4) for i in range(50)} <= set(store.snapshot())


def test_dataset_life_cycle_with_folder_group_mode_and_summary(tmp_path):
    group = grp.getgrgid(os.getgid()).gr_name
    store = MetadataStore(Rules(data_group=group, data_mode=0o2750))
    with pytest.raises(MetadataError, match="no proposal set"):
        store.start_dataset("run1")
    store.merge({"proposal": "20261234"})
    with pytest.raises(MetadataError, match="no DataRoot set"):
        store.start_dataset("run1")
    store.merge({"data_root": str(tmp_path), "instrument": "SANS2D", "sample": {"name": "Si"}})
    for bad in ("../x", "a/b", "..", "", "x" * 70, "-lead", "run1\n"):
        with pytest.raises(MetadataError, match="is not allowed"):
            store.start_dataset(bad)
    with pytest.raises(MetadataError, match=r"use 1-64 ASCII letters \(a-z, A-Z\)"):  # 'letters' refused é
        store.start_dataset("café")
    folder = store.start_dataset("run1")
    assert store.state == "RUNNING" and folder.is_dir()
    assert folder.parent.name == "20261234" and folder.parent.parent.parent == tmp_path
    mode = folder.stat().st_mode
    assert stat.S_IMODE(mode) == 0o2750 and folder.stat().st_gid == os.getgid()
    assert stat.S_IMODE(folder.parent.stat().st_mode) == 0o2750  # created parents too
    with pytest.raises(MetadataError, match="EndDataset first"):
        store.start_dataset("run2")
    (folder / "scan.nxs").write_bytes(b"x" * 10)
    summary_path = store.end_dataset()
    summary = json.loads(summary_path.read_text())
    assert summary["dataset"] == "run1" and summary["metadata"]["sample"]["name"] == "Si"
    assert summary["files"] == [{"path": "scan.nxs", "size": 10, "modified": summary["files"][0]["modified"]}]
    assert summary["start_time"] <= summary["end_time"] and store.state == "ON"
    with pytest.raises(MetadataError, match="no dataset is open"):
        store.end_dataset()


def test_folder_pattern_and_group_errors(tmp_path):
    store = MetadataStore(Rules(folder_pattern="{data_root}/{nope}/{dataset}"))
    store.merge({"proposal": "P", "data_root": str(tmp_path)})
    with pytest.raises(MetadataError, match="cannot be filled"):
        store.start_dataset("d")
    store = MetadataStore(Rules(folder_pattern="/tmp/{dataset}"))
    store.merge({"proposal": "P", "data_root": str(tmp_path)})
    with pytest.raises(MetadataError, match="outside DataRoot"):
        store.start_dataset("d")
    store = MetadataStore(Rules(data_group="no-such-group-livehist"))
    store.merge({"proposal": "P", "data_root": str(tmp_path)})
    with pytest.raises(MetadataError, match="DataGroup 'no-such-group-livehist' is not a group"):
        store.start_dataset("d")
    store = MetadataStore()
    store.merge({"proposal": "P", "data_root": str(tmp_path / "missing")})
    with pytest.raises(MetadataError, match="does not exist"):
        store.start_dataset("d")
    with pytest.raises(MetadataError, match="not a regex"):
        MetadataStore(Rules(proposal_pattern="(["))


def test_parse_user():
    assert parse_user("Jane Doe (PI)") == {"name": "Jane Doe", "role": "PI"}
    assert parse_user(" Li Wei ") == {"name": "Li Wei"}


# --- issue 14: any text, no shadow keys, bounded audit, standard JSON, nothing overwritten ---
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from livehist.components.metadata import canonical_key, from_tango_text, tango_text  # noqa: E402


@given(st.text())
def test_tango_text_is_latin1_and_lossless_for_any_text(text):
    shown = tango_text(text)
    shown.encode("latin-1")  # what a DevString can carry
    assert from_tango_text(shown) == text


def test_tango_text_examples_and_escapes_typed_by_users():
    assert tango_text("α-Fe2O3 – 5 K") == "\\u03b1-Fe2O3 \\u2013 5 K"
    assert tango_text("Å⁻¹ at 4 °C, 5 µs, Dvořák") == "Å\\u207b¹ at 4 °C, 5 µs, Dvo\\u0159ák"
    assert tango_text("plain é") == "plain é"  # Latin-1 stays readable as is
    assert from_tango_text("\\N{GREEK SMALL LETTER BETA}-Ga2O3 \\U0001f9ea") == "β-Ga2O3 🧪"
    assert from_tango_text("C:\\data\\x") == "C:\\data\\x"  # a lone backslash stays
    with pytest.raises(LivehistError, match="not a Unicode character name"):
        from_tango_text("\\N{NO SUCH THING}")


@given(st.text())
def test_latin1_text_for_statuses_carries_any_text_and_never_escapes_twice(text):
    from livehist.errors import latin1_text

    shown = latin1_text(text)
    shown.encode("latin-1")  # what a DevString can carry
    assert latin1_text(shown) == shown  # already-escaped text (ascii() of a name) stays as it is
    assert latin1_text("file \u6570.nxs; ('\\u63a2', C:\\x)") == "file \\u6570.nxs; ('\\u63a2', C:\\x)"


def test_attribute_names_and_case_variants_map_to_one_key():
    store = MetadataStore()
    store.merge({"Proposal": "20260001", "Title": "T", "SampleName": "Si", "DataRoot": "/tmp"})
    store.merge({"Sample": {"Temperature": 4.2}, "sample.Description": "powder"})
    md = store.snapshot()
    assert md["proposal"] == "20260001" and md["title"] == "T" and md["data_root"] == "/tmp"
    assert md["sample"] == {"name": "Si", "temperature": 4.2, "description": "powder"}
    assert not {"Proposal", "Title", "Sample", "SampleName", "DataRoot"} & set(md)  # no shadow key
    assert canonical_key("SAMPLENAME") == "sample.name" and canonical_key("beam") == "beam"
    store.merge({"beam_size": 5})
    before = store.stored()
    with pytest.raises(MetadataError, match="did you mean 'beam_size'"):
        store.merge({"Beam_Size": 6})
    with pytest.raises(MetadataError, match="give it once"):
        store.merge({"proposal": "1", "Proposal": "2"})
    with pytest.raises(MetadataError, match="give it once"):
        store.merge({"foo": 1, "FOO": 2})
    assert store.stored() == before


@pytest.mark.parametrize(
    "update, message",
    [
        ('{"sample": {"temperature": 1e999}}', "finite number of kelvin >= 0, got inf"),
        ('{"sample": {"temperature": -5}}', "finite number of kelvin >= 0, got -5"),
        ('{"sample": {"temperature": Infinity}}', "Infinity is not JSON"),
        ('{"sample": {"temperature": NaN}}', "NaN is not JSON"),
        ('{"field_T": 1e999}', "field_T is inf, which JSON cannot hold"),
        ('{"limits": [1, -1e999]}', "limits[1] is -inf"),
    ],
)
def test_nonfinite_and_negative_kelvin_are_refused(update, message):
    store = MetadataStore()
    store.merge({"sample": {"temperature": 10.0}})
    before = store.stored()
    with pytest.raises(MetadataError, match=re.escape(message)):
        store.merge(update)
    assert store.stored() == before
    json.loads(json.dumps(store.snapshot(), allow_nan=False))  # still standard JSON


def test_audit_trail_is_bounded_in_bytes():
    saved = []
    store = MetadataStore(Rules(audit_bytes=20_000), save=saved.append)
    for i in range(200):  # a 28 KB value changed 200 times
        store.merge({"notes": [f"{i:03d}"] + ["x" * 4000] * 7})
    stored = json.dumps(saved[-1])
    assert len(stored) < 60_000 + 20_000 + 1000  # metadata + audit bound, not 200 x 28 KB
    trail = [c.to_json() for c in store.audit]
    assert len(json.dumps(trail)) <= 20_000 and trail[-1]["new"].startswith('["199", "xxx')
    assert "[abbreviated in the audit trail: 28035 characters in all]" in trail[-1]["new"]
    assert (
        store.snapshot()["notes"][0] == "199" and len(store.snapshot()["notes"]) == 8
    )  # the metadata is whole


def test_a_save_that_fails_changes_nothing(tmp_path):
    calls = []

    def save(stored):
        calls.append(stored)
        if len(calls) > 1:
            raise OSError("database down")

    store = MetadataStore(save=save)
    store.merge({"proposal": "P", "data_root": str(tmp_path)})
    before = store.stored()
    with pytest.raises(OSError):
        store.merge({"title": "lost?"})
    with pytest.raises(OSError):
        store.start_dataset("d1")
    assert store.stored() == before and store.dataset is None


def test_a_reused_dataset_name_never_overwrites_its_summary(tmp_path):
    store = MetadataStore()
    store.merge({"proposal": "P", "data_root": str(tmp_path)})
    store.start_dataset("run_7")
    first = store.end_dataset()
    text = first.read_text()
    with pytest.raises(MetadataError, match="already recorded and closed.*e.g. 'run_7_2'"):
        store.start_dataset("run_7")
    assert first.read_text() == text and store.dataset is None
    store.start_dataset("run_7_2")
    assert store.end_dataset().name == "dataset.json"
    # a summary appearing under an open dataset (another tool) is not replaced either
    store.start_dataset("run_8")
    folder = Path(store.dataset["folder"])
    (folder / "dataset.json").write_text("{}")
    second = store.end_dataset()
    assert second.name == "dataset_2.json" and (folder / "dataset.json").read_text() == "{}"
    assert [f["path"] for f in json.loads(second.read_text())["files"]] == []


@pytest.mark.parametrize(
    "key", ["Dataset", "DATASET", "DatasetName", "DataFolder", "dataset_name", "data_folder"]
)
def test_the_open_dataset_has_no_shadow_key(tmp_path, key):
    """SetMetadata {"DatasetName": "fake"} (an attribute name) or {"Dataset": ...} (a case variant)
    was kept as a free-form key, so every file of the dataset carried a second, invented dataset
    next to the real one (SPEC '#C meta.DatasetName: "fake"' under '#C dataset: run_7')."""
    store = MetadataStore()
    store.merge({"proposal": "P1", "data_root": str(tmp_path)})
    store.start_dataset("run_7")
    before = store.stored()
    with pytest.raises(MetadataError, match=f"'{key}': the dataset is set by StartDataset/EndDataset"):
        store.merge({"title": "not applied", key: "fake"})
    assert store.stored() == before
    assert store.snapshot()["dataset"]["name"] == "run_7" and key not in store.snapshot()


def test_a_dataset_shadow_key_stored_before_can_still_be_removed():
    store = MetadataStore(stored={"metadata": {"proposal": "P1", "DatasetName": "fake"}})
    assert [c.key for c in store.merge({"DatasetName": None})] == ["DatasetName"]
    assert "DatasetName" not in store.snapshot()


@pytest.mark.parametrize(
    "text, key",
    [
        ('{"title": "first", "title": "second"}', "title"),
        ('{"sample": {"name": "Si", "name": "Ge"}}', "name"),
        ('{"beam": {"x": 1, "x": 2}}', "x"),
    ],
)
def test_a_key_given_twice_in_the_json_is_refused(text, key):
    """'{"title": "first", "title": "second"}' kept 'second' without a word ('first' dropped),
    while 'title' and 'Title' together were refused as one key given twice."""
    store = MetadataStore()
    store.merge({"proposal": "P1", "title": "kept"})
    before = store.stored()
    with pytest.raises(MetadataError, match=f"gives '{key}' twice"):
        store.merge(text)
    assert store.stored() == before


def test_users_written_back_as_shown_keep_their_full_records():
    """The Users attribute shows 'Name (role)'; writing back what was read, or adding one user to
    it (m.Users = list(m.Users) + ["Ada Li"]), dropped every user's email, ORCID and affiliation."""
    store = MetadataStore()
    jane = {"name": "Jane Doe", "role": "PI", "email": "jane@lab.org", "orcid": "0000-0002-1825-0097"}
    odd = {"name": "Li Wei (guest)", "affiliation": "ILL"}  # shown as 'Li Wei (guest)' too
    store.merge({"users": [jane, odd]})
    shown = [format_user(u) for u in store.get("users")]
    assert shown == ["Jane Doe (PI)", "Li Wei (guest)"]
    assert store.merge({"users": shown}) == []  # written back unchanged: nothing changed
    store.merge({"users": [*shown, "Ada Li (student)"]})
    assert store.get("users") == [jane, odd, {"name": "Ada Li", "role": "student"}]
    store.merge({"users": ["Li Wei (guest)"]})  # one removed, the other keeps its record
    assert store.get("users") == [odd]
    store.merge({"users": ["Jane Doe (PI)"]})  # a user not there any more starts from what is given
    assert store.get("users") == [{"name": "Jane Doe", "role": "PI"}]


def test_end_dataset_whose_folder_is_gone_says_so_and_can_be_retried(tmp_path):
    """A dataset whose folder was moved or deleted could never be ended: EndDataset said only
    "[Errno 2] No such file or directory: '.../.dataset.json.123.tmp'" and the device stayed RUNNING."""
    store = MetadataStore()
    store.merge({"proposal": "P1", "data_root": str(tmp_path)})
    folder = store.start_dataset("run_1")
    folder.rmdir()
    before = store.stored()
    with pytest.raises(MetadataError) as exc:
        store.end_dataset()
    assert f"{folder}, is gone" in str(exc.value) and f"mkdir -p {folder}" in str(exc.value)
    assert store.stored() == before and store.state == "RUNNING"
    folder.mkdir()  # the fix the message names
    assert json.loads(store.end_dataset().read_text())["files"] == [] and store.state == "ON"


FULL_DISK = """
import resource, sys
from pathlib import Path
from livehist.components.metadata import MetadataError, MetadataStore
store = MetadataStore()
store.merge({"proposal": "P1", "data_root": sys.argv[1], "title": "t" * 4000})
folder = store.start_dataset("run_1")
resource.setrlimit(resource.RLIMIT_FSIZE, (1000, resource.RLIM_INFINITY))  # the summary is 4 KB
try:
    store.end_dataset()
except MetadataError as exc:
    print(exc)
print(store.state, sorted(p.name for p in folder.iterdir()))
"""


def test_end_dataset_that_cannot_write_its_summary_says_where_and_leaves_no_debris(tmp_path):
    """On a full disk EndDataset said '[Errno 28] No space left on device' (no folder, no fix) and
    left a half-written .dataset.json.PID.tmp in the dataset folder."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", FULL_DISK, str(tmp_path)], capture_output=True, text=True,
                         timeout=60).stdout.splitlines()  # fmt: skip
    assert len(out) == 2, out
    assert out[0].startswith("dataset 'run_1' stays open: its summary cannot be written in ") and (
        "File too large" in out[0] and "then EndDataset again" in out[0]
    ), out
    assert out[1] == "RUNNING []", out  # still open, and no temporary file left


@pytest.mark.parametrize(
    "pattern, root", [("/{data_root}/{dataset}", "{tmp}"), ("{data_root}/{dataset}", "/{tmp}")]
)
def test_a_doubled_slash_never_gives_a_folder_that_was_not_created(tmp_path, pattern, root):
    """With a DataRoot of '/' (or a pattern or DataRoot giving '//...') StartDataset returned
    '//2026/P1/run_1' as DataFolder and went RUNNING without creating any folder."""
    store = MetadataStore(Rules(folder_pattern=pattern))
    store.merge({"proposal": "P1", "data_root": root.format(tmp=tmp_path)})
    folder = store.start_dataset("run_1")
    assert str(folder) == f"{tmp_path}/run_1" and folder.is_dir()
    assert store.snapshot()["dataset"]["folder"] == f"{tmp_path}/run_1"


@pytest.mark.parametrize(
    "stored, said",
    [
        ({"metadata": {"sample": "Si"}}, "metadata.sample is 'Si', not an object"),
        ({"metadata": [1]}, "metadata is a list, not an object"),
        ({"metadata": {"users": "Jane"}}, "metadata.users is 'Jane', not a list"),
        ({"metadata": {"proposal": 5}}, "metadata.proposal is 5, not a string"),
        ({"metadata": {}, "dataset": "run"}, "dataset is 'run', not an object"),
        ({"metadata": {}, "audit": "x"}, "audit is 'x', not a list"),
        (["x"], "a JSON list, not an object"),
    ],
)
def test_a_stored_state_that_is_not_what_was_saved_is_refused_naming_it(stored, said):
    """Restored without a look: a sample that was not an object made every later merge fail with
    AttributeError, a list raised TypeError, a proposal 5 read as ON."""
    with pytest.raises(MetadataError, match="StoredMetadata is not what this device saved") as exc:
        MetadataStore(stored=stored)
    assert said in str(exc.value)


def test_a_stored_state_from_a_newer_version_is_read_and_its_keys_kept():
    """An audit entry with one field more (a newer version's) raised TypeError in the restore."""
    saved = []
    newer = {"format": 2, "metadata": {"proposal": "P1", "sample": {"name": "Si"}},
             "audit": [{"time": "t", "client": "c", "key": "proposal", "old": None, "new": "P1", "sig": "x"}],
             "dataset": None}  # fmt: skip
    store = MetadataStore(save=saved.append, stored=newer)
    assert store.state == "ON" and store.get("sample") == {"name": "Si"}
    assert store.stored()["audit"][0]["new"] == "P1"
    store.merge({"title": "T"})
    assert saved[-1]["format"] == 2 and saved[-1]["metadata"]["title"] == "T"


@pytest.mark.parametrize("key, value", [("proposal", "P2"), ("data_root", "/elsewhere"), ("proposal", "")])
def test_what_names_the_open_datasets_folder_cannot_change_under_it(tmp_path, key, value):
    """Changing the proposal (or DataRoot) while a dataset was open was taken: the next scans went
    on into DataRoot/2026/P1/run_1 saying proposal P2, and the summary at EndDataset, in P1's folder,
    claimed proposal P2 for every file, those written for P1 too."""
    store = MetadataStore()
    store.merge({"proposal": "P1", "data_root": str(tmp_path), "instrument": "LOKI"})
    folder = store.start_dataset("run_1")
    before = store.stored()
    with pytest.raises(MetadataError) as exc:
        store.merge({"title": "not applied", key: value})
    assert f"{key} cannot change while dataset 'run_1' is open in {folder}" in str(exc.value)
    assert "EndDataset, then set" in str(exc.value)
    assert store.stored() == before
    store.merge({"instrument": "LOKI-2", "proposal": "P1"})  # not in the folder's name / unchanged: taken
    summary = json.loads(store.end_dataset().read_text())
    assert summary["metadata"]["proposal"] == "P1" and str(folder).endswith("/P1/run_1")
    store.merge({key: value})  # with no dataset open it is taken


def test_a_dataset_name_taken_by_a_file_is_refused(tmp_path):
    """A file where the dataset's folder goes (DataRoot/2026/P1/run_f) was taken as its folder:
    RUNNING, DataFolder a file, scans failing into it and EndDataset '[Errno 20] Not a directory'."""
    store = MetadataStore(Rules(folder_pattern="{data_root}/{proposal}/{dataset}"))
    store.merge({"proposal": "P1", "data_root": str(tmp_path)})
    (tmp_path / "P1").mkdir()
    (tmp_path / "P1" / "run_f").write_text("a user's notes")
    before = store.stored()
    with pytest.raises(
        MetadataError, match="run_f exists and is a file, not a folder; choose another dataset name"
    ):
        store.start_dataset("run_f")
    assert store.stored() == before and store.state == "ON"
    assert (tmp_path / "P1" / "run_f").read_text() == "a user's notes"


def test_a_dataset_summary_says_what_changed_while_it_was_open(tmp_path):
    """The summary's metadata is the one at EndDataset: with the sample changed between two scans it
    said sample 'Ge' for a dataset whose first file was of 'Si', with no word of the change."""
    store = MetadataStore()
    store.merge({"proposal": "P1", "data_root": str(tmp_path), "sample": {"name": "Si"}})
    folder = store.start_dataset("run_1")
    (folder / "si.spec").write_text("#F si.spec\n")
    store.merge({"sample": {"name": "Ge"}, "title": "Ge now"}, client="panel")
    summary = json.loads(store.end_dataset().read_text())
    assert summary["metadata"]["sample"]["name"] == "Ge"
    changes = [(c["key"], c["old"], c["new"], c["client"]) for c in summary["metadata_changes"]]
    assert changes == [("sample.name", "Si", "Ge", "panel"), ("title", None, "Ge now", "panel")]
    assert "metadata_changes_complete" not in summary
    store.start_dataset("run_2")
    summary = json.loads(store.end_dataset().read_text())
    assert summary["metadata_changes"] == []  # nothing changed in run_2


def test_a_dataset_summary_says_when_the_trail_no_longer_reaches_its_start(tmp_path):
    store = MetadataStore(Rules(audit_length=3))
    store.merge({"proposal": "P1", "data_root": str(tmp_path)})
    store.start_dataset("run_1")
    for t in "abcd":
        store.merge({"title": t})
    summary = json.loads(store.end_dataset().read_text())
    assert summary["metadata_changes_complete"] is False
    assert [c["new"] for c in summary["metadata_changes"]] == ["b", "c", "d"]


def test_an_abbreviated_audit_entry_survives_restarts_unchanged():
    """The trail keeps long values abbreviated; each restart (or Init) abbreviated the abbreviation
    again, so an entry saying '4000 characters in all' said '316 characters in all' afterwards."""
    store = MetadataStore()
    store.merge({"title": "x" * 4000, "tags": ["y" * 300]})
    saved = store.stored()
    assert saved["audit"][0]["new"].endswith("[abbreviated in the audit trail: 4000 characters in all]")
    for _ in range(3):  # three restarts
        store = MetadataStore(stored=store.stored())
    assert store.stored()["audit"] == saved["audit"]


def test_end_dataset_after_a_kill_between_summary_and_save_writes_no_second_summary(tmp_path):
    """EndDataset writes dataset.json, then saves the closed state; a server killed between the
    two came back RUNNING, and the next EndDataset wrote dataset_2.json: two summaries of one
    dataset (a catalogue registers it twice). So did a device cloned with its StoredMetadata."""
    store = MetadataStore()
    store.merge({"proposal": "P1", "data_root": str(tmp_path)})
    folder = store.start_dataset("run_1")
    open_state = copy.deepcopy(store.stored())  # what the killed server had saved
    first = store.end_dataset()
    text = first.read_text()
    restarted = MetadataStore(stored=open_state)
    assert restarted.state == "RUNNING"
    assert restarted.end_dataset() == first and restarted.state == "ON"
    assert sorted(p.name for p in folder.iterdir()) == ["dataset.json"] and first.read_text() == text
    restarted.start_dataset("run_2")  # the summary found is only ever the same dataset's
    (restarted.folder_for("run_2") / "dataset.json").write_text(
        '{"dataset": "run_2", "start_time": "earlier"}'
    )
    assert restarted.end_dataset().name == "dataset_2.json"


def test_a_symbolic_link_below_data_root_is_never_a_dataset_folder(tmp_path):
    """A link DataRoot/2026/P1/run_link -> DataRoot/2026/P2/secret (made by anyone who can write in
    P1's folder) was taken: P1's dataset was written into P2's folder, its summary there claiming
    proposal P1; a link leading out of DataRoot was refused as 'fix the pattern'."""
    store = MetadataStore(Rules(folder_pattern="{data_root}/{proposal}/{dataset}"))
    store.merge({"proposal": "P1", "data_root": str(tmp_path)})
    (tmp_path / "P1").mkdir()
    (tmp_path / "P2" / "secret").mkdir(parents=True)
    (tmp_path / "P1" / "run_link").symlink_to(tmp_path / "P2" / "secret")
    (tmp_path / "P1" / "run_out").symlink_to("/tmp")
    before = store.stored()
    for name in ("run_link", "run_out"):
        with pytest.raises(
            MetadataError, match=f"P1/{name} is a symbolic link .* remove it or choose another"
        ):
            store.start_dataset(name)
    assert store.stored() == before and store.state == "ON"
    assert list((tmp_path / "P2" / "secret").iterdir()) == []
    (tmp_path / "P0").symlink_to(tmp_path / "P1")  # a link above the dataset's own folder too
    store.merge({"proposal": "P0"})
    with pytest.raises(MetadataError, match="P0 is a symbolic link"):
        store.start_dataset("run_1")
