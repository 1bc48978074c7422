//! `GET /v1/models` and `GET /v1/models/{id}`: the models the router can route, in OpenAI's list shape.
//!
//! The list is what the workers themselves serve: the control loop fetches each worker's own
//! `GET /v1/models` at the health-check interval (5 s when health checks are off; a new worker at once),
//! and merges them with the configured model names into one listing, cached as ready JSON in an `ArcSwap`
//! (a request reads it without a lock). What a client can name is what is listed:
//! * a configured model (`--model`, the file's `[[models]]`, a registration's `model`) is listed under its
//!   own name, with the fields of the worker card of the same id (`created`, `owned_by`, `max_model_len`, ...)
//!   when a worker serves it, else `owned_by: "pdx"`;
//! * the catch-all model `*` (quick start without `--model`) routes any name, so each of its workers' cards
//!   is listed (first worker by id wins a duplicate id).
//!
//! A worker started with `--api-key` gets its own upstream key, else the router's first client key (clients'
//! keys reach the workers anyway, forwarded). Bounds: a worker's answer at most [`MAX_LIST_BYTES`], at most
//! [`MAX_MODELS_PER_WORKER`] cards each, ids at most [`MAX_ID_BYTES`], the listing at most [`MAX_LISTED`].
//! A worker that cannot be reached keeps its last list until it leaves the registry.
//!
//! The listing's ids are also the model label values of `pdx_requests_total` ([`Catalog::label`]): any other
//! name a client sends is counted as [`OTHER`], so clients cannot grow the metric's series.

use crate::api::{error_response, Shared};
use crate::body::RouterBody;
use crate::metrics::Label;
use crate::registry::{Registry, Snapshot, Worker};
use crate::upstream;
use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::header::HeaderValue;
use hyper::Response;
use pdx_protocol::ApiError;
use serde_json::{Map, Value};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Largest `/v1/models` answer read from a worker, bytes.
pub const MAX_LIST_BYTES: usize = 1 << 20;
/// Model cards kept per worker at most.
pub const MAX_MODELS_PER_WORKER: usize = 256;
/// Longest model id kept, bytes.
pub const MAX_ID_BYTES: usize = 256;
/// Largest worker card passed through whole, bytes of JSON; a larger one keeps only id, object, created and
/// owned_by.
pub const MAX_CARD_BYTES: usize = 4096;
/// Entries of the merged listing at most.
pub const MAX_LISTED: usize = 1024;
/// Model list refresh interval when active health checks are off.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(5);
/// Longest wait for one worker's list.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(2);
/// Model label of `pdx_requests_total` for a name the router does not list (or a request with no name
/// while several models are listed).
pub const OTHER: &str = "other";

/// The merged model listing and the per-worker lists it is built from.
#[derive(Debug)]
pub struct Catalog {
    listing: ArcSwap<Listing>,
    state: Mutex<State>,
    /// Unix seconds of the router's start: `created` of entries no worker card describes.
    created: u64,
    /// `Bearer KEY` of the router's first client key, for workers without their own upstream key.
    fallback_auth: Option<HeaderValue>,
}

/// The cached answer of `GET /v1/models` and its entries by id.
#[derive(Debug, Default)]
struct Listing {
    body: Bytes,
    /// Keyed by id as a metric label (a request naming a listed model takes its label from here).
    entries: HashMap<Label, Bytes>,
    /// The only id when exactly one is listed (the label of requests that name no model).
    single: Option<Label>,
}

#[derive(Debug, Default)]
struct State {
    workers: HashMap<u64, Fetched>,
    /// The registry snapshot the listing was built from.
    snap: Option<Arc<Snapshot>>,
}

#[derive(Debug)]
struct Fetched {
    at: Instant,
    cards: Vec<Map<String, Value>>,
    warned: bool,
}

impl Catalog {
    /// A catalog listing the configured models of `registry` (worker lists come with [`refresh`]).
    pub fn new(registry: &Registry, client_keys: &[crate::front_auth::ApiKey]) -> Self {
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let fallback_auth = client_keys.first().and_then(|k| {
            crate::front_auth::bearer(Some(k.expose()), "api_key")
                .ok()
                .flatten()
        });
        let snap = registry.snap.load_full();
        let listing = build(&snap, &HashMap::new(), created);
        Self {
            listing: ArcSwap::from_pointee(listing),
            state: Mutex::new(State {
                workers: HashMap::new(),
                snap: Some(snap),
            }),
            created,
            fallback_auth,
        }
    }

    /// The model label of a request naming `model`: the name if the router routes it by that name (a
    /// configured or registered model of `snap`) or lists it, else [`OTHER`]; a request without a name counts
    /// under the model it is routed to, or the only listed one.
    pub fn label(&self, snap: &Snapshot, model: Option<&str>) -> Label {
        match model {
            Some(m) => match snap.models.get(m).filter(|_| m != "*") {
                Some(t) => t.name.clone(),
                None => match self.listing.load().entries.get_key_value(m) {
                    Some((id, _)) => id.clone(),
                    None => OTHER.into(),
                },
            },
            None => match snap.model(None) {
                Some(t) if t.name != "*" => t.name.clone(),
                _ => self
                    .listing
                    .load()
                    .single
                    .clone()
                    .unwrap_or_else(|| OTHER.into()),
            },
        }
    }
}

/// `GET /v1/models`.
pub fn list(sh: &Shared) -> Response<RouterBody> {
    crate::api::full(
        200,
        "application/json",
        sh.models.listing.load().body.clone(),
    )
}

/// `GET /v1/models/{id}`; `raw` is the path after `/v1/models/` (percent-encoded; ids may hold `/`).
pub fn retrieve(sh: &Shared, raw: &str) -> Response<RouterBody> {
    let id = percent_decode(raw);
    if let Some(e) = id
        .as_ref()
        .and_then(|id| sh.models.listing.load().entries.get(id.as_str()).cloned())
    {
        return crate::api::full(200, "application/json", e);
    }
    let shown: String = id
        .as_deref()
        .unwrap_or(raw)
        .chars()
        .take(MAX_ID_BYTES)
        .collect();
    error_response(&ApiError {
        param: Some("model".into()),
        ..ApiError::not_found(format!("The model `{shown}` does not exist."))
    })
}

/// Decodes `%XX` escapes; `None` for a bad escape or bytes that are not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Fetches the lists of the workers that are due (new, or last fetched an interval ago) and rebuilds the
/// listing when a list or the registry changed. Called by the control loop; one worker at a time, each
/// within [`FETCH_TIMEOUT`].
pub async fn refresh(sh: &Shared) {
    let c = &sh.models;
    let every = sh.cfg.health_interval.unwrap_or(DEFAULT_REFRESH);
    let timeout = every.min(FETCH_TIMEOUT);
    let workers = sh.registry.workers();
    let due: Vec<Arc<Worker>> = {
        let Ok(st) = c.state.lock() else { return };
        workers
            .iter()
            .filter(|w| w.usable())
            .filter(|w| {
                st.workers
                    .get(&w.id)
                    .is_none_or(|f| f.at.elapsed() >= every)
            })
            .cloned()
            .collect()
    };
    let mut changed = false;
    for w in due {
        let auth = w.upstream_auth.as_ref().or(c.fallback_auth.as_ref());
        let got = fetch(&w, auth, timeout).await;
        let Ok(mut st) = c.state.lock() else { return };
        let f = st.workers.entry(w.id).or_insert_with(|| Fetched {
            at: Instant::now(),
            cards: Vec::new(),
            warned: false,
        });
        f.at = Instant::now();
        match got {
            Ok(cards) => {
                changed |= f.cards != cards;
                f.cards = cards;
            }
            Err(401 | 403) if !f.warned => {
                f.warned = true;
                tracing::warn!(url = %w.url, "worker refused GET /v1/models (401/403): give it an api_key \
                    (pool, worker or registration) to list its models");
            }
            Err(status) => tracing::debug!(url = %w.url, status, "worker model list unavailable"),
        }
    }
    let Ok(mut st) = c.state.lock() else { return };
    let live: HashSet<u64> = workers.iter().map(|w| w.id).collect();
    let before = st.workers.len();
    st.workers.retain(|id, _| live.contains(id));
    changed |= st.workers.len() != before;
    let snap = sh.registry.snap.load_full();
    if st.snap.as_ref().is_none_or(|s| !Arc::ptr_eq(s, &snap)) {
        st.snap = Some(snap.clone());
        changed = true;
    }
    if changed {
        c.listing
            .store(Arc::new(build(&snap, &st.workers, c.created)));
    }
}

/// One worker's `GET /v1/models`: its model cards, or the HTTP status (0: no answer) when it failed.
async fn fetch(
    w: &Worker,
    auth: Option<&HeaderValue>,
    timeout: Duration,
) -> Result<Vec<Map<String, Value>>, u16> {
    let fut = async {
        let conn = upstream::get(&w.authority, timeout)
            .await
            .map_err(|_| 0u16)?;
        let mut headers: Vec<(&str, &[u8])> = vec![("host", w.authority.as_bytes())];
        if let Some(a) = auth {
            headers.push(("authorization", a.as_bytes()));
        }
        let r = upstream::send(conn, "GET", "/v1/models", &headers, &[])
            .await
            .map_err(|_| 0u16)?;
        if !r.status().is_success() {
            return Err(r.status().as_u16());
        }
        let body = Limited::new(r.into_body(), MAX_LIST_BYTES)
            .collect()
            .await
            .map_err(|_| 0u16)?
            .to_bytes();
        Ok(parse_cards(&body))
    };
    monoio::time::timeout(timeout, fut).await.unwrap_or(Err(0))
}

/// The usable cards of a `/v1/models` answer: objects with a string `id` of 1 to [`MAX_ID_BYTES`] bytes, at
/// most [`MAX_MODELS_PER_WORKER`].
fn parse_cards(body: &[u8]) -> Vec<Map<String, Value>> {
    #[derive(serde::Deserialize)]
    struct List {
        data: Vec<Value>,
    }
    let Ok(l) = serde_json::from_slice::<List>(body) else {
        return Vec::new();
    };
    l.data
        .into_iter()
        .filter_map(|v| match v {
            Value::Object(m) => Some(m),
            _ => None,
        })
        .filter(|m| {
            m.get("id")
                .and_then(Value::as_str)
                .is_some_and(|id| !id.is_empty() && id.len() <= MAX_ID_BYTES)
        })
        .take(MAX_MODELS_PER_WORKER)
        .collect()
}

/// An OpenAI model entry for `id` from a worker's card (or none): `object: "model"`, integral `created`
/// and string `owned_by` guaranteed; other fields of a small card kept.
fn entry(id: &str, card: Option<&Map<String, Value>>, created: u64) -> Map<String, Value> {
    let small = card.filter(|c| serde_json::to_vec(c).is_ok_and(|v| v.len() <= MAX_CARD_BYTES));
    let mut e = small.cloned().unwrap_or_default();
    e.insert("id".into(), Value::from(id));
    e.insert("object".into(), Value::from("model"));
    let created = card
        .and_then(|c| c.get("created"))
        .and_then(Value::as_u64)
        .unwrap_or(created);
    e.insert("created".into(), Value::from(created));
    let owner = card
        .and_then(|c| c.get("owned_by"))
        .and_then(Value::as_str)
        .unwrap_or("pdx")
        .to_string();
    e.insert("owned_by".into(), Value::from(owner));
    e
}

/// The listing of `snap`'s models with the workers' cards.
fn build(snap: &Snapshot, fetched: &HashMap<u64, Fetched>, created: u64) -> Listing {
    let mut names: Vec<&String> = snap.models.keys().collect();
    names.sort();
    let mut data: Vec<Map<String, Value>> = Vec::new();
    let mut seen: HashSet<String> = HashSet::new();
    for name in names {
        let topo = &snap.models[name];
        let mut ws: Vec<u64> = topo
            .prefill
            .iter()
            .chain(&topo.decode)
            .chain(&topo.aggregated)
            .flat_map(|p| p.workers.load().iter().map(|w| w.id).collect::<Vec<_>>())
            .collect();
        ws.sort_unstable();
        let cards = ws
            .iter()
            .filter_map(|id| fetched.get(id))
            .flat_map(|f| f.cards.iter());
        if name == "*" {
            for c in cards {
                let id = c.get("id").and_then(Value::as_str).unwrap_or_default();
                if data.len() < MAX_LISTED && seen.insert(id.to_string()) {
                    data.push(entry(id, Some(c), created));
                }
            }
        } else if data.len() < MAX_LISTED && seen.insert(name.clone()) {
            let mut cards = cards;
            let card = cards.find(|c| c.get("id").and_then(Value::as_str) == Some(name.as_str()));
            data.push(entry(name, card, created));
        }
    }
    let entries: HashMap<Label, Bytes> = data
        .iter()
        .map(|e| {
            let id = Label::from(e.get("id").and_then(Value::as_str).unwrap_or_default());
            (id, Bytes::from(Value::Object(e.clone()).to_string()))
        })
        .collect();
    let single = (data.len() == 1)
        .then(|| entries.keys().next().cloned())
        .flatten();
    let body = serde_json::json!({"object": "list", "data": data}).to_string();
    Listing {
        body: Bytes::from(body),
        entries,
        single,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding() {
        assert_eq!(
            percent_decode("Qwen%2FQwen3-0.6B").as_deref(),
            Some("Qwen/Qwen3-0.6B")
        );
        assert_eq!(percent_decode("a/b").as_deref(), Some("a/b"));
        assert_eq!(percent_decode("caf%C3%A9").as_deref(), Some("café"));
        for bad in ["%", "%2", "%zz", "%ff"] {
            assert_eq!(percent_decode(bad), None, "{bad}");
        }
    }

    #[test]
    fn cards_are_bounded_and_normalized() {
        let long = "x".repeat(MAX_ID_BYTES + 1);
        let body = serde_json::json!({"object": "list", "data": [
            {"id": "a", "object": "model", "created": 5, "owned_by": "vllm", "max_model_len": 4096},
            {"id": ""}, {"id": 3}, "str", {"id": long}, {"id": "b", "created": "x", "owned_by": 1},
        ]});
        let cards = parse_cards(body.to_string().as_bytes());
        assert_eq!(cards.len(), 2);
        let a = entry("a", Some(&cards[0]), 9);
        assert_eq!(
            Value::Object(a),
            serde_json::json!(
            {"id": "a", "object": "model", "created": 5, "owned_by": "vllm", "max_model_len": 4096})
        );
        let b = entry("b", Some(&cards[1]), 9);
        assert_eq!(
            (&b["created"], &b["owned_by"]),
            (&Value::from(9), &Value::from("pdx"))
        );
        assert!(parse_cards(b"not json").is_empty());
        let many: Vec<Value> = (0..MAX_MODELS_PER_WORKER + 10)
            .map(|i| serde_json::json!({"id": i.to_string()}))
            .collect();
        let many = serde_json::json!({"data": many}).to_string();
        assert_eq!(parse_cards(many.as_bytes()).len(), MAX_MODELS_PER_WORKER);
        let big = serde_json::json!({"id": "c", "blob": "y".repeat(MAX_CARD_BYTES)});
        let c = entry("c", big.as_object(), 1);
        assert!(!c.contains_key("blob"));
    }
}
