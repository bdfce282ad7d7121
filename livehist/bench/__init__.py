"""`livehist bench`: each figure beside a reference measured in the same run.

livehist bench [--json] [--quick]
"""

from __future__ import annotations

import json

from livehist.bench.common import ROWS, _row
from livehist.bench.engine import end_to_end, engine_kernels


def bench(as_json: bool = False, quick: bool = False, say=print) -> list[dict]:
    ROWS.clear()
    say("livehist bench: engine kernels (single thread, int32 events)") if not as_json else None
    engine_kernels(10**6 if quick else 10**7)
    say("livehist bench: zmq:// end to end") if not as_json else None
    engine_rate = end_to_end(3 if quick else 30)
    say("livehist bench: kafka:// beside a bare confluent-kafka consumer") if not as_json else None
    from livehist.bench.kafka import kafka_figures

    kafka_figures(_row, quick)
    say("livehist bench: EventHistogrammer device (real Tango DB and server)") if not as_json else None
    from livehist.bench.device import device_figures

    device_figures(engine_rate, 3 if quick else 30, _row, ROWS)
    say("livehist bench: scaling out (Kafka group workers, HistogramSum)") if not as_json else None
    from livehist.bench.scaling import ingest_figures, sum_latency_figure

    ingest_figures(_row, quick)
    sum_latency_figure(_row, quick)
    say("livehist bench: recorders beside Sardana's") if not as_json else None
    from livehist.bench.recorders import recorder_figures

    recorder_figures(_row, quick)
    say("livehist bench: Sardana scans, dead time per point") if not as_json else None
    from livehist.bench.sardana import sardana_figures

    sardana_figures(_row, quick)
    if as_json:
        say(json.dumps(ROWS, indent=1))
    else:
        for r in ROWS:
            ref = f"{r['reference']} {r['reference_value']:.3g}" if r["reference_value"] else r["reference"]
            ratio = f" ({r['ratio']:.1f}x)" if r["ratio"] else ""
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
    return ROWS
