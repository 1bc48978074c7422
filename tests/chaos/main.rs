//! Chaos suite: regression tests for faults a user can cause, driving the real `pdx` binary. One module per
//! area; every test is bounded in time and kills its child processes on drop.

#[path = "../support/mod.rs"]
mod support;

mod first_hour;
