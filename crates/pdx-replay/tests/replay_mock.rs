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
        rate_curve: None,
        mean_rate: None,
        duration: None,
        max_requests: Some(24),
        concurrency_limit: Some(8),
        scale_tokens: 0.05,
        corpus: Vec::new(),
        slo_ttft_ms: Some(10_000.0),
        slo_itl_ms: Some(1_000.0),
        timeout_secs: 60.0,
        no_ignore_eos: false,
        json: false,
        quiet: true,
        plot: None,
        export: None,
        max_failed_fraction: 0.0,
    }
}

#[test]
fn every_request_streams_exactly_its_output_length() {
    let server = mock();
    for endpoint in [Endpoint::Chat, Endpoint::Completions] {
        let pdx_replay::Replay { report, records } =
            pdx_replay::run(&args(format!("http://{}", server.addr), endpoint)).unwrap();
        assert_eq!(report.requests, 24, "{endpoint:?}");
        assert_eq!(report.succeeded, 24, "{endpoint:?}: {:?}", report.errors);
        assert_eq!(report.length_mismatches, 0);
        assert_eq!(
            report.output_tokens_received,
            report.output_tokens_requested
        );
        assert_eq!(records.len(), 24);
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
    let report = pdx_replay::run(&a).unwrap().report;
    assert_eq!(report.succeeded, 10);
    // The server counted exactly the prompt tokens the trace asked for.
    let prompt_tokens = metric(&server, "vllm:prompt_tokens_total");
    assert_eq!(prompt_tokens as u64, report.input_tokens);
    // Every request of the conversation trace starts with block 0: later requests hit the prefix cache.
    assert!(metric(&server, "vllm:prefix_cache_hits_total") > 0.0);
}

#[test]
fn an_unreachable_server_stops_the_replay_before_it_starts() {
    // Before: every request failed with `connect`, and the report printed percentiles of 0.00.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut a = args(format!("http://127.0.0.1:{port}/v1"), Endpoint::Completions);
    a.model = Some("mock".into());
    let err = pdx_replay::run(&a).unwrap_err();
    assert!(
        matches!(err, pdx_replay::ReplayError::Connect { .. }),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("127.0.0.1:{port}")) && msg.contains("refused"),
        "{msg}"
    );
    assert!(!msg.contains('\n'), "one line: {msg}");
}

#[test]
fn a_base_url_with_v1_works_like_the_openai_clients_base_url() {
    // Before: `--url http://host:port/v1` posted to /v1/v1/chat/completions and every request failed with 404.
    let server = mock();
    let mut a = args(format!("http://{}/v1/", server.addr), Endpoint::Chat);
    a.max_requests = Some(4);
    let report = pdx_replay::run(&a).unwrap().report;
    assert_eq!(report.succeeded, 4, "{:?}", report.failures);
}

#[test]
fn failures_are_grouped_with_status_and_message_and_fail_the_threshold() {
    let server = mock();
    // A base URL one `/v1` too deep: every request gets the mock's 404.
    let mut a = args(format!("http://{}/v1/v1", server.addr), Endpoint::Chat);
    a.max_requests = Some(3);
    let replay = pdx_replay::run(&a).unwrap();
    let r = &replay.report;
    assert_eq!((r.requests, r.succeeded), (3, 0));
    assert_eq!(r.failures.len(), 1, "{:?}", r.failures);
    let g = &r.failures[0];
    assert_eq!((g.status, g.count), (Some(404), 3));
    assert!(
        g.message
            .as_deref()
            .is_some_and(|m| m.contains("/v1/v1/chat/completions")),
        "{g:?}"
    );
    assert!(r.to_table().contains("all 3 requests failed"));
    assert!(replay.check_failures(0.0).is_err());
    assert!(replay.check_failures(1.0).is_ok());
}

#[test]
fn export_writes_one_json_line_per_request_and_plot_draws() {
    let server = mock();
    let dir = std::env::temp_dir().join(format!("pdx-replay-export-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut a = args(format!("http://{}", server.addr), Endpoint::Chat);
    a.max_requests = Some(5);
    a.export = Some(dir.join("requests.jsonl"));
    let fonts = std::env::var_os("PDX_PLOT_FONT").is_some()
        || std::path::Path::new("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf").exists();
    if fonts {
        a.plot = Some(dir.join("replay.png"));
    } else {
        eprintln!("skipped: the --plot part (no TrueType font on this machine)");
    }
    let replay = pdx_replay::run(&a).unwrap();
    let text = std::fs::read_to_string(dir.join("requests.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 5);
    for (i, l) in lines.iter().enumerate() {
        let rec = &replay.records[i];
        assert_eq!(l["index"], i);
        assert_eq!(l["status"], 200);
        assert!(l["error"].is_null());
        assert!(l["ttft_ms"].as_f64().unwrap() > 0.0);
        assert_eq!(l["output_tokens"], rec.output_tokens);
        assert_eq!(l["output_tokens"], l["output_tokens_requested"]);
        assert_eq!(
            l["input_tokens"], l["prompt_tokens"],
            "the mock counted the exact prompt"
        );
        assert_eq!(
            l["itl_ms"].as_array().unwrap().len() + 1,
            rec.output_tokens as usize,
            "one gap between each pair of tokens (the instant mock streams them in one chunk or more)"
        );
        assert!(l["sent_s"].as_f64().unwrap() >= 0.0);
        assert!(
            l["worker"]
                .as_str()
                .is_some_and(|w| w.starts_with("pdx-mock-aggregated-")),
            "the mock names itself in x-pdx-worker: {l}"
        );
    }
    if fonts {
        let png = std::fs::read(dir.join("replay.png")).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_rate_curve_retimes_the_arrivals() {
    let server = mock();
    // Evenly spaced arrivals (a time warp keeps a trace's bursts, so start without any).
    let trace = std::env::temp_dir().join(format!("pdx-rate-{}.jsonl", std::process::id()));
    let lines: String = (0..24)
        .map(|i| {
            format!(
                "{{\"timestamp\": {}, \"input_length\": 64, \"output_length\": 2}}\n",
                i * 100
            )
        })
        .collect();
    std::fs::write(&trace, lines).unwrap();
    let mut a = args(format!("http://{}", server.addr), Endpoint::Completions);
    a.trace = Some(trace.clone());
    a.speed = 1.0;
    a.max_requests = Some(24);
    a.rate_curve = Some("steps:0=1,0.4=4".into());
    a.mean_rate = Some(40.0);
    let pdx_replay::Replay { report, records } = pdx_replay::run(&a).unwrap();
    let _ = std::fs::remove_file(&trace);
    assert_eq!(report.succeeded, 24, "{:?}", report.errors);
    let mut sent: Vec<f64> = records.iter().map(|r| r.sent_s).collect();
    sent.sort_by(f64::total_cmp);
    // 24 requests at a mean of 40 req/s span about 0.6 s, whatever the recorded trace's span.
    assert!(sent[23] < 2.0, "span {} s", sent[23]);
    // After 0.4 s the rate is 4× the rate before: arrivals come closer together.
    let gap = |w: &[f64]| (w[w.len() - 1] - w[0]) / (w.len() - 1) as f64;
    let (before, after): (Vec<f64>, Vec<f64>) = sent.iter().partition(|&&t| t < 0.4);
    assert!(before.len() >= 3 && after.len() >= 3, "{sent:?}");
    assert!(gap(&after) < gap(&before), "{sent:?}");
}
