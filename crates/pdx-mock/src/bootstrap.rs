//! SGLang's bootstrap path (PD disaggregation with `bootstrap_host`/`bootstrap_port`/`bootstrap_room`), as far
//! as its timing goes: the decode engine does not generate before the prefill engine has computed the prompt's
//! KV and handed it over.
//!
//! In SGLang (`python/sglang/srt/disaggregation/decode.py`, "Life cycle of a request in the decode server") a
//! decode request goes through a pre-allocation queue (handshake with the prefill's bootstrap server, KV memory
//! reserved), a transfer queue (polled until the prefill's KV has arrived), and only then into the running
//! batch. The mock does the same with an HTTP long poll instead of a KV transfer:
//! * the prefill engine keeps a [`RoomTable`]: a bootstrap request is `Pending` once admitted, `Ready` when its
//!   prompt has been computed (its one token is out), `Failed` when it ends any other way (error, client gone);
//! * it answers `GET /bootstrap/kv/{room}` ([`ROUTE_PREFIX`]) on its HTTP port, and on `--bootstrap-port` when
//!   that is given (SGLang's `--disaggregation-bootstrap-port`), waiting up to [`POLL_WAIT`] for the room to
//!   leave `Pending` (a room not seen yet counts as pending: the router sends both halves at once, so the decode
//!   may ask first);
//! * the decode engine reserves the request's KV blocks, then asks `bootstrap_host:bootstrap_port` until the
//!   room is ready (it then counts the prompt as computed), failed, or `--bootstrap-timeout-secs` passed (both
//!   502 `KVTransferError`, what the mock answers for any KV that does not arrive). While it waits the request
//!   counts in `vllm:num_requests_waiting`.
//!
//! Not modelled: the prefill waiting for the decode's pre-allocation before it computes (SGLang's prefill
//! bootstrap queue), and the KV bytes themselves (none move on this path).

use crate::error::MockError;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Path prefix of the bootstrap route on the prefill engine; the room follows as a decimal integer.
pub const ROUTE_PREFIX: &str = "/bootstrap/kv/";

/// Longest the prefill engine holds one poll before answering `pending` (the decode then asks again).
pub const POLL_WAIT: Duration = Duration::from_secs(5);

/// SGLang's default bootstrap port (`--disaggregation-bootstrap-port`), used when a request names none.
pub const DEFAULT_BOOTSTRAP_PORT: u16 = 8998;

/// Rooms remembered at most; the oldest finished ones go first, then the oldest of all.
pub const MAX_ROOMS: usize = 65_536;

/// How long a finished room is remembered for a decode that asks late.
pub const FINISHED_TTL: Duration = Duration::from_secs(120);

/// Largest bootstrap answer the decode reads, bytes.
const MAX_ANSWER_BYTES: usize = 4096;

/// Where the prefill half of one bootstrap room is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoomState {
    /// Admitted, prompt not computed yet (or not seen yet).
    Pending,
    /// The prompt's KV is computed: the decode may generate.
    Ready,
    /// The prefill ended without computing it (error, abort).
    Failed,
}

impl RoomState {
    /// The word on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            RoomState::Pending => "pending",
            RoomState::Ready => "ready",
            RoomState::Failed => "failed",
        }
    }
}

/// The prefill engine's bootstrap rooms, with a wake-up for long polls.
#[derive(Debug, Default)]
pub struct RoomTable {
    rooms: Mutex<HashMap<u64, (RoomState, Instant)>>,
    changed: Notify,
}

impl RoomTable {
    /// Sets `room` to `state` (a new room is added, bounded by [`MAX_ROOMS`]) and wakes the polls.
    pub fn set(&self, room: u64, state: RoomState) {
        let now = Instant::now();
        let mut m = self.rooms.lock().expect("rooms lock");
        if !m.contains_key(&room) && m.len() >= MAX_ROOMS {
            m.retain(|_, (s, t)| *s == RoomState::Pending || now.duration_since(*t) < FINISHED_TTL);
            if m.len() >= MAX_ROOMS {
                if let Some(oldest) = m.iter().min_by_key(|(_, (_, t))| *t).map(|(k, _)| *k) {
                    m.remove(&oldest);
                }
            }
        }
        m.insert(room, (state, now));
        drop(m);
        self.changed.notify_waiters();
    }

    /// The state of `room` (`Pending` when unknown).
    pub fn get(&self, room: u64) -> RoomState {
        self.rooms
            .lock()
            .expect("rooms lock")
            .get(&room)
            .map_or(RoomState::Pending, |(s, _)| *s)
    }

    /// Waits until `room` is no longer pending, or `max` passed; returns its state then.
    pub async fn wait(&self, room: u64, max: Duration) -> RoomState {
        let deadline = tokio::time::Instant::now() + max;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let s = self.get(room);
            if s != RoomState::Pending {
                return s;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.get(room);
            }
        }
    }
}

/// The room of a bootstrap route path (`/bootstrap/kv/123`), if it is one.
pub fn route_room(path: &str) -> Option<Result<u64, String>> {
    let rest = path.strip_prefix(ROUTE_PREFIX)?;
    Some(
        rest.parse::<u64>()
            .map_err(|_| format!("bootstrap room must be an unsigned integer, got `{rest}`")),
    )
}

/// The JSON body of a poll answer.
pub fn answer(room: u64, state: RoomState) -> String {
    format!(r#"{{"room":{room},"state":"{}"}}"#, state.as_str())
}

/// The decode side: asks the prefill's bootstrap server at `host:port` about `room` until it is ready (`Ok`),
/// failed, unreachable, or `timeout` passed (each a [`MockError::Transfer`], 502 on the wire).
pub async fn await_prefill(
    host: &str,
    port: u16,
    room: u64,
    timeout: Duration,
) -> Result<(), MockError> {
    let authority = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let fail = |reason: String| MockError::Transfer {
        engine: format!("bootstrap server {authority}"),
        reason,
    };
    let path = format!("{ROUTE_PREFIX}{room}");
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let state = tokio::time::timeout_at(deadline, poll_once(&authority, &path))
            .await
            .map_err(|_| {
                fail(format!(
                    "room {room}: no KV within {:.0} s (--bootstrap-timeout-secs)",
                    timeout.as_secs_f64()
                ))
            })?
            .map_err(|e| fail(format!("room {room}: {e}")))?;
        match state {
            RoomState::Ready => return Ok(()),
            RoomState::Failed => {
                return Err(fail(format!(
                    "room {room}: the prefill ended without computing the KV"
                )))
            }
            RoomState::Pending => {}
        }
    }
}

/// One long poll: `GET path` on `authority`, its `state` parsed (strictly, bounded).
async fn poll_once(authority: &str, path: &str) -> Result<RoomState, String> {
    let stream = tokio::net::TcpStream::connect(authority)
        .await
        .map_err(|e| format!("cannot reach it: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, authority)
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = http_body_util::Limited::new(resp.into_body(), MAX_ANSWER_BYTES)
        .collect()
        .await
        .map_err(|e| format!("bad answer: {e}"))?
        .to_bytes();
    if status != 200 {
        return Err(format!(
            "answered {status}: {}",
            String::from_utf8_lossy(&body)
        ));
    }
    #[derive(serde::Deserialize)]
    struct Answer {
        state: String,
    }
    let a: Answer = serde_json::from_slice(&body).map_err(|e| format!("bad answer: {e}"))?;
    match a.state.as_str() {
        "pending" => Ok(RoomState::Pending),
        "ready" => Ok(RoomState::Ready),
        "failed" => Ok(RoomState::Failed),
        s => Err(format!("unknown room state `{s}`")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_parse_strictly() {
        assert_eq!(route_room("/bootstrap/kv/42"), Some(Ok(42)));
        assert!(matches!(route_room("/bootstrap/kv/-1"), Some(Err(_))));
        assert!(matches!(route_room("/bootstrap/kv/"), Some(Err(_))));
        assert_eq!(route_room("/v1/models"), None);
    }

    #[tokio::test]
    async fn a_poll_wakes_when_the_room_is_ready_and_unknown_rooms_are_pending() {
        let t = std::sync::Arc::new(RoomTable::default());
        assert_eq!(
            t.wait(7, Duration::from_millis(20)).await,
            RoomState::Pending
        );
        t.set(7, RoomState::Pending);
        let t2 = t.clone();
        let w = tokio::spawn(async move { t2.wait(7, Duration::from_secs(10)).await });
        tokio::task::yield_now().await;
        t.set(7, RoomState::Ready);
        assert_eq!(w.await.unwrap(), RoomState::Ready);
        t.set(8, RoomState::Failed);
        assert_eq!(t.get(8), RoomState::Failed);
    }

    #[test]
    fn the_table_is_bounded() {
        let t = RoomTable::default();
        for r in 0..(MAX_ROOMS as u64 + 10) {
            t.set(r, RoomState::Pending);
        }
        assert_eq!(t.rooms.lock().unwrap().len(), MAX_ROOMS);
        assert_eq!(t.get(MAX_ROOMS as u64 + 9), RoomState::Pending);
    }
}
