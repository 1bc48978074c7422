//! `pdx serve`: pdx's disaggregated prefill/decode router.
//!
//! Thread per core: each server thread runs its own monoio runtime (io_uring, or epoll where
//! io_uring is unavailable: monoio's `FusionDriver`) with its own `SO_REUSEPORT` listener,
//! HTTP/1.1 server connections ([`server`]) and its own keep-alive upstream connection pool
//! ([`upstream`]), both over monoio's readiness-based sockets with pdx's own HTTP/1.1 codec
//! (`httparse` for heads, [`h1`] for body framing); hyper provides the `http`/`Body` types. Threads share only the registry snapshot
//! (`arc-swap`), per-worker atomics and the metrics. Routing decisions come from the sans-IO
//! [`pdx_router_core`]. See `docs/router.md`.
#![forbid(unsafe_code)]

pub mod body;
pub mod bootstrap;
pub mod config;
pub mod error;
pub mod h1;
pub mod metrics;
pub mod proxy;
pub mod registry;
pub mod server;
pub mod upstream;

pub use config::{Config, ServeArgs};
pub use error::RouterError;

use monoio::io::IntoPollIo;
use proxy::Shared;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A running router.
#[derive(Debug)]
pub struct RouterServer {
    /// Bound address.
    pub addr: SocketAddr,
    /// Shared state (registry, metrics; used by tests).
    pub shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl RouterServer {
    /// Blocks until the server threads end (they run until the process exits).
    pub fn wait(mut self) {
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for RouterServer {
    fn drop(&mut self) {
        // Stops the control loop; server threads end with the process.
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn bind(addr: SocketAddr) -> Result<std::net::TcpListener, RouterError> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_nodelay(true)?;
    s.bind(&addr.into())?;
    s.listen(4096)?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

fn runtime() -> std::io::Result<
    monoio::FusionRuntime<
        monoio::time::TimeDriver<monoio::IoUringDriver>,
        monoio::time::TimeDriver<monoio::LegacyDriver>,
    >,
> {
    monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .enable_timer()
        .build()
}

/// Starts the router in background threads and returns once it listens.
///
/// Errors: [`RouterError::Config`]/[`RouterError::Core`] for a bad configuration,
/// [`RouterError::Io`] when the port cannot be bound or a runtime cannot start.
pub fn start(args: ServeArgs) -> Result<RouterServer, RouterError> {
    let cfg = Config::from_args(&args)?;
    let ip: std::net::IpAddr = cfg
        .host
        .parse()
        .map_err(|e| RouterError::Config(format!("bad host {}: {e}", cfg.host)))?;
    let first = bind(SocketAddr::new(ip, cfg.port))?;
    let addr = first.local_addr()?;
    let mut listeners = vec![first];
    for _ in 1..cfg.threads {
        listeners.push(bind(addr)?);
    }
    let registry = registry::Registry::new(&cfg)?;
    let shared = Arc::new(Shared {
        cfg,
        registry,
        metrics: Arc::new(metrics::Metrics::new()),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for (i, l) in listeners.into_iter().enumerate() {
        let sh = shared.clone();
        threads.push(
            std::thread::Builder::new()
                .name(format!("pdx-router-{i}"))
                .spawn(move || {
                    let mut rt = match runtime() {
                        Ok(rt) => rt,
                        Err(e) => {
                            tracing::error!(error = %e, "cannot start runtime");
                            return;
                        }
                    };
                    rt.block_on(serve(l, sh));
                })?,
        );
    }
    {
        let sh = shared.clone();
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("pdx-router-ctl".into())
            .spawn(move || {
                if let Ok(mut rt) = runtime() {
                    rt.block_on(control(sh, stop));
                }
            })?;
    }
    tracing::info!(%addr, threads = shared.cfg.threads, "pdx serve listening");
    Ok(RouterServer {
        addr,
        shared,
        stop,
        threads,
    })
}

/// Runs `pdx serve` until the process is killed.
///
/// Errors: as [`start`].
pub fn run(args: ServeArgs) -> Result<(), RouterError> {
    start(args)?.wait();
    Ok(())
}

async fn serve(l: std::net::TcpListener, sh: Arc<Shared>) {
    let l = match monoio::net::TcpListener::from_std(l) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "listener");
            return;
        }
    };
    loop {
        let (s, _) = match l.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                monoio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = s.set_nodelay(true);
        let sh = sh.clone();
        monoio::spawn(async move {
            if let Ok(io) = s.into_poll_io() {
                server::serve_conn(io, sh).await;
            }
        });
    }
}

/// Control loop: heartbeat expiry and drain removal (every 100 ms), worker-state gauges,
/// active `GET /health` checks.
async fn control(sh: Arc<Shared>, stop: Arc<AtomicBool>) {
    let mut last_check: Option<std::time::Instant> = None;
    while !stop.load(Ordering::Relaxed) {
        sh.registry.sweep();
        let now = sh.registry.now_us();
        sh.metrics.worker_state.clear();
        for w in sh.registry.workers() {
            sh.metrics
                .worker_state
                .get_or_create(&metrics::WorkerStateLabels {
                    worker: w.url.clone(),
                    role: w.role.as_str(),
                    pool: w.pool.clone(),
                    state: w.state(now),
                })
                .set(1);
            sh.metrics
                .worker_in_flight
                .get_or_create(&metrics::WorkerLabel {
                    worker: w.url.clone(),
                })
                .set(w.in_flight.load(Ordering::Relaxed) as i64);
        }
        if let Some(every) = sh.cfg.health_interval {
            if last_check.is_none_or(|t| t.elapsed() >= every) {
                last_check = Some(std::time::Instant::now());
                for w in sh.registry.workers() {
                    let ok = health_check(&w.authority, every.min(Duration::from_secs(2))).await;
                    if w.healthy.swap(ok, Ordering::Relaxed) != ok {
                        tracing::info!(url = %w.url, healthy = ok, "worker health changed");
                    }
                }
            }
        }
        monoio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn health_check(authority: &str, timeout: Duration) -> bool {
    upstream::health(authority, timeout).await
}
