//! Replays a short Mooncake slice against a real `pdx mock` worker on loopback.

use pdx_replay::{Endpoint, ReplayArgs};

fn mock() -> pdx_mock::MockServer {
    use clap::Parser;
    let args = pdx_mock::MockArgs::parse_from([
        "pdx-mock",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--instant",
        "--num-blocks",
        "4096",
    ]);
    pdx_mock::start(args).expect("mock starts")
}

/// A counter of the mock's `/metrics` text.
fn metric(server: &pdx_mock::MockServer, name: &str) -> f64 {
    server
        .metric(name, "")
        .expect("the mock exports this metric")
}

fn args(url: String, endpoint: Endpoint) -> ReplayArgs {
    ReplayArgs {
        url,
        trace: None,
        model: None,
        endpoint,
        speed: 100.0,
        duration: None,
        max_requests: Some(24),
        concurrency_limit: Some(8),
        scale_tokens: 0.05,
        corpus: Vec::new(),
        slo_ttft_ms: Some(10_000.0),
        slo_itl_ms: Some(1_000.0),
        timeout: 60.0,
        no_ignore_eos: false,
        json: false,
        quiet: true,
        plot: None,
    }
}

#[test]
fn every_request_streams_exactly_its_output_length() {
    let server = mock();
    for endpoint in [Endpoint::Chat, Endpoint::Completions] {
        let (report, points) =
            pdx_replay::run(&args(format!("http://{}", server.addr), endpoint)).unwrap();
        assert_eq!(report.requests, 24, "{endpoint:?}");
        assert_eq!(report.succeeded, 24, "{endpoint:?}: {:?}", report.errors);
        assert_eq!(report.length_mismatches, 0);
        assert_eq!(
            report.output_tokens_received,
            report.output_tokens_requested
        );
        assert_eq!(points.len(), 24);
        assert_eq!(report.slo_attainment, Some(1.0));
        assert!(report.ttft_ms.p50 > 0.0);
    }
}

#[test]
fn prompt_lengths_are_exact_and_prefixes_are_shared() {
    let server = mock();
    let mut a = args(format!("http://{}", server.addr), Endpoint::Chat);
    a.max_requests = Some(10);
    a.concurrency_limit = Some(1);
    let (report, _) = pdx_replay::run(&a).unwrap();
    assert_eq!(report.succeeded, 10);
    // The server counted exactly the prompt tokens the trace asked for.
    let prompt_tokens = metric(&server, "vllm:prompt_tokens_total");
    assert_eq!(prompt_tokens as u64, report.input_tokens);
    // Every request of the conversation trace starts with block 0: later requests hit the prefix cache.
    assert!(metric(&server, "vllm:prefix_cache_hits_total") > 0.0);
}

#[test]
fn unreachable_server_is_counted_not_fatal() {
    let mut a = args("http://127.0.0.1:1".into(), Endpoint::Completions);
    a.model = Some("mock".into());
    a.max_requests = Some(3);
    let (report, _) = pdx_replay::run(&a).unwrap();
    assert_eq!(report.succeeded, 0);
    assert_eq!(report.errors.get("connect"), Some(&3));
    assert_eq!(report.slo_attainment, Some(0.0));
}
