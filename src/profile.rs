//! `pdx profile`: measures a worker's planner profile over its OpenAI API (Dynamo's
//! pre-deployment profiling, `profile_sla`, in small): for each prompt length, the TTFT of one
//! prompt alone and the prompt tokens per second with `--concurrency` prompts at once; for each
//! context length and batch size, the mean inter-token latency of that many streams decoding
//! together. Prompts are `/v1/completions` prompts of exact lengths under the built-in
//! tokenizer, each unique (no prefix-cache hits). Prints the `pdx_planner::PoolProfile` as TOML
//! (`prefill = [...]`, `decode = [...]`), ready for a `[planner.pools.profile]` table.

use pdx_planner::{DecodePoint, PoolProfile, PrefillPoint};
use pdx_replay::client::{http_client, run_request, HttpClient, Outcome};
use std::time::{Duration, Instant};

/// `pdx profile` arguments.
#[derive(Clone, Debug, clap::Args)]
pub struct ProfileArgs {
    /// Base URL of the worker (or of a router in front of one worker).
    #[arg(long)]
    pub url: String,
    /// Model name to request.
    #[arg(long, default_value = "mock")]
    pub model: String,
    /// Prompt lengths of the prefill table, tokens.
    #[arg(long, value_delimiter = ',', default_values_t = [256u32, 1024, 4096])]
    pub isl: Vec<u32>,
    /// Context lengths of the decode table, tokens.
    #[arg(long, value_delimiter = ',', default_values_t = [256u32, 1024, 4096])]
    pub context: Vec<u32>,
    /// Batch sizes of the decode table.
    #[arg(long, value_delimiter = ',', default_values_t = [1u32, 4, 16])]
    pub batch: Vec<u32>,
    /// Prompts sent at once to measure prefill throughput.
    #[arg(long, default_value_t = 8)]
    pub concurrency: u32,
    /// Tokens generated per decode stream.
    #[arg(long, default_value_t = 32)]
    pub output_tokens: u32,
    /// Per-request time limit, s.
    #[arg(long, default_value_t = 120.0)]
    pub timeout: f64,
    /// Write the TOML here instead of standard output.
    #[arg(long)]
    pub out: Option<std::path::PathBuf>,
}

struct Prober {
    client: HttpClient,
    url: hyper::Uri,
    model: String,
    timeout: Duration,
    seed: u64,
}

impl Prober {
    fn body(&mut self, isl: u32, max_tokens: u32) -> bytes::Bytes {
        self.seed += 1;
        let prompt = pdx_mock::synthetic_prompt(isl as usize, 0x5052_4f46 ^ self.seed);
        bytes::Bytes::from(
            serde_json::json!({
                "model": self.model, "prompt": prompt, "max_tokens": max_tokens,
                "min_tokens": max_tokens, "ignore_eos": true, "stream": true,
                "stream_options": {"include_usage": true},
            })
            .to_string(),
        )
    }

    /// `n` requests at once; their outcomes and the time until the last ended.
    async fn burst(
        &mut self,
        n: u32,
        isl: u32,
        max_tokens: u32,
    ) -> anyhow::Result<(Vec<Outcome>, f64)> {
        let start = Instant::now();
        let tasks: Vec<_> = (0..n)
            .map(|_| {
                let (c, u, b, t) = (
                    self.client.clone(),
                    self.url.clone(),
                    self.body(isl, max_tokens),
                    self.timeout,
                );
                tokio::spawn(async move { run_request(&c, &u, b, t).await })
            })
            .collect();
        let mut outs = Vec::new();
        for t in tasks {
            let o = t.await?;
            if let Some(e) = &o.error {
                anyhow::bail!("request failed: {e}");
            }
            outs.push(o);
        }
        Ok((outs, start.elapsed().as_secs_f64()))
    }
}

async fn measure(a: &ProfileArgs) -> anyhow::Result<PoolProfile> {
    let base = a.url.trim_end_matches('/');
    let mut p = Prober {
        client: http_client(),
        url: format!("{base}/v1/completions").parse()?,
        model: a.model.clone(),
        timeout: Duration::from_secs_f64(a.timeout.max(1.0)),
        seed: 0,
    };
    let mut prof = PoolProfile::default();
    for &isl in &a.isl {
        // Alone: the median of three TTFTs.
        let mut ttfts = Vec::new();
        for _ in 0..3 {
            let (o, _) = p.burst(1, isl, 1).await?;
            ttfts.push(o[0].ttft_us.unwrap_or(o[0].e2e_us) as f64 / 1e3);
        }
        ttfts.sort_by(f64::total_cmp);
        let n = a.concurrency.max(1);
        let (_, secs) = p.burst(n, isl, 1).await?;
        prof.prefill.push(PrefillPoint {
            isl: f64::from(isl),
            ttft_ms: ttfts[1],
            tokens_per_s: f64::from(n) * f64::from(isl) / secs,
        });
        eprintln!(
            "prefill isl {isl}: TTFT {:.1} ms alone, {:.0} tok/s with {n}",
            ttfts[1],
            f64::from(n) * f64::from(isl) / secs
        );
    }
    for &ctx in &a.context {
        for &b in &a.batch {
            let (outs, _) = p.burst(b.max(1), ctx, a.output_tokens.max(3)).await?;
            // Gaps after the first (the prefills of the batch overlap its start).
            let gaps: Vec<u64> = outs
                .iter()
                .flat_map(|o| o.itl_us.iter().skip(1).copied())
                .collect();
            let itl = gaps.iter().sum::<u64>() as f64 / gaps.len().max(1) as f64 / 1e3;
            prof.decode.push(DecodePoint {
                context: f64::from(ctx),
                batch: f64::from(b.max(1)),
                itl_ms: itl,
            });
            eprintln!("decode context {ctx} batch {b}: ITL {itl:.2} ms");
        }
    }
    Ok(prof)
}

/// Runs `pdx profile`.
pub fn run(a: &ProfileArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let prof = rt.block_on(measure(a))?.validated()?;
    let mut text = toml::to_string(&prof)?;
    if !text.ends_with('\n') {
        text.push('\n');
    }
    match &a.out {
        Some(p) => std::fs::write(p, text)?,
        None => print!("{text}"),
    }
    Ok(())
}
