"""Event sources against hostile input: broken NeXus files, odd simulator parameters, bad hosts."""

from __future__ import annotations

import time

import h5py
import numpy as np
import pytest

from livehist.engine import Engine
from livehist.engine.sources import SourceError, open_source
from livehist.engine.spec import parse_histograms
from tests.conftest import SANS2D

SPECS = [
    {"name": "t", "kind": "tof", "tof": {"start": 0, "stop": 1000, "bins": 10}},
    {"name": "i", "kind": "image", "pixels": {"first": 0, "shape": [4, 4]}},
]


def event_file(path, event_id, tof, pulse_time_s, index) -> str:
    with h5py.File(path, "w") as f:
        g = f.create_group("entry/events")
        g.attrs["NX_class"] = "NXevent_data"
        g["event_id"] = event_id
        g["event_time_offset"] = tof
        g["event_time_offset"].attrs["units"] = "ns"
        g["event_time_zero"] = pulse_time_s
        g["event_time_zero"].attrs["units"] = "s"
        g["event_index"] = index
    return str(path)


def replay(uri: str, timeout: float = 60.0) -> Engine:
    src = open_source(uri)
    engine = Engine(parse_histograms(SPECS))
    engine.start(src)
    deadline = time.monotonic() + timeout
    while not src.finished and src.error is None and engine.fault is None and time.monotonic() < deadline:
        time.sleep(0.01)
    engine.stop()
    assert src.error is None and engine.fault is None, (src.error, engine.fault)
    return engine


def test_nexus_arrays_of_different_lengths_are_refused_not_half_counted(tmp_path):
    """event_time_offset with 10 fewer values than event_id: the last pulse's events were
    silently not counted (90 of 100, no error anywhere)."""
    n = 100
    for ids, tofs in ((n, n - 10), (n - 10, n)):
        path = event_file(tmp_path / f"m{ids}.nxs", np.arange(ids) % 16, np.arange(tofs) * 10,
                          np.arange(10) * 0.1, np.arange(10) * 10)  # fmt: skip
        with pytest.raises(SourceError, match=f"event_id has {ids} .*event_time_offset has {tofs}"):
            open_source(f"nexus://{path}?rate=max")


def test_nexus_big_endian_and_unusual_dtypes_replay_equal_numpy(tmp_path):
    """Big-endian arrays (HDF5 keeps the writer's byte order) failed histogramming with a numba
    TypingError ('Unsupported array dtype: >i4'): FAULT and nothing counted."""
    rng = np.random.default_rng(3)
    n = 5000
    ids, tofs = rng.integers(-2, 18, n), rng.uniform(-100, 1100, n)
    index = np.sort(rng.integers(0, n, 20))
    index[0] = 0
    cases = [(">i4", ">f4"), (">u8", ">f8"), (">i2", ">i8"), ("<u4", "<f4"), (">i8", ">u4")]
    for id_type, tof_type in cases:
        i, t = (
            ids.astype(id_type) if id_type[1] != "u" else np.abs(ids).astype(id_type),
            tofs.astype(tof_type),
        )
        path = event_file(tmp_path / f"{id_type[1:]}_{tof_type[1:]}.nxs", i, t,
                          (np.arange(20) * 0.1).astype(">f8"), index.astype(">i8"))  # fmt: skip
        engine = replay(f"nexus://{path}?rate=max")
        snap = engine.snapshot()
        assert snap.events == n and snap.pulses == 20, (id_type, tof_type)
        t64 = t.astype(
            np.float64
        )  # bins are half-open: an event at 1000 is outside (numpy closes its last bin)
        expected = np.histogram(t64[t64 < 1000], np.linspace(0, 1000, 11))[0]
        assert snap.counts["t"].tolist() == expected.tolist(), (id_type, tof_type)
        p = i.astype(np.int64)
        assert snap.counts["i"].ravel().tolist() == np.bincount(p[(p >= 0) & (p < 16)], minlength=16).tolist()


def test_nexus_non_numeric_event_arrays_are_refused_at_open(tmp_path):
    """String pixel ids failed later, at the first pulse, with a numba TypingError."""
    path = event_file(tmp_path / "s.nxs", np.array([b"a"] * 10), np.arange(10), [0.0], [0])
    with pytest.raises(SourceError, match=r"event_id has dtype \|S1; .*numbers"):
        open_source(f"nexus://{path}")


def test_nexus_damaged_file_fails_with_a_source_error_naming_it(tmp_path):
    """A file damaged in its middle raised a bare RuntimeError ('Object visitation failed (bad
    symbol table node signature)') from the search for the NXevent_data group: not a SourceError,
    so a device that reopens a failed source (it catches SourceError) was not prepared for it."""
    raw = bytearray(open(SANS2D, "rb").read())
    middle = len(raw) // 2
    raw[middle : middle + 4096] = b"\xa5" * 4096
    bad = tmp_path / "damaged.nxs"
    bad.write_bytes(raw)
    with pytest.raises(SourceError, match=f"cannot read {bad}: .*bad symbol table"):
        open_source(f"nexus://{bad}?rate=max")


@pytest.mark.parametrize("freq", ["0.1", "0.001", "1e12", "1e10"])
def test_sim_pulse_frequency_whose_frames_ev44_cannot_carry_is_refused(freq):
    """freq=0.1 made a 10 s frame whose TOFs wrapped past int32 ns (negative TOFs, min -2**31);
    freq=1e12 made a 0 ns frame: every TOF was -2**31 and every pulse had the same time."""
    with pytest.raises(SourceError, match=f"freq must be 0.5 to 1e.06 Hz.*got '{freq}'"):
        open_source(f"sim://?freq={freq}")


@pytest.mark.parametrize("freq", ["0.5", "14", "1e6"])
def test_sim_pulse_frequencies_in_range_give_tofs_inside_the_frame(freq):
    model = open_source(f"sim://?freq={freq}").model
    assert model.period_ns > 0 and model.tof.min() >= 0 and model.tof.max() < model.period_ns


@pytest.mark.parametrize("bad_id", [2**32 + 5, 2**31, -(2**31) - 1, 2**63 + 3])
def test_stream_refuses_pixel_ids_ev44_cannot_carry_instead_of_wrapping_them(tmp_path, bad_id):
    """`livehist stream` of a file with pixel id 2**32+5 sent pixel 5 (int32 wrap-around), which
    the receiving device counted in a real pixel; replaying the file directly counts it nowhere."""
    from livehist.engine.stream import stream
    from livehist.errors import LivehistError
    from tests.conftest import free_port

    ids = np.array([1, 2, bad_id, 3], np.uint64 if bad_id >= 2**63 else np.int64)
    path = event_file(tmp_path / "ids.nxs", ids, np.arange(4), [0.0], [0])
    with pytest.raises(LivehistError, match=f"pixel id {bad_id} does not fit ev44's int32"):
        stream(f"nexus://{path}?rate=max", f"tcp://127.0.0.1:{free_port()}", say=lambda s: None, seconds=30)


def test_zmq_sub_counts_messages_zeromq_dropped_under_a_flood():
    """A PUB flooding a zmq+sub:// engine: ZeroMQ drops what its queues cannot hold (PUB never
    waits), and the engine counted 30,500 of 1,583,432 messages sent with DroppedMessageCount 0.
    The ev44 message_id gaps of each source are now counted as dropped."""
    import zmq

    from livehist.engine.events import EventBatch, encode_ev44
    from tests.conftest import free_port

    port = free_port()
    specs = [{"name": "p", "kind": "pixel_tof", "pixels": {"first": 0, "count": 4000},
              "tof": {"start": 0, "stop": 1000, "bins": 1000}}]  # fmt: skip
    engine = Engine(parse_histograms(specs), max_queue_items=4, max_queue_bytes=2**20)
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    try:
        pub.bind(f"tcp://127.0.0.1:{port}")
        engine.start(open_source(f"zmq+sub://127.0.0.1:{port}"))
        one = EventBatch(np.arange(10, dtype=np.int32), np.arange(10, dtype=np.int32), np.zeros(1, np.int64),
                         np.zeros(1, np.int64))  # fmt: skip
        deadline = time.monotonic() + 10
        while engine.messages == 0:  # the subscription reached the PUB
            assert time.monotonic() < deadline
            pub.send(encode_ev44(one, 0))
            time.sleep(0.05)
        time.sleep(0.5)  # the id-0 messages still in flight arrive
        first = engine.messages
        frames = [encode_ev44(one, i) for i in range(1, 200_001)]
        for frame in frames:  # far faster than the engine takes single small messages
            pub.send(frame)
        time.sleep(1.0)
        pub.send(encode_ev44(one, 200_001))  # the last one arrives once the queues are empty
        deadline = time.monotonic() + 30
        while engine.messages + engine.dropped_messages < first + 200_001:
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        time.sleep(0.5)
        engine.stop()
    finally:
        pub.close(0)
        ctx.term()
    # messages 0 sent while subscribing (first - 1 of them arrived, others never seen as gaps)
    assert engine.dropped_messages > 0
    assert engine.messages + engine.dropped_messages == first + 200_001, (
        engine.messages,
        engine.dropped_messages,
    )
    assert engine.events == 10 * engine.messages


def test_zmq_sub_gap_counting_per_sender_ev42_restarts_and_garbage():
    from streaming_data_types import eventdata_ev42

    from livehist.engine.events import EventBatch, encode_ev44

    src = open_source("zmq+sub://127.0.0.1:5999")
    lost = []
    src.count_lost = lost.append
    one = EventBatch(np.arange(2, dtype=np.int32), np.arange(2, dtype=np.int32), np.zeros(1, np.int64),
                     np.zeros(1, np.int64))  # fmt: skip
    last: dict = {}
    sent = [encode_ev44(one, 5, "a"), encode_ev44(one, 9, "a"), encode_ev44(one, 3, "b"), b"garbage!",
            encode_ev44(one, 0, "a"), encode_ev44(one, 1, "a"), encode_ev44(one, 7, "b"),
            bytes(eventdata_ev42.serialise_ev42("c", 10, 0, [1], [1])), b"",
            bytes(eventdata_ev42.serialise_ev42("c", 12, 0, [1], [1])), encode_ev44(one, 0, "z")]  # fmt: skip
    for payload in sent:
        src._note_gap(memoryview(payload), last)
    assert lost == [3, 3, 1]  # a: 6..8; (a restarted at 0: no gap); b: 4..6; c: 11


@pytest.mark.parametrize("host", ["no-such-host.invalid", "ü.invalid"])
def test_zmq_host_name_that_does_not_resolve_is_a_source_error_naming_it(host):
    """ZeroMQ connected to a host name that does not resolve without a word: the device stayed
    RUNNING with 'no message for N s (is the sender running?)' (or, for 'ü', failed with a bare
    'ZMQError: Invalid argument')."""
    src = open_source(f"zmq://{host}:5599")
    engine = Engine([])
    engine.start(src)
    deadline = time.monotonic() + 30
    while src.error is None and time.monotonic() < deadline:
        time.sleep(0.05)
    engine.stop()
    assert src.error is not None and f"host name {host!r} does not resolve" in src.error, src.error


@pytest.mark.parametrize(
    "uri", ["zmq://127.0.0.1:{port}", "zmq+sub://127.0.0.1:{port}", "kafka://127.0.0.1:{port}/t"]
)
def test_stream_refuses_a_network_source_before_binding_anything(uri):
    """`livehist stream zmq://...` printed 'publishing ...', then failed at the first message
    with 'AttributeError: 'memoryview' object has no attribute 'tof'' (or, with none, said
    'sent 0 events' and exited 0)."""
    import socket

    from livehist.engine.stream import stream
    from livehist.errors import LivehistError
    from tests.conftest import free_port

    port, bind_port = free_port(), free_port()
    said = []
    with pytest.raises(
        LivehistError, match="publishes sim:// or nexus:// sources; (zmq|zmq\\+sub|kafka):// is"
    ):
        stream(uri.format(port=port), f"tcp://127.0.0.1:{bind_port}", say=said.append, seconds=2)
    assert said == []
    with socket.socket() as s:  # nothing left bound
        s.bind(("127.0.0.1", bind_port))


@pytest.mark.parametrize("bad", [np.nan, np.inf, 1e300])
def test_nexus_pulse_time_that_is_not_a_time_is_refused_at_open(tmp_path, bad):
    """A NaN event_time_zero became pulse time -2**63 ns (NaN cast to int64) without a word:
    time windows and Kafka timestamps of a stream from the file were garbage."""
    path = event_file(tmp_path / "t0.nxs", np.arange(20) % 16, np.arange(20), [0.0, bad, 0.2], [0, 5, 10])
    with pytest.raises(SourceError, match=r"event_time_zero of pulse 1 is (nan|inf|1e\+300) s .*finite time"):
        open_source(f"nexus://{path}?rate=max")


def test_nexus_float_pixel_ids_count_when_whole_and_fail_naming_the_first_that_is_not(tmp_path):
    """Floating-point event_id 3.7 was counted in pixel 3 (the kernels truncate) and NaN in an
    arbitrary pixel, without a word; whole-number floats are pixel ids like any other."""
    whole = event_file(tmp_path / "whole.nxs", np.array([1.0, 2.0, 2.0, 15.0, -1.0, 16.0]),
                       np.arange(6) * 100, [0.0], [0])  # fmt: skip
    snap = replay(f"nexus://{whole}?rate=max").snapshot()
    assert snap.counts["i"].ravel().tolist() == np.bincount([1, 2, 2, 15], minlength=16).tolist()
    for value, shown in ((3.7, "3.7"), (np.nan, "nan"), (-np.inf, "-inf")):
        ids = np.array([1.0, 2.0, 4.0, 5.0, 6.0, value, 7.0])
        path = event_file(tmp_path / f"f{shown}.nxs", ids, np.arange(7) * 100, [0.0, 0.1], [0, 4])
        src = open_source(f"nexus://{path}?rate=max")
        engine = Engine(parse_histograms(SPECS))
        engine.start(src)
        deadline = time.monotonic() + 60
        while src.error is None and not src.finished and time.monotonic() < deadline:
            time.sleep(0.01)
        engine.stop()
        assert src.error is not None and f"event_id[5] is {shown}, not a pixel number" in src.error, src.error
        snap = engine.snapshot()
        assert (
            snap.events == 4
            and snap.counts["i"].ravel().tolist() == np.bincount([1, 2, 4, 5], minlength=16).tolist()
        )


def test_stream_sends_tofs_ev44_cannot_carry_outside_every_range_and_says_how_many(tmp_path):
    """NaN, inf and TOFs past int32 ns were cast without a word (undefined: -2**31 here, or a
    wrapped TOF elsewhere). Now they go as -2**31 ns, outside every TOF range, and are counted."""
    import threading

    import zmq

    from livehist.engine.events import decode
    from livehist.engine.stream import stream
    from tests.conftest import free_port

    tof_us = np.array([1.0, np.nan, 2.5, np.inf, -np.inf, 3e6, -3e6, 70_000.4])  # µs; 3e6 µs = 3 s
    path = event_file(tmp_path / "tof.nxs", np.arange(8), tof_us, [0.0], [0])
    with h5py.File(path, "a") as f:
        f["entry/events/event_time_offset"].attrs["units"] = "us"
    port = free_port()
    pull = zmq.Context.instance().socket(zmq.PULL)
    pull.connect(f"tcp://127.0.0.1:{port}")
    said: list[str] = []
    t = threading.Thread(target=stream, args=(f"nexus://{path}?rate=max", f"tcp://127.0.0.1:{port}"),
                         kwargs={"say": said.append, "seconds": 30})  # fmt: skip
    t.start()
    try:
        assert pull.poll(30_000), "nothing streamed"
        batch = decode(pull.recv())
    finally:
        t.join(60)
        pull.close(0)
    assert batch.tof.tolist() == [1000, -(2**31), 2500, -(2**31), -(2**31), -(2**31), -(2**31), 70_000_400]
    assert any(line.startswith("5 events had a TOF ev44 cannot carry") for line in said), said


def test_sim_pulses_bigger_than_its_pool_are_delivered_whole_and_impossible_rates_refused():
    """sim:// capped every pulse at its pool of 2,097,152 events without a word: rate=1e8 at
    14 Hz delivered 2.9e7 events/s. Pulses beyond the pool are now made of several slices; a
    rate no machine could take (1e12 ev/s: 570 GB a pulse) is refused, naming the limit."""
    src = open_source("sim://?rate=2e6&freq=0.5&pace=max&seed=4")  # Poisson(4e6) events a pulse
    assert src.model.pool < 3_900_000
    engine = Engine(parse_histograms(SPECS))
    engine.start(src)
    deadline = time.monotonic() + 120
    while engine.snapshot().pulses < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    engine.stop()
    snap = engine.snapshot()
    assert snap.pulses >= 3 and abs(snap.events / snap.pulses - 4e6) < 10_000, (snap.events, snap.pulses)
    with pytest.raises(SourceError, match=r"rate 1e12 ev/s at freq=14 Hz makes 7.14e\+10 events a pulse; at most "
                                          r"33,554,432 \(rate <= 4.7e\+08 at this freq"):  # fmt: skip
        open_source("sim://?rate=1e12")
    open_source("sim://?rate=4.6e8")  # within the limit at 14 Hz


def _events_group(path, **fields) -> str:
    """An NXevent_data group of 10 events in 2 pulses, with `fields` replacing (or, given None, as a
    group instead of) its datasets."""
    with h5py.File(path, "w") as f:
        g = f.create_group("entry/events")
        g.attrs["NX_class"] = "NXevent_data"
        base = {"event_id": np.arange(10) % 16, "event_time_offset": np.arange(10) * 10,
                "event_time_zero": np.array([0.0, 0.1]), "event_index": np.array([0, 5])}  # fmt: skip
        for key, value in {**base, **fields}.items():
            if value is None:
                g.create_group(key)
            else:
                g[key] = value
        if isinstance(g["event_time_offset"], h5py.Dataset):
            g["event_time_offset"].attrs["units"] = "ns"
    return str(path)


@pytest.mark.parametrize(
    "fields, message",
    [
        (
            {"event_time_zero": 0.5, "event_index": 0},
            r"event_time_zero is of shape \(\); NXevent_data needs a 1-D",
        ),
        (
            {"event_time_zero": [[0.0], [0.1]], "event_index": [[0], [5]]},
            r"event_time_zero is of shape \(2, 1\)",
        ),
        ({"event_id": None}, r"event_id is a Group; NXevent_data needs a 1-D dataset"),
        ({"event_id": 3, "event_time_offset": 5}, r"event_time_offset is of shape \(\)"),
        ({"event_index": [0, 2.5]}, r"event_index of pulse 1 is 2.5; each must be a whole number of 0..10"),
        ({"event_index": [0.0, np.nan]}, r"event_index of pulse 1 is nan; each must be a whole number"),
        (
            {"event_index": np.array([0, 2**64 - 1], np.uint64)},
            r"event_index of pulse 1 is 18446744073709551615",
        ),
        ({"event_index": np.array([b"0", b"5"])}, r"event_index has dtype \|S1; it must hold .* integers"),
        (
            {"event_index": [5, 7]},
            r"event_index starts at 5: events 0..4 belong to no pulse and would not be",
        ),
        (
            {"event_time_zero": np.zeros(0), "event_index": np.zeros(0, np.int64)},
            r"event_index is empty: all 10",
        ),
        (
            {"event_time_zero": [0.0, 0.1, 0.2], "event_index": [0, 6, 4]},
            r"pulse 2 has 4 after 6 \(replaying",
        ),
    ],
)
def test_nexus_event_datasets_of_the_wrong_shape_or_index_are_refused_at_open_naming_them(
    tmp_path, fields, message
):
    """A scalar event_time_zero raised a bare IndexError at open (not a SourceError: Init said only
    'IndexError: invalid index to scalar variable'); a 2-D one passed the open and failed every
    reconnect of the replay with TypeError; an event_id group raised AttributeError. event_index
    2.5 was cut to 2, NaN and 2**64-1 were named as 'pulse 0 has 0', and events before the first
    pulse (event_index starting at 5, or no pulse at all) were never replayed, without a word."""
    path = _events_group(tmp_path / "e.nxs", **fields)
    with pytest.raises(SourceError, match=message):
        open_source(f"nexus://{path}?rate=max")


def test_nexus_index_of_whole_floats_and_pulses_without_events_replay_every_event(tmp_path):
    """What the checks above must still let through: float indices holding whole numbers, empty
    pulses, and a file without any event."""
    path = _events_group(tmp_path / "f.nxs", event_time_zero=[0.0, 0.1, 0.2], event_index=[0.0, 5.0, 10.0])
    snap = replay(f"nexus://{path}?rate=max").snapshot()
    assert (snap.events, snap.pulses, int(snap.counts["t"].sum())) == (10, 3, 10)
    empty = _events_group(tmp_path / "none.nxs", event_id=np.zeros(0, np.int32),
                          event_time_offset=np.zeros(0), event_index=[0, 0])  # fmt: skip
    snap = replay(f"nexus://{empty}?rate=max").snapshot()
    assert (snap.events, snap.pulses) == (0, 2)
