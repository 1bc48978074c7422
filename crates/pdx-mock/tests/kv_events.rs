//! KV events of a live mock over ZMQ, read with the `zeromq` crate's own SUB and DEALER sockets: a request
//! publishes `BlockStored` with its prompt's token ids as `[topic, sequence, payload]`, the replay socket
//! answers every buffered batch from a start sequence and then vLLM's end marker, and
//! `/reset_prefix_cache` publishes `AllBlocksCleared`.

mod common;
use common::*;
use pdx_mock::kv_cache::KvCacheEvent;
use pdx_mock::kv_events::encode_batch;
use std::time::Duration;
use zeromq::{Socket, SocketRecv, SocketSend};

async fn recv(s: &mut impl SocketRecv) -> Vec<bytes::Bytes> {
    tokio::time::timeout(Duration::from_secs(10), s.recv())
        .await
        .expect("a message within 10 s")
        .expect("recv")
        .into_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_publishes_its_blocks_and_the_replay_socket_answers_from_a_sequence() {
    let s = start(&[
        "--instant",
        "--block-size",
        "4",
        "--kv-events-config",
        r#"{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"tcp://127.0.0.1:0",
            "replay_endpoint":"tcp://127.0.0.1:0","topic":"kv-events","buffer_steps":10}"#,
    ]);
    let p = s.engine.kv_events().expect("publisher");
    let (ep, rep) = (p.endpoint, p.replay_endpoint.expect("replay socket"));
    let mut sub = zeromq::SubSocket::new();
    sub.connect(&format!("tcp://{ep}")).await.unwrap();
    sub.subscribe("").await.unwrap();
    // A PUB socket drops what it sends before the subscription arrives: clear the (empty) cache until one
    // `AllBlocksCleared` comes through.
    let mut subscribed = false;
    for _ in 0..50 {
        let (st, _) = call(s.addr, "POST", "/reset_prefix_cache", None).await;
        assert_eq!(st, 200);
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(200), sub.recv()).await {
            subscribed = true;
            break;
        }
    }
    assert!(subscribed, "no event batch reached the subscriber");
    let prompt = "one two three four five six seven eight nine";
    let body = serde_json::json!({"model": "mock", "prompt": prompt, "max_tokens": 1});
    let (st, _) = post_json(s.addr, "/v1/completions", &body).await;
    assert_eq!(st, 200);
    let m = recv(&mut sub).await;
    assert_eq!(m.len(), 3, "[topic, sequence, payload]");
    assert_eq!(&m[0][..], b"kv-events");
    let seq = u64::from_be_bytes(m[1][..].try_into().unwrap());
    // The payload is exactly the encoding of the prompt's two full blocks (9 tokens, 4 per block).
    let mut ids = Vec::new();
    s.engine.tokenizer.encode(prompt, &mut ids).unwrap();
    let h = pdx_mock::kv_cache::block_hashes(&ids, 4);
    let stored = KvCacheEvent::BlockStored {
        block_hashes: h[..2].to_vec(),
        parent_block_hash: None,
        token_ids: ids[..8].to_vec(),
        block_size: 4,
    };
    let ts = f64::from_be_bytes(m[2][2..10].try_into().unwrap());
    assert_eq!(m[2][..], encode_batch(ts, &[stored])[..]);

    // Clearing the cache publishes AllBlocksCleared as the next batch.
    let (st, _) = call(s.addr, "POST", "/reset_prefix_cache", None).await;
    assert_eq!(st, 200);
    let m = recv(&mut sub).await;
    assert_eq!(u64::from_be_bytes(m[1][..].try_into().unwrap()), seq + 1);
    let ts = f64::from_be_bytes(m[2][2..10].try_into().unwrap());
    assert_eq!(
        m[2][..],
        encode_batch(ts, &[KvCacheEvent::AllBlocksCleared])[..]
    );

    // Replay from `seq`: both batches, then the end marker (-1, empty payload).
    let mut dealer = zeromq::DealerSocket::new();
    dealer.connect(&format!("tcp://{rep}")).await.unwrap();
    let req = zeromq::ZmqMessage::try_from(vec![
        bytes::Bytes::new(),
        bytes::Bytes::copy_from_slice(&seq.to_be_bytes()),
    ])
    .unwrap();
    dealer.send(req).await.unwrap();
    let mut got = Vec::new();
    loop {
        let f = recv(&mut dealer).await;
        assert_eq!(f.len(), 3, "[empty, sequence, payload]");
        assert!(f[0].is_empty());
        if f[1][..] == [0xff; 8] {
            assert!(f[2].is_empty());
            break;
        }
        got.push(u64::from_be_bytes(f[1][..].try_into().unwrap()));
    }
    assert_eq!(got, vec![seq, seq + 1]);
    assert_eq!(p.dropped(), 0);
    s.stop();
}

#[test]
fn bad_kv_events_configs_stop_the_mock_from_starting() {
    for bad in [
        r#"{"enable_kv_cache_events":true,"endpoint":"ipc:///tmp/pdx"}"#,
        r#"{"enable_kv_cache_events":true,"unknown":1}"#,
        "not json",
    ] {
        let args = <pdx_mock::MockArgs as clap::Parser>::try_parse_from([
            "pdx-mock",
            "--port",
            "0",
            "--host",
            "127.0.0.1",
            "--kv-events-config",
            bad,
        ])
        .unwrap();
        assert!(pdx_mock::start(args).is_err(), "{bad}");
    }
}
