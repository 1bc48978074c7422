//! What a discovery source hands a router (issue 16): etcd keys and values through the list + watch state
//! machine, Kubernetes pods and watch events (JSON) through the pod rules and the pod watch.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = pdx_discovery::fuzzing::source(data);
});
