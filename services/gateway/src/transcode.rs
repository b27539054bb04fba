//! proto3 JSON ↔ protobuf through `prost-reflect` dynamic messages.
//!
//! A request is assembled as one JSON object (the body, or the body under its
//! field, then the path variables and query parameters written into it with
//! the types their fields declare) and deserialized once with unknown fields
//! refused, so every input path gets the same proto3 JSON rules.

use anumate_errors::{Error, Reason, Violation};
use bytes::Bytes;
use prost::Message as _;
use prost_reflect::{
    DeserializeOptions, DynamicMessage, FieldDescriptor, Kind, MessageDescriptor, SerializeOptions,
};
use serde_json::{Map, Value as Json};

use crate::routes::{BodyBinding, Route};

/// The fields along a dotted path (proto or JSON names), if it names one.
pub fn field_path(desc: &MessageDescriptor, path: &str) -> Option<Vec<FieldDescriptor>> {
    let mut out = Vec::new();
    let mut msg = desc.clone();
    let mut parts = path.split('.').peekable();
    while let Some(part) = parts.next() {
        let field = msg
            .get_field_by_name(part)
            .or_else(|| msg.get_field_by_json_name(part))?;
        if parts.peek().is_some() {
            match field.kind() {
                Kind::Message(m) if !field.is_list() && !field.is_map() => msg = m,
                _ => return None,
            }
        }
        out.push(field);
    }
    Some(out)
}

/// Well-known types whose JSON form is a string or number, so a path
/// variable or query parameter can carry them.
fn is_scalar_wkt(m: &MessageDescriptor) -> bool {
    matches!(
        m.full_name(),
        "google.protobuf.Timestamp"
            | "google.protobuf.Duration"
            | "google.protobuf.FieldMask"
            | "google.protobuf.StringValue"
            | "google.protobuf.BytesValue"
            | "google.protobuf.BoolValue"
            | "google.protobuf.Int32Value"
            | "google.protobuf.Int64Value"
            | "google.protobuf.UInt32Value"
            | "google.protobuf.UInt64Value"
            | "google.protobuf.FloatValue"
            | "google.protobuf.DoubleValue"
    )
}

fn bad_field(field: &str, description: impl Into<String>) -> Error {
    let description = description.into();
    Error::because(Reason::InvalidArgument, format!("{field}: {description}"))
        .with_violations(vec![Violation::new(field, description)])
}

/// The JSON value of a path or query string for `field`.
fn text_value(name: &str, field: &FieldDescriptor, text: &str) -> Result<Json, Error> {
    let kind = field.kind();
    Ok(match kind {
        Kind::Bool => match text {
            "true" => Json::Bool(true),
            "false" => Json::Bool(false),
            _ => return Err(bad_field(name, format!("`{text}` is not true or false"))),
        },
        // 32-bit numbers and floats as numbers when they parse; proto3 JSON
        // also takes them as strings, so leave the rest to the deserializer
        // (which names what is wrong).
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 | Kind::Uint32 | Kind::Fixed32 => text
            .parse::<i64>()
            .map(Json::from)
            .unwrap_or_else(|_| Json::String(text.to_owned())),
        Kind::Message(m) if is_scalar_wkt(&m) => match m.full_name() {
            "google.protobuf.BoolValue" => match text {
                "true" => Json::Bool(true),
                "false" => Json::Bool(false),
                _ => return Err(bad_field(name, format!("`{text}` is not true or false"))),
            },
            "google.protobuf.Int32Value" | "google.protobuf.UInt32Value" => text
                .parse::<i64>()
                .map(Json::from)
                .unwrap_or_else(|_| Json::String(text.to_owned())),
            _ => Json::String(text.to_owned()),
        },
        Kind::Message(_) => {
            return Err(bad_field(
                name,
                "a message field cannot be set from a path or query string; set its fields (`field.subfield=`)",
            ));
        }
        _ => Json::String(text.to_owned()),
    })
}

/// Writes `value` at the field path into `root`, creating objects on the way;
/// `append` pushes onto a repeated field instead of replacing it.
fn set_path(
    root: &mut Map<String, Json>,
    desc: &MessageDescriptor,
    path: &str,
    text: &str,
    append: bool,
) -> Result<(), Error> {
    let fields =
        field_path(desc, path).ok_or_else(|| bad_field(path, "no such field in the request"))?;
    let mut obj = root;
    let last = fields.len() - 1;
    for (i, field) in fields.iter().enumerate() {
        // The body may name the field by its JSON name; keep one key.
        let json_name = field.json_name().to_owned();
        let value = obj.remove(&json_name);
        let proto_value = obj.remove(field.name());
        let existing = proto_value.or(value);
        if i < last {
            let next = match existing {
                Some(Json::Object(m)) => m,
                _ => Map::new(),
            };
            obj.insert(field.name().to_owned(), Json::Object(next));
            obj = match obj.get_mut(field.name()) {
                Some(Json::Object(m)) => m,
                _ => return Err(Error::internal("path object vanished")),
            };
        } else {
            if field.is_map() {
                return Err(bad_field(
                    path,
                    "a map field cannot be set from a path or query string",
                ));
            }
            let v = text_value(path, field, text)?;
            let v = if field.is_list() {
                let mut list = match existing {
                    Some(Json::Array(a)) if append => a,
                    _ => Vec::new(),
                };
                list.push(v);
                Json::Array(list)
            } else {
                if append && existing.is_some() {
                    return Err(bad_field(path, "given more than once but not repeated"));
                }
                v
            };
            obj.insert(field.name().to_owned(), v);
        }
    }
    Ok(())
}

/// Parses a JSON body; malformed JSON names its line and column.
pub fn parse_body(body: &[u8]) -> Result<Json, Error> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Json::Object(Map::new()));
    }
    serde_json::from_slice(body).map_err(|e| {
        let description = strip_position(&e.to_string());
        Error::because(
            Reason::InvalidDocument,
            format!(
                "malformed JSON body: {}:{}: {description}",
                e.line(),
                e.column()
            ),
        )
        .with_violations(vec![Violation::at(
            "body",
            u32::try_from(e.line()).unwrap_or(u32::MAX),
            u32::try_from(e.column()).unwrap_or(u32::MAX),
            description,
        )])
    })
}

fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_owned(),
        None => message.to_owned(),
    }
}

/// The request message for `route` from its path variables, query string and body.
pub fn request(
    route: &Route,
    vars: &[(String, String)],
    query: Option<&str>,
    body: &[u8],
    resume: Option<(&str, &str)>,
) -> Result<DynamicMessage, Error> {
    let desc = route.rpc.input();
    let mut root = match &route.body {
        BodyBinding::None => Map::new(),
        BodyBinding::Whole => match parse_body(body)? {
            Json::Object(m) => m,
            _ => return Err(bad_field("body", "the body must be a JSON object")),
        },
        BodyBinding::Field(f) => {
            let mut m = Map::new();
            m.insert(f.clone(), parse_body(body)?);
            m
        }
    };
    if matches!(route.body, BodyBinding::None) && !body.iter().all(u8::is_ascii_whitespace) {
        return Err(bad_field(
            "body",
            format!("{} {} takes no body", route.method, route.template.source),
        ));
    }
    for (path, value) in vars {
        set_path(&mut root, &desc, path, value, false)?;
    }
    if let Some(q) = query.filter(|q| !q.is_empty()) {
        if matches!(route.body, BodyBinding::Whole) {
            let first = form_urlencoded::parse(q.as_bytes())
                .next()
                .map(|(k, _)| k.into_owned())
                .unwrap_or_default();
            return Err(bad_field(
                &first,
                "query parameters are not read when the body is the whole request",
            ));
        }
        for (k, v) in form_urlencoded::parse(q.as_bytes()) {
            if vars.iter().any(|(p, _)| *p == k) {
                return Err(bad_field(&k, "already bound by the path"));
            }
            set_path(&mut root, &desc, &k, &v, true)?;
        }
    }
    if let Some((field, value)) = resume {
        set_path(&mut root, &desc, field, value, false)?;
    }
    from_json(&desc, Json::Object(root))
}

/// A message from proto3 JSON, unknown fields refused; a failure names the field.
pub fn from_json(desc: &MessageDescriptor, json: Json) -> Result<DynamicMessage, Error> {
    let options = DeserializeOptions::new().deny_unknown_fields(true);
    let mut track = serde_path_to_error::Track::new();
    let de = serde_path_to_error::Deserializer::new(&json, &mut track);
    DynamicMessage::deserialize_with_options(desc.clone(), de, &options).map_err(|e| {
        let path = track.path().to_string();
        let message = e.to_string();
        // An unknown field is named in the message; the tracked path stops at its parent.
        let unknown = message
            .strip_prefix("unknown field `")
            .and_then(|r| r.split('`').next())
            .or_else(|| {
                message
                    .strip_prefix("unrecognized field name '")
                    .and_then(|r| r.split('\'').next())
            });
        let field = match (unknown, path.as_str()) {
            (Some(name), p) => {
                if p == "." || p.is_empty() {
                    name.to_owned()
                } else {
                    format!("{p}.{name}")
                }
            }
            (None, ".") | (None, "") => "body".to_owned(),
            (None, p) => p.to_owned(),
        };
        bad_field(&field, message)
    })
}

/// Encodes a message.
pub fn encode(msg: &DynamicMessage) -> Bytes {
    Bytes::from(msg.encode_to_vec())
}

/// How responses are written: proto3 JSON, lowerCamelCase names, 64-bit
/// integers as strings, enums by name, default values left out.
fn serialize_options() -> SerializeOptions {
    SerializeOptions::new()
        .stringify_64_bit_integers(true)
        .use_enum_numbers(false)
        .use_proto_field_name(false)
        .skip_default_fields(true)
}

/// Decodes a response and writes it (or its `response_body` field) as JSON.
pub fn response_json(
    desc: &MessageDescriptor,
    bytes: &[u8],
    response_body: &str,
) -> Result<(Json, DynamicMessage), Error> {
    let msg = DynamicMessage::decode(desc.clone(), bytes)
        .map_err(|e| Error::internal(format!("response does not decode: {e}")))?;
    let json = if response_body.is_empty() {
        to_json(&msg)?
    } else {
        let field = desc
            .get_field_by_name(response_body)
            .ok_or_else(|| Error::internal("response_body field vanished"))?;
        let value = msg.get_field(&field);
        // Serialize the one field through a message holding only it.
        let mut only = DynamicMessage::new(desc.clone());
        only.set_field(&field, value.into_owned());
        let whole = serialize_full(&only)?;
        whole
            .get(field.json_name())
            .cloned()
            .unwrap_or_else(|| empty_value(&field))
    };
    Ok((json, msg))
}

/// Decodes a unary response and writes its JSON bytes straight from the
/// message (no intermediate `serde_json::Value` when the whole response is
/// the body, the common case).
pub fn response_json_bytes(
    desc: &MessageDescriptor,
    bytes: &[u8],
    response_body: &str,
) -> Result<Vec<u8>, Error> {
    if !response_body.is_empty() {
        let (json, _) = response_json(desc, bytes, response_body)?;
        return serde_json::to_vec(&json)
            .map_err(|e| Error::internal(format!("response does not serialize: {e}")));
    }
    let msg = DynamicMessage::decode(desc.clone(), bytes)
        .map_err(|e| Error::internal(format!("response does not decode: {e}")))?;
    let mut out = Vec::with_capacity(bytes.len() * 2 + 64);
    msg.serialize_with_options(
        &mut serde_json::Serializer::new(&mut out),
        &serialize_options(),
    )
    .map_err(|e| Error::internal(format!("response does not serialize: {e}")))?;
    Ok(out)
}

fn serialize_full(msg: &DynamicMessage) -> Result<Json, Error> {
    msg.serialize_with_options(serde_json::value::Serializer, &serialize_options())
        .map_err(|e| Error::internal(format!("response does not serialize: {e}")))
}

/// A message as proto3 JSON.
pub fn to_json(msg: &DynamicMessage) -> Result<Json, Error> {
    serialize_full(msg)
}

fn empty_value(field: &FieldDescriptor) -> Json {
    if field.is_list() {
        return Json::Array(Vec::new());
    }
    if field.is_map() {
        return Json::Object(Map::new());
    }
    match field.kind() {
        Kind::Message(_) => Json::Object(Map::new()),
        Kind::String | Kind::Bytes => Json::String(String::new()),
        Kind::Bool => Json::Bool(false),
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 | Kind::Uint64 | Kind::Fixed64 => {
            Json::String("0".into())
        }
        Kind::Enum(e) => e.default_value().name().to_owned().into(),
        _ => Json::from(0),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::routes::{Lookup, RouteTable};
    use http::Method;
    use prost_reflect::DescriptorPool;

    fn table() -> RouteTable {
        let pool = DescriptorPool::decode(anumate_proto::FILE_DESCRIPTOR_SET).unwrap();
        RouteTable::from_pool(&pool).unwrap()
    }

    fn req(
        t: &RouteTable,
        m: Method,
        path: &str,
        q: Option<&str>,
        body: &str,
    ) -> Result<Json, Error> {
        let Lookup::Found(route, vars) = t.lookup(&m, path) else {
            panic!("no route {m} {path}")
        };
        request(route, &vars, q, body.as_bytes(), None).map(|m| to_json(&m).unwrap())
    }

    #[test]
    fn path_and_query_fill_the_request() {
        let t = table();
        let j = req(&t, Method::GET, "/v1/capsules/refund/versions/3", None, "").unwrap();
        assert_eq!(j["name"], "refund");
        assert_eq!(j["version"], "3");
        let j = req(
            &t,
            Method::GET,
            "/v1/capsules",
            Some("page_size=5&pageToken=abc"),
            "",
        )
        .unwrap();
        assert_eq!(j["pageSize"], 5);
        assert_eq!(j["pageToken"], "abc");
    }

    #[test]
    fn bad_input_names_the_field() {
        let t = table();
        let e = req(&t, Method::GET, "/v1/capsules", Some("nope=1"), "").unwrap_err();
        assert_eq!(e.violations[0].field, "nope");
        let e = req(&t, Method::GET, "/v1/capsules", Some("page_size=many"), "").unwrap_err();
        assert_eq!(e.violations[0].field, "page_size", "{e:?}");
        let e = req(
            &t,
            Method::POST,
            "/v1/capsules:push",
            None,
            "{\"bogus\": 1}",
        )
        .unwrap_err();
        assert_eq!(e.violations[0].field, "bogus", "{e:?}");
        let e = req(&t, Method::POST, "/v1/capsules:push", None, "{\"x\": ").unwrap_err();
        assert_eq!(e.reason, Reason::InvalidDocument);
        assert!(e.violations[0].position.is_some());
    }
}
