//! `GET /openapi.json`: an OpenAPI 3.1 document generated from the same
//! descriptors and routes the gateway serves, with the proto comments as
//! descriptions, a schema per message and enum, the bearer security scheme,
//! and the streaming RPCs described as NDJSON and SSE.

use std::collections::BTreeMap;

use prost_reflect::{DescriptorPool, EnumDescriptor, FieldDescriptor, Kind, MessageDescriptor};
use serde_json::{Map, Value as Json, json};

use crate::routes::{BodyBinding, Route, RouteTable};

/// The leading (else trailing) comment of the element at `path` in its file.
fn comment(file: &prost_reflect::FileDescriptor, path: &[i32]) -> Option<String> {
    let info = file.file_descriptor_proto().source_code_info.as_ref()?;
    let loc = info.location.iter().find(|l| l.path == path)?;
    let text = loc
        .leading_comments
        .as_deref()
        .or(loc.trailing_comments.as_deref())?;
    let text = text
        .lines()
        .map(str::trim)
        .collect::<Vec<_>>()
        .join("\n")
        .trim()
        .to_owned();
    (!text.is_empty()).then_some(text)
}

fn schema_name(full_name: &str) -> String {
    full_name.to_owned()
}

fn schema_ref(full_name: &str) -> Json {
    json!({ "$ref": format!("#/components/schemas/{}", schema_name(full_name)) })
}

/// The schema of a well-known type's JSON form, if `m` is one.
fn wkt_schema(m: &MessageDescriptor) -> Option<Json> {
    Some(match m.full_name() {
        "google.protobuf.Timestamp" => json!({"type": "string", "format": "date-time"}),
        "google.protobuf.Duration" => {
            json!({"type": "string", "pattern": "^-?[0-9]+(\\.[0-9]{1,9})?s$"})
        }
        "google.protobuf.FieldMask" => {
            json!({"type": "string", "description": "Comma-separated lowerCamelCase field paths."})
        }
        "google.protobuf.Struct" => json!({"type": "object", "additionalProperties": true}),
        "google.protobuf.Value" => json!({}),
        "google.protobuf.ListValue" => json!({"type": "array", "items": {}}),
        "google.protobuf.Empty" => json!({"type": "object"}),
        "google.protobuf.Any" => {
            json!({"type": "object", "properties": {"@type": {"type": "string"}}, "additionalProperties": true})
        }
        "google.protobuf.StringValue" => json!({"type": ["string", "null"]}),
        "google.protobuf.BytesValue" => {
            json!({"type": ["string", "null"], "contentEncoding": "base64"})
        }
        "google.protobuf.BoolValue" => json!({"type": ["boolean", "null"]}),
        "google.protobuf.Int32Value" | "google.protobuf.UInt32Value" => {
            json!({"type": ["integer", "null"]})
        }
        "google.protobuf.Int64Value" | "google.protobuf.UInt64Value" => {
            json!({"type": ["string", "null"], "format": "int64"})
        }
        "google.protobuf.FloatValue" | "google.protobuf.DoubleValue" => {
            json!({"type": ["number", "null"]})
        }
        _ => return None,
    })
}

/// Whether the field is `(google.api.field_behavior) = REQUIRED`.
fn is_required(field: &FieldDescriptor) -> bool {
    const REQUIRED: i32 = 2;
    let Some(ext) = field
        .parent_pool()
        .get_extension_by_name("google.api.field_behavior")
    else {
        return false;
    };
    let options = field.options();
    if !options.has_extension(&ext) {
        return false;
    }
    match options.get_extension(&ext).as_ref() {
        prost_reflect::Value::List(list) => {
            list.iter().any(|v| v.as_enum_number() == Some(REQUIRED))
        }
        prost_reflect::Value::EnumNumber(n) => *n == REQUIRED,
        _ => false,
    }
}

/// The REQUIRED fields of the request a client must send in the query or
/// body: none when the RPC has other bindings, whose path may carry them
/// (`GET /v1/policies/{name}` has no `version`).
fn required_fields(route: &Route, bindings: usize) -> Vec<FieldDescriptor> {
    if bindings > 1 {
        return Vec::new();
    }
    route
        .rpc
        .input()
        .fields()
        .filter(|f| {
            !route
                .template
                .variables
                .iter()
                .any(|v| v.field_path == f.name())
        })
        .filter(is_required)
        .collect()
}

fn scalar_schema(kind: &Kind) -> Json {
    match kind {
        Kind::Double | Kind::Float => json!({"type": "number"}),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
            json!({"type": "integer", "format": "int32"})
        }
        Kind::Uint32 | Kind::Fixed32 => json!({"type": "integer", "format": "int32", "minimum": 0}),
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => json!({"type": "string", "format": "int64"}),
        Kind::Uint64 | Kind::Fixed64 => json!({"type": "string", "format": "uint64"}),
        Kind::Bool => json!({"type": "boolean"}),
        Kind::String => json!({"type": "string"}),
        Kind::Bytes => json!({"type": "string", "contentEncoding": "base64"}),
        Kind::Message(m) => wkt_schema(m).unwrap_or_else(|| schema_ref(m.full_name())),
        Kind::Enum(e) => schema_ref(e.full_name()),
    }
}

fn field_schema(field: &FieldDescriptor) -> Json {
    let kind = field.kind();
    if field.is_map()
        && let Kind::Message(entry) = &kind
    {
        let value = entry.map_entry_value_field();
        return json!({"type": "object", "additionalProperties": scalar_schema(&value.kind())});
    }
    let item = scalar_schema(&kind);
    let mut schema = if field.is_list() {
        json!({"type": "array", "items": item})
    } else {
        item
    };
    if let Some(text) = comment(&field.parent_file(), field.path())
        && let Json::Object(m) = &mut schema
    {
        // `$ref` siblings are allowed in 3.1.
        m.insert("description".into(), Json::String(text));
    }
    schema
}

fn message_schema(m: &MessageDescriptor) -> Json {
    if let Some(s) = wkt_schema(m) {
        return s;
    }
    let mut props = Map::new();
    for f in m.fields() {
        props.insert(f.json_name().to_owned(), field_schema(&f));
    }
    let mut s = json!({"type": "object", "properties": props, "additionalProperties": false});
    if let Some(text) = comment(&m.parent_file(), m.path()) {
        s["description"] = Json::String(text);
    }
    s
}

fn enum_schema(e: &EnumDescriptor) -> Json {
    let names: Vec<String> = e.values().map(|v| v.name().to_owned()).collect();
    let mut s = json!({"type": "string", "enum": names});
    if let Some(text) = comment(&e.parent_file(), e.path()) {
        s["description"] = Json::String(text);
    }
    s
}

/// Every message and enum reachable from `root`.
fn collect(
    m: &MessageDescriptor,
    msgs: &mut BTreeMap<String, MessageDescriptor>,
    enums: &mut BTreeMap<String, EnumDescriptor>,
) {
    if msgs.contains_key(m.full_name()) || wkt_schema(m).is_some() {
        return;
    }
    msgs.insert(m.full_name().to_owned(), m.clone());
    for f in m.fields() {
        match f.kind() {
            Kind::Message(inner) => {
                if inner.is_map_entry() {
                    let v = inner.map_entry_value_field();
                    match v.kind() {
                        Kind::Message(vm) => collect(&vm, msgs, enums),
                        Kind::Enum(e) => {
                            enums.insert(e.full_name().to_owned(), e);
                        }
                        _ => {}
                    }
                } else {
                    collect(&inner, msgs, enums);
                }
            }
            Kind::Enum(e) => {
                enums.insert(e.full_name().to_owned(), e);
            }
            _ => {}
        }
    }
}

/// Query parameters of a route: the top-level scalar, enum and
/// well-known-type fields not bound by the path (nested ones are accepted
/// as `a.b` but not listed).
fn query_params(route: &Route, bindings: usize) -> Vec<Json> {
    if !matches!(route.body, BodyBinding::None) {
        return Vec::new();
    }
    let required = required_fields(route, bindings);
    let input = route.rpc.input();
    input
        .fields()
        .filter(|f| {
            !route
                .template
                .variables
                .iter()
                .any(|v| v.field_path == f.name())
        })
        .filter(|f| !f.is_map())
        .filter(|f| match f.kind() {
            Kind::Message(m) => wkt_schema(&m).is_some(),
            _ => true,
        })
        .map(|f| {
            json!({
                "name": f.name(),
                "in": "query",
                "required": required.contains(&f),
                "schema": field_schema(&f),
            })
        })
        .collect()
}

/// The operation of `route`, one of the RPC's `bindings` HTTP bindings.
fn operation(route: &Route, bindings: usize) -> Json {
    let rpc = &route.rpc;
    let input = rpc.input();
    let output = rpc.output();
    let mut params: Vec<Json> = route
        .template
        .variables
        .iter()
        .map(|v| json!({"name": v.field_path, "in": "path", "required": true, "schema": {"type": "string"}}))
        .collect();
    params.extend(query_params(route, bindings));
    let result = if route.response_body.is_empty() {
        scalar_schema(&Kind::Message(output.clone()))
    } else {
        output
            .get_field_by_name(&route.response_body)
            .map(|f| field_schema(&f))
            .unwrap_or_else(|| json!({}))
    };
    let ok = if route.server_streaming() && output.full_name() == "google.api.HttpBody" {
        // Raw bytes as they stream (the receipts export: lines under the
        // format's content type).
        json!({"description": "The stream's bodies (google.api.HttpBody) as one raw response body, under the first body's content type; a failure after the first bytes cuts the body short (resume as the operation says).", "content": {"*/*": {"schema": {}}}})
    } else if route.server_streaming() {
        json!({
            "description": "A stream of messages: NDJSON lines `{\"result\": …}` (a failure after the first message comes as a last line `{\"error\": Status}`), or Server-Sent Events when `Accept: text/event-stream` (`id:` is the message's sequence; send it back as `Last-Event-ID` to resume).",
            "content": {
                "application/x-ndjson": {"schema": {
                    "type": "object",
                    "properties": {"result": result, "error": schema_ref("google.rpc.Status")}
                }},
                "text/event-stream": {"schema": {"type": "string"}}
            }
        })
    } else if output.full_name() == "google.api.HttpBody" {
        // Any bytes: a JWKS is JSON, an export is lines; the content type says which.
        json!({"description": "The raw body under its content type (google.api.HttpBody).", "content": {"*/*": {"schema": {}}}})
    } else {
        json!({"description": "OK", "content": {"application/json": {"schema": result}}})
    };
    let mut op = json!({
        "operationId": format!("{}_{}", rpc.parent_service().name(), rpc.name()),
        "tags": [rpc.parent_service().name()],
        "summary": rpc.name(),
        "parameters": params,
        "responses": {
            "200": ok,
            "default": {
                "description": "An error: google.rpc.Status with ErrorInfo (the stable reason) and, for bad input, BadRequest.",
                "content": {"application/json": {"schema": schema_ref("google.rpc.Status")}}
            }
        }
    });
    if let Some(text) = comment(&rpc.parent_file(), rpc.path()) {
        op["description"] = Json::String(text);
    }
    match &route.body {
        BodyBinding::None => {}
        BodyBinding::Whole => {
            let mut schema = schema_ref(input.full_name());
            let required: Vec<String> = required_fields(route, bindings)
                .iter()
                .map(|f| f.json_name().to_owned())
                .collect();
            if !required.is_empty() {
                // `$ref` siblings are allowed in 3.1.
                schema["required"] = json!(required);
            }
            op["requestBody"] =
                json!({"required": true, "content": {"application/json": {"schema": schema}}});
        }
        BodyBinding::Field(f) => {
            let schema = input
                .get_field_by_name(f)
                .map(|f| field_schema(&f))
                .unwrap_or_else(|| json!({}));
            op["requestBody"] =
                json!({"required": true, "content": {"application/json": {"schema": schema}}});
        }
    }
    op
}

/// The OpenAPI document.
pub fn document(_pool: &DescriptorPool, table: &RouteTable) -> Json {
    let mut paths: BTreeMap<String, Map<String, Json>> = BTreeMap::new();
    let mut msgs = BTreeMap::new();
    let mut enums = BTreeMap::new();
    for route in table.routes() {
        collect(&route.rpc.input(), &mut msgs, &mut enums);
        collect(&route.rpc.output(), &mut msgs, &mut enums);
        let bindings = table
            .routes()
            .iter()
            .filter(|r| r.grpc_path == route.grpc_path)
            .count();
        let mut op = operation(route, bindings);
        let n = paths.len();
        let item = paths.entry(route.template.openapi_path()).or_default();
        let method = route.method.as_str().to_ascii_lowercase();
        if item.contains_key(&method) {
            // An additional binding of the same method and path shape.
            continue;
        }
        if bindings > 1
            && let Some(id) = op["operationId"].as_str()
        {
            op["operationId"] = Json::String(format!("{id}_{n}"));
        }
        item.insert(method, op);
    }
    let mut schemas = Map::new();
    for (name, m) in &msgs {
        schemas.insert(schema_name(name), message_schema(m));
    }
    for (name, e) in &enums {
        schemas.insert(schema_name(name), enum_schema(e));
    }
    schemas.insert(
        "google.rpc.Status".into(),
        json!({
            "type": "object",
            "description": "The error model: a gRPC code, a message, and details (ErrorInfo with the stable reason, BadRequest naming fields).",
            "properties": {
                "code": {"type": "integer", "format": "int32"},
                "message": {"type": "string"},
                "details": {"type": "array", "items": {"type": "object", "properties": {"@type": {"type": "string"}}, "additionalProperties": true}}
            }
        }),
    );
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Anumate API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The REST mapping of the Anumate gRPC services, generated from their google.api.http annotations. Requests and responses use the proto3 JSON mapping (64-bit integers as strings, enums by name)."
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}}
        },
        "security": [{"bearer": []}]
    })
}
