#!/usr/bin/env python3
"""The golden path from Python, with classes generated from proto/ by
grpcio-tools only: push the tools, the policy and the capsule of
examples/transfer.*; compile; preflight (WARN: the transfer needs two
approvals); execute; the run waits; two approvers other than the starter
approve (quorum 2); the transfer acts once through the connector hub; the run
succeeds; every receipt of the run verifies offline here, in Python: its ES256
signature with the log's JWKS, its RFC 6962 inclusion proof against the
checkpoint's root, and the checkpoint's signed-note signature.

Run against a running `anumate dev` from its directory
(scripts/python-client-test does all of it):

    ANUMATE_SERVER=… ANUMATE_TOKEN=… ANUMATE_BIN=target/debug/anumate python golden_path.py

ANUMATE_BIN mints the approvers' tokens (`anumate auth dev-token`, from the
dev issuer key under ./.anumate). Exits 0 when every check passes, 1 otherwise.
"""

import base64
import hashlib
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
EXAMPLES = REPO / "examples"
GEN = Path(os.environ.get("ANUMATE_PY_GEN", str(HERE / "gen"))).resolve()
sys.path.insert(0, str(GEN))

import grpc  # noqa: E402
from cryptography.exceptions import InvalidSignature  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature  # noqa: E402
from google.protobuf import json_format, struct_pb2  # noqa: E402
from google.rpc import error_details_pb2, status_pb2  # noqa: E402

from anumate.approvals.v1 import approvals_pb2, approvals_pb2_grpc  # noqa: E402
from anumate.compiler.v1 import compiler_pb2, compiler_pb2_grpc  # noqa: E402
from anumate.connectors.v1 import connectors_pb2, connectors_pb2_grpc  # noqa: E402
from anumate.ghostrun.v1 import ghostrun_pb2, ghostrun_pb2_grpc  # noqa: E402
from anumate.orchestrator.v1 import orchestrator_pb2, orchestrator_pb2_grpc  # noqa: E402
from anumate.policy.v1 import policy_pb2, policy_pb2_grpc  # noqa: E402
from anumate.receipts.v1 import receipts_pb2, receipts_pb2_grpc  # noqa: E402
from anumate.registry.v1 import (  # noqa: E402
    registry_pb2,
    registry_pb2_grpc,
    tools_pb2,
    tools_pb2_grpc,
)


class Failed(Exception):
    """A check that did not hold."""


def check(condition, message):
    if not condition:
        raise Failed(message)


def connection():
    server = os.environ.get("ANUMATE_SERVER")
    token = os.environ.get("ANUMATE_TOKEN")
    if not server or not token:
        state = json.loads((Path(".anumate") / "dev.json").read_text())
        server = server or state["server"]
        token = token or state["token"]
    for scheme in ("http://", "https://"):
        if server.startswith(scheme):
            server = server[len(scheme):]
    return server.rstrip("/"), token


def dev_token(subject, groups=None):
    """A dev token for `subject` with the approver role, from the dev issuer."""
    binary = os.environ.get("ANUMATE_BIN", "anumate")
    args = [binary, "auth", "dev-token", "--subject", subject, "--roles", "approver"]
    if groups:
        args += ["--groups", groups]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANUMATE_")}
    out = subprocess.run(args, check=True, capture_output=True, text=True, env=env)
    return out.stdout.strip()


def reason(err):
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    return info.reason
    return None


def b64url(text):
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# --- offline verification ------------------------------------------------------

def p256_key(jwk):
    check(jwk.get("kty") == "EC" and jwk.get("crv") == "P-256", f"not a P-256 key: {jwk}")
    numbers = ec.EllipticCurvePublicNumbers(
        int.from_bytes(b64url(jwk["x"]), "big"), int.from_bytes(b64url(jwk["y"]), "big"),
        ec.SECP256R1(),
    )
    return numbers.public_key()


def leaf_hash(data):
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left, right):
    return hashlib.sha256(b"\x01" + left + right).digest()


def root_from_inclusion(index, size, leaf, path):
    """RFC 9162 §2.1.3.2: the root an inclusion proof leads to."""
    check(index < size, f"leaf {index} outside a tree of {size}")
    fn, sn, r = index, size - 1, leaf
    for p in path:
        check(sn != 0, "audit path too long")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while True:
                    fn >>= 1
                    sn >>= 1
                    if fn & 1 or fn == 0:
                        break
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    check(sn == 0, "audit path too short")
    return r


def open_checkpoint(note, keys):
    """The (origin, size, root) of a C2SP signed note whose ECDSA signature
    line verifies with one of `keys` (type 0x02: DER ECDSA over SHA-256 of the
    text; the 4-byte key id is not trusted, every key is tried)."""
    text, sep, sigs = note.partition("\n\n")
    check(sep, "a note without signatures")
    text += "\n"
    lines = text.splitlines()
    origin, size, root = lines[0], int(lines[1]), base64.b64decode(lines[2])
    for line in sigs.splitlines():
        if not line.startswith("\u2014 "):
            continue
        name, _, blob = line[2:].rpartition(" ")
        if name != origin:
            continue
        raw = base64.b64decode(blob)
        sig = raw[4:]
        for key in keys:
            try:
                key.verify(sig, text.encode(), ec.ECDSA(hashes.SHA256()))
                return origin, size, root
            except InvalidSignature:
                continue
    raise Failed(f"no signature of {origin!r} on the checkpoint verifies")


def verify_offline(receipt, proof, keys_by_kid):
    """Checks a receipt as `anumate receipt verify` does, with nothing but
    the JWKS: signature, inclusion in the checkpoint's tree, checkpoint."""
    statement = json.loads(receipt.statement_json)
    kid = statement.get("kid") or receipt.kid
    check(kid in keys_by_kid, f"receipt {receipt.receipt_id}: unknown key {kid}")
    sig = b64url(receipt.signature)
    check(len(sig) == 64, f"receipt {receipt.receipt_id}: signature of {len(sig)} bytes")
    der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
    try:
        keys_by_kid[kid].verify(der, receipt.statement_json.encode(), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise Failed(f"receipt {receipt.receipt_id}: bad signature")
    origin, size, root = open_checkpoint(proof.checkpoint.note, list(keys_by_kid.values()))
    check(origin == f"anumate.dev/receipts/{receipt.tenant_id}",
          f"checkpoint of another log: {origin}")
    leaf = leaf_hash(receipt.statement_json.encode())
    check(leaf == receipt.leaf_hash, f"receipt {receipt.receipt_id}: leaf hash differs")
    check(proof.leaf_index == receipt.leaf_index, "leaf index differs")
    got = root_from_inclusion(proof.leaf_index, size, leaf, list(proof.audit_path))
    check(got == root, f"receipt {receipt.receipt_id}: not included in the checkpoint's tree")
    return statement


# --- the walk ------------------------------------------------------------------

def main():
    target, token = connection()
    admin = (("authorization", f"Bearer {token}"),)
    alice = (("authorization", f"Bearer {dev_token('user:alice')}"),)
    bob = (("authorization", f"Bearer {dev_token('user:bob', 'treasury')}"),)
    inputs_text = (EXAMPLES / "transfer.inputs.json").read_text()
    inputs = struct_pb2.Struct()
    inputs.update(json.loads(inputs_text))

    with grpc.insecure_channel(target) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        tools = tools_pb2_grpc.ToolsServiceStub(channel)
        policy = policy_pb2_grpc.PolicyServiceStub(channel)
        registry = registry_pb2_grpc.RegistryServiceStub(channel)
        compiler = compiler_pb2_grpc.CompilerServiceStub(channel)
        ghostrun = ghostrun_pb2_grpc.GhostRunServiceStub(channel)
        orch = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        approvals = approvals_pb2_grpc.ApprovalsServiceStub(channel)
        hub = connectors_pb2_grpc.ConnectorHubServiceStub(channel)
        receipts = receipts_pb2_grpc.ReceiptsServiceStub(channel)

        tools.PushTools(tools_pb2.PushToolsRequest(
            source_yaml=(EXAMPLES / "transfer.tools.yaml").read_text(),
            source_name="transfer.tools.yaml"), metadata=admin, timeout=10)
        policy.PushPolicy(policy_pb2.PushPolicyRequest(
            source=(EXAMPLES / "transfer.policy").read_text(),
            source_name="transfer.policy", publish=True), metadata=admin, timeout=10)
        registry.PushCapsule(registry_pb2.PushCapsuleRequest(
            source_yaml=(EXAMPLES / "transfer.capsule.yaml").read_text(),
            source_name="transfer.capsule.yaml", publish=True), metadata=admin, timeout=10)
        plan = compiler.Compile(compiler_pb2.CompileRequest(capsule_name="transfer"),
                                metadata=admin, timeout=10).plan
        check(plan.plan_hash.startswith("sha256:"), f"plan hash {plan.plan_hash!r}")
        print(f"compiled: {plan.plan_hash}")

        report = ghostrun.Preflight(ghostrun_pb2.PreflightRequest(
            plan_hash=plan.plan_hash, inputs_json=inputs_text), metadata=admin, timeout=10).report
        check(report.verdict == ghostrun_pb2.PREFLIGHT_VERDICT_WARN,
              f"preflight verdict {ghostrun_pb2.PreflightVerdict.Name(report.verdict)}")
        check(report.citable, "the preflight is not citable")
        waits = [s.step_id for s in report.steps
                 if s.outcome == ghostrun_pb2.STEP_OUTCOME_WAITS_FOR_APPROVAL]
        check(waits == ["transfer"], f"steps waiting for approval: {waits}")
        print(f"preflight: WARN, transfer waits for approval ({report.preflight_id})")

        # Without the preflight: refused, with its reason.
        key = f"py-{uuid.uuid4()}"
        try:
            orch.Execute(orchestrator_pb2.ExecuteRequest(
                plan_hash=plan.plan_hash, inputs=inputs, idempotency_key=key + "-x"),
                metadata=admin, timeout=10)
            raise Failed("a run started without a preflight")
        except grpc.RpcError as err:
            check(reason(err) == "PREFLIGHT_REQUIRED", f"{err.code()} {reason(err)}")

        started = orch.Execute(orchestrator_pb2.ExecuteRequest(
            plan_hash=plan.plan_hash, inputs=inputs, preflight_id=report.preflight_id,
            idempotency_key=key), metadata=admin, timeout=10)
        run_id = started.run.run_id
        check(started.created, "the run was not created")
        print(f"run: {run_id}")

        def get_run():
            return orch.GetRun(orchestrator_pb2.GetRunRequest(run_id=run_id),
                               metadata=admin, timeout=10).run

        def wait_for(state, seconds=30):
            deadline = time.monotonic() + seconds
            while True:
                run = get_run()
                if run.state == state:
                    return run
                check(time.monotonic() < deadline,
                      f"run {run_id} is {orchestrator_pb2.RunState.Name(run.state)}, "
                      f"not {orchestrator_pb2.RunState.Name(state)}")
                time.sleep(0.05)

        run = wait_for(orchestrator_pb2.RUN_STATE_WAITING_APPROVAL)
        transfer = next(s for s in run.steps if s.step_id == "transfer")
        check(len(transfer.approval_ids) == 1, f"approvals {list(transfer.approval_ids)}")
        approval_id = transfer.approval_ids[0]
        approval = approvals.GetApproval(approvals_pb2.GetApprovalRequest(
            approval_id=approval_id), metadata=alice, timeout=10).approval
        print(f"waiting: approval {approval_id}, {approval.args_sha256}")

        # The starter is not an approver; alice and bob (group treasury) are.
        try:
            approvals.Approve(approvals_pb2.ApproveRequest(
                approval_id=approval_id, args_sha256=approval.args_sha256),
                metadata=admin, timeout=10)
            raise Failed("the starter approved")
        except grpc.RpcError as err:
            check(reason(err) in ("NOT_AN_APPROVER", "SELF_APPROVAL"), f"{reason(err)}")
        approvals.Approve(approvals_pb2.ApproveRequest(
            approval_id=approval_id, args_sha256=approval.args_sha256, comment="checked"),
            metadata=alice, timeout=10)
        check(get_run().state == orchestrator_pb2.RUN_STATE_WAITING_APPROVAL,
              "one approval of two was enough")
        approvals.Approve(approvals_pb2.ApproveRequest(
            approval_id=approval_id, args_sha256=approval.args_sha256),
            metadata=bob, timeout=10)
        run = wait_for(orchestrator_pb2.RUN_STATE_SUCCEEDED)
        print("run: SUCCEEDED after two approvals")

        calls = hub.ListMockCalls(connectors_pb2.ListMockCallsRequest(run_id=run_id),
                                  metadata=admin, timeout=10).calls
        transfers = [c for c in calls if c.tool == "payments.transfer"]
        check(len(transfers) == 1 and transfers[0].acted,
              f"transfer calls: {[json_format.MessageToDict(c) for c in transfers]}")
        print(f"hub: payments.transfer acted once (key {transfers[0].idempotency_key}, "
              f"{transfers[0].deliveries} delivery)")

        jwks = json.loads(receipts.GetReceiptSigningKeys(
            receipts_pb2.GetReceiptSigningKeysRequest(), metadata=admin, timeout=10).data)
        keys = {k["kid"]: p256_key(k) for k in jwks["keys"]}
        listed = receipts.ListReceipts(receipts_pb2.ListReceiptsRequest(
            filter=receipts_pb2.ReceiptFilter(run_id=run_id), page_size=500),
            metadata=admin, timeout=10).receipts
        check(len(listed) >= 3, f"{len(listed)} receipts for the run")
        kinds = {}
        for r in listed:
            receipt = receipts.GetReceipt(receipts_pb2.GetReceiptRequest(
                receipt_id=r.receipt_id), metadata=admin, timeout=10).receipt
            deadline = time.monotonic() + 15
            while True:  # the checkpoint covering it follows within a second
                try:
                    proof = receipts.GetInclusionProof(receipts_pb2.GetInclusionProofRequest(
                        receipt_id=r.receipt_id), metadata=admin, timeout=10)
                    break
                except grpc.RpcError as err:
                    if err.code() != grpc.StatusCode.FAILED_PRECONDITION \
                            or time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            statement = verify_offline(receipt, proof, keys)
            kinds[statement.get("kind", "?")] = kinds.get(statement.get("kind", "?"), 0) + 1
        print(f"receipts: {len(listed)} verified offline ({kinds})")

        # A receipt whose statement was altered does not verify.
        forged = receipts_pb2.Receipt()
        forged.CopyFrom(receipt)
        forged.statement_json = receipt.statement_json.replace('"', ' "', 1)
        try:
            verify_offline(forged, proof, keys)
            raise AssertionError("an altered receipt verified")
        except Failed:
            print("receipts: an altered statement is refused")

    print("python golden path: all checks passed")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Failed as e:
        print(f"python golden path: FAILED: {e}", file=sys.stderr)
        sys.exit(1)
    except grpc.RpcError as e:
        print(f"python golden path: FAILED: unexpected RPC error {e.code()}: {e.details()}"
              f" [{reason(e)}]", file=sys.stderr)
        sys.exit(1)
