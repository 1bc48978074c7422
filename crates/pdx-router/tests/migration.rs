//! Stream migration in the forwarding body, with scripted upstream bodies: a stream whose upstream breaks (or
//! sends a 5xx error event) continues on the re-issued one, and the client sees one stream: the first
//! upstream's `id` throughout, one role chunk, every token once, one usage total, one `[DONE]`.

use bytes::Bytes;
use hyper::body::{Body, Frame};
use pdx_router::body::Forward;
use pdx_router::migrate::{Migration, Reissue, Resumed, Resuming};
use pdx_router_core::{MoveReason, Transcript};
use std::cell::RefCell;
use std::collections::VecDeque;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

/// An upstream body playing a script of frames and failures.
struct Script(VecDeque<Result<&'static str, &'static str>>);

impl Body for Script {
    type Data = Bytes;
    type Error = std::io::Error;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Poll::Ready(self.0.pop_front().map(|r| match r {
            Ok(s) => Ok(Frame::data(Bytes::from_static(s.as_bytes()))),
            Err(e) => Err(std::io::Error::other(e)),
        }))
    }
}

/// What the fake re-issuer was asked.
#[derive(Default, Debug)]
struct Asked {
    moves: Vec<(MoveReason, String, u32)>,
}

/// Re-issues with the next scripted continuation (none left: the move fails).
struct Fake {
    next: VecDeque<Script>,
    asked: Rc<RefCell<Asked>>,
}

impl Reissue<Script> for Fake {
    fn start(
        &mut self,
        t: &Transcript,
        reason: MoveReason,
        _: Option<&std::sync::Arc<pdx_router::registry::Worker>>,
    ) -> Option<Resuming<Script>> {
        self.asked
            .borrow_mut()
            .moves
            .push((reason, t.text().unwrap(), t.tokens()));
        let next = self.next.pop_front();
        Some(Box::pin(async move {
            next.map(|body| Resumed { body, guard: None })
        }))
    }
}

fn chunk(id: &str, content: &str, finish: Option<&str>) -> String {
    let f = finish.map_or("null".to_string(), |f| format!("\"{f}\""));
    format!(
        "data: {{\"id\":\"{id}\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{content}\"}},\"logprobs\":null,\"finish_reason\":{f}}}]}}\n\n"
    )
}

fn role(id: &str) -> String {
    format!("data: {{\"id\":\"{id}\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{{\"index\":0,\"delta\":{{\"role\":\"assistant\",\"content\":\"\"}},\"logprobs\":null,\"finish_reason\":null}}]}}\n\n")
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

/// Polls `fwd` to its end; the client's bytes.
fn drain(mut fwd: Forward<Script>) -> String {
    let mut cx = Context::from_waker(Waker::noop());
    let mut out = Vec::new();
    for _ in 0..10_000 {
        match Pin::new(&mut fwd).poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(f))) => out.extend_from_slice(&f.into_data().unwrap()),
            Poll::Ready(None) => return String::from_utf8(out).unwrap(),
            Poll::Ready(Some(Err(e))) => panic!("stream error {e}"),
            Poll::Pending => panic!("a scripted stream never waits"),
        }
    }
    panic!("the stream did not end")
}

fn forward(first: Script, next: Vec<Script>) -> (Forward<Script>, Rc<RefCell<Asked>>) {
    let asked = Rc::new(RefCell::new(Asked::default()));
    let mut fwd = Forward::bare(first, true);
    fwd.migration = Some(Box::new(Migration::new(
        true,
        16,
        Box::new(Fake {
            next: next.into(),
            asked: asked.clone(),
        }),
        None,
    )));
    (fwd, asked)
}

fn events(s: &str) -> Vec<serde_json::Value> {
    s.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(|p| serde_json::from_str(p).unwrap_or_else(|_| serde_json::Value::String(p.into())))
        .collect()
}

/// The continuation of a chat stream after `sent` tokens: its own id, a role chunk, `more` tokens, the usage
/// (`prompt` tokens: the original's plus the `sent` it appended), `[DONE]`.
fn continuation(sent: u32, more: &[&str], prompt: u32) -> Script {
    let mut s: Vec<Result<&'static str, &'static str>> = vec![Ok(leak(role("B")))];
    for (i, t) in more.iter().enumerate() {
        let fin = (i + 1 == more.len()).then_some("length");
        s.push(Ok(leak(chunk("B", t, fin))));
    }
    let n = more.len() as u32;
    s.push(Ok(leak(format!(
        "data: {{\"id\":\"B\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[],\"usage\":{{\"prompt_tokens\":{},\"completion_tokens\":{n},\"total_tokens\":{}}}}}\n\n",
        prompt + sent,
        prompt + sent + n
    ))));
    s.push(Ok("data: [DONE]\n\n"));
    Script(s.into())
}

fn check_one_stream(out: &str, tokens: &[&str], prompt: u64) {
    let ev = events(out);
    assert_eq!(
        ev.last(),
        Some(&serde_json::Value::String("[DONE]".into())),
        "{out}"
    );
    assert!(!out.contains("\"error\""), "{out}");
    let chunks: Vec<&serde_json::Value> = ev.iter().filter(|e| e.is_object()).collect();
    assert!(chunks.iter().all(|c| c["id"] == "A"), "one id: {out}");
    let roles = chunks
        .iter()
        .filter(|c| c["choices"][0]["delta"]["role"].is_string())
        .count();
    assert_eq!(roles, 1, "{out}");
    let text: Vec<&str> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .filter(|t| !t.is_empty())
        .collect();
    assert_eq!(text, tokens, "every token once, in order");
    let usage: Vec<&&serde_json::Value> =
        chunks.iter().filter(|c| c["usage"].is_object()).collect();
    assert_eq!(usage.len(), 1, "{out}");
    let u = &usage[0]["usage"];
    assert_eq!(u["prompt_tokens"], prompt);
    assert_eq!(u["completion_tokens"], tokens.len() as u64);
    assert_eq!(u["total_tokens"], prompt + tokens.len() as u64);
}

#[test]
fn a_broken_upstream_continues_on_the_reissued_one() {
    let a1 = chunk("A", " one", None);
    // The third token event arrives in two frames; the connection breaks after the first half of the fourth,
    // which the client must never see.
    let a3 = chunk("A", " three", None);
    let (a3a, a3b) = a3.split_at(40);
    let a4 = chunk("A", " four", None);
    let first = Script(
        vec![
            Ok(leak(role("A") + &a1)),
            Ok(leak(chunk("A", " two", None))),
            Ok(leak(a3a.to_string())),
            Ok(leak(a3b.to_string())),
            Ok(leak(a4[..30].to_string())),
            Err("connection reset"),
        ]
        .into(),
    );
    let (fwd, asked) = forward(first, vec![continuation(3, &[" five", " six"], 20)]);
    let out = drain(fwd);
    check_one_stream(&out, &[" one", " two", " three", " five", " six"], 20);
    assert!(
        !out.contains(" four"),
        "half an event of the failed worker: {out}"
    );
    let a = asked.borrow();
    assert_eq!(
        a.moves,
        vec![(MoveReason::ConnectionLost, " one two three".to_string(), 3)]
    );
}

#[test]
fn a_server_error_event_moves_the_stream_twice_if_need_be() {
    let first = Script(
        vec![
            Ok(leak(role("A"))),
            Ok(leak(chunk("A", " a", None))),
            Ok(leak(
                chunk("A", " b", None)
                    + "data: {\"error\":{\"message\":\"engine died\",\"type\":\"InternalServerError\",\"param\":null,\"code\":500}}\n\n",
            )),
        ]
        .into(),
    );
    // The first continuation ends cleanly but early (no finish, no [DONE]): moved again.
    let second = Script(vec![Ok(leak(role("B"))), Ok(leak(chunk("B", " c", None)))].into());
    let (fwd, asked) = forward(first, vec![second, continuation(3, &[" d"], 7)]);
    let out = drain(fwd);
    check_one_stream(&out, &[" a", " b", " c", " d"], 7);
    let a = asked.borrow();
    assert_eq!(a.moves.len(), 2, "{a:?}");
    assert_eq!(a.moves[0], (MoveReason::ServerError, " a b".into(), 2));
    assert_eq!(a.moves[1], (MoveReason::ConnectionLost, " a b c".into(), 3));
}

#[test]
fn a_move_that_finds_no_worker_ends_with_the_error_event() {
    let first = Script(
        vec![
            Ok(leak(role("A"))),
            Ok(leak(chunk("A", " a", None))),
            Err("reset"),
        ]
        .into(),
    );
    let (fwd, _) = forward(first, vec![]);
    let out = drain(fwd);
    let ev = events(&out);
    assert!(
        ev.last().unwrap()["error"]["code"] == 502,
        "ends with the router's error event: {out}"
    );
    assert!(!out.contains("[DONE]"));
}

#[test]
fn a_finished_stream_never_moves() {
    let first = Script(
        vec![
            Ok(leak(role("A"))),
            Ok(leak(chunk("A", " a", Some("length")))),
            Err("reset after the end"),
        ]
        .into(),
    );
    let (fwd, asked) = forward(first, vec![continuation(1, &[" x"], 1)]);
    let out = drain(fwd);
    assert!(asked.borrow().moves.is_empty());
    assert!(!out.contains(" x"), "{out}");
}

mod common;

/// Reads a streamed response to its end: the token texts and the usage block.
async fn read_stream(
    resp: hyper::Response<hyper::body::Incoming>,
) -> (Vec<String>, serde_json::Value) {
    use http_body_util::BodyExt;
    let b = resp.into_body().collect().await.expect("body").to_bytes();
    let ev = common::events(&b);
    assert_eq!(ev.last().map(String::as_str), Some("[DONE]"), "{ev:?}");
    let chunks: Vec<serde_json::Value> = ev[..ev.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let id = &chunks[0]["id"];
    assert!(chunks.iter().all(|c| &c["id"] == id), "one id");
    let tokens = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect();
    let usage = chunks
        .iter()
        .find(|c| c["usage"].is_object())
        .map(|c| c["usage"].clone())
        .expect("usage");
    (tokens, usage)
}

/// Voluntary migration: two long streams on one decode worker and none on the other (a short one has ended
/// there). With a load-gap threshold of 0.3 and a budget of one move, exactly one stream moves to the idle
/// worker, at its next check, and both still get every token they asked for.
#[tokio::test(flavor = "current_thread")]
async fn a_load_gap_moves_one_stream_under_the_budget() {
    let p = common::mock(&["--role", "prefill", "--instant"]);
    let d1 = common::mock(&["--role", "decode", "--speed", "0.1"]);
    let d2 = common::mock(&["--role", "decode", "--speed", "0.1"]);
    let r = common::pd(
        &[&p],
        &[&d1, &d2],
        &[
            "--migration-gap-threshold",
            "0.3",
            "--migration-budget",
            "1",
            // Admission of the decode pool on, never limiting here: the moved stream keeps its slot.
            "--admission-itl-target-ms",
            "10000",
        ],
    );
    let body = |n: u32| {
        let mut b = common::chat(n, true);
        b["stream_options"] = serde_json::json!({"include_usage": true});
        b.to_string()
    };
    let send = |b: String| common::send(r.addr, "POST", "/v1/chat/completions", &[], b);
    // Round robin: the first and third go to one decode worker, the short second to the other.
    let long1 = send(body(150)).await;
    let short = send(body(3)).await;
    let (short_tokens, _) = read_stream(short).await;
    assert_eq!(short_tokens.len(), 3);
    let long2 = send(body(150)).await;
    let ((t1, u1), (t2, u2)) = tokio::join!(read_stream(long1), read_stream(long2));
    for (t, u) in [(&t1, &u1), (&t2, &u2)] {
        assert_eq!(t.len(), 150);
        assert_eq!(u["completion_tokens"], 150, "{u}");
        assert_eq!(u["prompt_tokens"], 42, "{u}");
    }
    let m = common::router_metrics(&r);
    assert_eq!(
        common::sample(&m, "pdx_migrations_total", "reason=\"score_gap\""),
        1.0,
        "{m}"
    );
    // Three requests took three slots of the decode pool; the continuation took none.
    assert_eq!(
        common::sample(&m, "pdx_admission_total", "outcome=\"admitted\""),
        3.0,
        "{m}"
    );
    // The worker the stream left aborted it.
    let aborted = common::mock_metric(&d1, "vllm:request_success_total", "abort")
        + common::mock_metric(&d2, "vllm:request_success_total", "abort");
    assert_eq!(aborted, 1.0);
}
