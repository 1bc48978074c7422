//! `pdx sim` and `pdx plan` given bad input: clear errors, no panic, nothing left running.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const PDX: &str = env!("CARGO_BIN_EXE_pdx");

fn dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("pdx-chaos-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs `pdx ARGS` in `cwd` (killed after 30 s); returns (success, stderr).
fn pdx(args: &[&str], cwd: &std::path::Path) -> (bool, String) {
    let mut child = Command::new(PDX)
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            return (
                status.success(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            );
        }
        if t.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("pdx {args:?} hung");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn bad_cluster_files_and_specs_are_errors_not_panics() {
    let d = dir("sim");
    let ok_pools = "[[pools]]\nname = \"a\"\nrole = \"aggregated\"\nworkers = 1\n";
    let cases: [(&str, &[&str], &str); 7] = [
        ("[[pools]]\nname = \"a\"\nrole = \"router\"\n", &[], "cluster"),
        ("block_size = 0\n[[pools]]\nname = \"a\"\nrole = \"aggregated\"\n", &[], "block_size"),
        ("[[pools]]\nname = \"p\"\nrole = \"prefill\"\nworkers = 1\n", &[], "decode or an aggregated"),
        ("[kv_handoff]\nbandwidth_gbps = 0\n[[pools]]\nname = \"a\"\nrole = \"aggregated\"\n", &[], "kv_handoff"),
        (ok_pools, &["--rate-curve", "diurnal:period=-5,ratio=4"], "rate curve"),
        (ok_pools, &["--synthetic", "requests=10,rate=0"], "synthetic"),
        (
            &format!("{ok_pools}[planner]\nbudget_gpus = 4\n[[planner.pools]]\nname = \"a\"\nrole = \"aggregated\"\nttft_ms = 100\n"),
            &[],
            "itl_ms",
        ),
    ];
    for (i, (toml, extra, want)) in cases.iter().enumerate() {
        let f = format!("c{i}.toml");
        std::fs::write(d.join(&f), toml).unwrap();
        let mut args = vec![
            "sim",
            "--cluster",
            f.as_str(),
            "--quiet",
            "--max-requests",
            "5",
        ];
        args.extend(extra.iter());
        let (ok, err) = pdx(&args, &d);
        assert!(!ok, "case {i} succeeded");
        assert!(!err.contains("panicked"), "case {i} panicked: {err}");
        assert!(err.contains(want), "case {i}: want `{want}` in: {err}");
    }
    let (ok, err) = pdx(&["sim", "--cluster", "missing.toml"], &d);
    assert!(
        !ok && err.contains("missing.toml") && !err.contains("panicked"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn plan_without_a_router_keeps_going_and_stops_its_workers() {
    let d = dir("plan");
    // A port nothing listens on: every collection fails, the planner logs and goes on; the
    // local connector's workers (which cannot register) are stopped when it ends.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    std::fs::write(
        d.join("plan.toml"),
        format!(
            "router = \"http://127.0.0.1:{port}\"\nconnector = \"local\"\n\
             [planner]\ninterval_secs = 0.5\nbudget_gpus = 2\n\
             [[planner.pools]]\nname = \"a\"\nrole = \"aggregated\"\nttft_ms = 100\nitl_ms = 50\n\
             [local]\npdx = \"{PDX}\"\n"
        ),
    )
    .unwrap();
    let (ok, err) = pdx(
        &[
            "plan",
            "--config",
            "plan.toml",
            "--duration-secs",
            "2",
            "--log",
            "log.jsonl",
        ],
        &d,
    );
    assert!(ok, "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // Nothing was decided without observations, and no worker outlived the planner.
    let log = std::fs::read_to_string(d.join("log.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 0, "{log}");
    let ps = Command::new("ps").args(["-eo", "args"]).output().unwrap();
    let router = format!("--register http://127.0.0.1:{port}");
    let left: Vec<String> = String::from_utf8_lossy(&ps.stdout)
        .lines()
        .filter(|l| l.contains(&router))
        .map(str::to_owned)
        .collect();
    assert!(left.is_empty(), "workers left running: {left:?}");
    let (ok, err) = pdx(&["plan", "--config", "nope.toml"], &d);
    assert!(!ok && err.contains("nope.toml"), "{err}");
    let _ = std::fs::remove_dir_all(&d);
}
