//! The node API's bodies and answers, shaped as the peer (FastAPI + pydantic v2) shapes them.
//!
//! Answers are [`Reply`]s: a status, a content type and bytes. Errors the peer raises as `HTTPException`
//! are `{"detail": "..."}`; a body that fails validation is a 422 with FastAPI's list of pydantic errors
//! (`{"detail": [{"type", "loc", "msg", "input", "ctx"?}]}`), in the order of the model's fields; what
//! the peer does not catch is its bare `500 Internal Server Error` (text).
//!
//! Validation follows pydantic's lax mode as the peer runs it (checked against it): strings must be JSON
//! strings; integers may be JSON integers, floats without a fraction, booleans, or strings of digits
//! (whitespace around, `_` between digits, a `.0…` tail). On top of the peer, pdx bounds what it stores:
//! strings to their column's length (`String(64)`, …, as `string_too_long`), integers to MySQL's `INTEGER`
//! (`less_than_equal` 2147483647), device lists to [`MAX_DEVICES`] (`too_long`) and comm ids to
//! [`MAX_COMM_ID`] bytes.

use serde::Serialize;
use serde_json::{json, Map, Value};

/// Most devices one node may list (pdx's bound; the peer has none).
pub const MAX_DEVICES: usize = 1024;
/// Longest comm id, characters (pdx's bound; the peer's `data_channel_meta` is an unbounded JSON column).
pub const MAX_COMM_ID: usize = 65_536;
/// Largest integer stored (MySQL `INTEGER`).
pub const MAX_INT: i64 = i32::MAX as i64;

/// An answer of the node API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// `Content-Type`.
    pub content_type: &'static str,
    /// Body bytes.
    pub body: Vec<u8>,
}

impl Reply {
    /// `status` with `value` as JSON.
    pub fn json<T: Serialize>(status: u16, value: &T) -> Reply {
        Reply {
            status,
            content_type: "application/json",
            body: serde_json::to_vec(value).unwrap_or_default(),
        }
    }

    /// FastAPI's `HTTPException`: `{"detail": message}`.
    pub fn detail(status: u16, message: impl Into<String>) -> Reply {
        Reply::json(status, &json!({ "detail": message.into() }))
    }

    /// What FastAPI answers for an exception nobody caught (the peer's answer to a heartbeat or comm id of an
    /// unknown node).
    pub fn internal_error() -> Reply {
        Reply {
            status: 500,
            content_type: "text/plain; charset=utf-8",
            body: b"Internal Server Error".to_vec(),
        }
    }

    /// A 422 with FastAPI's list of validation errors.
    pub fn invalid(errors: Vec<FieldError>) -> Reply {
        Reply::json(422, &json!({ "detail": errors }))
    }

    /// The body as JSON (tests).
    pub fn value(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }
}

/// One element of a pydantic error's `loc`: a field name or a list index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Loc {
    /// A field (or `body`).
    Key(&'static str),
    /// A list index (or the character offset of a JSON error).
    Index(usize),
}

/// One pydantic validation error as FastAPI answers it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FieldError {
    /// pydantic's error type (`missing`, `string_type`, `int_parsing`, …).
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Where: `["body", field, …]`.
    pub loc: Vec<Loc>,
    /// pydantic's message.
    pub msg: String,
    /// The offending input.
    pub input: Value,
    /// Constraint context (`{"ge": 0}`, …).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ctx: Option<Value>,
}

/// Reads a request body as FastAPI does for a pydantic body model: JSON when there is no `Content-Type` or it
/// is `application/json` / `application/*+json`; any other type hands the text to the model, which refuses
/// it. An empty body is a missing body. Errors are the peer's answers.
pub fn body_object(content_type: Option<&[u8]>, body: &[u8]) -> Result<Map<String, Value>, Reply> {
    let root = || vec![Loc::Key("body")];
    if body.is_empty() {
        return Err(Reply::invalid(vec![FieldError {
            kind: "missing",
            loc: root(),
            msg: "Field required".into(),
            input: Value::Null,
            ctx: None,
        }]));
    }
    let is_json = content_type.is_none_or(|ct| {
        let ct = String::from_utf8_lossy(ct);
        let media = ct
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        match media.split_once('/') {
            Some(("application", sub)) => sub == "json" || sub.ends_with("+json"),
            _ => false,
        }
    });
    let value = if is_json {
        if std::str::from_utf8(body).is_err() {
            return Err(Reply::detail(400, "There was an error parsing the body"));
        }
        match serde_json::from_slice::<Value>(body) {
            Ok(v) => v,
            Err(e) => return Err(json_error(body, &e)),
        }
    } else {
        Value::String(String::from_utf8_lossy(body).into_owned())
    };
    match value {
        Value::Object(m) => Ok(m),
        other => Err(Reply::invalid(vec![not_an_object(root(), other)])),
    }
}

fn not_an_object(loc: Vec<Loc>, input: Value) -> FieldError {
    FieldError {
        kind: "model_attributes_type",
        loc,
        msg: "Input should be a valid dictionary or object to extract fields from".into(),
        input,
        ctx: None,
    }
}

/// FastAPI's answer to a body that is not JSON: `json_invalid` at the character offset of the error, with
/// Python's `json` message where serde's error maps onto one.
fn json_error(body: &[u8], e: &serde_json::Error) -> Reply {
    let text = String::from_utf8_lossy(body);
    // serde counts lines from 1 and columns (bytes) from 1; Python counts characters from 0.
    let mut offset = 0usize;
    for (i, line) in text.split('\n').enumerate() {
        if i + 1 == e.line() {
            let col = e.column().saturating_sub(1).min(line.len());
            offset += line.char_indices().take_while(|(b, _)| *b < col).count();
            break;
        }
        offset += line.chars().count() + 1;
    }
    let m = e.to_string();
    let msg = if m.starts_with("trailing characters") {
        "Extra data"
    } else if m.starts_with("key must be a string") || m.starts_with("trailing comma") {
        "Expecting property name enclosed in double quotes"
    } else if [
        "expected `,` or `}`",
        "expected `,` or `]`",
        "EOF while parsing an object",
        "EOF while parsing a list",
    ]
    .iter()
    .any(|p| m.starts_with(p))
    {
        "Expecting ',' delimiter"
    } else if m.starts_with("expected `:`") {
        "Expecting ':' delimiter"
    } else if m.starts_with("EOF while parsing a string") {
        "Unterminated string starting at"
    } else if m.starts_with("invalid escape") {
        "Invalid \\escape"
    } else if m.starts_with("control character") {
        "Invalid control character at"
    } else {
        "Expecting value"
    };
    Reply::invalid(vec![FieldError {
        kind: "json_invalid",
        loc: vec![Loc::Key("body"), Loc::Index(offset)],
        msg: "JSON decode error".into(),
        input: json!({}),
        ctx: Some(json!({ "error": msg })),
    }])
}

/// Field-by-field validation of one JSON object, collecting pydantic's errors in field order.
struct Fields<'a> {
    obj: &'a Map<String, Value>,
    loc: Vec<Loc>,
    errors: &'a mut Vec<FieldError>,
}

impl Fields<'_> {
    fn err(
        &mut self,
        key: &'static str,
        kind: &'static str,
        msg: String,
        input: Value,
        ctx: Option<Value>,
    ) {
        let mut loc = self.loc.clone();
        loc.push(Loc::Key(key));
        self.errors.push(FieldError {
            kind,
            loc,
            msg,
            input,
            ctx,
        });
    }

    fn missing(&mut self, key: &'static str) {
        let input = Value::Object(self.obj.clone());
        self.err(key, "missing", "Field required".into(), input, None);
    }

    /// A string field; `max` characters at most (pdx's bound). `Ok(None)`: absent or null (optional fields).
    fn string(&mut self, key: &'static str, required: bool, max: usize) -> Option<Option<String>> {
        match self.obj.get(key) {
            None if required => {
                self.missing(key);
                None
            }
            None => Some(None),
            Some(Value::Null) if !required => Some(None),
            Some(Value::String(s)) => {
                if s.chars().count() > max {
                    self.err(
                        key,
                        "string_too_long",
                        format!("String should have at most {max} characters"),
                        Value::String(s.clone()),
                        Some(json!({ "max_length": max })),
                    );
                    return None;
                }
                Some(Some(s.clone()))
            }
            Some(v) => {
                let v = v.clone();
                self.err(
                    key,
                    "string_type",
                    "Input should be a valid string".into(),
                    v,
                    None,
                );
                None
            }
        }
    }

    /// An integer field with pydantic's `ge`/`gt` bound (`lower`, `strict`: `gt`) and pdx's upper bound
    /// [`MAX_INT`]. `Ok(None)`: absent or null (optional fields).
    fn int(
        &mut self,
        key: &'static str,
        required: bool,
        lower: Option<(i64, bool)>,
    ) -> Option<Option<i64>> {
        let v = match self.obj.get(key) {
            None if required => {
                self.missing(key);
                return None;
            }
            None => return Some(None),
            Some(Value::Null) if !required => return Some(None),
            Some(v) => v.clone(),
        };
        let n = match lax_int(&v) {
            Ok(n) => n,
            Err((kind, msg)) => {
                self.err(key, kind, msg.into(), v, None);
                return None;
            }
        };
        if let Some((bound, strict)) = lower {
            if strict && n <= bound as i128 {
                self.err(
                    key,
                    "greater_than",
                    format!("Input should be greater than {bound}"),
                    v,
                    Some(json!({ "gt": bound })),
                );
                return None;
            }
            if !strict && n < bound as i128 {
                self.err(
                    key,
                    "greater_than_equal",
                    format!("Input should be greater than or equal to {bound}"),
                    v,
                    Some(json!({ "ge": bound })),
                );
                return None;
            }
        }
        if n > MAX_INT as i128 {
            self.err(
                key,
                "less_than_equal",
                format!("Input should be less than or equal to {MAX_INT}"),
                v,
                Some(json!({ "le": MAX_INT })),
            );
            return None;
        }
        Some(Some(n as i64))
    }

    /// An after-validator's `ValueError`, as pydantic reports it.
    fn value_error(&mut self, key: &'static str, message: &str, input: Value) {
        self.err(
            key,
            "value_error",
            format!("Value error, {message}"),
            input,
            Some(json!({ "error": {} })),
        );
    }
}

/// pydantic's lax integer: the value, or its error type and message. Values beyond `i64` are kept (as
/// `i128`) so that bounds see them; floats beyond `i64` are `int_parsing_size` as in pydantic.
fn lax_int(v: &Value) -> Result<i128, (&'static str, &'static str)> {
    const PARSING: (&str, &str) = (
        "int_parsing",
        "Input should be a valid integer, unable to parse string as an integer",
    );
    match v {
        Value::Bool(b) => Ok(i128::from(*b)),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Ok(i128::from(i))
            } else if let Some(u) = n.as_u64() {
                Ok(i128::from(u))
            } else {
                let f = n.as_f64().unwrap_or(f64::NAN);
                if f.fract() != 0.0 {
                    Err((
                        "int_from_float",
                        "Input should be a valid integer, got a number with a fractional part",
                    ))
                } else if f.abs() > 9.2e18 {
                    Err((
                        "int_parsing_size",
                        "Unable to parse input string as an integer, exceeded maximum size",
                    ))
                } else {
                    Ok(f as i128)
                }
            }
        }
        Value::String(s) => {
            let t = s.trim();
            let (neg, digits) = match t.as_bytes().first() {
                Some(b'-') => (true, &t[1..]),
                Some(b'+') => (false, &t[1..]),
                _ => (false, t),
            };
            // A `.0…` tail is accepted ("1.00"), any other fraction is not.
            let digits = match digits.split_once('.') {
                Some((i, frac)) if !frac.is_empty() && frac.bytes().all(|b| b == b'0') => i,
                Some(_) => return Err(PARSING),
                None => digits,
            };
            let b = digits.as_bytes();
            let ok = !b.is_empty()
                && b[0].is_ascii_digit()
                && b[b.len() - 1].is_ascii_digit()
                && b.iter().all(|c| c.is_ascii_digit() || *c == b'_')
                && !digits.contains("__");
            if !ok {
                return Err(PARSING);
            }
            let clean: String = digits.chars().filter(|c| *c != '_').collect();
            // More digits than any bound we check: saturate (the bound reports it).
            let n = clean.parse::<i128>().unwrap_or(i128::MAX);
            Ok(if neg { -n } else { n })
        }
        _ => Err(("int_type", "Input should be a valid integer")),
    }
}

/// A node role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Computes the prompt's KV and the first token.
    Prefill,
    /// Receives the KV and generates the rest.
    Decode,
}

impl Role {
    /// `prefill` / `decode` (the peer's `node_role` enum).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Prefill => "prefill",
            Role::Decode => "decode",
        }
    }

    /// Parses `prefill` / `decode`.
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "prefill" => Some(Role::Prefill),
            "decode" => Some(Role::Decode),
            _ => None,
        }
    }

    /// The other role.
    pub fn opposite(self) -> Role {
        match self {
            Role::Prefill => Role::Decode,
            Role::Decode => Role::Prefill,
        }
    }
}

/// `POST /RegisterNode` (the peer's `RegisterNodeCompatRequest`), validated. Fields the router does not
/// use (`hostname`, `job_id`, `start_time`, `comm_id`, device types and IPs) are checked and dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisterNode {
    /// `host:port` of the node's inference server (where requests go).
    pub inference_addr: String,
    /// Cluster (absent or empty: the router's).
    pub cluster_name: Option<String>,
    /// Role of the node's group.
    pub group_role: Role,
    /// Rank inside its group (≥ 0).
    pub node_rank: i64,
    /// The coordinator (control channel) address as sent; checked by the endpoint.
    pub coordinator_addr: Option<String>,
    /// Processes (devices) of the whole group (> 0).
    pub world_size: Option<i64>,
    /// Devices of this node (`None`: absent or null).
    pub devices: Option<usize>,
    /// A node id chosen by the node (absent or empty: the router draws one).
    pub node_id: Option<String>,
}

impl RegisterNode {
    /// Validates a body object in the model's field order.
    ///
    /// Errors: the peer's 422.
    pub fn parse(obj: &Map<String, Value>) -> Result<RegisterNode, Reply> {
        let mut errors = Vec::new();
        let mut f = Fields {
            obj,
            loc: vec![Loc::Key("body")],
            errors: &mut errors,
        };
        let inference_addr = f.string("inference_addr", true, 128).flatten();
        if let Some(a) = &inference_addr {
            if !host_port(a) {
                f.value_error(
                    "inference_addr",
                    "inference_addr must be in 'host:port' format",
                    Value::String(a.clone()),
                );
            }
        }
        let cluster_name = f.string("cluster_name", false, 128);
        let group_role = f.string("group_role", true, usize::MAX).flatten();
        let role = group_role.as_deref().and_then(Role::parse);
        if let (Some(r), None) = (&group_role, role) {
            f.value_error(
                "group_role",
                "group_role must be 'prefill' or 'decode'",
                Value::String(r.clone()),
            );
        }
        let node_rank = f.int("node_rank", true, Some((0, false))).flatten();
        let hostname = f.string("hostname", false, usize::MAX);
        let coordinator_addr = f.string("coordinator_addr", false, 128);
        let world_size = f.int("world_size", false, Some((0, true)));
        let devices = devices(&mut f);
        let job_id = f.string("job_id", false, usize::MAX);
        let start_time = f.string("start_time", false, usize::MAX);
        let comm_id = f.string("comm_id", false, usize::MAX);
        let node_id = f.string("node_id", false, 64);
        let _ = (hostname, job_id, start_time, comm_id);
        match (
            inference_addr,
            cluster_name,
            role,
            node_rank,
            coordinator_addr,
            world_size,
            devices,
            node_id,
        ) {
            (Some(ia), Some(cn), Some(r), Some(nr), Some(ca), Some(ws), Some(dv), Some(ni))
                if errors.is_empty() =>
            {
                Ok(RegisterNode {
                    inference_addr: ia,
                    cluster_name: cn,
                    group_role: r,
                    node_rank: nr,
                    coordinator_addr: ca,
                    world_size: ws,
                    devices: dv,
                    node_id: ni,
                })
            }
            _ => Err(Reply::invalid(errors)),
        }
    }
}

/// `devices: Optional[List[DeviceInfo]]`: the count of valid entries, `Some(None)` when absent or null.
fn devices(f: &mut Fields<'_>) -> Option<Option<usize>> {
    let list = match f.obj.get("devices") {
        None | Some(Value::Null) => return Some(None),
        Some(Value::Array(a)) => a,
        Some(v) => {
            let v = v.clone();
            f.err(
                "devices",
                "list_type",
                "Input should be a valid list".into(),
                v,
                None,
            );
            return None;
        }
    };
    if list.len() > MAX_DEVICES {
        let n = list.len();
        f.err(
            "devices",
            "too_long",
            format!("List should have at most {MAX_DEVICES} items after validation, not {n}"),
            Value::Array(list.clone()),
            Some(json!({ "field_type": "List", "max_length": MAX_DEVICES, "actual_length": n })),
        );
        return None;
    }
    let before = f.errors.len();
    for (i, d) in list.iter().enumerate() {
        let mut loc = f.loc.clone();
        loc.extend([Loc::Key("devices"), Loc::Index(i)]);
        let Value::Object(obj) = d else {
            f.errors.push(not_an_object(loc, d.clone()));
            continue;
        };
        let mut g = Fields {
            obj,
            loc,
            errors: &mut *f.errors,
        };
        g.int("device_id", true, None);
        g.string("device_type", false, usize::MAX);
        g.string("device_ip", true, usize::MAX);
    }
    (f.errors.len() == before).then_some(Some(list.len()))
}

/// The peer's `host:port` check of `inference_addr`: a colon, with something on both sides of the last one.
pub fn host_port(v: &str) -> bool {
    matches!(v.rsplit_once(':'), Some((h, p)) if !h.is_empty() && !p.is_empty())
}

/// `POST /Heartbeat`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heartbeat {
    /// The node's id (from `/RegisterNode`).
    pub node_id: String,
}

impl Heartbeat {
    /// Validates a body object.
    ///
    /// Errors: the peer's 422.
    pub fn parse(obj: &Map<String, Value>) -> Result<Heartbeat, Reply> {
        let mut errors = Vec::new();
        let mut f = Fields {
            obj,
            loc: vec![Loc::Key("body")],
            errors: &mut errors,
        };
        let node_id = f.string("node_id", true, 64).flatten();
        match node_id {
            Some(node_id) if errors.is_empty() => Ok(Heartbeat { node_id }),
            _ => Err(Reply::invalid(errors)),
        }
    }
}

/// `POST /RegisterCommId`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisterCommId {
    /// The registering node (a rank-0 prefill).
    pub node_id: String,
    /// `<prefill inference_addr>__<decode inference_addr>`.
    pub comm_key: String,
    /// What the decode group needs to join the prefill's communicator (opaque to the router).
    pub comm_id: String,
}

impl RegisterCommId {
    /// Validates a body object.
    ///
    /// Errors: the peer's 422.
    pub fn parse(obj: &Map<String, Value>) -> Result<RegisterCommId, Reply> {
        let mut errors = Vec::new();
        let mut f = Fields {
            obj,
            loc: vec![Loc::Key("body")],
            errors: &mut errors,
        };
        let node_id = f.string("node_id", true, 64).flatten();
        let comm_key = f.string("comm_key", true, 256).flatten();
        let comm_id = f.string("comm_id", true, MAX_COMM_ID).flatten();
        match (node_id, comm_key, comm_id) {
            (Some(node_id), Some(comm_key), Some(comm_id)) if errors.is_empty() => {
                Ok(RegisterCommId {
                    node_id,
                    comm_key,
                    comm_id,
                })
            }
            _ => Err(Reply::invalid(errors)),
        }
    }
}

/// The peer's checks of `coordinator_addr` (an `ip:port` the node's peers connect to): the first failing
/// one's message, as its 400 `detail`.
pub fn check_coordinator_addr(value: Option<&str>) -> Result<String, String> {
    let v = match value {
        None | Some("") => return Err("coordinator_addr is required".into()),
        Some(v) => v,
    };
    if v.trim() != v {
        return Err("coordinator_addr must not contain leading or trailing whitespace".into());
    }
    if v.contains("://") || v.contains(['/', '?', '#']) {
        return Err("coordinator_addr must be in 'ip:port' format without prefixes".into());
    }
    let Some((host, port)) = v
        .rsplit_once(':')
        .filter(|(h, p)| !h.is_empty() && !p.is_empty())
    else {
        return Err("coordinator_addr must be in 'host:port' format".into());
    };
    if !python_ip(host) {
        return Err("coordinator_addr host must be a valid IP address".into());
    }
    let Some(port) = python_int(port) else {
        return Err("coordinator_addr port must be an integer".into());
    };
    if !(1..=65535).contains(&port) {
        return Err("coordinator_addr port must be between 1 and 65535".into());
    }
    Ok(v.to_string())
}

/// Python's `ipaddress.ip_address` on a string: IPv4 dotted quad (no leading zeros), or IPv6, which may carry
/// a `%scope`.
fn python_ip(h: &str) -> bool {
    if h.parse::<std::net::Ipv4Addr>().is_ok() {
        return true;
    }
    let addr = match h.split_once('%') {
        Some((a, scope)) if !scope.is_empty() && !scope.contains('%') => a,
        Some(_) => return false,
        None => h,
    };
    addr.parse::<std::net::Ipv6Addr>().is_ok()
}

/// Python's `int(str)`: whitespace around, a sign, ASCII digits with single `_` between them.
fn python_int(s: &str) -> Option<i64> {
    let t = s.trim();
    let (neg, d) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let b = d.as_bytes();
    let ok = !b.is_empty()
        && b[0].is_ascii_digit()
        && b[b.len() - 1].is_ascii_digit()
        && b.iter().all(|c| c.is_ascii_digit() || *c == b'_')
        && !d.contains("__");
    if !ok {
        return None;
    }
    let n: String = d.chars().filter(|c| *c != '_').collect();
    let n = n.parse::<i64>().unwrap_or(i64::MAX);
    Some(if neg { -n } else { n })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(s: &str) -> Map<String, Value> {
        serde_json::from_str(s).unwrap()
    }

    fn errors(r: Reply) -> Vec<Value> {
        assert_eq!(r.status, 422, "{}", String::from_utf8_lossy(&r.body));
        r.value().unwrap()["detail"].as_array().unwrap().clone()
    }

    #[test]
    fn bodies_that_are_not_objects() {
        let e = errors(body_object(Some(b"application/json"), b"").unwrap_err());
        assert_eq!(
            e[0],
            json!({"type":"missing","loc":["body"],"msg":"Field required","input":null})
        );
        for (body, input) in [("[]", json!([])), ("1", json!(1)), ("null", Value::Null)] {
            let e = errors(body_object(None, body.as_bytes()).unwrap_err());
            assert_eq!(e[0]["type"], "model_attributes_type");
            assert_eq!(e[0]["input"], input);
        }
        // Another content type: the text goes to the model.
        let e = errors(body_object(Some(b"text/plain"), br#"{"a":1}"#).unwrap_err());
        assert_eq!(e[0]["input"], r#"{"a":1}"#);
        assert!(body_object(Some(b"application/problem+json; charset=utf-8"), b"{}").is_ok());
        let r = body_object(None, b"{\"a\": \xff}").unwrap_err();
        assert_eq!(
            (r.status, r.value().unwrap()["detail"].clone()),
            (400, json!("There was an error parsing the body"))
        );
        // JSON errors: the character offset and Python's message.
        for (body, msg) in [
            ("nojson", "Expecting value"),
            (
                r#"{"a": 1,}"#,
                "Expecting property name enclosed in double quotes",
            ),
            (r#"{"a": 1} x"#, "Extra data"),
        ] {
            let e = errors(body_object(None, body.as_bytes()).unwrap_err());
            assert_eq!(e[0]["type"], "json_invalid", "{body}");
            assert_eq!(e[0]["loc"][0], "body", "{body}");
            assert!(
                e[0]["loc"][1]
                    .as_u64()
                    .is_some_and(|n| n <= body.len() as u64),
                "{body}"
            );
            assert_eq!(e[0]["ctx"]["error"], msg, "{body}");
        }
    }

    #[test]
    fn register_node_errors_in_field_order() {
        let e = errors(RegisterNode::parse(&obj("{}")).unwrap_err());
        let fields: Vec<&Value> = e.iter().map(|x| &x["loc"][1]).collect();
        assert_eq!(fields, ["inference_addr", "group_role", "node_rank"]);
        assert!(e
            .iter()
            .all(|x| x["type"] == "missing" && x["input"] == json!({})));
        let e = errors(
            RegisterNode::parse(&obj(
                r#"{"inference_addr":"x","coordinator_addr":"127.0.0.1:9001","group_role":"bad","node_rank":-1,
                "world_size":0,"devices":[{"device_id":"a"}]}"#,
            ))
            .unwrap_err(),
        );
        let kinds: Vec<&str> = e.iter().map(|x| x["type"].as_str().unwrap()).collect();
        assert_eq!(
            kinds,
            [
                "value_error",
                "value_error",
                "greater_than_equal",
                "greater_than",
                "int_parsing",
                "missing"
            ]
        );
        assert_eq!(
            e[0]["msg"],
            "Value error, inference_addr must be in 'host:port' format"
        );
        assert_eq!(e[0]["ctx"], json!({"error": {}}));
        assert_eq!(e[4]["loc"], json!(["body", "devices", 0, "device_id"]));
        assert_eq!(e[5]["input"], json!({"device_id": "a"}));
        assert_eq!(e[2]["ctx"], json!({"ge": 0}));
    }

    #[test]
    fn lax_integers_as_pydantic() {
        for (v, want) in [
            (json!(true), Ok(1)),
            (json!(1.0), Ok(1)),
            (json!(" 2 "), Ok(2)),
            (json!("1_0"), Ok(10)),
            (json!("+5"), Ok(5)),
            (json!("-0"), Ok(0)),
            (json!("1.00"), Ok(1)),
            (json!("00012"), Ok(12)),
            (json!(1.5), Err("int_from_float")),
            (json!(1e20), Err("int_parsing_size")),
            (json!("1e3"), Err("int_parsing")),
            (json!("1.5"), Err("int_parsing")),
            (json!("1__0"), Err("int_parsing")),
            (json!("_1"), Err("int_parsing")),
            (json!(""), Err("int_parsing")),
            (json!(null), Err("int_type")),
            (json!([1]), Err("int_type")),
        ] {
            assert_eq!(lax_int(&v).map_err(|e| e.0), want, "{v}");
        }
        // pdx's own bounds.
        let e = errors(
            RegisterNode::parse(&obj(
                r#"{"inference_addr":"a:1","group_role":"decode","node_rank":2147483648,
                "node_id":"01234567890123456789012345678901234567890123456789012345678901234"}"#,
            ))
            .unwrap_err(),
        );
        assert_eq!(e[0]["type"], "less_than_equal");
        assert_eq!(e[1]["type"], "string_too_long");
        assert_eq!(e[1]["ctx"], json!({"max_length": 64}));
    }

    #[test]
    fn coordinator_addresses_as_the_peer_checks_them() {
        for (v, want) in [
            (Some("127.0.0.1:9001"), None),
            (Some("::1:80"), None),
            (Some("fe80::1%eth0:80"), None),
            (Some("127.0.0.1: 80"), None),
            (Some("127.0.0.1:+80"), None),
            (Some("127.0.0.1:8_0"), None),
            (None, Some("coordinator_addr is required")),
            (Some(""), Some("coordinator_addr is required")),
            (
                Some(" 127.0.0.1:9"),
                Some("coordinator_addr must not contain leading or trailing whitespace"),
            ),
            (
                Some("http://127.0.0.1:9"),
                Some("coordinator_addr must be in 'ip:port' format without prefixes"),
            ),
            (
                Some("127.0.0.1"),
                Some("coordinator_addr must be in 'host:port' format"),
            ),
            (
                Some("host:9001"),
                Some("coordinator_addr host must be a valid IP address"),
            ),
            (
                Some("[::1]:80"),
                Some("coordinator_addr host must be a valid IP address"),
            ),
            (
                Some("127.0.0.01:80"),
                Some("coordinator_addr host must be a valid IP address"),
            ),
            (
                Some("127.0.0.1:x"),
                Some("coordinator_addr port must be an integer"),
            ),
            (
                Some("127.0.0.1:0"),
                Some("coordinator_addr port must be between 1 and 65535"),
            ),
            (
                Some("127.0.0.1:70000"),
                Some("coordinator_addr port must be between 1 and 65535"),
            ),
        ] {
            assert_eq!(check_coordinator_addr(v).err().as_deref(), want, "{v:?}");
        }
    }

    #[test]
    fn heartbeat_and_comm_id_bodies() {
        assert_eq!(
            Heartbeat::parse(&obj(r#"{"node_id":"n","x":1}"#))
                .unwrap()
                .node_id,
            "n"
        );
        let e = errors(Heartbeat::parse(&obj(r#"{"node_id":5}"#)).unwrap_err());
        assert_eq!(e[0]["type"], "string_type");
        let e = errors(
            RegisterCommId::parse(&obj(r#"{"node_id":"n","comm_key":1,"comm_id":null}"#))
                .unwrap_err(),
        );
        assert_eq!(e.len(), 2);
        assert_eq!(e[1]["loc"], json!(["body", "comm_id"]));
        let long = "x".repeat(MAX_COMM_ID + 1);
        let e = errors(
            RegisterCommId::parse(&obj(&format!(
                r#"{{"node_id":"n","comm_key":"a__b","comm_id":"{long}"}}"#
            )))
            .unwrap_err(),
        );
        assert_eq!(e[0]["type"], "string_too_long");
    }
}
