//! Chaos suite: regression tests for user-causable faults, one module per area (see `docs/`), each
//! driving the real `pdx` binary or the library crates, bounded in time, cleaning up its child processes.

mod router_faults;
