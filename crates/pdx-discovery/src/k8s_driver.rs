//! The Kubernetes I/O around [`crate::k8s`]: one task per selector listing and watching pods through `kube`'s
//! client (kubeconfig or in-cluster service account; rustls, no OpenSSL), on a thread of its own.
//!
//! A list is paged ([`LIST_PAGE`] pods a page); a watch asks the server to end it after
//! [`WATCH_TIMEOUT_SECS`] and is then resumed at once from the last resource version (bookmarks keep it
//! fresh). `410 Gone` lists again; any other failure retries with [`crate::backoff`], keeping the workers
//! known.

use crate::args::K8sSpec;
use crate::k8s::{K8sStep, PodRules, PodSelector, PodWatch};
use crate::{DiscoveryError, Sink};
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, WatchParams};

/// Pods per list page.
pub const LIST_PAGE: u32 = 500;
/// Seconds after which the API server ends a watch (the client then resumes it).
pub const WATCH_TIMEOUT_SECS: u32 = 290;

/// A running pod watcher; stops when dropped.
#[derive(Debug)]
pub struct K8sDiscovery {
    stop: tokio::sync::watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for K8sDiscovery {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts watching `spec`'s selectors on a thread of its own and hands every change to `sink`. `config`:
/// the API server and credentials (`None`: inferred as kubectl does: `KUBECONFIG`, `~/.kube/config`, else
/// the in-cluster service account). `max_entries` bounds the workers of each selector.
///
/// Errors: [`DiscoveryError::Kube`] when no client configuration can be found or built (checked before
/// this returns, so `pdx serve` fails at start rather than serving without its workers), or when the
/// thread cannot start.
pub fn spawn(
    spec: K8sSpec,
    rules: PodRules,
    max_entries: usize,
    config: Option<kube::Config>,
    sink: Sink,
) -> Result<K8sDiscovery, DiscoveryError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| DiscoveryError::Kube(format!("runtime: {e}")))?;
    let config = match config {
        Some(c) => c,
        None => rt.block_on(kube::Config::infer()).map_err(|e| {
            DiscoveryError::Kube(format!(
                "no Kubernetes client configuration (KUBECONFIG, ~/.kube/config or in-cluster): {e}"
            ))
        })?,
    };
    let namespace = spec
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    let client = {
        let _g = rt.enter();
        kube::Client::try_from(config).map_err(DiscoveryError::from)?
    };
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let thread = std::thread::Builder::new()
        .name("pdx-k8s".into())
        .spawn(move || {
            rt.block_on(async move {
                let api: Api<Pod> = Api::namespaced(client, &namespace);
                let tasks: Vec<_> = spec
                    .selectors
                    .iter()
                    .map(|sel| {
                        let w = PodWatch::new(&namespace, sel.clone(), rules.clone(), max_entries);
                        tokio::spawn(pod_loop(api.clone(), w, sink.clone(), stop_rx.clone()))
                    })
                    .collect();
                tracing::info!(%namespace, selectors = tasks.len(), "watching pods");
                for t in tasks {
                    let _ = t.await;
                }
            });
        })
        .map_err(|e| DiscoveryError::Kube(format!("thread: {e}")))?;
    Ok(K8sDiscovery {
        stop,
        thread: Some(thread),
    })
}

fn is_gone(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(r) if r.code == 410)
}

async fn pod_loop(
    api: Api<Pod>,
    mut w: PodWatch,
    sink: Sink,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut attempt = 0u32;
    // 410s in a row without an event between them: a server that forgets every version at once must not
    // get a list per round trip.
    let mut gone = 0u32;
    loop {
        let r = tokio::select! {
            r = round(&api, &mut w, &sink, &mut attempt, &mut gone) => r,
            _ = stop.changed() => return,
        };
        if let Err(e) = r {
            let sel = w.selector();
            if attempt == 0 {
                tracing::warn!(selector = %sel.selector, error = %e,
                    "pod watch broken: keeping the workers known, retrying");
            }
            let wait = crate::backoff(attempt);
            attempt = attempt.saturating_add(1);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.changed() => return,
            }
        }
    }
}

/// One list or one watch (until the server ends it, 410, or an error).
async fn round(
    api: &Api<Pod>,
    w: &mut PodWatch,
    sink: &Sink,
    attempt: &mut u32,
    gone: &mut u32,
) -> Result<(), kube::Error> {
    let sel: PodSelector = w.selector().clone();
    match w.step() {
        K8sStep::List => {
            let mut pods = Vec::new();
            let mut rv = String::new();
            let mut token: Option<String> = None;
            // Enough pages for this watch's bound, and one more to see that it is exceeded.
            let max_pages = 2 + w.max_entries() / LIST_PAGE as usize;
            for _ in 0..max_pages {
                let mut lp = ListParams::default().labels(&sel.selector).limit(LIST_PAGE);
                if let Some(t) = &token {
                    lp = lp.continue_token(t);
                }
                let page = api.list(&lp).await?;
                if rv.is_empty() {
                    rv = page.metadata.resource_version.clone().unwrap_or_default();
                }
                pods.extend(page.items);
                token = page.metadata.continue_.filter(|t| !t.is_empty());
                if token.is_none() {
                    break;
                }
            }
            if token.is_some() {
                // An incomplete list must not be taken for the whole: the workers on the pages not read would be
                // removed. Keep what is known and try again after the backoff.
                return Err(kube::Error::Service(
                    format!(
                        "more than {} pods match {} (not ready ones included): list not applied",
                        pods.len(),
                        sel.selector
                    )
                    .into(),
                ));
            }
            *attempt = 0;
            let changes = w.on_list(&rv, &pods);
            tracing::debug!(selector = %sel.selector, pods = pods.len(), resource_version = %rv, "pods listed");
            if !changes.is_empty() {
                sink(changes);
            }
            Ok(())
        }
        K8sStep::Watch { resource_version } => {
            let wp = WatchParams::default()
                .labels(&sel.selector)
                .timeout(WATCH_TIMEOUT_SECS);
            let stream = match api.watch(&wp, &resource_version).await {
                Ok(s) => s,
                Err(e) if is_gone(&e) => {
                    w.on_gone();
                    relist_pause(gone).await;
                    return Ok(());
                }
                Err(e) => return Err(e),
            };
            *attempt = 0;
            let mut stream = std::pin::pin!(stream);
            let mut events = 0u64;
            while let Some(ev) = stream.next().await {
                events += 1;
                match ev {
                    Ok(ev) => {
                        if !matches!(ev, kube::core::WatchEvent::Error(_)) {
                            *gone = 0;
                        }
                        let changes = w.on_event(&ev);
                        if !changes.is_empty() {
                            sink(changes);
                        }
                        if w.step() == K8sStep::List {
                            relist_pause(gone).await;
                            return Ok(());
                        }
                        if let kube::core::WatchEvent::Error(e) = ev {
                            return Err(kube::Error::Api(e));
                        }
                    }
                    Err(e) if is_gone(&e) => {
                        w.on_gone();
                        relist_pause(gone).await;
                        return Ok(());
                    }
                    Err(e) => return Err(e),
                }
            }
            // The server ended the watch (its timeout): resume from the last version, at once unless it
            // ended without a single event (a server that closes every watch must not spin this loop).
            if events == 0 {
                tokio::time::sleep(crate::backoff(0)).await;
            }
            Ok(())
        }
    }
}

/// Before a list after `410 Gone`: nothing the first time, then [`crate::backoff`] while 410s follow each
/// other without an event between them.
async fn relist_pause(gone: &mut u32) {
    if *gone > 0 {
        tokio::time::sleep(crate::backoff(*gone - 1)).await;
    }
    *gone = gone.saturating_add(1);
}
