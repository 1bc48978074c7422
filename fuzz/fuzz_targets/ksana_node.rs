//! What a KsanaLLM node (`pdx mock --ksana-router`) reads from its router and its peers: a heartbeat answer, a
//! comm id, a prefill's KV notice, and a client's `/generate` body.
#![no_main]
use libfuzzer_sys::fuzz_target;
use pdx_mock::ksana::{CommId, KsanaConfig, KsanaNode, KvNotice};
use std::sync::OnceLock;

fn node() -> &'static KsanaNode {
    static NODE: OnceLock<KsanaNode> = OnceLock::new();
    NODE.get_or_init(|| {
        let cfg = KsanaConfig {
            router: "http://127.0.0.1:9".into(),
            cluster_name: None,
            role: pdx_mock::Role::Prefill,
            node_rank: 0,
            world_size: 1,
            devices: 1,
            inference_addr: "127.0.0.1:1000".into(),
            coordinator_addr: "127.0.0.1:1001".parse().unwrap(),
            engine_id: "fuzz".into(),
            heartbeat: std::time::Duration::from_secs(5),
            kv_wait: std::time::Duration::from_secs(1),
        };
        KsanaNode::new(cfg, 64).unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    let _ = node().apply_heartbeat(data);
    let _ = KvNotice::decode(data, 64);
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = CommId::parse(s);
    }
    let _ = pdx_mock::ksana_generate::parse(&pdx_mock::Tokenizer::Builtin, data);
});
