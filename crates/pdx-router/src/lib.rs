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
pub mod shutdown;
pub mod upstream;

pub use config::{Config, ServeArgs};
pub use error::RouterError;

use monoio::io::IntoPollIo;
use proxy::Shared;
use std::cell::Cell;
use std::future::Future;
use std::net::SocketAddr;
use std::rc::Rc;
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
    /// A second handle on each server thread's listening socket, to shut it down from here.
    listeners: Vec<std::net::TcpListener>,
}

impl RouterServer {
    /// Blocks until the server threads end (after a [`RouterServer::shutdown`] from elsewhere, or never).
    pub fn wait(mut self) {
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }

    /// Graceful shutdown (see [`shutdown`]): stops accepting, lets requests in flight finish for at most
    /// `timeout`, then ends the server threads and returns. Returns true when every request finished in time.
    pub fn shutdown(mut self, timeout: Duration) -> bool {
        self.shared.drain.begin(timeout);
        for l in &self.listeners {
            // A listening socket shut down for reading fails the pending accept at once (EINVAL) and refuses
            // new connections; the accept loop then sees the drain and stops.
            let _ = socket2::SockRef::from(l).shutdown(std::net::Shutdown::Read);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let cut_short = self.shared.drain.was_cut_short();
        if cut_short {
            tracing::warn!("shutdown deadline passed with requests in flight: they were dropped");
        }
        !cut_short
    }
}

impl Drop for RouterServer {
    fn drop(&mut self) {
        // Stops the control loop; server threads end with the process.
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One `SO_REUSEPORT` listener per server thread on `addr`, refusing an address another process holds (a second
/// router on the same port would otherwise take part of this one's connections; see `pdx-listen`).
fn bind(addr: SocketAddr, threads: usize) -> Result<Vec<std::net::TcpListener>, RouterError> {
    let listeners = pdx_listen::bind_set(addr, threads, 4096)?;
    for l in &listeners {
        // Accepted sockets inherit TCP_NODELAY from the listener.
        socket2::SockRef::from(l).set_nodelay(true)?;
    }
    Ok(listeners)
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
/// [`RouterError::Listen`] when another process holds the address or it cannot be bound, [`RouterError::Io`] when a
/// runtime cannot start.
pub fn start(args: ServeArgs) -> Result<RouterServer, RouterError> {
    let cfg = Config::from_args(&args)?;
    let ip: std::net::IpAddr = cfg
        .host
        .parse()
        .map_err(|e| RouterError::Config(format!("bad host {}: {e}", cfg.host)))?;
    let listeners = bind(SocketAddr::new(ip, cfg.port), cfg.threads)?;
    let addr = listeners[0].local_addr()?;
    let listener_handles = listeners
        .iter()
        .map(std::net::TcpListener::try_clone)
        .collect::<Result<Vec<_>, _>>()?;
    let registry = registry::Registry::new(&cfg)?;
    let shared = Arc::new(Shared {
        cfg,
        registry,
        metrics: Arc::new(metrics::Metrics::new()),
        drain: shutdown::Drain::default(),
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
    tracing::info!(
        threads = shared.cfg.threads,
        "pdx serve listening on http://{addr}"
    );
    Ok(RouterServer {
        addr,
        shared,
        stop,
        threads,
        listeners: listener_handles,
    })
}

/// Runs `pdx serve` until the process is killed.
///
/// Errors: as [`start`].
pub fn run(args: ServeArgs) -> Result<(), RouterError> {
    let server = start(args)?;
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    ctrlc::set_handler(move || {
        let _ = tx.send(());
    })
    .map_err(|e| RouterError::Io(std::io::Error::other(e)))?;
    // SIGTERM/SIGINT: drain; a second one ends the process at once.
    let _ = rx.recv();
    let timeout = server.shared.cfg.shutdown_timeout;
    tracing::info!(
        requests = server.shared.drain.active_requests(),
        timeout_secs = timeout.as_secs_f64(),
        "shutting down: draining requests in flight"
    );
    std::thread::spawn(move || {
        if rx.recv().is_ok() {
            tracing::warn!("second signal: exiting without waiting");
            std::process::exit(130);
        }
    });
    if server.shutdown(timeout) {
        tracing::info!("drained; exiting");
    }
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
    // Connections open on this thread, so a drain knows when this thread is done, and the switch that ends
    // those left at the drain deadline.
    let open = Rc::new(Cell::new(0usize));
    let kill = Rc::new(shutdown::KillSwitch::default());
    loop {
        let (s, _) = match l.accept().await {
            Ok(x) => x,
            Err(_) if sh.drain.is_draining() => break,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                monoio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        // A connection accepted as the drain starts is still served (its answer closes it).
        let _ = s.set_nodelay(true);
        let sh2 = sh.clone();
        let open2 = open.clone();
        let killed = kill.killed();
        open.set(open.get() + 1);
        monoio::spawn(async move {
            if let Ok(io) = s.into_poll_io() {
                let mut conn = std::pin::pin!(server::serve_conn(io, sh2));
                let mut killed = std::pin::pin!(killed);
                // The connection ends by itself, or is dropped (with its sockets) at the drain deadline.
                std::future::poll_fn(|cx| {
                    if conn.as_mut().poll(cx).is_ready() || killed.as_mut().poll(cx).is_ready() {
                        std::task::Poll::Ready(())
                    } else {
                        std::task::Poll::Pending
                    }
                })
                .await;
            }
            open2.set(open2.get() - 1);
        });
        if sh.drain.is_draining() {
            break;
        }
    }
    drop(l);
    // Draining: connections end after their current request (idle ones within IDLE_DRAIN_CHECK).
    while open.get() > 0 && !sh.drain.past_deadline() {
        monoio::time::sleep(shutdown::DRAIN_POLL).await;
    }
    if open.get() > 0 {
        // Deadline: drop what is left, so clients and engines see their connections close.
        sh.drain.note_deadline();
        kill.kill();
        for _ in 0..50 {
            if open.get() == 0 {
                break;
            }
            monoio::time::sleep(shutdown::DRAIN_POLL).await;
        }
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
