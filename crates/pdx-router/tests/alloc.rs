//! The forwarding path allocates nothing per chunk: the router's `Forward` body hands each
//! upstream frame on as the same `Bytes` while scanning SSE boundaries. Plain forwarding allocates
//! nothing at all; a movable stream keeps a transcript of the text sent, whose buffer starts small and
//! doubles, so it may allocate a small constant plus log2 of the bytes forwarded per stream, never a
//! number that grows with the chunks. Counted with `stats_alloc` (a safe wrapper of
//! `std::alloc::System`; no `unsafe` in this file).

use bytes::Bytes;
use hyper::body::{Body, Frame};
use pdx_router::body::Forward;
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};
use std::alloc::System;
use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// An upstream body that yields pre-built chunks.
struct Chunks(VecDeque<Bytes>);

impl Body for Chunks {
    type Data = Bytes;
    type Error = std::io::Error;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
    }
}

#[test]
fn forwarding_a_chunk_allocates_nothing_and_keeps_the_bytes() {
    const N: usize = 10_000;
    let event = br#"data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"mock","choices":[{"index":0,"delta":{"content":" word"},"finish_reason":null}]}

"#;
    let chunks: VecDeque<Bytes> = (0..N).map(|_| Bytes::copy_from_slice(event)).collect();
    let ptrs: Vec<*const u8> = chunks.iter().map(|b| b.as_ptr()).collect();
    let mut fwd = Forward::bare(Chunks(chunks), true);
    fwd.metrics = Some(std::sync::Arc::new(pdx_router::metrics::Metrics::new()));
    let mut cx = Context::from_waker(Waker::noop());
    let mut out_ptrs = Vec::with_capacity(N);
    let region = Region::new(GLOBAL);
    loop {
        match Pin::new(&mut fwd).poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(f))) => {
                let d = f.into_data().unwrap();
                out_ptrs.push(d.as_ptr());
                drop(d);
            }
            Poll::Ready(None) => break,
            other => panic!("unexpected {:?}", other.map(|o| o.map(|r| r.is_ok()))),
        }
    }
    let change = region.change();
    // Dropping the forwarded Bytes frees them (N deallocations are expected); nothing new is
    // allocated while forwarding.
    assert_eq!(change.allocations, 0, "{change:?}");
    assert_eq!(change.reallocations, 0, "{change:?}");
    assert_eq!(out_ptrs, ptrs, "the same buffers are forwarded");
    assert_eq!(fwd.stats.events, N as u64);
    a_movable_stream_forwards_its_chunks_without_allocating();
    closed_loop_accounting_allocates_nothing_per_chunk_nor_at_the_end();
}

/// Allocations (new or grown) one stream may make while forwarding `bytes` bytes: a small constant plus
/// log2 of the bytes. A buffer that doubles from a fixed first size stays under it; anything allocating per
/// chunk (10,000 chunks here) is far above it.
fn per_stream_bound(bytes: usize) -> usize {
    4 + (usize::BITS - bytes.leading_zeros()) as usize
}

/// A re-issuer that is never asked (the stream does not fail).
struct Never;
impl pdx_router::migrate::Reissue<Chunks> for Never {
    fn start(
        &mut self,
        _: &pdx_router_core::Transcript,
        _: pdx_router_core::MoveReason,
        _: Option<&std::sync::Arc<pdx_router::registry::Worker>>,
    ) -> Option<pdx_router::migrate::Resuming<Chunks>> {
        None
    }
}

/// The same with stream migration on (as `pdx serve` forwards a movable stream): the transcript reads every
/// event and the frames still go out as they came, with no allocation per chunk: the transcript's text
/// buffer grows by doubling, at most [`per_stream_bound`] allocations for the stream. (Part of the test above:
/// the counts are process-wide, and the test harness allocates while it starts another test's thread.)
fn a_movable_stream_forwards_its_chunks_without_allocating() {
    const N: usize = 10_000;
    let event = br#"data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"mock","choices":[{"index":0,"delta":{"content":" word"},"finish_reason":null}]}

"#;
    let last = br#"data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"mock","choices":[{"index":0,"delta":{"content":" end"},"finish_reason":"length"}]}

data: [DONE]

"#;
    let mut chunks: VecDeque<Bytes> = (1..N).map(|_| Bytes::copy_from_slice(event)).collect();
    chunks.push_back(Bytes::copy_from_slice(last));
    let ptrs: Vec<*const u8> = chunks.iter().map(|b| b.as_ptr()).collect();
    let bytes: usize = chunks.iter().map(Bytes::len).sum();
    let mut fwd = Forward::bare(Chunks(chunks), true);
    fwd.metrics = Some(std::sync::Arc::new(pdx_router::metrics::Metrics::new()));
    fwd.migration = Some(Box::new(pdx_router::migrate::Migration::new(
        true,
        N as u32,
        Box::new(Never),
        None,
    )));
    let mut cx = Context::from_waker(Waker::noop());
    let mut out_ptrs = Vec::with_capacity(N);
    let region = Region::new(GLOBAL);
    loop {
        match Pin::new(&mut fwd).poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(f))) => {
                let d = f.into_data().unwrap();
                out_ptrs.push(d.as_ptr());
                drop(d);
            }
            Poll::Ready(None) => break,
            other => panic!("unexpected {:?}", other.map(|o| o.map(|r| r.is_ok()))),
        }
    }
    let change = region.change();
    let made = change.allocations + change.reallocations;
    let bound = per_stream_bound(bytes);
    assert!(
        made <= bound,
        "{made} allocations forwarding {bytes} B in {N} chunks (bound {bound}): {change:?}"
    );
    // Only the transcript's text grew (from 512 B, 5 B a chunk: 7 doublings to 64 KiB); nothing new. One
    // growth per few hundred chunks would still pass the bound above, not this.
    assert!((1..=8).contains(&change.reallocations), "{change:?}");
    assert_eq!(change.allocations, 0, "{change:?}");
    assert_eq!(out_ptrs, ptrs, "the same buffers are forwarded");
    assert_eq!(fwd.stats.events, N as u64);
    let t = &fwd.migration.as_ref().unwrap().transcript;
    assert_eq!(t.tokens(), N as u32);
    assert!(t.finished() && t.done());
}

/// With a worker behind the stream (the `score` policy's per-chunk accounting of output tokens still to
/// come, and the telemetry fed at the stream's end), forwarding still allocates nothing, end included. Run by
/// the test above, not as a test of its own: the counting allocator sees every thread, so two measuring tests
/// must not run at once.
fn closed_loop_accounting_allocates_nothing_per_chunk_nor_at_the_end() {
    use pdx_router::registry::{LoadGuard, Registry};
    use std::sync::atomic::Ordering;
    const N: usize = 2_000;
    let event = br#"data: {"id":"cmpl-1","object":"text_completion","created":1,"model":"mock","choices":[{"index":0,"text":" word","finish_reason":null}]}

"#;
    let args = <pdx_router::ServeArgs as clap::Parser>::parse_from([
        "pdx-serve",
        "--worker",
        "http://127.0.0.1:1",
    ]);
    let registry = Registry::new(&pdx_router::Config::from_args(&args).unwrap()).unwrap();
    let worker = registry.workers()[0].clone();
    let chunks: VecDeque<Bytes> = (0..N).map(|_| Bytes::copy_from_slice(event)).collect();
    let mut fwd = Forward::bare(Chunks(chunks), true);
    fwd.metrics = Some(std::sync::Arc::new(pdx_router::metrics::Metrics::new()));
    fwd.registry = Some(registry.clone());
    // 100 prompt tokens and N output tokens in flight.
    let mut guard = LoadGuard::new(worker.clone(), 100 + N as u64);
    guard.track_output(N as u64);
    fwd.guard = Some(guard);
    let mut cx = Context::from_waker(Waker::noop());
    let mut half = 0;
    let region = Region::new(GLOBAL);
    for k in 0.. {
        match Pin::new(&mut fwd).poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(f))) => drop(f),
            Poll::Ready(None) => break,
            other => panic!("unexpected {:?}", other.map(|o| o.map(|r| r.is_ok()))),
        }
        if k == N / 2 - 1 {
            half = worker.in_flight_tokens.load(Ordering::Relaxed);
        }
    }
    let change = region.change();
    assert_eq!(change.allocations, 0, "{change:?}");
    assert_eq!(change.reallocations, 0, "{change:?}");
    // Half the output streamed: the worker's tokens in flight count what is left.
    assert_eq!(half, 100 + (N / 2) as u64);
    drop(fwd);
    assert_eq!(worker.in_flight_tokens.load(Ordering::Relaxed), 0);
    assert_eq!(worker.in_flight.load(Ordering::Relaxed), 0);
    let s = worker.telemetry_snapshot(registry.now_us());
    assert!(s.ttft_s.is_some() && s.tpot_s.is_some(), "{s:?}");
}
