//! Helpers shared by the CLI tests (`tests/first_hour.rs`, `tests/chaos/`): the `pdx` binary as child
//! processes that are killed when dropped (mocks and routers on loopback ports), a small HTTP/1.1 client, the
//! mocks' Prometheus counters, and bounded waits.

#![allow(dead_code)]

use std::ffi::OsStr;
use std::fmt::Debug;
use std::io::{BufRead, Read, Write};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

#[path = "ports.rs"]
mod ports;
pub use ports::free_port;

/// How long a test waits for a process to come up or a condition to hold: a guard against hangs, not a
/// speed assertion.
pub const GUARD: Duration = Duration::from_secs(20);

/// The `pdx` binary under test: this build's, or `PDX_CHAOS_BIN` (to run the same scenarios against another
/// build, e.g. the one before a fix). The environment that would change what it does is removed: logging
/// (`RUST_LOG`, `NO_COLOR`), the KV agents' shared secret (`PDX_AGENT_SECRET`) and the router's admin token
/// (`PDX_ADMIN_TOKEN`); tests that want them pass flags.
pub fn pdx() -> Command {
    let bin = std::env::var_os("PDX_CHAOS_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_pdx").into());
    let mut c = Command::new(bin);
    for var in [
        "RUST_LOG",
        "NO_COLOR",
        "PDX_AGENT_SECRET",
        "PDX_ADMIN_TOKEN",
    ] {
        c.env_remove(var);
    }
    c
}

/// Runs `pdx ARGS` to its end, killed after 60 s (a guard against hangs, not a speed check).
pub fn run<S: AsRef<OsStr> + Debug>(args: &[S]) -> Output {
    let mut child = pdx()
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("pdx starts");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if child.try_wait().expect("wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("pdx {args:?} did not exit within 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child `pdx` process, killed (SIGKILL) and reaped when dropped, also when a test fails.
pub struct Proc {
    child: Option<Child>,
    /// Sent SIGSTOP and not SIGCONT since: continued before it is killed.
    stopped: bool,
}

impl Proc {
    /// Starts `pdx ARGS` in the background, logging at `RUST_LOG`'s level (`warn` by default). Its output is
    /// dropped, or shown with `PDX_CHAOS_LOG` set.
    pub fn spawn<S: AsRef<OsStr>>(args: &[S]) -> Proc {
        Proc::spawn_env(args, &[])
    }

    /// [`Proc::spawn`] with the environment variables `env` set.
    pub fn spawn_env<S: AsRef<OsStr>>(args: &[S], env: &[(&str, &str)]) -> Proc {
        let level = std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into());
        let mut cmd = pdx();
        cmd.args(args).env("RUST_LOG", level).stdin(Stdio::null());
        cmd.envs(env.iter().copied());
        if std::env::var_os("PDX_CHAOS_LOG").is_some() {
            cmd.stdout(Stdio::inherit()).stderr(Stdio::inherit());
        } else {
            cmd.stdout(Stdio::null()).stderr(Stdio::null());
        }
        Proc::start(&mut cmd)
    }

    /// Starts `pdx ARGS` in the background with its stderr piped, to read with [`Proc::stderr_line_with`].
    pub fn spawn_reading_stderr<S: AsRef<OsStr>>(args: &[S]) -> Proc {
        Proc::start(
            pdx()
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped()),
        )
    }

    fn start(cmd: &mut Command) -> Proc {
        Proc {
            child: Some(cmd.spawn().expect("pdx starts")),
            stopped: false,
        }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Its exit status, once it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().expect("wait")
    }

    /// Sends it signal `sig` (`STOP`, `CONT`, ...) with `kill(1)`.
    pub fn signal(&mut self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill runs")
            .success();
        assert!(ok, "kill -{sig} failed");
        match sig {
            "STOP" => self.stopped = true,
            "CONT" => self.stopped = false,
            _ => {}
        }
    }

    /// Kills it (SIGKILL) and reaps it, now.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            if self.stopped {
                // SIGKILL ends a stopped process too; continuing it first lets it be reaped at once everywhere.
                let _ = Command::new("kill")
                    .arg("-CONT")
                    .arg(c.id().to_string())
                    .status();
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The first line of its stderr (piped: [`Proc::spawn_reading_stderr`]) that contains `needle`; reads at
    /// most 50 lines.
    pub fn stderr_line_with(&mut self, needle: &str) -> String {
        let err = self.child.as_mut().and_then(|c| c.stderr.take());
        let mut lines = std::io::BufReader::new(err.expect("stderr piped")).lines();
        for _ in 0..50 {
            match lines.next() {
                Some(Ok(l)) if l.contains(needle) => return l,
                Some(Ok(_)) => continue,
                _ => break,
            }
        }
        panic!("no stderr line with `{needle}`");
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `http://127.0.0.1:PORT`.
pub fn url(port: u16) -> String {
    format!("http://127.0.0.1:{port}")
}

/// The arguments of `pdx CMD --host 127.0.0.1 --port PORT ARGS`: a server on a loopback port.
pub fn server_args(cmd: &str, port: u16, args: &[&str]) -> Vec<String> {
    let head = [cmd, "--host", "127.0.0.1", "--port", &port.to_string()].map(String::from);
    head.into_iter()
        .chain(args.iter().map(|a| a.to_string()))
        .collect()
}

/// Starts `pdx mock --host 127.0.0.1 --port PORT ARGS`, without waiting for it.
pub fn spawn_mock(port: u16, args: &[&str]) -> Proc {
    Proc::spawn(&server_args("mock", port, args))
}

/// Starts `pdx mock --instant` on 127.0.0.1:PORT with `args` and waits until `/health` answers 200.
pub fn mock(port: u16, args: &[&str]) -> Proc {
    let mut m = spawn_mock(port, &[&["--instant"], args].concat());
    wait_healthy(&mut m, port);
    m
}

/// Waits until `/health` on `port` answers 200; panics when `proc` exits first or after [`GUARD`].
pub fn wait_healthy(proc: &mut Proc, port: u16) {
    let up = wait_until(GUARD, || {
        if let Some(st) = proc.exited() {
            panic!("pdx on port {port} exited: {st}");
        }
        health_ok(port)
    });
    assert!(
        up,
        "pdx on port {port} did not become healthy within {GUARD:?}"
    );
}

/// Starts `pdx serve --host 127.0.0.1 --port PORT --threads 2 ARGS`, without waiting for it.
pub fn router(port: u16, args: &[&str]) -> Proc {
    Proc::spawn(&server_args(
        "serve",
        port,
        &[&["--threads", "2"], args].concat(),
    ))
}

/// A `pdx mock` prefill or decode engine with a KV agent on a loopback port, killed on drop.
pub struct KvMock {
    /// The process.
    pub proc: Proc,
    /// Its HTTP port.
    pub http: u16,
    /// Its KV agent's port (side channel and `tcp` transfers).
    pub kv: u16,
}

impl KvMock {
    /// An engine of `role` with 64 KV blocks of a 64th of the real size, `extra` flags, up.
    pub fn start(role: &str, extra: &[&str]) -> KvMock {
        KvMock::with_blocks(role, 64, 64, extra)
    }

    /// An engine of `role` with `blocks` KV blocks of a `scale_down`th of the real size, `extra` flags, up.
    pub fn with_blocks(role: &str, blocks: u32, scale_down: u32, extra: &[&str]) -> KvMock {
        let (http, kv) = (free_port(), free_port());
        let listen = format!("127.0.0.1:{kv}");
        let (blocks, scale_down) = (blocks.to_string(), scale_down.to_string());
        let args = [
            &["--role", role, "--kv-listen", &listen][..],
            &["--num-blocks", &blocks, "--kv-scale-down", &scale_down],
            extra,
        ]
        .concat();
        KvMock {
            proc: mock(http, &args),
            http,
            kv,
        }
    }

    /// Its KV agent's address, `127.0.0.1:PORT`.
    pub fn agent_addr(&self) -> String {
        format!("127.0.0.1:{}", self.kv)
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }
}

/// `POST /v1/completions` of `prompt` with `kv_transfer_params` `kv`: the status and the JSON body.
pub fn complete(
    port: u16,
    prompt: &str,
    max_tokens: u32,
    kv: serde_json::Value,
) -> (u16, serde_json::Value) {
    let body = serde_json::json!({"model": "mock", "prompt": prompt, "max_tokens": max_tokens, "kv_transfer_params": kv});
    post_json(port, "/v1/completions", &body)
}

/// The prefill half of vLLM's proxy flow on `p`: the `kv_transfer_params` a decode needs.
pub fn prefill(p: &KvMock, prompt: &str) -> serde_json::Value {
    let (st, v) = complete(
        p.http,
        prompt,
        1,
        serde_json::json!({"do_remote_decode": true, "do_remote_prefill": false}),
    );
    assert_eq!(st, 200, "{v}");
    v["kv_transfer_params"].clone()
}

/// A number field of `/proc/PID/status` (`Threads`, `RssShmem` in kB, ...).
pub fn status_of(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} for {pid}"))
}

/// How many mappings of process `pid` are of the KV memory (memfd `pdx-NAME`) of the agent named `agent`.
pub fn mappings_of(pid: u32, agent: &str) -> usize {
    let needle = format!("memfd:pdx-{agent} ");
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(&needle))
        .count()
}

/// A whole HTTP/1.1 response, a chunked body decoded.
#[derive(Debug)]
pub struct Resp {
    /// The status code.
    pub status: u16,
    /// The status line and the headers, as sent.
    pub head: String,
    /// The body.
    pub body: String,
}

impl Resp {
    /// The body as JSON, or as a JSON string when it is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|_| self.body.clone().into())
    }

    /// The value of header `name` (case-insensitive), if sent.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// One request to 127.0.0.1:PORT on a new connection (`Connection: close`) with extra `headers`, read to the
/// end within `timeout`. A POST or a non-empty body goes as `application/json`.
pub fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
    timeout: Duration,
) -> std::io::Result<Resp> {
    let mut s = std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, rest) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("no response head: {text:?}")))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line: {head:?}")))?;
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        let mut out = String::new();
        let mut r = rest;
        while let Some((size, after)) = r.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 || after.len() < n {
                break;
            }
            out.push_str(&after[..n]);
            r = after[n..].trim_start_matches("\r\n");
        }
        out
    } else {
        rest.to_string()
    };
    Ok(Resp {
        status,
        head: head.to_string(),
        body,
    })
}

/// `POST path` with a JSON body; the status and the body as JSON. Panics when nothing answers within
/// [`GUARD`].
pub fn post_json(port: u16, path: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
    let r = http(port, "POST", path, &[], &body.to_string(), GUARD).expect("an HTTP answer");
    (r.status, r.json())
}

/// `GET path`: the status code, or `None` when nothing answers within 5 s.
pub fn get_status(port: u16, path: &str) -> Option<u16> {
    let r = http(port, "GET", path, &[], "", Duration::from_secs(5));
    r.ok().map(|r| r.status)
}

/// `/health` answers 200.
pub fn health_ok(port: u16) -> bool {
    get_status(port, "/health") == Some(200)
}

/// `/ready` answers 200 (a router with a worker of each role it needs).
pub fn ready(port: u16) -> bool {
    get_status(port, "/ready") == Some(200)
}

/// Sum of the samples of metric `name` on the `/metrics` page of 127.0.0.1:PORT (lines `name{...} v` or
/// `name v`); `None` when there is none or nothing answers.
pub fn metric(port: u16, name: &str) -> Option<f64> {
    let r = http(port, "GET", "/metrics", &[], "", Duration::from_secs(2)).ok()?;
    let vals: Vec<f64> = r
        .body
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    (!vals.is_empty()).then(|| vals.iter().sum())
}

/// Polls `f` every 20 ms until it holds or `limit` has passed; whether it held.
#[must_use]
pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

/// A fresh temporary folder for one test, removed when dropped.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    /// A new empty folder named after `name` and this process.
    pub fn new(name: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("pdx-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
