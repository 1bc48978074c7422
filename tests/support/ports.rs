//! Loopback ports for test servers, shared by the CLI tests (`tests/support`) and `pdx-discovery`'s tests (included
//! by path).

/// A loopback port that was free a moment ago, below the kernel's ephemeral range.
///
/// Why not port 0's answer: that port comes from the ephemeral range, which the kernel also hands out as the local
/// port of outgoing connections; between this call and the server's bind, a connection made by a test running
/// beside this one could take it, and the server would fail to bind ("address in use"). Ports below the range are
/// only ever taken by an explicit bind. Each call in a process gets another port (a counter), starting at a place
/// set by the process id, so test binaries running side by side start apart; a port found bound is skipped.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOWEST: u32 = 20_000;
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    let span = ephemeral_low.saturating_sub(LOWEST).max(1_000);
    let start = std::process::id().wrapping_mul(7_919) % span;
    for _ in 0..span {
        let port = LOWEST + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        let Ok(port) = u16::try_from(port) else {
            continue;
        };
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {LOWEST}..{}", LOWEST + span);
}
