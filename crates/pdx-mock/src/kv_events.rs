//! vLLM's KV cache events, published as vLLM publishes them (`vllm/distributed/kv_events.py`,
//! `ZmqEventPublisher`), so a KV-aware router can follow this engine's prefix cache exactly.
//!
//! * **Config**: `--kv-events-config '{"enable_kv_cache_events":true,"publisher":"zmq",
//!   "endpoint":"tcp://*:5557","replay_endpoint":"tcp://*:5558","topic":"kv-events","buffer_steps":10000}'`,
//!   vLLM's `KVEventsConfig` fields ([`KvEventsConfig`]).
//! * **Events**: the block manager records them where its prefix cache changes
//!   ([`crate::kv_cache::BlockManager::record_events`]); the engine hands each admission's events to the
//!   publisher thread through a bounded channel ([`KvEventPublisher::publish`]), never blocking: when the
//!   channel is full the events are dropped and counted, and the publisher skips one sequence number, so
//!   subscribers see a gap that no replay can fill and reset their view of this engine (an honest "events
//!   were lost"; dropping silently would leave them wrong without knowing).
//! * **Wire**: a ZMQ PUB socket sends each batch as the multipart message `[topic, sequence (8 bytes,
//!   big-endian, from 0), payload]`, the payload the msgpack of `KVEventBatch` as msgspec writes it with
//!   `array_like=True, tag=True`: `[ts, [event, ...], data_parallel_rank]`, events
//!   `["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium, lora_name]`,
//!   `["BlockRemoved", block_hashes, medium]`, `["AllBlocksCleared"]`. The last `buffer_steps` batches are
//!   kept for replay: a ROUTER socket takes a request `[empty, start sequence (8 bytes BE)]` (REQ or DEALER
//!   clients) and answers every buffered `[empty, sequence, payload]` from there, then
//!   `[empty, -1 (8 bytes BE), empty]`.
//!
//! The publisher runs on a thread of its own with a single-threaded tokio runtime and the `zeromq` crate
//! (pure Rust ZMTP 3). Batches are coalesced from what the channel holds (at most
//! [`MAX_EVENTS_PER_BATCH`] events), as vLLM publishes one batch per engine step. A send to subscribers that
//! takes longer than [`SEND_TIMEOUT`] is abandoned (a stalled subscriber then misses that batch and sees a
//! gap), so one slow subscriber cannot stop the others, nor replays.

use crate::MockError;
use bytes::Bytes;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use zeromq::{Socket, SocketRecv, SocketSend};

/// A KV cache event as the block manager records it (vLLM's event classes, with the fields the mock has;
/// `lora_id` and `lora_name` are always null, `medium` always `"GPU"` on the wire).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvCacheEvent {
    /// Full blocks entered the prefix cache.
    BlockStored {
        /// Chained hashes of the new blocks, in prompt order.
        block_hashes: Vec<u64>,
        /// Hash of the block before the first new one (`None`: the prompt's first block).
        parent_block_hash: Option<u64>,
        /// Token ids of the new blocks, `block_size` per block.
        token_ids: Vec<u32>,
        /// Tokens per block.
        block_size: u32,
    },
    /// Blocks were evicted from the prefix cache.
    BlockRemoved {
        /// Their hashes.
        block_hashes: Vec<u64>,
    },
    /// The prefix cache was cleared.
    AllBlocksCleared,
}

/// Most events in one published batch.
pub const MAX_EVENTS_PER_BATCH: usize = 1024;
/// Longest wait for one message to be queued to the subscribers (or one replay answer to a client).
pub const SEND_TIMEOUT: Duration = Duration::from_secs(2);
/// vLLM's end-of-replay sequence number: -1 as 8 bytes big-endian.
pub const END_SEQ: [u8; 8] = [0xff; 8];

/// vLLM's `KVEventsConfig` (the JSON of `--kv-events-config`). Unknown fields are refused, as vLLM's
/// config class does.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvEventsConfig {
    /// Publish events at all (vLLM default false).
    #[serde(default)]
    pub enable_kv_cache_events: bool,
    /// `zmq` or `null` (default: `zmq` when enabled).
    #[serde(default)]
    pub publisher: Option<String>,
    /// PUB socket address to bind: `tcp://*:PORT`, `tcp://IP:PORT` (port 0: any free port). Default
    /// `tcp://*:5557`.
    #[serde(default = "default_endpoint")]
    pub endpoint: String,
    /// ROUTER socket address for replays (none: no replay).
    #[serde(default)]
    pub replay_endpoint: Option<String>,
    /// Batches kept for replay (vLLM default 10000; 1..=1000000).
    #[serde(default = "default_buffer_steps")]
    pub buffer_steps: usize,
    /// ZMQ high-water mark of the PUB socket (accepted for vLLM compatibility; the `zeromq` crate has
    /// none, [`SEND_TIMEOUT`] bounds a stalled subscriber instead).
    #[serde(default = "default_queue")]
    pub hwm: usize,
    /// Event chunks the engine may have queued for the publisher (vLLM default 100000; 1..=1000000);
    /// past it events are dropped and counted.
    #[serde(default = "default_queue")]
    pub max_queue_size: usize,
    /// Topic, the first frame of each message (vLLM default empty).
    #[serde(default)]
    pub topic: String,
}

fn default_endpoint() -> String {
    "tcp://*:5557".into()
}
fn default_buffer_steps() -> usize {
    10_000
}
fn default_queue() -> usize {
    100_000
}

impl KvEventsConfig {
    /// Parses `--kv-events-config` JSON and checks it. `Ok(None)` when events are not enabled (or the
    /// publisher is `null`).
    ///
    /// Errors: [`MockError::Config`] for malformed JSON, an unknown field or publisher, an endpoint that is
    /// not `tcp://HOST:PORT`, or a size out of range.
    pub fn parse(json: &str) -> Result<Option<Self>, MockError> {
        let c: KvEventsConfig = serde_json::from_str(json)
            .map_err(|e| MockError::Config(format!("--kv-events-config: {e}")))?;
        match c.publisher.as_deref() {
            None | Some("zmq") => {}
            Some("null") => return Ok(None),
            Some(o) => {
                return Err(MockError::Config(format!(
                    "--kv-events-config: unknown publisher `{}` (zmq, null)",
                    o.escape_debug()
                )))
            }
        }
        if !c.enable_kv_cache_events {
            return Ok(None);
        }
        bind_addr(&c.endpoint)?;
        if let Some(r) = &c.replay_endpoint {
            bind_addr(r)?;
        }
        for (name, v) in [
            ("buffer_steps", c.buffer_steps),
            ("max_queue_size", c.max_queue_size),
        ] {
            if !(1..=1_000_000).contains(&v) {
                return Err(MockError::Config(format!(
                    "--kv-events-config: {name} must be 1..=1000000, got {v}"
                )));
            }
        }
        if c.topic.len() > 256 {
            return Err(MockError::Config(
                "--kv-events-config: topic longer than 256 bytes".into(),
            ));
        }
        Ok(Some(c))
    }
}

/// The socket address of a bind endpoint `tcp://HOST:PORT` (`*` is every IPv4 interface, as vLLM binds it).
///
/// Errors: [`MockError::Config`] for another transport (`ipc://`, `inproc://`) or a bad host or port.
pub fn bind_addr(endpoint: &str) -> Result<SocketAddr, MockError> {
    let bad = || {
        MockError::Config(format!(
            "KV events endpoint `{}` must be tcp://HOST:PORT (HOST `*` or an IP address)",
            endpoint.escape_debug()
        ))
    };
    let rest = endpoint.strip_prefix("tcp://").ok_or_else(bad)?;
    let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    let ip: std::net::IpAddr = match host {
        "*" => std::net::Ipv4Addr::UNSPECIFIED.into(),
        "localhost" => std::net::Ipv4Addr::LOCALHOST.into(),
        h => h
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .map_err(|_| bad())?,
    };
    Ok(SocketAddr::new(ip, port))
}

/// Encodes `events` as one `KVEventBatch` payload (see the module doc for the shape), with `ts` in seconds
/// since the Unix epoch and `data_parallel_rank` 0 (vLLM's publisher fills in its rank).
pub fn encode_batch(ts: f64, events: &[KvCacheEvent]) -> Vec<u8> {
    use rmp::encode as e;
    let mut w = Vec::with_capacity(64);
    // Writes into a Vec cannot fail.
    let _ = e::write_array_len(&mut w, 3);
    let _ = e::write_f64(&mut w, ts);
    let _ = e::write_array_len(&mut w, events.len() as u32);
    let hashes = |w: &mut Vec<u8>, hs: &[u64]| {
        let _ = e::write_array_len(w, hs.len() as u32);
        for &h in hs {
            let _ = e::write_uint(w, h);
        }
    };
    for ev in events {
        match ev {
            KvCacheEvent::BlockStored {
                block_hashes,
                parent_block_hash,
                token_ids,
                block_size,
            } => {
                let _ = e::write_array_len(&mut w, 8);
                let _ = e::write_str(&mut w, "BlockStored");
                hashes(&mut w, block_hashes);
                match parent_block_hash {
                    Some(p) => {
                        let _ = e::write_uint(&mut w, *p);
                    }
                    None => {
                        let _ = e::write_nil(&mut w);
                    }
                }
                let _ = e::write_array_len(&mut w, token_ids.len() as u32);
                for &t in token_ids {
                    let _ = e::write_uint(&mut w, u64::from(t));
                }
                let _ = e::write_uint(&mut w, u64::from(*block_size));
                let _ = e::write_nil(&mut w); // lora_id
                let _ = e::write_str(&mut w, "GPU"); // medium
                let _ = e::write_nil(&mut w); // lora_name
            }
            KvCacheEvent::BlockRemoved { block_hashes } => {
                let _ = e::write_array_len(&mut w, 3);
                let _ = e::write_str(&mut w, "BlockRemoved");
                hashes(&mut w, block_hashes);
                let _ = e::write_str(&mut w, "GPU");
            }
            KvCacheEvent::AllBlocksCleared => {
                let _ = e::write_array_len(&mut w, 1);
                let _ = e::write_str(&mut w, "AllBlocksCleared");
            }
        }
    }
    let _ = e::write_uint(&mut w, 0);
    w
}

/// The engine's handle on the publisher thread.
#[derive(Debug)]
pub struct KvEventPublisher {
    tx: tokio::sync::mpsc::Sender<Vec<KvCacheEvent>>,
    dropped: Arc<AtomicU64>,
    /// Bound address of the PUB socket.
    pub endpoint: SocketAddr,
    /// Bound address of the replay socket, if any.
    pub replay_endpoint: Option<SocketAddr>,
    published: Arc<AtomicU64>,
}

impl KvEventPublisher {
    /// Binds the sockets and starts the publisher thread; returns once both sockets listen.
    ///
    /// Errors: [`MockError::Config`] when an endpoint is bad or cannot be bound.
    pub fn start(cfg: &KvEventsConfig) -> Result<Self, MockError> {
        let pub_addr = bind_addr(&cfg.endpoint)?;
        let replay_addr = cfg.replay_endpoint.as_deref().map(bind_addr).transpose()?;
        let (tx, rx) = tokio::sync::mpsc::channel(cfg.max_queue_size);
        let dropped = Arc::new(AtomicU64::new(0));
        let published = Arc::new(AtomicU64::new(0));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let run = Run {
            rx,
            dropped: dropped.clone(),
            published: published.clone(),
            topic: Bytes::from(cfg.topic.clone().into_bytes()),
            buffer_steps: cfg.buffer_steps,
        };
        std::thread::Builder::new()
            .name("pdx-mock-kv-events".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("runtime: {e}")));
                        return;
                    }
                };
                rt.block_on(run.serve(pub_addr, replay_addr, ready_tx));
            })
            .map_err(MockError::Io)?;
        let (endpoint, replay_endpoint) = ready_rx
            .recv_timeout(Duration::from_secs(10))
            .map_err(|_| MockError::Config("KV event publisher did not start".into()))?
            .map_err(MockError::Config)?;
        tracing::info!(%endpoint, replay = ?replay_endpoint, "publishing KV events");
        Ok(Self {
            tx,
            dropped,
            endpoint,
            replay_endpoint,
            published,
        })
    }

    /// Queues `events` for publishing without blocking; when the queue is full they are dropped and
    /// counted (see the module doc).
    pub fn publish(&self, events: Vec<KvCacheEvent>) {
        if events.is_empty() {
            return;
        }
        let n = events.len() as u64;
        if self.tx.try_send(events).is_err() {
            self.dropped.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Events dropped because the publisher's queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Batches published so far.
    pub fn published(&self) -> u64 {
        self.published.load(Ordering::Relaxed)
    }
}

struct Run {
    rx: tokio::sync::mpsc::Receiver<Vec<KvCacheEvent>>,
    dropped: Arc<AtomicU64>,
    published: Arc<AtomicU64>,
    topic: Bytes,
    buffer_steps: usize,
}

type Ready = std::sync::mpsc::Sender<Result<(SocketAddr, Option<SocketAddr>), String>>;
type Buffer = Arc<Mutex<VecDeque<(u64, Bytes)>>>;

fn bound(ep: &zeromq::Endpoint) -> Result<SocketAddr, String> {
    match ep {
        zeromq::Endpoint::Tcp(h, port) => {
            let ip: std::net::IpAddr = h.clone().try_into().map_err(|e| format!("{e}"))?;
            Ok(SocketAddr::new(ip, *port))
        }
        other => Err(format!("unexpected endpoint {other:?}")),
    }
}

impl Run {
    async fn serve(self, pub_addr: SocketAddr, replay_addr: Option<SocketAddr>, ready: Ready) {
        let mut pub_sock = zeromq::PubSocket::new();
        let ep = match pub_sock.bind(&format!("tcp://{pub_addr}")).await {
            Ok(ep) => ep,
            Err(e) => {
                let _ = ready.send(Err(format!("bind KV events endpoint {pub_addr}: {e}")));
                return;
            }
        };
        let pub_ep = match bound(&ep) {
            Ok(a) => a,
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        let mut router = None;
        let mut replay_ep = None;
        if let Some(addr) = replay_addr {
            let mut r = zeromq::RouterSocket::new();
            match r
                .bind(&format!("tcp://{addr}"))
                .await
                .map_err(|e| e.to_string())
            {
                Ok(ep) => match bound(&ep) {
                    Ok(a) => replay_ep = Some(a),
                    Err(e) => {
                        let _ = ready.send(Err(e));
                        return;
                    }
                },
                Err(e) => {
                    let _ = ready.send(Err(format!("bind KV events replay endpoint {addr}: {e}")));
                    return;
                }
            }
            router = Some(r);
        }
        let _ = ready.send(Ok((pub_ep, replay_ep)));
        let buffer: Buffer = Arc::new(Mutex::new(VecDeque::new()));
        let replays = async {
            match router {
                Some(r) => serve_replays(r, buffer.clone()).await,
                None => std::future::pending().await,
            }
        };
        // Publishing ends when the engine (the channel's sender) is gone; the replays go with it.
        tokio::select! {
            _ = self.publish_loop(pub_sock, buffer.clone()) => {}
            _ = replays => {}
        }
    }

    async fn publish_loop(mut self, mut sock: zeromq::PubSocket, buffer: Buffer) {
        let mut seq: u64 = 0;
        let mut seen_dropped = 0;
        while let Some(mut events) = self.rx.recv().await {
            while events.len() < MAX_EVENTS_PER_BATCH {
                match self.rx.try_recv() {
                    Ok(more) => events.extend(more),
                    Err(_) => break,
                }
            }
            let d = self.dropped.load(Ordering::Relaxed);
            if d != seen_dropped {
                // Events were lost before they had a number: skip one, so subscribers see the loss.
                seen_dropped = d;
                seq += 1;
                tracing::warn!(dropped = d, "KV event queue was full; events dropped");
            }
            let ts = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0);
            let payload = Bytes::from(encode_batch(ts, &events));
            let msg = zeromq::ZmqMessage::try_from(vec![
                self.topic.clone(),
                Bytes::copy_from_slice(&seq.to_be_bytes()),
                payload.clone(),
            ]);
            if let Ok(msg) = msg {
                match tokio::time::timeout(SEND_TIMEOUT, sock.send(msg)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::warn!(error = %e, seq, "KV event publish failed"),
                    Err(_) => {
                        tracing::warn!(seq, "KV event publish timed out (stalled subscriber)")
                    }
                }
            }
            if let Ok(mut b) = buffer.lock() {
                b.push_back((seq, payload));
                while b.len() > self.buffer_steps {
                    b.pop_front();
                }
            }
            self.published.fetch_add(1, Ordering::Relaxed);
            seq += 1;
        }
    }
}

/// Answers replay requests: `[identity, empty, start (8 bytes BE)]` in, every buffered batch from `start`
/// and the end marker out. Anything else is ignored, as vLLM does.
async fn serve_replays(mut router: zeromq::RouterSocket, buffer: Buffer) {
    loop {
        let msg = match router.recv().await {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(error = %e, "replay socket receive failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let frames = msg.into_vec();
        let [id, empty, start] = frames.as_slice() else {
            tracing::warn!(frames = frames.len(), "invalid KV event replay request");
            continue;
        };
        let Ok(start) = <[u8; 8]>::try_from(start.as_ref()) else {
            tracing::warn!("invalid KV event replay request: start is not 8 bytes");
            continue;
        };
        let start = u64::from_be_bytes(start);
        let batches: Vec<(u64, Bytes)> = match buffer.lock() {
            Ok(b) => b.iter().filter(|(s, _)| *s >= start).cloned().collect(),
            Err(_) => Vec::new(),
        };
        let answers = batches
            .into_iter()
            .map(|(s, p)| (Bytes::copy_from_slice(&s.to_be_bytes()), p))
            .chain(std::iter::once((
                Bytes::from_static(&END_SEQ),
                Bytes::new(),
            )));
        for (s, p) in answers {
            let Ok(m) = zeromq::ZmqMessage::try_from(vec![id.clone(), empty.clone(), s, p]) else {
                break;
            };
            match tokio::time::timeout(SEND_TIMEOUT, router.send(m)).await {
                Ok(Ok(())) => {}
                _ => {
                    tracing::warn!("KV event replay to a client failed or stalled; abandoned");
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_parses_vllms_json_and_refuses_bad_values() {
        let c = KvEventsConfig::parse(
            r#"{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"tcp://*:5557",
                "replay_endpoint":"tcp://*:5558","topic":"kv-events","buffer_steps":10000}"#,
        )
        .unwrap()
        .unwrap();
        assert_eq!(c.replay_endpoint.as_deref(), Some("tcp://*:5558"));
        assert_eq!(bind_addr(&c.endpoint).unwrap().to_string(), "0.0.0.0:5557");
        assert_eq!(
            KvEventsConfig::parse(r#"{"enable_kv_cache_events":false}"#).unwrap(),
            None
        );
        assert_eq!(
            KvEventsConfig::parse(r#"{"enable_kv_cache_events":true,"publisher":"null"}"#).unwrap(),
            None
        );
        for bad in [
            "{",
            r#"{"enable_kv_cache_events":true,"bogus":1}"#,
            r#"{"enable_kv_cache_events":true,"publisher":"nats"}"#,
            r#"{"enable_kv_cache_events":true,"endpoint":"ipc:///tmp/x"}"#,
            r#"{"enable_kv_cache_events":true,"endpoint":"tcp://*:99999"}"#,
            r#"{"enable_kv_cache_events":true,"replay_endpoint":"tcp://host"}"#,
            r#"{"enable_kv_cache_events":true,"buffer_steps":0}"#,
        ] {
            assert!(KvEventsConfig::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn batches_are_msgspec_tagged_arrays() {
        let b = encode_batch(
            1.5,
            &[
                KvCacheEvent::BlockStored {
                    block_hashes: vec![5],
                    parent_block_hash: None,
                    token_ids: vec![1, 2],
                    block_size: 2,
                },
                KvCacheEvent::AllBlocksCleared,
            ],
        );
        // msgspec.msgpack.encode(KVEventBatch(ts=1.5, events=[BlockStored([5], None, [1, 2], 2, None,
        // "GPU", None), AllBlocksCleared()], data_parallel_rank=0)) with array_like=True, tag=True.
        let mut g = vec![0x93, 0xcb];
        g.extend_from_slice(&1.5f64.to_be_bytes());
        g.extend_from_slice(&[0x92, 0x98, 0xab]);
        g.extend_from_slice(b"BlockStored");
        g.extend_from_slice(&[0x91, 0x05, 0xc0, 0x92, 0x01, 0x02, 0x02, 0xc0, 0xa3]);
        g.extend_from_slice(b"GPU");
        g.extend_from_slice(&[0xc0, 0x91, 0xb0]);
        g.extend_from_slice(b"AllBlocksCleared");
        g.push(0x00);
        assert_eq!(b, g);
    }
}
