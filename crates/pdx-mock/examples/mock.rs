//! Standalone `pdx mock` (same flags), for benchmarks and peer-router checks without the
//! `pdx` binary: `cargo run --release -p pdx-mock --example mock -- --instant --port 8000`.

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = <pdx_mock::MockArgs as clap::Parser>::parse();
    pdx_mock::run(args)?;
    Ok(())
}
