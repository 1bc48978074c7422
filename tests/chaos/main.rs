//! The chaos suite (issue 13): one regression test per fault a user or a peer can cause, run against the real
//! `pdx` binary or the library crates, each bounded in time and cleaning up its child processes on failure.
//! The fuzz targets of every parser of untrusted input live in `fuzz/` (`fuzz/run.sh`).

mod planner;
