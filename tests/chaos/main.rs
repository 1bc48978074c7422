//! The chaos suite (issue 13): one regression test per fault a user or a peer can cause, run against the real
//! `pdx` binary or the library crates, one module per area, each test bounded in time and killing its child
//! processes even when it fails. The fuzz targets of every parser of untrusted input live in `fuzz/`
//! (`fuzz/run.sh`).

#[path = "../support/mod.rs"]
mod support;

mod agent_trust;
mod caller_memory;
mod codec;
mod first_hour;
mod front;
mod ksana;
mod ksana_node;
mod kv_events;
mod kv_peer_death;
mod migration;
mod planner;
mod policies;
mod router_faults;
mod scale_out;
mod sse_split;
mod transfer;
mod uring;
