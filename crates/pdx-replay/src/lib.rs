//! `pdx replay`: replays a real request trace against any OpenAI-compatible endpoint and reports TTFT, ITL,
//! TPOT, end-to-end latency (mean, p50/p90/p99), request and token throughput, SLO attainment and goodput.
//!
//! - Trace formats: Mooncake jsonl and Azure CSV, told apart by content ([`trace`]). Arrival times are kept,
//!   scaled by `--speed`.
//! - Prompts have the exact input length for pdx's built-in tokenizer. They are built from real text
//!   ([`prompt`]), and Mooncake `hash_ids` become real shared prefixes.
//! - `max_tokens` = the trace's output length, with `min_tokens` and `ignore_eos` so the server produces
//!   exactly that many tokens (`--no-ignore-eos` for servers that reject the fields). Responses are
//!   streamed with `stream_options.include_usage`.
//! - Everything that can stop a replay is checked before the first request: the URL, the trace, the corpus,
//!   every output path (`--plot`, `--export`) and the plot's font, and that the server answers at all.
//!   Failed requests are grouped by kind, HTTP status and message in the report.

#![forbid(unsafe_code)]

pub mod client;
pub mod plot;
pub mod prompt;
pub mod rate;
pub mod report;
pub mod trace;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use indicatif::{ProgressBar, ProgressStyle};

pub use report::{Report, RequestRecord, Slo};

/// Errors of the replayer. All are fatal: nothing was sent, except for [`ReplayError::Failures`] and
/// [`ReplayError::Output`], which come after the replay.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The trace could not be read or parsed.
    #[error("trace {0}")]
    Trace(String),
    /// The prompt corpus could not be read or is too short.
    #[error("corpus: {0}")]
    Corpus(String),
    /// Bad arguments.
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// The server could not be reached (connection refused, no answer): nothing was replayed.
    #[error("cannot reach {url}: {reason}")]
    Connect {
        /// The URL asked.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// An output file (`--plot`, `--export`) cannot be written.
    #[error("{0}")]
    Output(String),
    /// More requests failed than `--max-failed-fraction` allows (after the report was printed).
    #[error(
        "{failed} of {requests} requests failed, more than --max-failed-fraction {max_fraction} allows"
    )]
    Failures {
        /// Requests that failed.
        failed: u64,
        /// Requests sent.
        requests: u64,
        /// The allowed fraction.
        max_fraction: f64,
    },
    /// The runtime could not start.
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

impl Endpoint {
    fn path(self) -> &'static str {
        match self {
            Endpoint::Chat => "/v1/chat/completions",
            Endpoint::Completions => "/v1/completions",
        }
    }
}

/// `pdx replay` arguments.
#[derive(Clone, Debug, clap::Args)]
#[command(after_help = "\
Trace formats are told apart by content, not by file name: a trace whose first non-blank line is a JSON \
object is Mooncake jsonl (one {\"timestamp\": ms, \"input_length\", \"output_length\", \"hash_ids\"} per \
line); anything else must start with an Azure CSV header naming TIMESTAMP, ContextTokens and \
GeneratedTokens. The chosen format is printed before the replay starts.")]
pub struct ReplayArgs {
    /// Base URL of the OpenAI-compatible server: `http://host:port`, or the OpenAI clients' base_url
    /// `http://host:port/v1` (the same). Several, separated by commas (`http://a:8000,http://b:8000`): the
    /// requests go to them in turn, in arrival order (as a Service in front of several routers spreads
    /// them).
    #[arg(long)]
    pub url: String,
    /// Trace file, Mooncake jsonl or Azure CSV, detected from the content (see below) [default: the Mooncake
    /// conversation slice shipped with pdx]
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Model name to request [default: the first model of `GET /v1/models`]
    #[arg(long)]
    pub model: Option<String>,
    /// Endpoint.
    #[arg(long, value_enum, default_value_t = Endpoint::Chat)]
    pub endpoint: Endpoint,
    /// Time factor: 2 replays twice as fast as recorded.
    #[arg(long, default_value_t = 1.0)]
    pub speed: f64,
    /// Re-time the trace's arrivals to a rate curve before `--speed`: `diurnal:period=S,ratio=K[,phase=F]`
    /// or `steps:T0=M0,T1=M1,...` (see `docs/planner.md`) [default: as recorded]
    #[arg(long)]
    pub rate_curve: Option<String>,
    /// Mean arrival rate after `--rate-curve`, req/s [default: the trace's own]
    #[arg(long, requires = "rate_curve")]
    pub mean_rate: Option<f64>,
    /// Replay only requests that arrive within this many seconds (after `--speed`) [default: all]
    #[arg(long, value_name = "SECS")]
    pub duration: Option<f64>,
    /// Replay at most this many requests (the first ones of the trace) [default: all]
    #[arg(long, alias = "requests")]
    pub max_requests: Option<usize>,
    /// Requests in flight at most (later arrivals wait) [default: no limit]
    #[arg(long)]
    pub concurrency_limit: Option<usize>,
    /// Multiply every input and output length by this factor (at least 1 token each), to fit a trace
    /// to a small deployment.
    #[arg(long, default_value_t = 1.0)]
    pub scale_tokens: f64,
    /// Prompt text files (GSM8K / MT-Bench jsonl, or plain text) [default: the slices shipped with pdx]
    #[arg(long)]
    pub corpus: Vec<PathBuf>,
    /// TTFT target for SLO attainment and goodput, ms.
    #[arg(long)]
    pub slo_ttft_ms: Option<f64>,
    /// ITL (TPOT) target for SLO attainment and goodput, ms.
    #[arg(long)]
    pub slo_itl_ms: Option<f64>,
    /// Per-request time limit, s.
    #[arg(long, alias = "timeout", default_value_t = 600.0)]
    pub timeout_secs: f64,
    /// Do not send `ignore_eos` / `min_tokens`.
    #[arg(long)]
    pub no_ignore_eos: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// No progress bar, and no line about the trace and the target.
    #[arg(long)]
    pub quiet: bool,
    /// Write a PNG of TTFT and TPOT per request over time to this file (with the SLO targets, p50/p90/p99 and
    /// the failed requests marked).
    #[arg(long, value_name = "FILE")]
    pub plot: Option<PathBuf>,
    /// Write one JSON line per request to this file: send time, TTFT, every ITL, TPOT, end-to-end latency,
    /// tokens in and out, HTTP status, error and message, and the worker when the response names one.
    #[arg(long, value_name = "FILE")]
    pub export: Option<PathBuf>,
    /// Exit with an error when more than this fraction of the requests failed (0: any failure).
    #[arg(long, default_value_t = 0.0)]
    pub max_failed_fraction: f64,
}

/// The result of a replay.
#[derive(Clone, Debug)]
pub struct Replay {
    /// The aggregated report.
    pub report: Report,
    /// Every request, in trace order.
    pub records: Vec<RequestRecord>,
}

impl Replay {
    /// Errors when more than `max_fraction` of the requests failed: [`ReplayError::Failures`].
    pub fn check_failures(&self, max_fraction: f64) -> Result<(), ReplayError> {
        let (failed, requests) = (self.report.failed(), self.report.requests);
        if failed > 0 && failed as f64 > max_fraction * requests as f64 {
            return Err(ReplayError::Failures {
                failed,
                requests,
                max_fraction,
            });
        }
        Ok(())
    }
}

/// The server's base URL from `--url`: with or without a trailing `/v1` (the OpenAI clients' `base_url`
/// habit), without a trailing slash.
///
/// Errors: [`ReplayError::Invalid`] for a URL that does not parse, is not `http://`, or has no host.
pub fn base_url(url: &str) -> Result<String, ReplayError> {
    let mut base = url.trim().trim_end_matches('/').to_string();
    if let Some(b) = base.strip_suffix("/v1") {
        base = b.trim_end_matches('/').to_string();
    }
    let bad = |why: &str| ReplayError::Invalid(format!("--url {url}: {why}"));
    let uri: hyper::Uri = base.parse().map_err(|e| bad(&format!("{e}")))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => return Err(bad("https is not supported; use http://")),
        _ => return Err(bad("give it as http://host:port")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(bad("no host"));
    }
    if uri.query().is_some() {
        return Err(bad("a base URL has no query"));
    }
    Ok(base)
}

/// The base URLs of a `--url` holding one or several comma-separated URLs ([`base_url`] each).
///
/// Errors: [`ReplayError::Invalid`] for an empty entry or a URL [`base_url`] refuses.
pub fn base_urls(urls: &str) -> Result<Vec<String>, ReplayError> {
    urls.split(',')
        .map(|u| {
            if u.trim().is_empty() {
                Err(ReplayError::Invalid(format!("--url {urls}: an empty URL")))
            } else {
                base_url(u)
            }
        })
        .collect()
}

/// An output file checked (and created) before the replay; removed again if the replay does not finish.
struct OutputFile {
    path: PathBuf,
    file: Option<std::fs::File>,
    created: bool,
    done: bool,
}

impl OutputFile {
    /// Checks that `path` (of flag `flag`) can be written: its folder exists and the file can be created.
    fn prepare(flag: &str, path: &Path) -> Result<OutputFile, ReplayError> {
        let bad = |why: String| ReplayError::Output(format!("{flag} {}: {why}", path.display()));
        if path.is_dir() {
            return Err(bad("is a folder; give a file name".into()));
        }
        let parent = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if !parent.is_dir() {
            return Err(bad(format!("folder {} does not exist", parent.display())));
        }
        let created = !path.exists();
        let file = std::fs::File::create(path).map_err(|e| bad(e.to_string()))?;
        Ok(OutputFile {
            path: path.to_path_buf(),
            file: Some(file),
            created,
            done: false,
        })
    }
}

impl Drop for OutputFile {
    fn drop(&mut self) {
        if !self.done && self.created {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A prepared request: when to send it, its body, and what it asks for.
struct Planned {
    at: Duration,
    body: Bytes,
    osl: u32,
    isl: u32,
}

/// A request of the trace chosen by the limits, before its body exists.
struct Chosen<'a> {
    at: Duration,
    req: &'a trace::TraceRequest,
    isl: u32,
    osl: u32,
}

fn check_args(args: &ReplayArgs) -> Result<(), ReplayError> {
    let positive = |v: f64, flag: &str| {
        if v > 0.0 && v.is_finite() {
            Ok(())
        } else {
            Err(ReplayError::Invalid(format!(
                "{flag} must be a positive number, got {v}"
            )))
        }
    };
    positive(args.speed, "--speed")?;
    positive(args.scale_tokens, "--scale-tokens")?;
    positive(args.timeout_secs, "--timeout-secs")?;
    if let Some(d) = args.duration {
        positive(d, "--duration")?;
    }
    if !(0.0..=1.0).contains(&args.max_failed_fraction) {
        return Err(ReplayError::Invalid(format!(
            "--max-failed-fraction must be within 0..=1, got {}",
            args.max_failed_fraction
        )));
    }
    if args.max_requests == Some(0) || args.concurrency_limit == Some(0) {
        return Err(ReplayError::Invalid(
            "--max-requests and --concurrency-limit must be at least 1".into(),
        ));
    }
    Ok(())
}

fn default_corpus() -> Result<prompt::Corpus, ReplayError> {
    let texts: Vec<String> = GSM8K_SLICE
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
        .collect();
    prompt::Corpus::from_texts(texts.iter().map(String::as_str))
}

/// The trace's requests that the limits keep (`--duration`, `--max-requests`), with their scaled lengths.
fn choose<'a>(args: &ReplayArgs, trace: &'a trace::Trace) -> Result<Vec<Chosen<'a>>, ReplayError> {
    let scale = |n: u32| ((f64::from(n) * args.scale_tokens).round() as u32).max(1);
    let overhead = match args.endpoint {
        Endpoint::Chat => pdx_tokens::CHAT_OVERHEAD_TOKENS as u32,
        Endpoint::Completions => 0,
    };
    let mut out = Vec::new();
    for r in &trace.requests {
        let at = r.arrival_ms / args.speed / 1e3;
        if args.duration.is_some_and(|d| at > d)
            || args.max_requests.is_some_and(|m| out.len() >= m)
        {
            break;
        }
        out.push(Chosen {
            // Arrivals are finite and non-negative (the parser checks), so this never fails.
            at: Duration::try_from_secs_f64(at).unwrap_or_default(),
            req: r,
            isl: scale(r.input_tokens).max(overhead + 1),
            osl: scale(r.output_tokens),
        });
    }
    if out.is_empty() {
        let first = trace.requests[0].arrival_ms / args.speed / 1e3;
        return Err(ReplayError::Invalid(format!(
            "--duration {} keeps no request: the trace's first request arrives at {first:.3} s",
            args.duration.unwrap_or_default()
        )));
    }
    Ok(out)
}

fn plan(
    args: &ReplayArgs,
    chosen: &[Chosen],
    corpus: &prompt::Corpus,
    model: &str,
) -> Vec<Planned> {
    let overhead = match args.endpoint {
        Endpoint::Chat => pdx_tokens::CHAT_OVERHEAD_TOKENS as u32,
        Endpoint::Completions => 0,
    };
    chosen
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let text = corpus.prompt(c.req, (c.isl - overhead) as usize, i as u64);
            let mut body = serde_json::json!({
                "model": model,
                "max_tokens": c.osl,
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
                body["min_tokens"] = c.osl.into();
            }
            Planned {
                at: c.at,
                body: Bytes::from(body.to_string()),
                osl: c.osl,
                isl: c.isl,
            }
        })
        .collect()
}

/// Asks `GET {base}/v1/models`. The server must answer something: a refused connection or no answer within
/// 10 s stops the replay before it starts. Returns the first model's id, when the answer has one.
async fn probe(client: &client::HttpClient, base: &str) -> Result<Option<String>, ReplayError> {
    use http_body_util::{BodyExt, Full};
    let url = format!("{base}/v1/models");
    let connect = |reason: String| ReplayError::Connect {
        url: base.to_string(),
        reason,
    };
    let uri: hyper::Uri = url
        .parse()
        .map_err(|e| ReplayError::Invalid(format!("--url: {e}")))?;
    let req = hyper::Request::get(uri)
        .body(Full::new(Bytes::new()))
        .map_err(|e| ReplayError::Invalid(format!("--url: {e}")))?;
    let resp = match tokio::time::timeout(Duration::from_secs(10), client.request(req)).await {
        Err(_) => return Err(connect("no answer to GET /v1/models within 10 s".into())),
        Ok(Err(e)) if e.is_connect() => {
            return Err(connect(format!(
                "{} (is the server running?)",
                client::root_cause(&e)
            )))
        }
        Ok(Err(e)) => return Err(connect(client::root_cause(&e))),
        Ok(Ok(r)) => r,
    };
    if !resp.status().is_success() {
        return Ok(None);
    }
    let body = http_body_util::Limited::new(resp.into_body(), 1 << 20)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    Ok(v["data"][0]["id"].as_str().map(str::to_owned))
}

/// Runs the replay: checks everything that can stop it first (arguments, trace, corpus, output paths, the
/// server), sends the requests at their arrival times, and writes `--plot` and `--export`.
///
/// Errors: [`ReplayError`] for bad arguments, a bad trace or corpus, an output path that cannot be written, or
/// a server that cannot be reached; none of those sends a request. Failed requests are in the report, not
/// errors (see [`Replay::check_failures`]).
pub fn run(args: &ReplayArgs) -> Result<Replay, ReplayError> {
    check_args(args)?;
    let bases = base_urls(&args.url)?;
    let uris = bases
        .iter()
        .map(|b| {
            format!("{b}{}", args.endpoint.path())
                .parse::<hyper::Uri>()
                .map_err(|e| ReplayError::Invalid(format!("--url {b}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let base = bases[0].clone();
    let target = if bases.len() == 1 {
        format!("{base}{}", args.endpoint.path())
    } else {
        format!("{} (in turn)", bases.join(", "))
    };
    let trace_name = args.trace.as_ref().map_or_else(
        || "Mooncake conversation slice (shipped with pdx)".to_string(),
        |p| p.display().to_string(),
    );
    let text = match &args.trace {
        Some(p) => std::fs::read_to_string(p)
            .map_err(|e| ReplayError::Trace(format!("{}: {e}", p.display())))?,
        None => MOONCAKE_CONVERSATION_SLICE.to_string(),
    };
    let mut trace = trace::parse(&text).map_err(|e| match e {
        ReplayError::Trace(m) => ReplayError::Trace(format!("{trace_name}: {m}")),
        other => other,
    })?;
    if let Some(spec) = &args.rate_curve {
        let curve: rate::RateCurve = spec.parse()?;
        rate::reshape(&mut trace.requests, &curve, args.mean_rate)?;
        trace.notes.push(format!("arrivals re-timed to {spec}"));
    }
    let chosen = choose(args, &trace)?;
    let corpus = if args.corpus.is_empty() {
        default_corpus()?
    } else {
        prompt::Corpus::load(&args.corpus)?
    };
    if args.plot.is_some() {
        plot::check_font()?;
    }
    let mut plot_file = args
        .plot
        .as_deref()
        .map(|p| OutputFile::prepare("--plot", p))
        .transpose()?;
    let mut export_file = args
        .export
        .as_deref()
        .map(|p| OutputFile::prepare("--export", p))
        .transpose()?;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let records = rt.block_on(async {
        let client = client::http_client();
        let found = probe(&client, &base).await?;
        for b in &bases[1..] {
            probe(&client, b).await?;
        }
        let model = args
            .model
            .clone()
            .or(found)
            .unwrap_or_else(|| "mock".into());
        if !args.quiet {
            eprintln!(
                "pdx replay: trace {trace_name}: {}, {} requests",
                trace.format.describe(),
                trace.requests.len()
            );
            for note in &trace.notes {
                eprintln!("pdx replay: note: {note}");
            }
            eprintln!(
                "pdx replay: sending {} requests for model `{model}` to {target}",
                chosen.len()
            );
        }
        let planned = plan(args, &chosen, &corpus, &model);
        Ok::<_, ReplayError>(send_all(args, &client, &uris, planned).await)
    })?;
    let (records, duration) = records;
    let slo = Slo {
        ttft_ms: args.slo_ttft_ms,
        itl_ms: args.slo_itl_ms,
    };
    let report = report::build(&records, duration, slo);
    if let (Some(out), Some(path)) = (plot_file.as_mut(), &args.plot) {
        out.file = None; // the PNG encoder opens the path itself
        let title = format!("pdx replay: {trace_name} → {target}, {}", plot::utc_now());
        plot::write_png(path, &records, slo, &title)?;
        out.done = true;
    }
    if let Some(out) = export_file.as_mut() {
        write_export(out, &records)?;
        out.done = true;
    }
    Ok(Replay { report, records })
}

fn write_export(out: &mut OutputFile, records: &[RequestRecord]) -> Result<(), ReplayError> {
    let path = out.path.display().to_string();
    let bad = |e: std::io::Error| ReplayError::Output(format!("--export {path}: {e}"));
    let file = out.file.take().expect("prepared with a file");
    let mut w = std::io::BufWriter::new(file);
    for r in records {
        serde_json::to_writer(&mut w, r).map_err(|e| bad(e.into()))?;
        w.write_all(b"\n").map_err(bad)?;
    }
    w.flush().map_err(bad)
}

/// Sends every planned request at its time and waits for all; returns their records and the replay's wall
/// time, s.
async fn send_all(
    args: &ReplayArgs,
    client: &client::HttpClient,
    urls: &[hyper::Uri],
    planned: Vec<Planned>,
) -> (Vec<RequestRecord>, f64) {
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
    let timeout = Duration::from_secs_f64(args.timeout_secs);
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(planned.len());
    let requested: Vec<(u32, u32)> = planned.iter().map(|p| (p.isl, p.osl)).collect();
    for (i, p) in planned.into_iter().enumerate() {
        tokio::time::sleep_until(start + p.at).await;
        let permit = limit.clone().acquire_owned().await;
        let url = urls[i % urls.len()].clone();
        let (client, bar) = (client.clone(), bar.clone());
        let sent = start.elapsed().as_secs_f64();
        tasks.push(tokio::spawn(async move {
            let out = client::run_request(&client, &url, p.body, timeout).await;
            drop(permit);
            bar.inc(1);
            (sent, out)
        }));
    }
    let mut records = Vec::with_capacity(tasks.len());
    for (index, t) in tasks.into_iter().enumerate() {
        let (sent, o) = t.await.unwrap_or_else(|e| {
            (
                0.0,
                client::Outcome {
                    error: Some("internal".into()),
                    message: Some(e.to_string()),
                    ..Default::default()
                },
            )
        });
        let (isl, osl) = requested[index];
        records.push(RequestRecord::from_outcome(index, sent, o, isl, osl));
    }
    let duration = Instant::now()
        .duration_since(start.into_std())
        .as_secs_f64();
    bar.finish_and_clear();
    (records, duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn several_urls_separated_by_commas() {
        assert_eq!(
            base_urls("http://a:1,http://b:2/v1").unwrap(),
            ["http://a:1", "http://b:2"]
        );
        assert_eq!(base_urls("http://a:1").unwrap(), ["http://a:1"]);
        for bad in ["http://a:1,", ",http://a:1", "http://a:1,https://b:2"] {
            assert!(base_urls(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn base_urls_with_or_without_v1() {
        for u in [
            "http://127.0.0.1:8000",
            "http://127.0.0.1:8000/",
            "http://127.0.0.1:8000/v1",
            "http://127.0.0.1:8000/v1/",
        ] {
            assert_eq!(base_url(u).unwrap(), "http://127.0.0.1:8000", "{u}");
        }
        assert_eq!(base_url("http://h:1/proxy/v1").unwrap(), "http://h:1/proxy");
        for bad in [
            "127.0.0.1:8000",
            "https://h:1",
            "http://",
            "http://h:1/?a=b",
        ] {
            assert!(base_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn output_paths_are_checked_before_the_run() {
        let dir = std::env::temp_dir().join(format!("pdx-replay-out-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("no-such-folder").join("run.png");
        let e = OutputFile::prepare("--plot", &missing).err().unwrap();
        assert!(
            e.to_string().contains("no-such-folder") && e.to_string().contains("does not exist"),
            "{e}"
        );
        assert!(OutputFile::prepare("--plot", &dir).is_err(), "a folder");
        let ok = dir.join("run.png");
        drop(OutputFile::prepare("--plot", &ok).unwrap());
        assert!(
            !ok.exists(),
            "a file made for a replay that did not finish is removed"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
