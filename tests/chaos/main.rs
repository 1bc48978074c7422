//! Chaos suite: regression tests for faults a user can cause, driving the real `pdx` binary. One module
//! per area; every test is bounded in time and kills its child processes even when it fails.

mod front;
