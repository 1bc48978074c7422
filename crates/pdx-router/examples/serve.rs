//! `pdx serve` without the `pdx` CLI: `cargo run --release -p pdx-router --example serve -- FLAGS`.
//! With `--features mimalloc`, on mimalloc instead of the system allocator (the allocator measurement of
//! docs/benchmarks.md "Router").

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    pdx_router::run(<pdx_router::ServeArgs as clap::Parser>::parse())?;
    Ok(())
}
