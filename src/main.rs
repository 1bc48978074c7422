//! `pdx`: the command-line entry point (router, mock engine, trace replay, demo, benchmarks).

#![forbid(unsafe_code)]

mod bench_gpu;
mod bench_kv;
mod demo;
mod logging;
mod plan;
mod profile;
mod sim;
mod units;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

/// pdx — prefill/decode exchange: router and KV-transfer data plane for disaggregated LLM serving.
#[derive(Parser)]
#[command(name = "pdx", version, about, long_about = None)]
struct Cli {
    #[command(flatten)]
    log: logging::LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The whole path on a real trace: mock prefill/decode pools, the router, KV transfer, replay.
    Demo(Box<demo::DemoArgs>),
    /// A vLLM-compatible mock prefill/decode engine with a timing model and real KV bytes.
    Mock(Box<pdx_mock::MockArgs>),
    /// The disaggregated prefill/decode router (thread per core, vLLM NixlConnector flow).
    Serve(Box<plan::ServeCmd>),
    /// Replay a request trace (Mooncake jsonl or Azure CSV, told apart by content) against an
    /// OpenAI-compatible endpoint.
    Replay(Box<pdx_replay::ReplayArgs>),
    /// Simulate a cluster on a trace in virtual time (pdx's own routing, scheduling, planner).
    Sim(Box<pdx_sim::SimArgs>),
    /// Scale pools of a live `pdx serve` with the planner (local `pdx mock` workers).
    Plan(Box<plan::PlanArgs>),
    /// Measure a worker's planner profile (prefill TTFT and throughput, decode ITL) as TOML.
    Profile(Box<profile::ProfileArgs>),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Subcommand)]
enum BenchCommand {
    /// KV-transfer bandwidth and latency (like nixlbench), with a same-run memcpy reference.
    Kv(bench_kv::KvArgs),
    /// The target process of `pdx bench kv --procs 2` (started by it).
    #[command(hide = true)]
    KvTarget(bench_kv::TargetArgs),
    /// KV pack/unpack kernels vs per-block cuMemcpyAsync and the same-run device-to-device copy (needs CUDA).
    Kernels(bench_gpu::KernelArgs),
    /// The IPC process of `pdx bench kv --mem device` (started by it).
    #[command(hide = true)]
    KvGpuTarget(bench_gpu::GpuTargetArgs),
}

/// Runs `pdx replay` and prints its report (a table, or JSON with `--json`); errors when more requests
/// failed than `--max-failed-fraction` allows.
fn replay(args: &pdx_replay::ReplayArgs) -> anyhow::Result<()> {
    let replay = pdx_replay::run(args)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&replay.report)?);
    } else {
        print!("{}", replay.report.to_table());
    }
    replay.check_failures(args.max_failed_fraction)?;
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Mock(args) => pdx_mock::run(*args)?,
        Command::Serve(args) => plan::serve(*args)?,
        Command::Demo(args) => demo::run(*args, &cli.log)?,
        Command::Replay(args) => replay(&args)?,
        Command::Sim(args) => sim::run(&args)?,
        Command::Plan(args) => plan::run(&args)?,
        Command::Profile(args) => profile::run(&args)?,
        Command::Bench(BenchCommand::Kv(args)) => bench_kv::run(args)?,
        Command::Bench(BenchCommand::KvTarget(args)) => bench_kv::run_target(args)?,
        Command::Bench(BenchCommand::Kernels(args)) => bench_gpu::run_kernels(args)?,
        Command::Bench(BenchCommand::KvGpuTarget(args)) => bench_gpu::run_gpu_target(args)?,
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let matches = Cli::command().get_matches();
    let level_given =
        matches.value_source("log_level") == Some(clap::parser::ValueSource::CommandLine);
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let result = logging::init(&cli.log, level_given).and_then(|()| run(cli));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line: the error and its causes (`{:#}`), never Rust's debug format.
            eprintln!("pdx: error: {}", format!("{e:#}").replace('\n', " "));
            std::process::ExitCode::FAILURE
        }
    }
}
