//! The global planner's diversions, applied: `PUT`/`GET /v1/planner/diversions`, and the pool choice.
//!
//! When the GPU budget caps a pool below what its load needs, the global planner (`pdx-planner`,
//! `global::diversions`) asks that a fraction of that pool's new requests go to another pool of the same
//! role with replicas to spare. `pdx plan` (and `pdx serve --planner`) `PUT`s each interval's decision here:
//!
//! ```json
//! {"model": "m", "diversions": [{"from": "prefill-short", "to": "prefill-long", "fraction": 0.25}]}
//! ```
//!
//! The list replaces every diversion of that model (an empty list clears them); `model` may be left out
//! when the router serves one model (or a `*` model). The body is parsed strictly (unknown fields refused)
//! and bounded ([`MAX_DIVERSIONS`] entries, [`crate::api::workers::MAX_ADMIN_BODY`] bytes): both pools must exist
//! in that model with the same role and differ, a pool is diverted from at most once, and `fraction` is in
//! `(0, 1]`; anything else is a 400 OpenAI error. The route is guarded like `/v1/workers` (the admin token).
//!
//! On the request path, the pool the grid picks (or the first pool without a grid) is the *source*; a rule
//! for it decides by [`pdx_router_core::Divert`] (one atomic add per request, no lock; the rules are an
//! `ArcSwap` snapshot) whether this request goes to the rule's target pool instead. Diverted requests are
//! counted in `pdx_planner_diverted_total{model,role,from,to}`.

use crate::api::{error_response, full, Shared};
use crate::body::RouterBody;
use crate::registry::{ModelTopo, Pool};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response};
use pdx_protocol::{ApiError, Role};
use pdx_router_core::Divert;
use serde::Deserialize;
use std::sync::Arc;

/// Most diversions in one `PUT` (a deployment has a handful of pools per role).
pub const MAX_DIVERSIONS: usize = 64;

/// Longest pool or model name accepted in a diversion, bytes.
pub const MAX_NAME_BYTES: usize = 256;

/// One diversion in force.
#[derive(Debug)]
pub struct Rule {
    /// The model's name as the router knows it (`*` for the fallback model).
    pub model: String,
    /// Role of both pools.
    pub role: Role,
    /// The capped pool.
    pub from: String,
    /// The pool that takes the diverted requests.
    pub to: String,
    /// The counter deciding which requests go.
    pub divert: Divert,
}

/// The diversions in force (the router's whole set, every model).
pub type Rules = Vec<Arc<Rule>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PutBody {
    #[serde(default)]
    model: Option<String>,
    diversions: Vec<Entry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    from: String,
    to: String,
    fraction: f64,
}

/// The pool index to use for a request whose grid choice is `first` among `pools` of `model`: `first`, or
/// the target of a diversion from it when this request is one of those diverted (and the target still
/// exists). The cost without any diversion is one `ArcSwap` load.
pub fn apply(sh: &Shared, model: &ModelTopo, pools: &[Arc<Pool>], first: usize) -> usize {
    let rules = sh.registry.diversions.load();
    if rules.is_empty() {
        return first;
    }
    let Some(src) = pools.get(first) else {
        return first;
    };
    let Some(rule) = rules
        .iter()
        .find(|r| r.role == src.role && r.from == src.name && r.model == model.name)
    else {
        return first;
    };
    if !rule.divert.next() {
        return first;
    }
    match pools.iter().position(|p| p.name == rule.to) {
        Some(to) => {
            sh.metrics
                .diverted
                .get_or_create(&crate::metrics::DivertLabels {
                    model: model.name.to_string(),
                    role: rule.role.as_str(),
                    from: rule.from.clone(),
                    to: rule.to.clone(),
                })
                .inc();
            to
        }
        None => first,
    }
}

/// Handles `/v1/planner/diversions` (`GET` lists, `PUT` replaces a model's diversions).
pub async fn route(sh: &Shared, req: Request<Full<Bytes>>) -> Response<RouterBody> {
    if let Some(r) = crate::api::workers::refusal(sh, &req) {
        return r;
    }
    match *req.method() {
        Method::GET => list(sh),
        Method::PUT => match put(sh, req).await {
            Ok(r) => r,
            Err(e) => error_response(&e),
        },
        ref m => error_response(&ApiError::method_not_allowed(format!(
            "{m} not allowed on /v1/planner/diversions"
        ))),
    }
}

fn list(sh: &Shared) -> Response<RouterBody> {
    let rules = sh.registry.diversions.load();
    let v: Vec<serde_json::Value> = rules
        .iter()
        .map(|r| {
            serde_json::json!({
                "model": r.model, "role": r.role.as_str(), "from": r.from, "to": r.to,
                "fraction": r.divert.fraction(), "seen": r.divert.seen(),
            })
        })
        .collect();
    full(
        200,
        "application/json",
        serde_json::json!({ "diversions": v }).to_string(),
    )
}

/// The role of pool `name` in `m`, if it has one.
fn role_of(m: &ModelTopo, name: &str) -> Option<Role> {
    [&m.prefill, &m.decode, &m.aggregated]
        .into_iter()
        .flatten()
        .find(|p| p.name == name)
        .map(|p| p.role)
}

async fn put(sh: &Shared, req: Request<Full<Bytes>>) -> Result<Response<RouterBody>, ApiError> {
    let body = crate::api::workers::read_small(req).await?;
    let b: PutBody = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("malformed diversions: {e}")))?;
    if b.diversions.len() > MAX_DIVERSIONS {
        return Err(ApiError::invalid_param(
            "diversions",
            format!("at most {MAX_DIVERSIONS} diversions"),
        ));
    }
    let snap = sh.registry.snap.load();
    let Some(model) = snap.model(b.model.as_deref()) else {
        // Clearing the diversions of a model no worker serves (yet: `pdx plan` sends its first
        // decision while its workers may still be registering) is trivially done.
        if let (Some(m), true) = (&b.model, b.diversions.is_empty()) {
            if m.len() <= MAX_NAME_BYTES {
                let _edit = sh.registry.diversions_edit.lock();
                let cur = sh.registry.diversions.load();
                let kept: Rules = cur.iter().filter(|r| &r.model != m).cloned().collect();
                sh.registry.diversions.store(Arc::new(kept));
                return Ok(full(
                    200,
                    "application/json",
                    serde_json::json!({"model": m, "diversions": 0}).to_string(),
                ));
            }
        }
        return Err(match &b.model {
            Some(m) => {
                ApiError::invalid_param("model", format!("no model {}", truncate(m).escape_debug()))
            }
            None => ApiError::invalid_param("model", "model is required (several models served)"),
        });
    };
    let model = model.clone();
    let old = sh.registry.diversions.load();
    let mut new: Vec<Arc<Rule>> = Vec::with_capacity(b.diversions.len());
    for e in b.diversions {
        for n in [&e.from, &e.to] {
            if n.len() > MAX_NAME_BYTES {
                return Err(ApiError::invalid_param(
                    "diversions",
                    format!("pool name over {MAX_NAME_BYTES} bytes"),
                ));
            }
        }
        let from_role = role_of(&model, &e.from).ok_or_else(|| {
            ApiError::invalid_param(
                "from",
                format!(
                    "no pool {} in model {}",
                    e.from.escape_debug(),
                    model.name.escape_debug()
                ),
            )
        })?;
        match role_of(&model, &e.to) {
            None => {
                return Err(ApiError::invalid_param(
                    "to",
                    format!(
                        "no pool {} in model {}",
                        e.to.escape_debug(),
                        model.name.escape_debug()
                    ),
                ))
            }
            Some(r) if r != from_role => {
                return Err(ApiError::invalid_param(
                    "to",
                    format!(
                        "pool {} is {}, pool {} is {}: a diversion stays within one role",
                        e.from.escape_debug(),
                        from_role.as_str(),
                        e.to.escape_debug(),
                        r.as_str()
                    ),
                ))
            }
            Some(_) => {}
        }
        if e.from == e.to {
            return Err(ApiError::invalid_param(
                "to",
                "a diversion needs two different pools",
            ));
        }
        if new.iter().any(|r| r.from == e.from) {
            return Err(ApiError::invalid_param(
                "from",
                format!("pool {} is diverted from twice", e.from.escape_debug()),
            ));
        }
        let divert = Divert::new(e.fraction)
            .map_err(|x| ApiError::invalid_param("fraction", x.to_string()))?;
        // The same rule again (the planner re-sends its decision every interval) keeps its counter, so
        // the exact fraction holds across intervals.
        let same = old.iter().find(|r| {
            r.model == model.name
                && r.from == e.from
                && r.to == e.to
                && r.divert.fraction() == divert.fraction()
        });
        new.push(match same {
            Some(r) => r.clone(),
            None => Arc::new(Rule {
                model: model.name.to_string(),
                role: from_role,
                from: e.from,
                to: e.to,
                divert,
            }),
        });
    }
    let n = new.len();
    let _edit = sh.registry.diversions_edit.lock();
    let cur = sh.registry.diversions.load();
    let mut all: Rules = cur
        .iter()
        .filter(|r| r.model != model.name)
        .cloned()
        .collect();
    all.extend(new);
    sh.registry.diversions.store(Arc::new(all));
    Ok(full(
        200,
        "application/json",
        serde_json::json!({"model": model.name, "diversions": n}).to_string(),
    ))
}

fn truncate(s: &str) -> &str {
    let mut end = s.len().min(MAX_NAME_BYTES);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
