//! `pdx plan --metrics-port`: the last decision as Prometheus gauges, served on `GET /metrics`
//! by one small thread (std sockets; request heads bounded to 8 KiB and 5 s).
//!
//! * `pdx_planner_target_replicas{pool}`: replicas given within the budget;
//! * `pdx_planner_desired_replicas{pool}`, `pdx_planner_needed_replicas{pool}`: asked for;
//! * `pdx_planner_predicted_rate{pool}` (req/s), `pdx_planner_predicted_isl{pool}`,
//!   `pdx_planner_predicted_osl{pool}` (tokens);
//! * `pdx_planner_correction{pool,phase}` (`prefill`, `decode`);
//! * `pdx_planner_observed_requests{pool}`, `pdx_planner_observed_ttft_ms{pool}`,
//!   `pdx_planner_observed_itl_ms{pool}`, `pdx_planner_observed_queued{pool}`;
//! * `pdx_planner_diversion_fraction{from,to}`: share of a capped pool's requests the
//!   planner asks to send to another pool of its role (`pdx plan` exports it; the router
//!   does not apply it yet);
//! * `pdx_planner_gpus`, `pdx_planner_decisions_total`.

use crate::Decision;
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The text the endpoint serves; replaced at every decision.
#[derive(Debug, Clone, Default)]
pub struct Exported(Arc<Mutex<String>>);

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The Prometheus text of a decision (`n`: decisions so far).
pub fn render(d: &Decision, n: u64) -> String {
    let mut s = String::new();
    let mut gauge = |name: &str, help: &str, rows: Vec<(String, f64)>| {
        s += &format!("# HELP {name} {help}\n# TYPE {name} gauge\n");
        for (labels, v) in rows {
            s += &format!("{name}{labels} {v}\n");
        }
    };
    let per = |f: &dyn Fn(usize) -> Option<f64>| -> Vec<(String, f64)> {
        d.requests
            .iter()
            .enumerate()
            .filter_map(|(i, r)| Some((format!("{{pool=\"{}\"}}", esc(&r.pool)), f(i)?)))
            .collect()
    };
    gauge(
        "pdx_planner_target_replicas",
        "Replicas given within the GPU budget.",
        per(&|i| d.targets.get(i).map(|&t| f64::from(t))),
    );
    gauge(
        "pdx_planner_desired_replicas",
        "Replicas the pool asked for.",
        per(&|i| Some(f64::from(d.requests[i].desired))),
    );
    gauge(
        "pdx_planner_needed_replicas",
        "Replicas needed at the SLO for the predicted load.",
        per(&|i| Some(d.requests[i].needed)),
    );
    gauge(
        "pdx_planner_predicted_rate",
        "Predicted request rate, req/s.",
        per(&|i| Some(d.requests[i].rate)),
    );
    gauge(
        "pdx_planner_predicted_isl",
        "Predicted ISL, tokens.",
        per(&|i| Some(d.requests[i].isl)),
    );
    gauge(
        "pdx_planner_predicted_osl",
        "Predicted OSL, tokens.",
        per(&|i| Some(d.requests[i].osl)),
    );
    let mut corr = Vec::new();
    for r in &d.requests {
        let p = esc(&r.pool);
        corr.push((
            format!("{{pool=\"{p}\",phase=\"prefill\"}}"),
            r.prefill_correction,
        ));
        corr.push((
            format!("{{pool=\"{p}\",phase=\"decode\"}}"),
            r.decode_correction,
        ));
    }
    gauge(
        "pdx_planner_correction",
        "Correction factor (observed / expected latency).",
        corr,
    );
    gauge(
        "pdx_planner_observed_requests",
        "Requests routed to the pool over the last interval.",
        per(&|i| d.observed.get(i).map(|o| o.requests)),
    );
    gauge(
        "pdx_planner_observed_ttft_ms",
        "Mean TTFT over the last interval, ms.",
        per(&|i| d.observed.get(i)?.ttft_ms),
    );
    gauge(
        "pdx_planner_observed_itl_ms",
        "Mean ITL over the last interval, ms.",
        per(&|i| d.observed.get(i)?.itl_ms),
    );
    gauge(
        "pdx_planner_observed_queued",
        "Requests waiting in the pool.",
        per(&|i| d.observed.get(i).map(|o| o.queued)),
    );
    gauge(
        "pdx_planner_diversion_fraction",
        "Share of a capped pool's new requests to send to a pool of its role with headroom.",
        d.diversions
            .iter()
            .map(|v| {
                (
                    format!("{{from=\"{}\",to=\"{}\"}}", esc(&v.from), esc(&v.to)),
                    v.fraction,
                )
            })
            .collect(),
    );
    gauge(
        "pdx_planner_gpus",
        "GPUs the targets use.",
        vec![(String::new(), d.gpus as f64)],
    );
    s += &format!("# HELP pdx_planner_decisions_total Decisions made.\n# TYPE pdx_planner_decisions_total counter\npdx_planner_decisions_total {n}\n");
    s
}

impl Exported {
    /// Replaces the served text.
    pub fn set(&self, text: String) {
        if let Ok(mut g) = self.0.lock() {
            *g = text;
        }
    }

    /// Serves `GET /metrics` on `listener` from a background thread, for the life of the
    /// process. Other paths get 404; connections are handled one at a time.
    pub fn serve(&self, listener: std::net::TcpListener) -> std::io::Result<()> {
        let me = self.clone();
        std::thread::Builder::new()
            .name("pdx-plan-metrics".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    let Ok(mut c) = conn else { continue };
                    let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
                    let _ = c.set_write_timeout(Some(Duration::from_secs(5)));
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
                        match c.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let ok = head.starts_with(b"GET /metrics ") || head.starts_with(b"GET /metrics?");
                    let (status, body) = if ok {
                        ("200 OK", me.0.lock().map(|g| g.clone()).unwrap_or_default())
                    } else {
                        ("404 Not Found", "not found\n".to_string())
                    };
                    let _ = write!(
                        c,
                        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                }
            })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::live::{http, prom};
    use crate::{Observation, ReplicaRequest};

    #[test]
    fn renders_and_serves_the_last_decision() {
        let d = Decision {
            at_s: 30.0,
            observed: vec![Observation {
                requests: 12.0,
                ttft_ms: Some(80.0),
                ..Default::default()
            }],
            requests: vec![ReplicaRequest {
                pool: "p\"x".into(),
                needed: 2.5,
                desired: 3,
                min: 1,
                max: 9,
                gpus_per_replica: 2,
                priority: 1.0,
                rate: 4.0,
                isl: 512.0,
                osl: 64.0,
                prefill_correction: 1.2,
                decode_correction: 1.0,
            }],
            targets: vec![3],
            gpus: 6,
            diversions: vec![crate::global::Diversion {
                from: "p\"x".into(),
                to: "q".into(),
                fraction: 0.25,
            }],
        };
        let text = render(&d, 7);
        let s = prom::parse(&text);
        assert_eq!(
            prom::sum(&s, "pdx_planner_target_replicas", &[("pool", "p\"x")]),
            3.0
        );
        assert_eq!(
            prom::sum(&s, "pdx_planner_correction", &[("phase", "prefill")]),
            1.2
        );
        assert_eq!(prom::sum(&s, "pdx_planner_observed_ttft_ms", &[]), 80.0);
        assert_eq!(prom::sum(&s, "pdx_planner_gpus", &[]), 6.0);
        assert_eq!(
            prom::sum(&s, "pdx_planner_diversion_fraction", &[("to", "q")]),
            0.25
        );
        assert_eq!(prom::sum(&s, "pdx_planner_decisions_total", &[]), 7.0);
        // No ITL observed: no sample.
        assert!(!text.contains("pdx_planner_observed_itl_ms{"));
        let e = Exported::default();
        e.set(text.clone());
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        e.serve(l).unwrap();
        let t = Duration::from_secs(5);
        let (st, body) = http::request("GET", &format!("http://{addr}/metrics"), None, t).unwrap();
        assert_eq!((st, body), (200, text.into_bytes()));
        let (st, _) = http::request("GET", &format!("http://{addr}/other"), None, t).unwrap();
        assert_eq!(st, 404);
    }
}
