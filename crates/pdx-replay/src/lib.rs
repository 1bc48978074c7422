//! `pdx replay`: replays a real request trace against any OpenAI-compatible endpoint and reports TTFT, ITL,
//! TPOT, end-to-end latency (mean, p50/p90/p99), request and token throughput, SLO attainment and goodput.
//!
//! - Trace formats: Mooncake jsonl and Azure CSV ([`trace`]). Arrival times are kept, scaled by `--speed`.
//! - Prompts have the exact input length for pdx's built-in tokenizer. They are built from real text
//!   ([`prompt`]), and Mooncake `hash_ids` become real shared prefixes.
//! - `max_tokens` = the trace's output length, with `min_tokens` and `ignore_eos` so the server produces
//!   exactly that many tokens (`--no-ignore-eos` for servers that reject the fields). Responses are
//!   streamed with `stream_options.include_usage`.

#![forbid(unsafe_code)]

pub mod client;
pub mod plot;
pub mod prompt;
pub mod rate;
pub mod report;
pub mod trace;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use indicatif::{ProgressBar, ProgressStyle};

pub use report::{Report, Slo};

/// Errors of the replayer.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The trace could not be read or parsed (fatal).
    #[error("trace: {0}")]
    Trace(String),
    /// The prompt corpus could not be read or is too short (fatal).
    #[error("corpus: {0}")]
    Corpus(String),
    /// Bad arguments (fatal).
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// The runtime could not start (retryable).
    #[error("runtime: {0}")]
    Runtime(#[from] std::io::Error),
}

/// The Mooncake conversation-trace slice shipped with pdx (first 1,000 requests; see `data/README.md`).
pub const MOONCAKE_CONVERSATION_SLICE: &str =
    include_str!("../data/mooncake_conversation_head1000.jsonl");
const GSM8K_SLICE: &str = include_str!("../data/gsm8k_test_head200.jsonl");
const MT_BENCH: &str = include_str!("../data/mt_bench_question.jsonl");

/// Which OpenAI endpoint to call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Endpoint {
    /// `/v1/chat/completions` (one user message; the prompt includes the chat template's tokens).
    Chat,
    /// `/v1/completions` (raw prompt).
    Completions,
}

/// `pdx replay` arguments.
#[derive(Clone, Debug, clap::Args)]
pub struct ReplayArgs {
    /// Base URL of the OpenAI-compatible server, e.g. `http://127.0.0.1:8000`.
    #[arg(long)]
    pub url: String,
    /// Trace file (Mooncake jsonl or Azure CSV). Default: the Mooncake conversation slice shipped with pdx.
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Model name to request. Default: the first model of `GET /v1/models`.
    #[arg(long)]
    pub model: Option<String>,
    /// Endpoint.
    #[arg(long, value_enum, default_value_t = Endpoint::Chat)]
    pub endpoint: Endpoint,
    /// Time factor: 2 replays twice as fast as recorded.
    #[arg(long, default_value_t = 1.0)]
    pub speed: f64,
    /// Replay only requests that arrive within this many seconds (after `--speed`).
    #[arg(long)]
    pub duration: Option<f64>,
    /// Replay at most this many requests.
    #[arg(long)]
    pub max_requests: Option<usize>,
    /// Requests in flight at most (later arrivals wait).
    #[arg(long)]
    pub concurrency_limit: Option<usize>,
    /// Multiply every input and output length by this factor (at least 1 token each), to fit a trace
    /// to a small deployment.
    #[arg(long, default_value_t = 1.0)]
    pub scale_tokens: f64,
    /// Prompt text files (GSM8K / MT-Bench jsonl, or plain text). Default: the slices shipped with pdx.
    #[arg(long)]
    pub corpus: Vec<PathBuf>,
    /// TTFT target for SLO attainment and goodput, ms.
    #[arg(long)]
    pub slo_ttft_ms: Option<f64>,
    /// ITL (TPOT) target for SLO attainment and goodput, ms.
    #[arg(long)]
    pub slo_itl_ms: Option<f64>,
    /// Per-request time limit, s.
    #[arg(long, default_value_t = 600.0)]
    pub timeout: f64,
    /// Do not send `ignore_eos` / `min_tokens`.
    #[arg(long)]
    pub no_ignore_eos: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Write a PNG of TTFT and TPOT per request over time to this file.
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

/// A prepared request: when to send it, its body, and what it asks for.
struct Planned {
    at: Duration,
    body: Bytes,
    osl: u32,
    isl: u32,
}

fn plan(args: &ReplayArgs, model: &str) -> Result<Vec<Planned>, ReplayError> {
    if !(args.speed > 0.0 && args.speed.is_finite()) {
        return Err(ReplayError::Invalid("--speed must be positive".into()));
    }
    if !(args.scale_tokens > 0.0 && args.scale_tokens.is_finite()) {
        return Err(ReplayError::Invalid(
            "--scale-tokens must be positive".into(),
        ));
    }
    let text = match &args.trace {
        Some(p) => std::fs::read_to_string(p)
            .map_err(|e| ReplayError::Trace(format!("{}: {e}", p.display())))?,
        None => MOONCAKE_CONVERSATION_SLICE.to_string(),
    };
    let trace = trace::parse(&text)?;
    let corpus = if args.corpus.is_empty() {
        prompt::Corpus::from_texts(
            GSM8K_SLICE
                .lines()
                .chain(MT_BENCH.lines())
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .flat_map(|v| {
                    let mut t: Vec<String> = ["question", "answer"]
                        .iter()
                        .filter_map(|k| v.get(*k).and_then(|s| s.as_str()).map(str::to_owned))
                        .collect();
                    if let Some(turns) = v.get("turns").and_then(|t| t.as_array()) {
                        t.extend(turns.iter().filter_map(|s| s.as_str().map(str::to_owned)));
                    }
                    t
                })
                .collect::<Vec<_>>()
                .iter()
                .map(String::as_str),
        )?
    } else {
        prompt::Corpus::load(&args.corpus)?
    };
    let scale = |n: u32| ((f64::from(n) * args.scale_tokens).round() as u32).max(1);
    let overhead = match args.endpoint {
        Endpoint::Chat => pdx_tokens::CHAT_OVERHEAD_TOKENS as u32,
        Endpoint::Completions => 0,
    };
    let mut out = Vec::new();
    for (i, r) in trace.iter().enumerate() {
        let at = r.arrival_ms / args.speed / 1e3;
        if args.duration.is_some_and(|d| at > d)
            || args.max_requests.is_some_and(|m| out.len() >= m)
        {
            break;
        }
        let isl = scale(r.input_tokens).max(overhead + 1);
        let osl = scale(r.output_tokens);
        let text = corpus.prompt(r, (isl - overhead) as usize, i as u64);
        let mut body = serde_json::json!({
            "model": model,
            "max_tokens": osl,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        match args.endpoint {
            Endpoint::Chat => {
                body["messages"] = serde_json::json!([{"role": "user", "content": text}])
            }
            Endpoint::Completions => body["prompt"] = serde_json::Value::String(text),
        }
        if !args.no_ignore_eos {
            body["ignore_eos"] = true.into();
            body["min_tokens"] = osl.into();
        }
        out.push(Planned {
            at: Duration::from_secs_f64(at),
            body: Bytes::from(body.to_string()),
            osl,
            isl,
        });
    }
    if out.is_empty() {
        return Err(ReplayError::Invalid(
            "no request of the trace falls within the limits".into(),
        ));
    }
    Ok(out)
}

async fn first_model(client: &client::HttpClient, base: &str) -> Option<String> {
    use http_body_util::{BodyExt, Full};
    let uri: hyper::Uri = format!("{base}/v1/models").parse().ok()?;
    let req = hyper::Request::get(uri)
        .body(Full::new(Bytes::new()))
        .ok()?;
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .ok()?
        .ok()?;
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).ok()?;
    v["data"][0]["id"].as_str().map(str::to_owned)
}

/// Runs the replay and returns the report (and the per-request points `(send s, TTFT ms, TPOT ms)`).
///
/// Errors: [`ReplayError`] for a bad trace, corpus or arguments. Request failures are counted in the report,
/// not returned.
pub fn run(args: &ReplayArgs) -> Result<(Report, report::Points), ReplayError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run_async(args))
}

async fn run_async(args: &ReplayArgs) -> Result<(Report, report::Points), ReplayError> {
    let base = args.url.trim_end_matches('/').to_string();
    let path = match args.endpoint {
        Endpoint::Chat => "/v1/chat/completions",
        Endpoint::Completions => "/v1/completions",
    };
    let url: hyper::Uri = format!("{base}{path}")
        .parse()
        .map_err(|e| ReplayError::Invalid(format!("--url {}: {e}", args.url)))?;
    let client = client::http_client();
    let model = match &args.model {
        Some(m) => m.clone(),
        None => first_model(&client, &base)
            .await
            .unwrap_or_else(|| "mock".into()),
    };
    let planned = plan(args, &model)?;
    let bar = if args.quiet || args.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(planned.len() as u64)
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} requests  {elapsed_precise}  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let limit = Arc::new(tokio::sync::Semaphore::new(
        args.concurrency_limit
            .unwrap_or(tokio::sync::Semaphore::MAX_PERMITS),
    ));
    let timeout = Duration::from_secs_f64(args.timeout.max(0.001));
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(planned.len());
    let requested: Vec<(u32, u32)> = planned.iter().map(|p| (p.osl, p.isl)).collect();
    for p in planned {
        tokio::time::sleep_until(start + p.at).await;
        let permit = limit.clone().acquire_owned().await;
        let (client, url, bar) = (client.clone(), url.clone(), bar.clone());
        let sent = start.elapsed().as_secs_f64();
        tasks.push(tokio::spawn(async move {
            let out = client::run_request(&client, &url, p.body, timeout).await;
            drop(permit);
            bar.inc(1);
            (sent, out)
        }));
    }
    let mut outcomes = Vec::with_capacity(tasks.len());
    let mut sent_at = Vec::with_capacity(tasks.len());
    for t in tasks {
        let (sent, out) = t.await.unwrap_or_else(|_| {
            (
                0.0,
                client::Outcome {
                    error: Some("internal".into()),
                    ..Default::default()
                },
            )
        });
        sent_at.push(sent);
        outcomes.push(out);
    }
    let duration = Instant::now()
        .duration_since(start.into_std())
        .as_secs_f64();
    bar.finish_and_clear();
    let slo = Slo {
        ttft_ms: args.slo_ttft_ms,
        itl_ms: args.slo_itl_ms,
    };
    Ok(report::build(
        &outcomes, &sent_at, &requested, duration, slo,
    ))
}
