//! The client-facing rules around a completion request that are not routing: configurations refused at
//! start because no request could ever be served, the answer when no worker exists at all, and the count
//! of every answer in `pdx_requests_total` (authentication is [`crate::front_auth`], request validation
//! [`pdx_protocol::validate`], the model list [`crate::models`]).

use crate::api::Shared;
use crate::body::RouterBody;
use crate::config::{Config, OrchestrationKind};
use crate::metrics::RequestLabels;
use crate::registry::Snapshot;
use crate::RouterError;
use hyper::Response;
use pdx_protocol::{ApiError, Role};
use std::sync::Arc;

/// Refuses a configuration under which a model's requests could only ever get 503:
/// * prefill pools with neither a decode nor an aggregated pool (a prefill worker computes the prompt's KV
///   and one token; a decode worker must generate the answer). A decode pool with no static workers counts:
///   its workers may register later. With aggregated pools beside them the prefill pools are only unused,
///   which is logged;
/// * `orchestration = "aggregated"` for a model with only prefill/decode pools (that orchestration sends
///   requests to aggregated pools only).
///
/// Errors: [`RouterError::Config`] saying what to add or change.
pub fn check_topology(cfg: &Config) -> Result<(), RouterError> {
    for m in &cfg.models {
        let has = |r: Role| m.pools.iter().any(|p| p.role == r);
        let (prefill, decode, agg) = (has(Role::Prefill), has(Role::Decode), has(Role::Aggregated));
        let name = if m.name == "*" {
            "of the quick-start flags (any model name)".to_string()
        } else {
            format!("`{}`", m.name)
        };
        if cfg.orchestration == OrchestrationKind::Aggregated && !agg && (prefill || decode) {
            return Err(RouterError::Config(format!(
                "model {name} has only prefill/decode workers, but orchestration `aggregated` sends requests to \
                 aggregated workers only (--worker, or a pool with role = \"aggregated\"); use --orchestration \
                 vllm-nixl or sglang-bootstrap for prefill/decode workers"
            )));
        }
        if prefill && !decode && !agg {
            return Err(RouterError::Config(format!(
                "model {name} has prefill workers but no decode worker: a prefill worker only computes the \
                 prompt's KV, a decode worker generates the answer. Add --decode URL (in a file: a pool with \
                 role = \"decode\"; `workers = []` if its workers register), or use --worker for workers that \
                 do both"
            )));
        }
        if prefill && !decode {
            tracing::warn!(model = %m.name, "prefill pools without a decode pool are not used: requests go to \
                the aggregated pools");
        }
    }
    Ok(())
}

/// Whether the snapshot holds any worker (static or registered).
pub fn has_workers(snap: &Snapshot) -> bool {
    snap.models.values().any(|m| {
        m.prefill
            .iter()
            .chain(&m.decode)
            .chain(&m.aggregated)
            .any(|p| !p.workers.load().is_empty())
    })
}

/// The 503 of a request that arrives before any worker exists (none configured, none registered yet).
pub fn no_workers() -> ApiError {
    ApiError::unavailable(
        "no workers registered: start the router with --prefill/--decode or --worker URLs, or register \
         workers with POST /v1/workers",
    )
}

/// Marks a response a worker produced (pool and worker labels of `pdx_requests_total`); answers without
/// it are the router's own (or a prefill worker's 4xx passed on).
#[derive(Debug, Clone)]
pub struct Served {
    /// Pool name.
    pub pool: crate::metrics::Label,
    /// The worker (its URL is the `worker` label; it keeps the label sets to delete when it leaves).
    pub worker: Arc<crate::registry::Worker>,
}

/// `1xx` … `5xx`.
pub fn status_class(status: u16) -> &'static str {
    match status / 100 {
        1 => "1xx",
        2 => "2xx",
        3 => "3xx",
        4 => "4xx",
        _ => "5xx",
    }
}

/// Counts one answer of a completion route in `pdx_requests_total`, under `model` (a
/// [`crate::api::models::Catalog::label`]), its status and status class, and the pool and worker that produced it.
pub fn count(sh: &Shared, model: crate::metrics::Label, resp: &Response<RouterBody>) {
    let status = resp.status().as_u16();
    let served = resp.body().served();
    let (pool, worker) = served
        .map(|s| (s.pool.clone(), s.worker.url.clone()))
        .unwrap_or_default();
    let labels = RequestLabels {
        model,
        pool,
        worker,
        status,
        class: status_class(status),
    };
    let before = sh.metrics.requests.get_or_create(&labels).inc();
    // The worker keeps the label sets of its series, to delete them when it leaves: noted once, when the series
    // is new (its first count), so a request takes no lock on the worker.
    if let (0, Some(s)) = (before, served) {
        s.worker.note_series(&labels.model, status);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn cfg(flags: &[&str]) -> Result<Config, RouterError> {
        Config::from_args(&crate::ServeArgs::parse_from(
            std::iter::once("pdx-serve").chain(flags.iter().copied()),
        ))
    }

    #[test]
    fn configurations_that_cannot_serve_are_refused() {
        let p = "http://127.0.0.1:9";
        for (flags, want) in [
            (&["--prefill", p][..], "no decode worker"),
            (
                &["--prefill", p, "--orchestration", "sglang"],
                "no decode worker",
            ),
            (
                &[
                    "--prefill",
                    p,
                    "--decode",
                    p,
                    "--orchestration",
                    "aggregated",
                ],
                "aggregated workers only",
            ),
            (
                &["--decode", p, "--orchestration", "aggregated"],
                "aggregated workers only",
            ),
        ] {
            let e = check_topology(&cfg(flags).unwrap())
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{flags:?}: {e}");
        }
        for flags in [
            &["--prefill", p, "--decode", p][..],
            &["--decode", p],
            &["--worker", p],
            &["--worker", p, "--orchestration", "aggregated"],
            &["--prefill", p, "--worker", p],
            &[],
        ] {
            check_topology(&cfg(flags).unwrap()).unwrap_or_else(|e| panic!("{flags:?}: {e}"));
        }
    }

    #[test]
    fn status_classes() {
        assert_eq!(
            [200, 204, 400, 401, 404, 429, 500, 503, 504].map(status_class),
            ["2xx", "2xx", "4xx", "4xx", "4xx", "4xx", "5xx", "5xx", "5xx"]
        );
    }
}
