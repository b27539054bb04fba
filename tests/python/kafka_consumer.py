"""A Kafka consumer in another language: reads the CloudEvent that
`anumate dev --kafka` published for a capsule push with confluent-kafka and
decodes it with classes generated from proto/ by grpcio-tools.

Environment: ANUMATE_KAFKA (bootstrap servers), ANUMATE_PY_GEN (generated
code), ANUMATE_EXPECT_ID (the CloudEvent id to find, from `anumate events
tail`), ANUMATE_EXPECT_NAME (the capsule name).
"""
import os
import sys
import time
import uuid

sys.path.insert(0, os.environ["ANUMATE_PY_GEN"])

from confluent_kafka import Consumer  # noqa: E402
from anumate.events.v1 import capsule_events_pb2  # noqa: E402

bootstrap = os.environ["ANUMATE_KAFKA"]
want_id = os.environ["ANUMATE_EXPECT_ID"]
want_name = os.environ["ANUMATE_EXPECT_NAME"]

consumer = Consumer(
    {
        "bootstrap.servers": bootstrap,
        "group.id": f"python-test-{uuid.uuid4()}",
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
        "session.timeout.ms": 6000,
        "heartbeat.interval.ms": 500,
    }
)
consumer.subscribe(["anumate.capsules"])
deadline = time.monotonic() + 60
found = None
try:
    while found is None and time.monotonic() < deadline:
        msg = consumer.poll(1.0)
        if msg is None:
            continue
        if msg.error():
            print(f"kafka error: {msg.error()}", file=sys.stderr)
            continue
        headers = {k: (v.decode() if v is not None else None) for k, v in (msg.headers() or [])}
        if headers.get("ce_id") == want_id:
            found = (msg, headers)
finally:
    consumer.close()

if found is None:
    print(f"FAIL: no message with ce_id {want_id} on anumate.capsules within 60 s", file=sys.stderr)
    sys.exit(1)

msg, headers = found
failures = []


def check(cond, what):
    if not cond:
        failures.append(what)


check(headers.get("ce_specversion") == "1.0", f"ce_specversion: {headers.get('ce_specversion')}")
check(headers.get("ce_type") == "dev.anumate.capsule.published.v1", f"ce_type: {headers.get('ce_type')}")
check(headers.get("ce_source") == "/anumate/capsules", f"ce_source: {headers.get('ce_source')}")
check(headers.get("ce_tenantid") == "dev", f"ce_tenantid: {headers.get('ce_tenantid')}")
check(bool(headers.get("ce_time")), "ce_time missing")
check(headers.get("content-type") == "application/protobuf", f"content-type: {headers.get('content-type')}")
# Keyed by tenant and aggregate, as the proto's (anumate.events.v1.key) fields declare.
check(msg.key() == f"dev/{want_name}".encode(), f"key: {msg.key()!r}")

event = capsule_events_pb2.CapsulePublished()
event.ParseFromString(msg.value())
check(event.name == want_name, f"data.name: {event.name!r}")
check(event.version == 1, f"data.version: {event.version}")
check(event.tenant_id == "dev", f"data.tenant_id: {event.tenant_id!r}")
check(event.content_hash.startswith("sha256:"), f"data.content_hash: {event.content_hash!r}")

if failures:
    for f in failures:
        print(f"FAIL: {f}", file=sys.stderr)
    sys.exit(1)
print(
    f"ok: {headers['ce_type']} {headers['ce_id']} from partition {msg.partition()} offset "
    f"{msg.offset()} decoded as CapsulePublished(name={event.name!r}, version={event.version})"
)
