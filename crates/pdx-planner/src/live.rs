//! `pdx plan`: the standalone driver (filled in below).
