//! Memory the caller registered by pointer (issue 18), end to end on the real `pdx` binary:
//! - `pdx bench kv --mem caller` (each side maps its own memory, no memfd, and registers it as it is) moves
//!   READ and WRITE over `cma` and `tcp` with every byte checked;
//! - asking for what caller memory cannot do (`shm`, which maps memfd arenas; another `--remote-memory`) is a
//!   clear error, not a panic or a hang.

use crate::support::*;

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bench_kv_moves_caller_memory_with_every_byte_checked() {
    let out = run(&[
        "bench",
        "kv",
        "--mem",
        "caller",
        "--transport",
        "cma,tcp",
        "--block-size",
        "4KiB,64KiB",
        "--batch-size",
        "8",
        "--duration",
        "0.05",
        "--check",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON rows");
    let rows = rows.as_array().expect("array");
    assert_eq!(rows.len(), 2 * 2 * 2, "{rows:?}");
    for r in rows {
        assert_eq!(r["local_memory"], "caller", "{r}");
        assert_eq!(r["remote_memory"], "caller", "{r}");
        assert_eq!(r["checked"], true, "{r}");
        assert!(r["gbps"].as_f64().is_some_and(|g| g > 0.0), "{r}");
    }
    let transports: Vec<&str> = rows
        .iter()
        .filter_map(|r| r["transport"].as_str())
        .collect();
    assert!(
        transports.contains(&"cma") && transports.contains(&"tcp"),
        "{transports:?}"
    );
}

#[test]
fn bench_kv_refuses_what_caller_memory_cannot_do() {
    for (args, why) in [
        (
            &["--transport", "shm"][..],
            "caller memory is reached by cma, tcp or ucx",
        ),
        (
            &["--transport", "cma", "--remote-memory", "shared"][..],
            "drop --remote-memory",
        ),
    ] {
        let mut all = vec![
            "bench",
            "kv",
            "--mem",
            "caller",
            "--block-size",
            "4KiB",
            "--duration",
            "0.01",
        ];
        all.extend_from_slice(args);
        let out = run(&all);
        let err = stderr_of(&out);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(err.contains(why), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    // The target maps its own memory only under `--mem caller`: without it, rows would be labelled with memory
    // the run never used.
    let out = run(&[
        "bench",
        "kv",
        "--transport",
        "cma",
        "--remote-memory",
        "caller",
        "--block-size",
        "4KiB",
        "--duration",
        "0.01",
    ]);
    let err = stderr_of(&out);
    assert!(!out.status.success(), "accepted: {err}");
    assert!(err.contains("needs --mem caller"), "{err}");
}
