#!/usr/bin/env python3
"""A Python client of the Capsule Registry, built only from code generated from
proto/ with grpcio-tools: pushes a capsule, reads it back, lists capsules,
fetches the registry's JWKS (a `google.api.HttpBody`) and reads the
google.rpc.Status details of a validation error and of an unknown capsule.

Run against a running `anumate dev` (scripts/python-client-test does all of it):

    ANUMATE_SERVER=http://127.0.0.1:7600 ANUMATE_TOKEN=… python registry_client.py

Without ANUMATE_SERVER/ANUMATE_TOKEN, both are read from ./.anumate/dev.json.
The generated code is looked up in $ANUMATE_PY_GEN (default: gen/ next to this
file). Exits 0 when every check passes, 1 otherwise.
"""

import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
GEN = Path(os.environ.get("ANUMATE_PY_GEN", str(HERE / "gen"))).resolve()
sys.path.insert(0, str(GEN))

import importlib  # noqa: E402
import sysconfig  # noqa: E402

import grpc  # noqa: E402

from anumate.registry.v1 import registry_pb2, registry_pb2_grpc  # noqa: E402

try:
    # googleapis-common-protos (installed next to grpcio-tools by the script).
    from google.rpc import error_details_pb2, status_pb2  # noqa: E402
except ImportError as e:  # pragma: no cover - depends on the environment
    sys.exit(
        f"error: cannot import google.rpc ({e}); "
        "pip install googleapis-common-protos (or grpcio-status)"
    )

STATUS_DETAILS_KEY = "grpc-status-details-bin"
BAD_DOCUMENT = """\
apiVersion: anumate.dev/v2
kind: Capsule
metadata:
  name: Not_A_Label
spec:
  steps: []
"""


class Failed(Exception):
    """A check that did not hold."""


def check(condition, message):
    if not condition:
        raise Failed(message)


def connection():
    """(target, token) from the environment, else ./.anumate/dev.json."""
    server = os.environ.get("ANUMATE_SERVER")
    token = os.environ.get("ANUMATE_TOKEN")
    if not server or not token:
        state_file = Path(".anumate") / "dev.json"
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError) as e:
            raise Failed(
                f"no server: set ANUMATE_SERVER and ANUMATE_TOKEN, or run from the "
                f"directory of a running `anumate dev` ({state_file}: {e})"
            )
        server = server or state["server"]
        token = token or state["token"]
    for scheme in ("http://", "https://"):
        if server.startswith(scheme):
            server = server[len(scheme):]
    return server.rstrip("/"), token


def status_details(err):
    """The google.rpc.Status carried in the error's trailing metadata."""
    for key, value in err.trailing_metadata() or ():
        if key == STATUS_DETAILS_KEY:
            return status_pb2.Status.FromString(value)
    raise Failed(f"no {STATUS_DETAILS_KEY} trailer in {err!r}")


def unpack(status, message_type):
    """The details of `status` of the given message type."""
    found = []
    for any_detail in status.details:
        if any_detail.Is(message_type.DESCRIPTOR):
            msg = message_type()
            any_detail.Unpack(msg)
            found.append(msg)
    return found


def check_generated_imports():
    """Every generated module imports, and the google.api modules they use come
    from googleapis-common-protos in site-packages: the generated tree holds
    proto/anumate only, never a second copy of google/api."""
    check(not (GEN / "google").exists(), f"{GEN / 'google'} exists: google/api was generated")
    modules = sorted(
        ".".join(p.relative_to(GEN).with_suffix("").parts) for p in GEN.rglob("*_pb2*.py")
    )
    check(any(m == "anumate.registry.v1.registry_pb2" for m in modules), f"modules: {modules}")
    for module in modules:
        importlib.import_module(module)
    import google.api.annotations_pb2 as annotations_pb2

    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    google_api = {
        name: Path(module.__file__).resolve()
        for name, module in sys.modules.items()
        if name.startswith("google.api.") and getattr(module, "__file__", None)
    }
    check("google.api.annotations_pb2" in google_api, "google.api.annotations_pb2 was not imported")
    check(
        Path(annotations_pb2.__file__).resolve().is_relative_to(site),
        f"google.api.annotations_pb2 from {annotations_pb2.__file__}, not {site}",
    )
    for name, path in google_api.items():
        check(path.is_relative_to(site) and not path.is_relative_to(GEN),
              f"{name} from {path}, not from googleapis-common-protos in {site}")
    print(f"generated: {len(modules)} modules import; "
          f"{', '.join(sorted(n.rsplit('.', 1)[1] for n in google_api))} from site-packages")


def main():
    check_generated_imports()
    target, token = connection()
    auth = (("authorization", f"Bearer {token}"),)
    source_path = REPO / "examples" / "refund.capsule.yaml"
    source = source_path.read_text()

    with grpc.insecure_channel(target) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        registry = registry_pb2_grpc.RegistryServiceStub(channel)

        # push
        pushed = registry.PushCapsule(
            registry_pb2.PushCapsuleRequest(
                source_yaml=source, source_name=source_path.name
            ),
            metadata=auth,
            timeout=10,
        )
        name = pushed.version.name
        check(name == "refund-small-orders", f"pushed name {name!r}")
        check(pushed.version.version >= 1, f"version {pushed.version.version}")
        print(
            f"push: {name} version {pushed.version.version} "
            f"({'created' if pushed.created else 'unchanged'})"
        )

        # get it back
        got = registry.GetCapsule(
            registry_pb2.GetCapsuleRequest(name=name, version="latest"),
            metadata=auth,
            timeout=10,
        )
        check(got.version.content_hash.startswith("sha256:"),
              f"content hash {got.version.content_hash!r}")
        check(got.version.content_hash == pushed.version.content_hash,
              "get returned another hash than push")
        check(got.version.source_yaml == source, "source differs from the file")
        check(got.version.status == registry_pb2.VERSION_STATUS_DRAFT
              or got.version.status == registry_pb2.VERSION_STATUS_PUBLISHED,
              f"status {got.version.status}")
        print(f"get: {got.version.content_hash}")

        # list
        listed = registry.ListCapsules(
            registry_pb2.ListCapsulesRequest(page_size=50),
            metadata=auth,
            timeout=10,
        )
        names = [c.name for c in listed.capsules]
        check(name in names, f"{name} not in list {names}")
        print(f"list: {len(names)} capsule(s)")

        # the signing keys: a JWKS document, as GET /v1/registry/keys serves it
        keys = registry.GetCapsuleSigningKeys(
            registry_pb2.GetCapsuleSigningKeysRequest(), metadata=auth, timeout=10
        )
        check(keys.content_type == "application/json", f"content type {keys.content_type!r}")
        kids = [k.get("kid") for k in json.loads(keys.data).get("keys", [])]
        check(got.version.kid in kids, f"signing key {got.version.kid!r} not in JWKS {kids}")
        print(f"keys: {len(kids)} key(s) in the JWKS")

        # an unknown capsule: NOT_FOUND with its specific reason
        try:
            registry.GetCapsule(
                registry_pb2.GetCapsuleRequest(name="no-such-capsule"),
                metadata=auth,
                timeout=10,
            )
            raise Failed("an unknown capsule was found")
        except grpc.RpcError as err:
            check(err.code() == grpc.StatusCode.NOT_FOUND, f"code {err.code()}")
            infos = unpack(status_details(err), error_details_pb2.ErrorInfo)
            check([i.reason for i in infos] == ["CAPSULE_NOT_FOUND"], f"{infos}")
            print("unknown capsule: CAPSULE_NOT_FOUND")

        # a validation error, with its google.rpc.Status details
        try:
            registry.PushCapsule(
                registry_pb2.PushCapsuleRequest(
                    source_yaml=BAD_DOCUMENT, source_name="bad.yaml"
                ),
                metadata=auth,
                timeout=10,
            )
            raise Failed("an invalid document was accepted")
        except grpc.RpcError as err:
            check(err.code() == grpc.StatusCode.INVALID_ARGUMENT,
                  f"code {err.code()} ({err.details()})")
            status = status_details(err)
            check(status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0],
                  f"Status.code {status.code}")
            infos = unpack(status, error_details_pb2.ErrorInfo)
            check(len(infos) == 1, f"{len(infos)} ErrorInfo details")
            check(infos[0].reason == "INVALID_DOCUMENT", f"reason {infos[0].reason!r}")
            bad = unpack(status, error_details_pb2.BadRequest)
            check(len(bad) == 1, f"{len(bad)} BadRequest details")
            fields = [v.field for v in bad[0].field_violations]
            for field in ("apiVersion", "metadata.name"):
                check(field in fields, f"{field} not among violations {fields}")
            print(
                f"invalid document: {infos[0].reason}, "
                f"{len(fields)} violation(s): {', '.join(fields)}"
            )

        # a bad token
        try:
            registry.ListCapsules(
                registry_pb2.ListCapsulesRequest(),
                metadata=(("authorization", "Bearer not-a-token"),),
                timeout=10,
            )
            raise Failed("a bad token was accepted")
        except grpc.RpcError as err:
            check(err.code() == grpc.StatusCode.UNAUTHENTICATED, f"code {err.code()}")
            infos = unpack(status_details(err), error_details_pb2.ErrorInfo)
            check([i.reason for i in infos] == ["UNAUTHENTICATED"], f"{infos}")
            print("bad token: UNAUTHENTICATED")

    print("python client: all checks passed")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Failed as e:
        print(f"python client: FAILED: {e}", file=sys.stderr)
        sys.exit(1)
    except grpc.RpcError as e:
        print(f"python client: FAILED: unexpected RPC error {e.code()}: {e.details()}",
              file=sys.stderr)
        sys.exit(1)
    except grpc.FutureTimeoutError:
        print("python client: FAILED: server not reachable", file=sys.stderr)
        sys.exit(1)
