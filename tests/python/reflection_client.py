#!/usr/bin/env python3
"""Server reflection as Python's `grpcio-reflection` client speaks it (the
v1alpha protocol, like Postman and older grpcurl): lists the services of a
running `anumate dev`, checks every service declared in proto/anumate and
grpc.health.v1.Health are there, and resolves a method's request and response
types through the served file descriptors (their imports included), with no
generated code at all. Then calls that method with a message built only from
the reflected descriptors.

Run against a running `anumate dev` (scripts/python-client-test does it):

    ANUMATE_SERVER=http://127.0.0.1:7600 ANUMATE_TOKEN=… python reflection_client.py

Exits 0 when every check passes, 1 otherwise.
"""

import os
import re
import sys
from pathlib import Path

import grpc
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

REPO = Path(__file__).resolve().parent.parent.parent
failures = []


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what)
    if not cond:
        failures.append(what)


def declared_services():
    """Every `service X` of proto/anumate, by full name."""
    names = set()
    for path in (REPO / "proto" / "anumate").rglob("*.proto"):
        text = path.read_text()
        package = re.search(r"^package\s+([\w.]+)\s*;", text, re.M)
        for svc in re.findall(r"^service\s+(\w+)", text, re.M):
            names.add(f"{package.group(1)}.{svc}")
    return names


def main():
    server = os.environ["ANUMATE_SERVER"]
    token = os.environ.get("ANUMATE_TOKEN", "")
    target = re.sub(r"^https?://", "", server)
    channel = grpc.insecure_channel(target)
    db = ProtoReflectionDescriptorDatabase(channel)

    listed = set(db.get_services())
    print(f"reflection (v1alpha) lists {len(listed)} services")
    expected = declared_services()
    check(len(expected) >= 10, f"proto/anumate declares services ({len(expected)})")
    missing = sorted(expected - listed)
    check(not missing, f"every proto/anumate service is listed (missing: {missing})")
    check("grpc.health.v1.Health" in listed, "grpc.health.v1.Health is listed")

    # Resolve a method's types from the reflected descriptors alone: this
    # fetches registry.proto and, transitively, every file it imports.
    pool = descriptor_pool.DescriptorPool(db)
    svc = pool.FindServiceByName("anumate.registry.v1.RegistryService")
    method = svc.methods_by_name.get("ListCapsules")
    check(method is not None, "RegistryService.ListCapsules is described")
    if method is None:
        return
    check(
        method.input_type.full_name == "anumate.registry.v1.ListCapsulesRequest",
        f"its request type resolves ({method.input_type.full_name})",
    )
    check(len(method.output_type.fields) > 0, "its response type has fields")

    # Call the method with classes built from the reflected descriptors.
    request_cls = message_factory.GetMessageClass(method.input_type)
    response_cls = message_factory.GetMessageClass(method.output_type)
    call = channel.unary_unary(
        f"/{svc.full_name}/{method.name}",
        request_serializer=request_cls.SerializeToString,
        response_deserializer=response_cls.FromString,
    )
    try:
        call(request_cls(), metadata=[("authorization", f"Bearer {token}")], timeout=10)
        check(True, "ListCapsules called with reflected descriptors answers OK")
    except grpc.RpcError as e:
        check(False, f"ListCapsules with reflected descriptors: {e.code()} {e.details()}")

    # An unknown symbol is NOT_FOUND. tonic-reflection ends the stream with
    # that status (the protocol would send an error_response message, which
    # the client turns into KeyError); either is a precise refusal. Last, on
    # a fresh stream: a stream ended this way is not reused.
    fresh = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    try:
        fresh.FindServiceByName("anumate.nope.v1.NoSuchService")
        check(False, "an unknown service is refused")
    except KeyError:
        check(True, "an unknown service is refused (error_response)")
    except grpc.RpcError as e:
        check(e.code() == grpc.StatusCode.NOT_FOUND, f"an unknown service is refused ({e.code()})")


if __name__ == "__main__":
    main()
    if failures:
        print(f"{len(failures)} check(s) failed", file=sys.stderr)
        sys.exit(1)
    print("reflection client: all checks passed")
