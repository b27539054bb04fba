"""Schemathesis hooks for the gateway (loaded with SCHEMATHESIS_HOOKS by
scripts/schemathesis-test).

A server-streaming route answers `application/x-ndjson`: one JSON object per
line, each `{"result": ...}` or a last `{"error": Status}`. The OpenAPI
document gives the schema of one line. The deserializer hands Schemathesis
the first line for the schema check; `ndjson_lines_are_json` checks that
every line is a JSON object with exactly one of `result` or `error`, and that
`error`, if any, comes last.

A raw download (a stream of `google.api.HttpBody`: the receipts export,
`GET /v1/receipts:export`) is the lines themselves under the format's content
type: its NDJSON lines are receipts, each a JSON object, without the wrapping.
"""

# Operations whose NDJSON is raw lines (their responses are `*/*` in the
# OpenAPI document).
RAW_PATHS = ("/v1/receipts:export",)

import json

import schemathesis


def _lines(response):
    text = response.content.decode("utf-8")
    return [line for line in text.split("\n") if line.strip()]


@schemathesis.deserializer("application/x-ndjson")
def ndjson(ctx, response):
    lines = _lines(response)
    if not lines:
        return {}
    return json.loads(lines[0])


@schemathesis.check
def ndjson_lines_are_json(ctx, response, case):
    content_type = response.headers.get("content-type", [""])
    if isinstance(content_type, list):
        content_type = content_type[0] if content_type else ""
    if not content_type.startswith("application/x-ndjson"):
        return None
    lines = _lines(response)
    raw = case.path in RAW_PATHS
    for i, line in enumerate(lines):
        value = json.loads(line)
        assert isinstance(value, dict), f"line {i + 1} is not an object: {line[:200]}"
        if raw:
            continue
        keys = set(value)
        assert keys in ({"result"}, {"error"}), f"line {i + 1} has keys {sorted(keys)}"
        if "error" in keys:
            assert i == len(lines) - 1, f"line {i + 1} is an error but not the last line"
    return None
