//! Response bodies: a whole buffer, or an upstream body forwarded frame by frame.
//!
//! [`Forward`] hands each upstream data frame to hyper as the same [`Bytes`] (no copy, no
//! re-encoding). On streams it only scans for event boundaries ([`SseScanner`]) to count
//! token events and time TTFT/ITL; it allocates nothing per frame. At the stream's end (not per chunk) it
//! feeds the worker's telemetry with the stream's TTFT and TPOT, and with the `score` policy each chunk's
//! tokens are taken off the worker's tokens in flight (one relaxed atomic). If the upstream body fails
//! mid-stream, it sends one SSE error event and ends the stream. When the body is dropped
//! early (the client went away), its upstream connection goes with it (see
//! [`crate::upstream`]).

use crate::metrics::Metrics;
use crate::registry::LoadGuard;
use crate::upstream::UpBody;
use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use pdx_router_core::SseScanner;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

/// The SSE error event sent when the upstream sends nothing for the stream idle timeout (OpenAI error JSON, 504).
pub const STREAM_TIMEOUT_EVENT: &[u8] = b"data: {\"error\":{\"message\":\"upstream stream idle timeout\",\"type\":\"UpstreamTimeout\",\"param\":null,\"code\":504}}\n\n";

/// The SSE error event sent when the decode stream breaks (OpenAI error JSON, 502).
pub const STREAM_ERROR_EVENT: &[u8] = b"data: {\"error\":{\"message\":\"upstream stream failed\",\"type\":\"UpstreamError\",\"param\":null,\"code\":502}}\n\n";

/// Per-request observation state of a forwarded stream.
#[derive(Debug)]
pub struct StreamStats {
    /// Request start (client request received).
    pub start: Instant,
    /// Decode (or aggregated) response headers received.
    pub headers_at: Instant,
    /// First token event time.
    pub first_event: Option<Instant>,
    /// Last token event time.
    pub last_event: Option<Instant>,
    /// Token events seen (including a usage chunk; `[DONE]` excluded).
    pub events: u64,
    /// Observe PD phase `decode_first_token`.
    pub pd: bool,
}

/// An upstream body being forwarded.
pub struct Forward<B> {
    /// Upstream body (it owns its connection: back to the pool at a clean end, closed when
    /// dropped early); `None` while a migrated stream waits for its continuation.
    pub body: Option<B>,
    /// In-flight accounting (released at the end or on drop).
    pub guard: Option<LoadGuard>,
    /// SSE scanning on (streamed responses).
    pub stream: bool,
    /// Boundary scanner.
    pub scanner: SseScanner,
    /// Timing.
    pub stats: StreamStats,
    /// Metrics (None in tests).
    pub metrics: Option<Arc<Metrics>>,
    /// Registry (clock for breaker reports; None in tests).
    pub registry: Option<Arc<crate::registry::Registry>>,
    /// Finished (end or error event sent).
    pub done: bool,
    /// Longest gap between upstream frames before the response is ended (`None`: unbounded). The gap is
    /// detected within one to two times this bound: a frame only marks progress, and the timer is re-armed
    /// when it fires, so forwarding a frame costs no timer operation.
    pub idle_timeout: Option<std::time::Duration>,
    /// The idle timer (monoio), made on the first wait for a frame.
    pub idle_timer: Option<Pin<Box<monoio::time::Sleep>>>,
    /// A frame arrived since the idle timer was last armed.
    pub progressed: bool,
    /// Stream migration ([`crate::migrate`]): `None` when the stream cannot or may not move.
    pub migration: Option<Box<crate::migrate::Migration<B>>>,
    /// The request's admission slot (aggregated pools with admission shaping): given back with the TTFT at
    /// the first token event, or at the end.
    pub admission: Option<crate::admission::Permit>,
    /// The request's slot of its decode pool's admission (decode pools with an ITL target): fed the mean ITL
    /// of every [`DECODE_WINDOW`] token events, given back at the end (it stays with a stream that moves).
    pub decode_slot: Option<Box<DecodeSlot>>,
    /// The pool and worker that produce this answer (labels of `pdx_requests_total`, [`crate::front::count`]);
    /// `None` for a body no worker produced.
    pub served: Option<crate::front::Served>,
}

/// Token events per ITL sample of a decode pool's admission: about one sample per 0.4 s of a stream at 25 ms
/// per token, so a pool with a hundred streams has its smoothed TPOT from the last fraction of a second.
pub const DECODE_WINDOW: u64 = 16;

/// A stream's slot of its decode pool's admission and the window of token events being timed.
#[derive(Debug)]
pub struct DecodeSlot {
    permit: crate::admission::Permit,
    /// The token event the window is timed from (`None` before the first).
    from: Option<Instant>,
    /// Token events since `from`.
    events: u64,
    /// The last token event.
    last: Instant,
}

impl DecodeSlot {
    /// A slot taken from a decode pool's admission.
    pub fn new(permit: crate::admission::Permit) -> Self {
        Self {
            permit,
            from: None,
            events: 0,
            last: Instant::now(),
        }
    }

    /// The window starts again at the next token event (the stream moved to another worker).
    fn restart(&mut self) {
        self.from = None;
        self.events = 0;
    }

    /// The stream ended (`ok`: well): the slot goes back, with the mean ITL of the last, partial window when
    /// it has token events (so a stream shorter than a window still gives its pool a sample).
    fn finish(self, ok: bool) {
        match (ok, self.from) {
            (true, Some(from)) if self.events > 0 => {
                let itl =
                    self.last.saturating_duration_since(from).as_secs_f64() / self.events as f64;
                self.permit.done(itl);
            }
            _ => drop(self.permit),
        }
    }

    /// `events` token events arrived at `now`: a window full of them gives the pool a sample, their mean ITL.
    fn tokens(&mut self, events: u64, now: Instant) {
        self.last = now;
        let Some(from) = self.from else {
            // The first token's delay is TTFT, not ITL: the window starts at it.
            self.from = Some(now);
            return;
        };
        self.events += events;
        if self.events >= DECODE_WINDOW {
            let itl = now.saturating_duration_since(from).as_secs_f64() / self.events as f64;
            self.permit.observe(itl);
            self.from = Some(now);
            self.events = 0;
        }
    }
}

impl<B> std::fmt::Debug for Forward<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forward")
            .field("stream", &self.stream)
            .field("done", &self.done)
            .finish()
    }
}

impl<B> Forward<B> {
    /// A forwarder with no connection, guard or metrics (tests, benchmarks).
    pub fn bare(body: B, stream: bool) -> Self {
        let now = Instant::now();
        Self {
            body: Some(body),
            guard: None,
            stream,
            scanner: SseScanner::new(),
            stats: StreamStats {
                start: now,
                headers_at: now,
                first_event: None,
                last_event: None,
                events: 0,
                pd: false,
            },
            metrics: None,
            registry: None,
            done: false,
            idle_timeout: None,
            idle_timer: None,
            progressed: false,
            migration: None,
            admission: None,
            decode_slot: None,
            served: None,
        }
    }

    /// Polls the idle timer after the upstream body returned `Pending`: `true` when the upstream has sent
    /// nothing for a whole timer period.
    fn idle_expired(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(limit) = self.idle_timeout else {
            return false;
        };
        // A monoio timer keeps the first waker it is polled with: the server polls bodies only with its task's
        // own waker (never a no-op one), so this is the right one.
        let timer = self
            .idle_timer
            .get_or_insert_with(|| Box::pin(monoio::time::sleep(limit)));
        while timer.as_mut().poll(cx).is_ready() {
            if !std::mem::take(&mut self.progressed) {
                return true;
            }
            timer.as_mut().reset(monoio::time::Instant::now() + limit);
        }
        false
    }

    fn observe(&mut self, data: &[u8]) {
        let r = self.scanner.scan(data);
        let events = u64::from(r.events).saturating_sub(u64::from(r.done));
        if events == 0 {
            return;
        }
        let now = Instant::now();
        if let Some(g) = &mut self.guard {
            g.progress(events);
        }
        if let Some(d) = &mut self.decode_slot {
            d.tokens(events, now);
        }
        if self.stats.first_event.is_none() {
            self.stats.first_event = Some(now);
            if let Some(p) = self.admission.take() {
                let ttft = now.saturating_duration_since(p.granted_at());
                p.done(ttft.as_secs_f64());
            }
        }
        if let Some(m) = &self.metrics {
            match self.stats.last_event {
                None => {
                    m.ttft.observe((now - self.stats.start).as_secs_f64());
                    if self.stats.pd {
                        m.phase
                            .get_or_create(&crate::metrics::PhaseLabel {
                                phase: "decode_first_token",
                            })
                            .observe((now - self.stats.headers_at).as_secs_f64());
                    }
                }
                Some(last) => m.itl.observe((now - last).as_secs_f64() / events as f64),
            }
        }
        self.stats.last_event = Some(now);
        self.stats.events += events;
    }

    /// The response ended: well (`None`), or with `failure` (a broken or silent upstream is a
    /// reachability failure for the breaker, which a passing health check clears).
    fn finish(&mut self, failure: Option<pdx_router_core::UpstreamFailure>) {
        self.done = true;
        self.admission = None;
        if let Some(d) = self.decode_slot.take() {
            d.finish(failure.is_none());
        }
        if let (Some(g), None) = (&self.guard, failure) {
            let st = &self.stats;
            if let (true, Some(first), Some(last)) = (self.stream, st.first_event, st.last_event) {
                // Decode under PD: from its response head (the KV handoff and the prefill are not its
                // doing); aggregated: from the request's arrival.
                let from = if st.pd { st.headers_at } else { st.start };
                let ttft = first.saturating_duration_since(from).as_secs_f64();
                let tpot = (st.events >= 2).then(|| {
                    last.saturating_duration_since(first).as_secs_f64() / (st.events - 1) as f64
                });
                g.worker.with_telemetry(|t| {
                    t.observe_ttft(ttft);
                    if let Some(x) = tpot {
                        t.observe_tpot(x);
                    }
                });
            }
        }
        if let Some(g) = self.guard.take() {
            let now = self.registry.as_ref().map_or(0, |r| r.now_us());
            match failure {
                None => g.worker.report(true, now),
                Some(f) => g.worker.report_failure(f, now),
            }
        }
        if let Some(m) = &self.metrics {
            m.e2e.observe(self.stats.start.elapsed().as_secs_f64());
        }
    }
}

impl<B> Forward<B> {
    /// Moves the stream off its worker for `reason` ([`crate::migrate`]): the old upstream request is dropped
    /// (its connection closes, so the engine aborts it) and counted against its worker when it failed. False
    /// when the stream cannot move.
    fn try_move(&mut self, reason: pdx_router_core::MoveReason) -> bool {
        let Some(m) = self.migration.as_mut() else {
            return false;
        };
        let from = self.guard.as_ref().map(|g| g.worker.clone());
        if !m.start(reason, from.as_ref()) {
            return false;
        }
        self.body = None;
        // The stall before the move and the continuation's prefill are not ITL: the next window starts at the
        // continuation's first token event.
        if let Some(d) = &mut self.decode_slot {
            d.restart();
        }
        if let Some(g) = self.guard.take() {
            let now = self.registry.as_ref().map_or(0, |r| r.now_us());
            match reason {
                pdx_router_core::MoveReason::ConnectionLost => g
                    .worker
                    .report_failure(pdx_router_core::UpstreamFailure::Connect, now),
                pdx_router_core::MoveReason::Stalled => g
                    .worker
                    .report_failure(pdx_router_core::UpstreamFailure::Timeout, now),
                pdx_router_core::MoveReason::ServerError => g.worker.report(false, now),
                pdx_router_core::MoveReason::ScoreGap => {}
            }
        }
        true
    }

    /// Hands `data` to the client, observing its events.
    fn emit(&mut self, data: Bytes) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        if self.stream {
            self.observe(&data);
        }
        Poll::Ready(Some(Ok(Frame::data(data))))
    }

    /// The stream failed and will not move: the router's error event (504 after a timeout, else 502), then the
    /// end.
    fn fail(
        &mut self,
        failure: pdx_router_core::UpstreamFailure,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        self.finish(Some(failure));
        let event = match failure {
            pdx_router_core::UpstreamFailure::Timeout => STREAM_TIMEOUT_EVENT,
            _ => STREAM_ERROR_EVENT,
        };
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(event)))))
    }
}

impl<B> Body for Forward<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        use pdx_router_core::{MoveReason, UpstreamFailure};
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        loop {
            if let Some(m) = this.migration.as_mut() {
                if let Some(q) = m.next_out() {
                    return this.emit(q);
                }
                if m.resuming() {
                    match m.poll_resume(cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Some(r)) => {
                            this.body = Some(r.body);
                            this.guard = r.guard;
                            this.progressed = true;
                            continue;
                        }
                        Poll::Ready(None) => {
                            // No worker took the continuation: the stream ends as the failure that moved it.
                            let f = match m.last_reason {
                                Some(MoveReason::Stalled) => UpstreamFailure::Timeout,
                                _ => UpstreamFailure::Connect,
                            };
                            return this.fail(f);
                        }
                    }
                }
                if m.move_due && !this.try_move(MoveReason::ScoreGap) {
                    if let Some(m) = this.migration.as_mut() {
                        m.move_due = false;
                    }
                }
                if this.migration.as_ref().is_some_and(|m| m.resuming()) {
                    continue;
                }
            }
            let Some(body) = this.body.as_mut() else {
                this.finish(None);
                return Poll::Ready(None);
            };
            return match Pin::new(body).poll_frame(cx) {
                Poll::Pending if this.idle_expired(cx) => {
                    tracing::warn!(timeout = ?this.idle_timeout, "upstream body idle: ending the response");
                    if this.try_move(MoveReason::Stalled) {
                        continue;
                    }
                    if this.stream {
                        this.fail(UpstreamFailure::Timeout)
                    } else {
                        this.finish(Some(UpstreamFailure::Timeout));
                        Poll::Ready(Some(Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "upstream body idle",
                        ))))
                    }
                }
                Poll::Pending => Poll::Pending,
                Poll::Ready(Some(Ok(frame))) => {
                    this.progressed = true;
                    if !this.stream {
                        return Poll::Ready(Some(Ok(frame)));
                    }
                    let Some(m) = this.migration.as_mut() else {
                        if let Some(d) = frame.data_ref() {
                            this.observe(d);
                        }
                        return Poll::Ready(Some(Ok(frame)));
                    };
                    let data = match frame.into_data() {
                        Ok(d) => d,
                        Err(f) => return Poll::Ready(Some(Ok(f))),
                    };
                    match m.on_data(data) {
                        Some(f) => {
                            tracing::warn!(
                                reason = f.reason.as_str(),
                                "decode stream failed mid-stream"
                            );
                            if !this.try_move(f.reason) {
                                // Nobody to move to: what came is forwarded as it is, the engine's error too.
                                if let Some(m) = this.migration.as_mut() {
                                    m.owe(f.rest);
                                }
                            }
                        }
                        None => {
                            // Disjoint fields: the worker is borrowed, not cloned, on every chunk.
                            let w = this.guard.as_ref().map(|g| &g.worker);
                            if let Some(m) = this.migration.as_mut() {
                                m.check_voluntary(w);
                            }
                        }
                    }
                    continue;
                }
                Poll::Ready(Some(Err(e))) => {
                    tracing::warn!(error = %e, "upstream body failed");
                    if this.stream && this.try_move(MoveReason::ConnectionLost) {
                        continue;
                    }
                    if this.stream {
                        this.fail(UpstreamFailure::Connect)
                    } else {
                        this.finish(Some(UpstreamFailure::Connect));
                        Poll::Ready(Some(Err(std::io::Error::other(e.to_string()))))
                    }
                }
                Poll::Ready(None) => {
                    // The body ended: after the stream's end, or cut short by a worker that closed it cleanly.
                    let cut = this
                        .migration
                        .as_ref()
                        .is_some_and(|m| !m.transcript.done() && m.transcript.migratable());
                    if cut && this.try_move(MoveReason::ConnectionLost) {
                        continue;
                    }
                    // An incomplete last event, or an error that could not move: forwarded as it came.
                    let owed = this.migration.as_mut().and_then(|m| {
                        m.flush_held();
                        m.next_out()
                    });
                    if let Some(b) = owed {
                        this.body = None;
                        return this.emit(b);
                    }
                    this.finish(None);
                    Poll::Ready(None)
                }
            };
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

/// Collects a body's data frames into one [`Bytes`]. A body that comes as one data frame (a whole non-streamed
/// answer read at once: [`UpBody`] hands out what the connection read as one slice of its buffer) is that frame,
/// neither copied nor listed (`http_body_util`'s `collect` pushes every frame onto a list, one allocation even for
/// one frame). The frames of a longer body are copied into one buffer sized from its size hint (bytes). Trailers
/// are skipped, as `Collected::to_bytes` skips them. Bound the body first (`http_body_util::Limited`) when it is
/// untrusted.
///
/// Errors: the body's own, as they come.
pub async fn collect_bytes<B>(body: B) -> Result<Bytes, B::Error>
where
    B: Body<Data = Bytes>,
{
    let mut body = std::pin::pin!(body);
    let mut first: Option<Bytes> = None;
    let mut joined: Option<bytes::BytesMut> = None;
    while let Some(frame) = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        if data.is_empty() {
            continue;
        }
        if let Some(j) = &mut joined {
            j.extend_from_slice(&data);
        } else if let Some(f) = first.take() {
            let hint = body.size_hint();
            let room = hint
                .exact()
                .unwrap_or(hint.lower())
                .min(crate::upstream::READ_BUF as u64 * 16) as usize;
            let mut j = bytes::BytesMut::with_capacity(f.len() + data.len() + room);
            j.extend_from_slice(&f);
            j.extend_from_slice(&data);
            joined = Some(j);
        } else {
            first = Some(data);
        }
    }
    Ok(match joined {
        Some(j) => j.freeze(),
        None => first.unwrap_or_default(),
    })
}

impl RouterBody {
    /// The pool and worker that produced this answer, if a worker did.
    pub fn served(&self) -> Option<&crate::front::Served> {
        match self {
            RouterBody::Full(_) => None,
            RouterBody::Forward(f) => f.served.as_ref(),
            RouterBody::Ksana(m) => m.served(),
        }
    }
}

/// The router's response body.
pub enum RouterBody {
    /// Whole body.
    Full(Option<Bytes>),
    /// Forwarded upstream body.
    Forward(Box<Forward<UpBody>>),
    /// A KsanaLLM pair's stream: the decode's, watched beside the prefill's
    /// ([`crate::orchestrate::ksana::Merged`]).
    Ksana(Box<crate::orchestrate::ksana::Merged>),
}

impl std::fmt::Debug for RouterBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RouterBody::Full(b) => f
                .debug_tuple("Full")
                .field(&b.as_ref().map(Bytes::len))
                .finish(),
            RouterBody::Forward(x) => x.fmt(f),
            RouterBody::Ksana(x) => x.fmt(f),
        }
    }
}

impl Body for RouterBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        match self.get_mut() {
            RouterBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            RouterBody::Forward(f) => Pin::new(f.as_mut()).poll_frame(cx),
            RouterBody::Ksana(k) => Pin::new(k.as_mut()).poll_frame(cx),
        }
    }
    fn is_end_stream(&self) -> bool {
        match self {
            RouterBody::Full(b) => b.is_none(),
            RouterBody::Forward(f) => f.is_end_stream(),
            RouterBody::Ksana(k) => k.is_end_stream(),
        }
    }
    fn size_hint(&self) -> SizeHint {
        match self {
            RouterBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            RouterBody::Full(None) => SizeHint::with_exact(0),
            RouterBody::Forward(f) => f.body.as_ref().map(|b| b.size_hint()).unwrap_or_default(),
            RouterBody::Ksana(_) => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// A body of ready frames (a trailers frame where `None`).
    struct Frames(VecDeque<Option<&'static [u8]>>);

    impl Body for Frames {
        type Data = Bytes;
        type Error = std::io::Error;
        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
            Poll::Ready(self.get_mut().0.pop_front().map(|f| {
                Ok(match f {
                    Some(d) => Frame::data(Bytes::from_static(d)),
                    None => Frame::trailers(hyper::HeaderMap::new()),
                })
            }))
        }
    }

    fn ready<F: Future>(f: F) -> F::Output {
        let mut f = std::pin::pin!(f);
        match f
            .as_mut()
            .poll(&mut Context::from_waker(std::task::Waker::noop()))
        {
            Poll::Ready(v) => v,
            Poll::Pending => panic!("the body's frames are all ready"),
        }
    }

    #[test]
    fn one_frame_is_the_body_and_more_are_joined() {
        static WHOLE: &[u8] = b"{\"id\":1}";
        let one = ready(collect_bytes(Frames(VecDeque::from([Some(WHOLE)])))).unwrap();
        assert_eq!(one.as_ptr(), WHOLE.as_ptr(), "one frame: no copy");
        let more = Frames(VecDeque::from([
            Some(&b""[..]),
            Some(&b"ab"[..]),
            Some(&b"c"[..]),
            None,
            Some(&b"de"[..]),
        ]));
        assert_eq!(&ready(collect_bytes(more)).unwrap()[..], b"abcde");
        assert!(ready(collect_bytes(Frames(VecDeque::new())))
            .unwrap()
            .is_empty());
        // A bound still applies (and its error comes through).
        let big = http_body_util::Limited::new(Frames(VecDeque::from([Some(&b"abcdef"[..])])), 4);
        assert!(ready(collect_bytes(big)).is_err());
    }
}
