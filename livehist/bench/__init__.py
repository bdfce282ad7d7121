"""`livehist bench`: each figure beside a reference measured in the same run.

livehist bench [--json] [--quick] [--only SECTION ...]

Sections: engine (kernels, in-memory threads), zmq (end to end), kafka, scaling (group workers,
HistogramSum), device, recorders, sardana.
Engine and zmq figures are median ratios of alternated subject/reference pairs.
"""

from __future__ import annotations

import json

from livehist.bench.common import ROWS, _row, machine

SECTIONS = ("engine", "zmq", "kafka", "scaling", "device", "web", "recorders", "sardana")


def bench(as_json: bool = False, quick: bool = False, say=print, only: list[str] | None = None) -> list[dict]:
    only = list(only or SECTIONS)
    unknown = [s for s in only if s not in SECTIONS]
    if unknown:
        from livehist.errors import LivehistError

        raise LivehistError(f"--only {unknown[0]!r} is not a section; choose from {', '.join(SECTIONS)}")
    ROWS.clear()
    info = machine()
    import signal

    def _interrupted(signum, frame):  # a bench stopped with kill still prints what it measured
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, _interrupted)
    say(f"livehist bench on {info}") if not as_json else None
    try:
        _sections(only, as_json, quick, say)
    except KeyboardInterrupt as exc:
        say(f"livehist bench: interrupted ({exc or 'Ctrl-C'}); the rows measured so far:")
    finally:
        signal.signal(signal.SIGTERM, old)
        _report(info, as_json, say)
    return ROWS


def _sections(only: list[str], as_json: bool, quick: bool, say) -> None:
    pairs = 5 if quick else 11
    if "engine" in only:
        from livehist.bench.engine import engine_kernels

        say(
            f"livehist bench: engine kernels (int32 events, {pairs} alternated pairs)"
        ) if not as_json else None
        engine_kernels(10**7, pairs)
    engine_rate = None
    if "zmq" in only or "device" in only:
        from livehist.bench.engine import end_to_end

        say(
            "livehist bench: zmq:// end to end (alternated with bare receive + decode)"
        ) if not as_json else None
        engine_rate = end_to_end(1.0 if quick else 4.0, pairs)
    if "kafka" in only:
        say("livehist bench: kafka:// beside a bare confluent-kafka consumer") if not as_json else None
        from livehist.bench.kafka import kafka_figures

        kafka_figures(_row, quick)
    if "scaling" in only:
        say("livehist bench: scaling out (Kafka group workers, HistogramSum)") if not as_json else None
        from livehist.bench.scaling import ingest_figures, sum_latency_figure

        ingest_figures(_row, quick)
        sum_latency_figure(_row, quick)
    if "device" in only:
        say("livehist bench: EventHistogrammer device (real Tango DB and server)") if not as_json else None
        from livehist.bench.device import device_figures

        device_figures(engine_rate, 3 if quick else 30, _row, ROWS)
    if "web" in only:
        say("livehist bench: web view (livehist web + chromium)") if not as_json else None
        from livehist.bench.web import web_figures

        web_figures(_row, quick)
    if "recorders" in only:
        say("livehist bench: recorders beside Sardana's") if not as_json else None
        from livehist.bench.recorders import recorder_figures

        recorder_figures(_row, quick)
    if "sardana" in only:
        say("livehist bench: Sardana scans, dead time per point") if not as_json else None
        from livehist.bench.sardana import sardana_figures

        sardana_figures(_row, quick)


def _report(info: str, as_json: bool, say) -> None:
    if as_json:
        say(json.dumps({"machine": info, "rows": ROWS}, indent=1))
    else:
        say(f"machine: {info}")
        for r in ROWS:
            ref = f"{r['reference']} {r['reference_value']:.3g}" if r["reference_value"] else r["reference"]
            ratio = f" ({r['ratio']:.2f}x" if r["ratio"] else ""
            if ratio and "spread" in r:
                ratio += f", median of {r['pairs']} pairs, spread {r['spread'][0]:.2f}..{r['spread'][1]:.2f}"
            ratio += ")" if ratio else ""
            met = "ok " if r["met"] else "MISS"
            say(
                f"{met} {r['figure']}: {r['value']:.3g} {r['unit']}{ratio} | ref: {ref} | target {r['target']}"
            )
        for r in ROWS:
            if "sent" in r:
                say(f"     {r['figure']}: sent {r['sent']}, counted {r['counted']}, "
                    f"dropped messages {r['dropped_messages']}")  # fmt: skip
            if "detail" in r:
                say(f"     {r['figure']}: {r['detail']}")
