//! A worker's `/metrics` body, as the router's telemetry scraper reads it (the strict Prometheus text parser of
//! `pdx-protocol` and the engine-gauge extraction).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = pdx_router::fuzzing::metrics_text(data);
});
