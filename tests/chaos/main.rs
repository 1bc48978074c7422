//! Chaos suite: regression tests for user-causable faults, driving the real `pdx` binary or the library crates.
//! Each area has its own module; every test is bounded in time and cleans up its child processes.

mod agent_trust;
