#!/usr/bin/env python3
"""The plan hash recomputed in Python, from the protobuf message alone, as
services/compiler/testdata/plans/README.md pins it:

    sha256: + hex SHA-256 of JCS(MessageToDict(plan) minus the non-executable fields)

Checks, so that a difference between Python's proto3 JSON printer and the
compiler's (Rust, pbjson) shows up here:
  1. every golden plan (services/compiler/testdata/plans/*.json): its
     `executable_content` parsed into the generated `ExecutablePlan` and
     printed back by `json_format.MessageToDict` is the same JSON, and hashes
     to the file's `plan_hash`;
  2. against a running `anumate dev` (ANUMATE_SERVER, ANUMATE_TOKEN): the
     example capsule and its two policies pushed, a plan compiled and fetched
     back by hash, and its `plan_hash` recomputed.

The generated code is looked up in $ANUMATE_PY_GEN (default: gen/ next to
this file). Exits 0 when every check passes, 1 otherwise. Without a server
(ANUMATE_SERVER unset) only the golden plans are checked.
"""

import hashlib
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
GOLDEN_DIR = REPO / "services" / "compiler" / "testdata" / "plans"
sys.path.insert(0, os.environ.get("ANUMATE_PY_GEN", str(HERE / "gen")))

import rfc8785  # noqa: E402
from google.protobuf import json_format, unknown_fields  # noqa: E402
from google.protobuf.descriptor import FieldDescriptor  # noqa: E402

from anumate.compiler.v1 import compiler_pb2  # noqa: E402

# libs/crypto/src/plan.rs: PLAN_NON_EXECUTABLE_FIELDS (proto3 JSON names).
PLAN_NON_EXECUTABLE_FIELDS = (
    "planHash",
    "estimate",
    "compilerVersion",
    "createdBy",
    "createTime",
)


class Failed(Exception):
    """A check that did not hold."""


def check(condition, message):
    if not condition:
        raise Failed(message)


# Printed by json_format as JSON values, not walked as messages.
_JSON_VALUE_TYPES = {
    "google.protobuf.Struct",
    "google.protobuf.Value",
    "google.protobuf.ListValue",
    "google.protobuf.Duration",
    "google.protobuf.Timestamp",
}


def _canonicalize(message, path="plan"):
    """Applies the README's two rules a printer may not: refuse what this
    schema does not know (unknown fields, enum numbers without a name), and
    treat a double -0.0 as the default it is (omitted, as pbjson does)."""
    check(
        len(unknown_fields.UnknownFieldSet(message)) == 0,
        f"{path} has fields this schema does not know: regenerate from a newer proto/",
    )
    for field, value in message.ListFields():
        where = f"{path}.{field.name}"
        values = value if field.is_repeated else [value]
        if field.cpp_type == FieldDescriptor.CPPTYPE_ENUM:
            for v in values:
                check(v in field.enum_type.values_by_number,
                      f"{where}: enum number {v} has no name in this schema")
        elif field.cpp_type in (FieldDescriptor.CPPTYPE_DOUBLE, FieldDescriptor.CPPTYPE_FLOAT):
            if not field.is_repeated and not field.has_presence and value == 0.0:
                message.ClearField(field.name)
        elif field.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE:
            if field.message_type.full_name in _JSON_VALUE_TYPES:
                continue
            if field.message_type.GetOptions().map_entry:
                # Map values that are messages; scalar maps have nothing to walk.
                has_messages = field.message_type.fields_by_name["value"].message_type
                values = list(value.values()) if has_messages else []
            for i, v in enumerate(values):
                _canonicalize(v, f"{where}[{i}]" if field.is_repeated else where)


def executable_content(plan):
    """The plan's proto3 JSON as the compiler prints it (lowerCamelCase names,
    defaults omitted, enums by name, 64-bit integers as strings) without the
    non-executable fields."""
    plan = type(plan).FromString(plan.SerializeToString())
    _canonicalize(plan)
    content = json_format.MessageToDict(
        plan,
        always_print_fields_with_no_presence=False,
        preserving_proto_field_name=False,
        use_integers_for_enums=False,
    )
    for field in PLAN_NON_EXECUTABLE_FIELDS:
        content.pop(field, None)
    return content


def jcs(value):
    """RFC 8785 bytes of a JSON value: every number is an IEEE-754 double."""
    return rfc8785.dumps(_numbers_as_doubles(value))


def _numbers_as_doubles(value):
    # JSON has one number type; JCS prints it as an ECMAScript double would be.
    # rfc8785 refuses Python ints beyond 2^53 instead of rounding them, which
    # no plan holds (64-bit integers are strings), so be explicit and uniform.
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return float(value)
    if isinstance(value, dict):
        return {k: _numbers_as_doubles(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_numbers_as_doubles(v) for v in value]
    return value


def hash_content(content):
    return "sha256:" + hashlib.sha256(jcs(content)).hexdigest()


def plan_hash(plan):
    """`plan_hash` of an `ExecutablePlan` message, recomputed."""
    return hash_content(executable_content(plan))


def first_difference(a, b, path="$"):
    """Where two JSON values first differ, for the failure message."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                return f"{path}.{k}: {'missing' if k not in a else a[k]!r} vs {'missing' if k not in b else b[k]!r}"
            d = first_difference(a[k], b[k], f"{path}.{k}")
            if d:
                return d
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{path}: {len(a)} vs {len(b)} items"
        for i, (x, y) in enumerate(zip(a, b)):
            d = first_difference(x, y, f"{path}[{i}]")
            if d:
                return d
        return None
    same = type(a) is type(b) or (
        isinstance(a, (int, float)) and isinstance(b, (int, float))
        and not isinstance(a, bool) and not isinstance(b, bool)
    )
    return None if same and a == b else f"{path}: {a!r} vs {b!r}"


def check_golden_plans():
    files = sorted(GOLDEN_DIR.glob("*.json"))
    check(len(files) >= 3, f"golden plans missing in {GOLDEN_DIR}")
    for path in files:
        golden = json.loads(path.read_text())
        content = golden["executable_content"]
        # Python's JCS over the compiler's own JSON: the canonical form.
        check(
            hash_content(content) == golden["plan_hash"],
            f"{path.name}: JCS of executable_content does not hash to plan_hash",
        )
        # Python's printer: parse into the generated class, print back.
        plan = json_format.ParseDict(content, compiler_pb2.ExecutablePlan())
        printed = executable_content(plan)
        diff = first_difference(printed, content)
        check(diff is None, f"{path.name}: MessageToDict differs from pbjson at {diff}")
        check(
            jcs(printed) == jcs(content),
            f"{path.name}: JCS of MessageToDict differs from JCS of pbjson's JSON",
        )
        # And through the wire format, as a client receives a plan.
        wire = compiler_pb2.ExecutablePlan.FromString(plan.SerializeToString())
        got = plan_hash(wire)
        check(got == golden["plan_hash"], f"{path.name}: recomputed {got}, golden {golden['plan_hash']}")
        print(f"golden {path.name}: {got}")


def check_pinned_rules():
    """The README's rules that no golden plan exercises: -0.0 is a default,
    and what this schema does not know is refused rather than hashed."""
    golden = json.loads((GOLDEN_DIR / "refund-small-orders.json").read_text())
    plan = json_format.ParseDict(golden["executable_content"], compiler_pb2.ExecutablePlan())
    negative_zero = compiler_pb2.ExecutablePlan()
    negative_zero.CopyFrom(plan)
    negative_zero.steps[1].retry.multiplier = -0.0
    check(plan_hash(negative_zero) == golden["plan_hash"], "a -0.0 multiplier entered the hash")
    unknown_enum = compiler_pb2.ExecutablePlan()
    unknown_enum.CopyFrom(plan)
    unknown_enum.steps[0].retry.backoff = 99
    # Field 127, varint 1: a field from a newer schema.
    newer = compiler_pb2.ExecutablePlan.FromString(plan.SerializeToString() + b"\xf8\x07\x01")
    for name, message in (("unknown enum number", unknown_enum), ("unknown field", newer)):
        try:
            plan_hash(message)
        except Failed:
            continue
        raise Failed(f"a plan with an {name} was hashed instead of refused")
    print("pinned rules: -0.0 omitted; unknown enum numbers and fields refused")


def check_server_plan(target, token):
    import grpc

    from anumate.compiler.v1 import compiler_pb2_grpc
    from anumate.policy.v1 import policy_pb2, policy_pb2_grpc
    from anumate.registry.v1 import registry_pb2, registry_pb2_grpc

    auth = (("authorization", f"Bearer {token}"),)
    capsule = REPO / "examples" / "refund.capsule.yaml"
    policies = (REPO / "examples" / "refund.policy").read_text()
    split = policies.index('policy "pii-masking"')
    with grpc.insecure_channel(target) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        registry = registry_pb2_grpc.RegistryServiceStub(channel)
        policy = policy_pb2_grpc.PolicyServiceStub(channel)
        compiler = compiler_pb2_grpc.CompilerServiceStub(channel)

        for name, source in (("limits.policy", policies[:split]), ("pii.policy", policies[split:])):
            policy.PushPolicy(
                policy_pb2.PushPolicyRequest(source=source, source_name=name, publish=True),
                metadata=auth,
                timeout=10,
            )
        pushed = registry.PushCapsule(
            registry_pb2.PushCapsuleRequest(
                source_yaml=capsule.read_text(), source_name=capsule.name
            ),
            metadata=auth,
            timeout=10,
        )
        compiled = compiler.Compile(
            compiler_pb2.CompileRequest(
                capsule_name=pushed.version.name, version=str(pushed.version.version)
            ),
            metadata=auth,
            timeout=30,
        )
        stored = compiled.plan.plan_hash
        check(stored.startswith("sha256:") and len(stored) == 71, f"plan_hash {stored!r}")
        check(len(compiled.plan.steps) == 3, f"{len(compiled.plan.steps)} steps")
        got = plan_hash(compiled.plan)
        check(got == stored, f"Compile: recomputed {got}, server {stored}")

        fetched = compiler.GetPlan(
            compiler_pb2.GetPlanRequest(plan_hash=stored), metadata=auth, timeout=10
        ).plan
        check(fetched.plan_hash == stored, f"GetPlan returned {fetched.plan_hash}")
        # The stored plan carries the fields outside the hash; they stay outside.
        check(fetched.HasField("create_time"), "GetPlan: no create_time")
        got = plan_hash(fetched)
        check(got == stored, f"GetPlan: recomputed {got}, server {stored}")
        print(f"server plan {pushed.version.name}@{pushed.version.version}: {got}"
              f"{' (cache hit)' if compiled.cache_hit else ''}")


def connection():
    server = os.environ.get("ANUMATE_SERVER")
    token = os.environ.get("ANUMATE_TOKEN")
    if not server or not token:
        return None
    for scheme in ("http://", "https://"):
        if server.startswith(scheme):
            server = server[len(scheme):]
    return server.rstrip("/"), token


def main():
    check_golden_plans()
    check_pinned_rules()
    server = connection()
    if server is None:
        print("plan hash: no ANUMATE_SERVER/ANUMATE_TOKEN; server plan not checked")
    else:
        check_server_plan(*server)
    print("plan hash: all checks passed")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Failed as e:
        print(f"plan hash: FAILED: {e}", file=sys.stderr)
        sys.exit(1)
    except Exception as e:  # grpc.RpcError and friends: say what, fail
        code = getattr(e, "code", None)
        details = getattr(e, "details", None)
        if callable(code) and callable(details):
            print(f"plan hash: FAILED: RPC error {code()}: {details()}", file=sys.stderr)
        else:
            print(f"plan hash: FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
