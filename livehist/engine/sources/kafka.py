"""kafka://BROKER[,BROKER]/TOPIC?source=NAME  ev44/ev42 messages from Kafka (confluent-kafka).

Installed with the `kafka` extra. Messages of other source names are skipped when
`source` is given (the engine filters after decoding).
"""

from __future__ import annotations

import uuid

from livehist.engine.sources import Source, SourceError, check_known, query


class KafkaSource(Source):
    paced = False

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        try:
            import confluent_kafka  # noqa: F401
        except ImportError:
            raise SourceError("kafka:// needs confluent-kafka: pip install 'livehist[kafka]'") from None
        parts, params = query(uri)
        check_known(params, {"source", "group"}, uri)
        self.brokers = parts.netloc
        self.topic = parts.path.strip("/")
        if not self.brokers or not self.topic:
            raise SourceError(f"EventSource {uri!r}: give kafka://BROKER[,BROKER]/TOPIC")
        self.source_name = params.get("source")
        self.group = params.get("group") or f"livehist-{uuid.uuid4()}"

    def run(self) -> None:
        from confluent_kafka import Consumer

        consumer = Consumer({"bootstrap.servers": self.brokers, "group.id": self.group,
                             "auto.offset.reset": "latest", "enable.auto.commit": False})  # fmt: skip
        consumer.subscribe([self.topic])
        try:
            while not self.stopping:
                msg = consumer.poll(0.1)
                if msg is None:
                    continue
                if msg.error():
                    self.error = str(msg.error())
                    continue
                self.emit(msg.value())
        finally:
            consumer.close()
