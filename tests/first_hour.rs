//! The first hour with pdx (issue 14), at the command line: the replayer's URL habits, failure reports, exit
//! status and export; logging of every command; one vocabulary of flags with defaults in every `--help`. The
//! faults a user can cause (ports taken, stopped servers, bad traces) are in `tests/chaos/first_hour.rs`.

mod support;

use support::*;

/// `--url http://host:port/v1` (the OpenAI clients' base_url) failed every request with 404; now it works,
/// the replay says which trace format it read, and `--export` writes one JSON line per request.
#[test]
fn replay_takes_the_openai_base_url_and_exports_every_request() {
    let port = free_port();
    let _mock = mock(port, &[]);
    let dir = TempDir::new("export");
    let export = dir.0.join("requests.jsonl");
    let out = run(&[
        "replay",
        "--url",
        &format!("http://127.0.0.1:{port}/v1"),
        "--max-requests",
        "4",
        "--speed",
        "100",
        "--export",
        export.to_str().unwrap(),
    ]);
    let (stdout, err) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{err}");
    assert!(stdout.contains("succeeded 4  failed 0"), "{stdout}");
    assert!(err.contains("Mooncake jsonl"), "says the format: {err}");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&export)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4);
    for l in &lines {
        assert_eq!(l["status"], 200);
        assert!(
            l["worker"]
                .as_str()
                .is_some_and(|w| w.starts_with("pdx-mock-")),
            "{l}"
        );
        assert!(l["error"].is_null());
        for key in [
            "sent_s",
            "ttft_ms",
            "itl_ms",
            "tpot_ms",
            "e2e_ms",
            "input_tokens",
            "output_tokens",
            "worker",
        ] {
            assert!(l.get(key).is_some(), "{key} in {l}");
        }
    }
}

/// Failed requests used to show as `{"http_404": 3}` with percentiles of 0.00 and exit 0. Now they are grouped
/// by status and message, and the exit status says the run failed unless `--max-failed-fraction` allows it.
#[test]
fn replay_lists_failures_and_exits_non_zero() {
    let port = free_port();
    let _mock = mock(port, &[]);
    // One `/v1` too many: the mock answers 404 to every request.
    let url = format!("http://127.0.0.1:{port}/v1/v1");
    let out = run(&["replay", "--url", &url, "--max-requests", "3", "--quiet"]);
    let (stdout, err) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(!out.status.success());
    assert!(
        stdout.contains("3 × HTTP 404: no route for POST /v1/v1/chat/completions"),
        "{stdout}"
    );
    assert!(
        stdout.contains("all 3 requests failed") && !stdout.contains("p50"),
        "{stdout}"
    );
    assert!(err.contains("3 of 3 requests failed"), "{err}");
    let out = run(&[
        "replay",
        "--url",
        &url,
        "--max-requests",
        "3",
        "--quiet",
        "--max-failed-fraction",
        "1",
    ]);
    assert!(out.status.success(), "allowed by the threshold");
}

/// Every command logs at info by default (no RUST_LOG): a server's listen address shows; no colour codes when
/// stderr is not a terminal; `--log-format json` gives JSON lines.
#[test]
fn servers_log_their_listen_address_by_default() {
    for (format, check) in [
        (
            "text",
            (|l: &str| !l.contains('\u{1b}')) as fn(&str) -> bool,
        ),
        ("json", |l: &str| {
            serde_json::from_str::<serde_json::Value>(l).is_ok_and(|v| v["level"] == "INFO")
        }),
    ] {
        let port = free_port();
        let args = server_args("mock", port, &["--instant", "--log-format", format]);
        let mut child = Proc::spawn_reading_stderr(&args);
        let line = child.stderr_line_with(&format!("listening on http://127.0.0.1:{port}"));
        assert!(check(&line), "{format}: {line}");
    }
    // The router too, and `--log-level` goes before or after the subcommand.
    let port = free_port();
    let serve = server_args("serve", port, &["--worker", "http://127.0.0.1:9"]);
    let mut child =
        Proc::spawn_reading_stderr(&[&["--log-level".into(), "info".into()], &serve[..]].concat());
    let line = child.stderr_line_with(&format!("pdx serve listening on http://127.0.0.1:{port}"));
    assert!(!line.contains('\u{1b}'), "{line}");
    // A level that is not one fails at once, in one line.
    let out = run(&[
        "--log-level",
        "loud",
        "replay",
        "--url",
        "http://127.0.0.1:9",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--log-level `loud`"),
        "{err}"
    );
}

/// One vocabulary: `--speed` and `--max-requests` everywhere (the old `--speedup`, `--requests` and
/// `--timeout` still parse), defaults in every `--help`, and `replay --help` says how formats are told apart.
#[test]
fn one_vocabulary_of_flags_with_defaults_in_every_help() {
    let help = |args: &[&str]| {
        let out = run(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let mock = help(&["mock", "--help"]);
    assert!(
        mock.contains("--speed <SPEED>") && !mock.contains("--speedup"),
        "{mock}"
    );
    let demo = help(&["demo", "--help"]);
    contains_all(&demo, &["--max-requests", "--speed", "--port-base"]);
    assert!(!demo.contains("--requests <"), "{demo}");
    let replay = help(&["replay", "--help"]);
    contains_all(
        &replay,
        &[
            "--max-requests",
            "--speed",
            "--timeout-secs",
            "told apart by content",
            "[default: 0]",
        ],
    );
    let serve = help(&["serve", "--help"]);
    contains_all(
        &serve,
        &[
            "[default: 0.0.0.0]",
            "[default: 8000]",
            "[default: vllm-nixl]",
            "[default: 300]",
            "[default: 3]",
            "[default: info]",
        ],
    );
    for cmd in ["mock", "demo", "replay", "bench kv"] {
        let mut args: Vec<&str> = cmd.split(' ').collect();
        args.push("--help");
        assert!(help(&args).contains("--log-format"), "{cmd}");
    }
    // The old spellings are hidden aliases (clap rejects unknown flags before it prints help).
    help(&["mock", "--speedup", "2", "--help"]);
    help(&["demo", "--requests", "5", "--help"]);
    help(&["replay", "--url", "http://x", "--timeout", "5", "--help"]);
}

/// `pdx demo --port-base` puts the cluster on fixed ports, and says so when they do not fit.
#[test]
fn demo_port_base_is_checked() {
    let out = run(&["demo", "--port-base", "65533"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("--port-base 65533"), "{err}");
    // A port of the range taken: the demo stops at once with the worker's own error, not after a 30 s wait.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = taken.local_addr().unwrap().port().to_string(); // ephemeral ports end well below 65531
    let out = run(&["demo", "--port-base", &base, "--max-requests", "1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("exited at start") && err.contains("is already in use"),
        "{err}"
    );
}

/// Asserts that `text` contains every one of `needles`.
fn contains_all(text: &str, needles: &[&str]) {
    for n in needles {
        assert!(text.contains(n), "{n}: {text}");
    }
}
