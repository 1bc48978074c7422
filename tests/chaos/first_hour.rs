//! Faults of a first hour with pdx: a port already taken, a replay against a stopped server, bad traces and
//! output paths. Each test failed before issue 14's changes.

use crate::support::*;

/// A second `pdx mock` on the port of a running one used to start without a word and take part of its
/// requests (both set `SO_REUSEPORT`). Now it refuses, naming the address and the holder, and the first one
/// keeps serving.
#[test]
fn a_second_mock_on_a_port_pdx_holds_is_refused() {
    let port = free_port();
    let _first = mock(port, &[]);
    let out = run(&server_args("mock", port, &["--instant"]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the second mock must not start: {err}"
    );
    assert!(
        err.contains(&format!("127.0.0.1:{port} is already in use")),
        "{err}"
    );
    assert!(err.contains("pdx"), "names the holder: {err}");
    assert_eq!(
        get_status(port, "/health"),
        Some(200),
        "the first one still serves"
    );
}

/// The same for `pdx serve` started on a port a `pdx mock` holds.
#[test]
fn serve_on_a_port_pdx_holds_is_refused() {
    let port = free_port();
    let _mock = mock(port, &[]);
    let serve = ["--threads", "2", "--worker", "http://127.0.0.1:9"];
    let out = run(&server_args("serve", port, &serve));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
}

/// A port held by another program gave `Address already in use` without the address.
#[test]
fn a_port_held_by_another_program_is_named() {
    let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = other.local_addr().unwrap().port();
    for cmd in [
        vec!["serve", "--worker", "http://127.0.0.1:9"],
        vec!["mock", "--instant"],
    ] {
        let out = run(&server_args(cmd[0], port, &cmd[1..]));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{cmd:?}: {err}");
        assert!(
            err.contains(&format!("127.0.0.1:{port} is already in use")),
            "{cmd:?}: {err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    }
}

/// `pdx replay --url http://127.0.0.1:PORT/v1` against a stopped server used to send every request, fail each
/// one, and print percentiles of 0.00. Now: a non-zero exit and one clear line.
#[test]
fn replay_against_a_stopped_server_is_one_line() {
    let port = free_port();
    let out = run(&["replay", "--url", &format!("http://127.0.0.1:{port}/v1")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(
        err.contains(&format!("cannot reach http://127.0.0.1:{port}")) && err.contains("refused"),
        "{err}"
    );
    assert!(out.stdout.is_empty(), "no report");
}

/// `--plot` into a missing folder failed only after the whole run, with a Rust debug dump. Now it fails before
/// the first request: the server here does not even exist, and the error is about the folder.
#[test]
fn replay_checks_output_paths_before_the_run() {
    let dir = TempDir::new("plot-missing");
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    for flag in ["--plot", "--export"] {
        let target = dir.0.join("no-such-folder").join("out.file");
        let out = run(&["replay", "--url", &url, flag, target.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            err.contains(flag) && err.contains("no-such-folder") && err.contains("does not exist"),
            "{err}"
        );
        assert!(
            !err.contains("cannot reach"),
            "checked before connecting: {err}"
        );
        assert!(!err.contains("Os {"), "no debug dump: {err}");
    }
}

/// An Azure CSV out of time order panicked (`cannot convert float seconds to Duration`); now it is sorted, and
/// the replay says so and which format it read.
#[test]
fn an_unsorted_azure_csv_is_sorted_not_a_panic() {
    let dir = TempDir::new("unsorted-csv");
    let trace = dir.0.join("azure.csv");
    std::fs::write(
        &trace,
        "TIMESTAMP,ContextTokens,GeneratedTokens\n\
         2023-11-16 18:15:46.90,40,4\n\
         2023-11-16 18:15:46.10,30,3\n\
         2023-11-16 18:15:46.50,20,2\n",
    )
    .unwrap();
    let port = free_port();
    let _mock = mock(port, &[]);
    let out = run(&[
        "replay",
        "--url",
        &format!("http://127.0.0.1:{port}"),
        "--trace",
        trace.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("Azure CSV") && err.contains("sorted 3 requests"),
        "{err}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("succeeded 3"));
}

/// Unknown CSV headers gave a JSON parse error, and an empty file said "no request of the trace falls within
/// the limits".
#[test]
fn bad_traces_say_what_is_wrong() {
    let dir = TempDir::new("bad-traces");
    let url = format!("http://127.0.0.1:{}", free_port());
    for (name, text, expect) in [
        ("empty.jsonl", "", "the file is empty"),
        (
            "unknown.csv",
            "time,prompt,GeneratedTokens\n1,2,3\n",
            "lacks the columns TIMESTAMP, ContextTokens",
        ),
        (
            "bad-value.csv",
            "TIMESTAMP,ContextTokens,GeneratedTokens\n1,2,3\n2,many,3\n",
            "line 3: column ContextTokens: `many`",
        ),
    ] {
        let trace = dir.0.join(name);
        std::fs::write(&trace, text).unwrap();
        let out = run(&["replay", "--url", &url, "--trace", trace.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name}");
        assert!(err.contains(expect) && err.contains(name), "{name}: {err}");
        assert!(
            !err.contains("expected value"),
            "{name}: no JSON error: {err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "{name}: one line: {err}");
    }
}
