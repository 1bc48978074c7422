//! A KsanaLLM node API request (`POST /RegisterNode`, `/Heartbeat`, `/RegisterCommId`): the first byte picks the
//! route and whether a content type is sent, the rest is the body, run against a registry that already holds a
//! ready prefill/decode pair (pdx-ksana's sans-IO state: no database).
#![no_main]
use libfuzzer_sys::fuzz_target;
use pdx_ksana::state::{Registry, Route, Settings, Tables};
use pdx_ksana::Ts;

fn registry() -> Registry {
    let mut r = Registry::new(Settings::default(), Tables::default());
    let mut n = 0;
    let mut id = || {
        n += 1;
        format!("n{n}")
    };
    let now = Ts(1_800_000_000_000_000);
    for (addr, coord, role) in [("127.0.0.1:1", "127.0.0.1:11", "prefill"), ("127.0.0.1:2", "127.0.0.1:12", "decode")] {
        let body = format!(
            r#"{{"inference_addr":"{addr}","coordinator_addr":"{coord}","group_role":"{role}","node_rank":0,"world_size":1,"devices":[{{"device_id":0,"device_ip":"x"}}]}}"#
        );
        r.handle(Route::RegisterNode, None, body.as_bytes(), now, &mut id);
    }
    for node in ["n1", "n2"] {
        r.handle(Route::Heartbeat, None, format!(r#"{{"node_id":"{node}"}}"#).as_bytes(), now, &mut id);
    }
    r.handle(
        Route::RegisterCommId,
        None,
        br#"{"node_id":"n1","comm_key":"127.0.0.1:1__127.0.0.1:2","comm_id":"c"}"#,
        now,
        &mut id,
    );
    r
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, body)) = data.split_first() else {
        return;
    };
    let route = match sel % 3 {
        0 => Route::RegisterNode,
        1 => Route::Heartbeat,
        _ => Route::RegisterCommId,
    };
    let ctype: Option<&[u8]> = if sel & 4 == 0 { None } else { Some(b"text/plain") };
    let mut r = registry();
    let mut id = || "fuzz".to_string();
    let reply = r.handle(route, ctype, body, Ts(1_800_000_001_000_000), &mut id);
    assert!((200..600).contains(&reply.status));
    // The registry stays usable: expiry and the pair list never panic either.
    r.expire(Ts(1_900_000_000_000_000));
    let _ = r.ready_pairs();
});
