//! What a request generates, decided at admission: one plan per choice (`n`), each with its own seed
//! (`seed`), its length (where a stop string ends it), and deterministic fake log-probabilities in vLLM's
//! response shapes.
//!
//! Token `i` of a choice is the output piece chosen by a hash of (choice seed, `i`)
//! ([`pdx_tokens::output_choice`]). Choice 0 of a request without `seed` uses the prompt's seed, so the same
//! prompt gives the same text on aggregated and disaggregated workers; `seed` mixes in, so a seed gives the
//! same text every time and other seeds give other texts; choice `c > 0` mixes in `c`.
//!
//! Stop strings work as in vLLM (`vllm/v1/engine/detokenizer.py`): they are looked for in the text only once
//! more than `min_tokens` tokens exist; the token that completes one ends the choice with `finish_reason:
//! "stop"` and `stop_reason` set to it, and the text is cut before it (after it with
//! `include_stop_str_in_output`). The whole text is known in advance here, so a stream never sends a piece
//! that the cut removes: the pieces are cut at the same place.

use crate::tokenizer::{output_choice, Tokenizer};
use pdx_protocol::FinishReason;
use pdx_tokens::mix64;

/// Most choices (`n`) a mock request may ask for (vLLM allows 16384; each choice costs the mock its text and
/// KV blocks, so it is bounded far lower).
pub const MAX_CHOICES: u32 = 16;
/// Most stop strings per request.
pub const MAX_STOP_STRINGS: usize = 16;
/// Longest stop string, bytes.
pub const MAX_STOP_BYTES: usize = 256;

/// How the request asked to generate (besides its length).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenParams {
    /// Choices (`n`, at least 1).
    pub n: u32,
    /// `seed`.
    pub seed: Option<i64>,
    /// Stop strings.
    pub stop: Vec<String>,
    /// `include_stop_str_in_output`.
    pub include_stop_str: bool,
}

/// One choice, planned at admission.
#[derive(Debug, Clone, PartialEq)]
pub struct ChoicePlan {
    /// Seed of its tokens.
    pub seed: u64,
    /// Tokens it generates.
    pub tokens: u32,
    /// Why it ends.
    pub finish: FinishReason,
    /// The stop string that ended it, if one did.
    pub stop_reason: Option<String>,
    /// Bytes of its text that are kept, when a stop string cut it (`None`: the whole text of its tokens).
    pub text_len: Option<usize>,
}

/// The seed of choice `index` (module docs).
pub fn choice_seed(prompt_seed: u64, seed: Option<i64>, index: u32) -> u64 {
    let mut s = prompt_seed;
    if let Some(seed) = seed {
        s = mix64(s ^ mix64(seed as u64 ^ 0x5EED_5EED_5EED_5EED));
    }
    if index > 0 {
        s = mix64(s ^ u64::from(index).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    }
    s
}

/// The text of token `i` of a choice with `seed` (unescaped).
pub fn piece(tokenizer: &Tokenizer, seed: u64, i: u32) -> String {
    let escaped = tokenizer.output_piece(output_choice(seed, i, tokenizer.output_len()));
    serde_json::from_str(&format!("\"{escaped}\"")).unwrap_or_default()
}

/// The choices of a request whose tokens end after `tokens` with `finish` unless a stop string ends them
/// earlier (module docs). `min_tokens`: stop strings count only in tokens after these.
pub fn plan(
    tokenizer: &Tokenizer,
    prompt_seed: u64,
    tokens: u32,
    finish: FinishReason,
    min_tokens: u32,
    p: &GenParams,
) -> Vec<ChoicePlan> {
    (0..p.n.max(1))
        .map(|c| {
            let seed = choice_seed(prompt_seed, p.seed, c);
            let whole = ChoicePlan {
                seed,
                tokens,
                finish,
                stop_reason: None,
                text_len: None,
            };
            if p.stop.is_empty() {
                return whole;
            }
            // The text and where each token ends in it.
            let mut text = String::new();
            let mut ends = Vec::with_capacity(tokens as usize);
            for i in 0..tokens {
                text.push_str(&piece(tokenizer, seed, i));
                ends.push(text.len());
            }
            // The first token that completes a stop string (after `min_tokens`), then the stop's order.
            let mut best: Option<(usize, usize, usize)> = None;
            for (si, s) in p.stop.iter().enumerate() {
                let mut from = 0;
                while let Some(off) = text[from..].find(s.as_str()) {
                    let start = from + off;
                    let tok = ends.partition_point(|&e| e < start + s.len());
                    if tok >= min_tokens as usize {
                        if best.is_none_or(|(bt, bs, _)| (tok, si) < (bt, bs)) {
                            best = Some((tok, si, start));
                        }
                        break;
                    }
                    from = start + text[start..].chars().next().map_or(1, char::len_utf8);
                }
            }
            match best {
                None => whole,
                Some((tok, si, start)) => ChoicePlan {
                    seed,
                    tokens: tok as u32 + 1,
                    finish: FinishReason::Stop,
                    stop_reason: Some(p.stop[si].clone()),
                    text_len: Some(if p.include_stop_str {
                        start + p.stop[si].len()
                    } else {
                        start
                    }),
                },
            }
        })
        .collect()
}

/// The visible text of token `i` of `choice`: its piece, cut where the choice's text ends. `offset`: bytes of
/// the choice's text before this token (updated).
pub fn visible_piece(
    tokenizer: &Tokenizer,
    choice: &ChoicePlan,
    i: u32,
    offset: &mut usize,
) -> String {
    let p = piece(tokenizer, choice.seed, i);
    let start = *offset;
    *offset += p.len();
    match choice.text_len {
        Some(len) if *offset > len => {
            let keep = len.saturating_sub(start).min(p.len());
            let mut cut = keep;
            while !p.is_char_boundary(cut) {
                cut -= 1;
            }
            p[..cut].to_string()
        }
        _ => p,
    }
}

/// Log-probability of token `i` of a choice and of the `top - 1` next most likely ones (the sampled token is
/// the most likely: its probability is 0.5–0.95, the others share the rest, halving each rank).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    /// The sampled token's text.
    pub token: String,
    /// Its natural-log probability.
    pub logprob: f64,
    /// The `top` most likely tokens (the sampled one first), with their log-probabilities.
    pub top: Vec<(String, f64)>,
}

/// Deterministic fake log-probabilities of token `i` of a choice with `seed` ([`TokenLogprobs`]).
pub fn logprobs(tokenizer: &Tokenizer, seed: u64, i: u32, top: u32) -> TokenLogprobs {
    let unit = |x: u64| (mix64(x) >> 11) as f64 / (1u64 << 53) as f64;
    let p0 =
        0.5 + 0.45 * unit(seed ^ u64::from(i).wrapping_mul(0xD6E8_FEB8_6659_FD93) ^ 0x10_6B_9B);
    let token = piece(tokenizer, seed, i);
    let chosen = output_choice(seed, i, tokenizer.output_len());
    let mut out = vec![(token.clone(), p0.ln())];
    let mut seen = vec![chosen];
    let mut attempt = 0u32;
    while out.len() < top as usize && attempt < top * 8 {
        attempt += 1;
        let k = output_choice(
            seed ^ 0x70B_1065,
            i.wrapping_mul(64).wrapping_add(attempt),
            tokenizer.output_len(),
        );
        if seen.contains(&k) {
            continue;
        }
        seen.push(k);
        let rank = out.len() as i32;
        let p = (1.0 - p0) * 0.5f64.powi(rank);
        let escaped = tokenizer.output_piece(k);
        out.push((
            serde_json::from_str(&format!("\"{escaped}\"")).unwrap_or_default(),
            p.ln(),
        ));
    }
    if top == 0 {
        out.clear();
    }
    TokenLogprobs {
        token,
        logprob: p0.ln(),
        top: out,
    }
}

/// One entry of chat `logprobs.content` (vLLM `ChatCompletionLogProbsContent`).
pub fn chat_entry(lp: &TokenLogprobs) -> serde_json::Value {
    let item =
        |t: &str, l: f64| serde_json::json!({"token": t, "logprob": l, "bytes": t.as_bytes()});
    let mut e = item(&lp.token, lp.logprob);
    e["top_logprobs"] = lp.top.iter().map(|(t, l)| item(t, *l)).collect();
    e
}

/// Completions `logprobs` (vLLM `CompletionLogProbs`) of tokens starting at text offset `offset`.
pub fn completion_logprobs(entries: &[TokenLogprobs], mut offset: usize) -> serde_json::Value {
    let mut text_offset = Vec::with_capacity(entries.len());
    for e in entries {
        text_offset.push(offset);
        offset += e.token.len();
    }
    serde_json::json!({
        "text_offset": text_offset,
        "token_logprobs": entries.iter().map(|e| e.logprob).collect::<Vec<_>>(),
        "tokens": entries.iter().map(|e| e.token.as_str()).collect::<Vec<_>>(),
        "top_logprobs": entries
            .iter()
            .map(|e| {
                let mut m = serde_json::Map::new();
                if e.top.is_empty() {
                    m.insert(e.token.clone(), e.logprob.into());
                }
                for (t, l) in &e.top {
                    m.entry(t.clone()).or_insert((*l).into());
                }
                serde_json::Value::Object(m)
            })
            .collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(n: u32, seed: Option<i64>, stop: &[&str]) -> GenParams {
        GenParams {
            n,
            seed,
            stop: stop.iter().map(|s| s.to_string()).collect(),
            include_stop_str: false,
        }
    }

    fn text(t: &Tokenizer, c: &ChoicePlan) -> String {
        let mut off = 0;
        (0..c.tokens)
            .map(|i| visible_piece(t, c, i, &mut off))
            .collect()
    }

    #[test]
    fn choices_and_seeds() {
        let t = Tokenizer::Builtin;
        let p = plan(&t, 7, 20, FinishReason::Length, 0, &params(3, None, &[]));
        assert_eq!(p.len(), 3);
        assert_eq!(
            p[0].seed, 7,
            "choice 0 without seed keeps the prompt's seed"
        );
        assert_ne!(text(&t, &p[0]), text(&t, &p[1]), "choices differ");
        let a = plan(&t, 7, 20, FinishReason::Length, 0, &params(1, Some(1), &[]));
        let b = plan(&t, 7, 20, FinishReason::Length, 0, &params(1, Some(1), &[]));
        let c = plan(&t, 7, 20, FinishReason::Length, 0, &params(1, Some(2), &[]));
        assert_eq!(
            text(&t, &a[0]),
            text(&t, &b[0]),
            "the same seed, the same text"
        );
        assert_ne!(
            text(&t, &a[0]),
            text(&t, &c[0]),
            "another seed, another text"
        );
    }

    #[test]
    fn a_stop_string_ends_the_text_before_it() {
        let t = Tokenizer::Builtin;
        let whole = text(
            &t,
            &plan(&t, 11, 40, FinishReason::Length, 0, &params(1, None, &[]))[0],
        );
        // A stop string that spans the pieces of tokens 5 and 6.
        let mut off = 0;
        let pieces: Vec<String> = (0..40).map(|i| piece(&t, 11, i)).collect();
        for p in &pieces[..5] {
            off += p.len();
        }
        let stop = format!("{}{}", &pieces[4][1..], &pieces[5][..2]);
        let c = &plan(
            &t,
            11,
            40,
            FinishReason::Length,
            0,
            &params(1, None, &[&stop]),
        )[0];
        let start = whole.find(&stop).unwrap();
        assert!(start < off, "the stop begins inside token 4");
        assert_eq!(c.finish, FinishReason::Stop);
        assert_eq!(c.stop_reason.as_deref(), Some(stop.as_str()));
        assert_eq!(c.tokens, 6, "token 5 completes it");
        assert_eq!(text(&t, c), whole[..start], "cut before the stop string");
        // Kept with include_stop_str_in_output.
        let mut p = params(1, None, &[&stop]);
        p.include_stop_str = true;
        let c = &plan(&t, 11, 40, FinishReason::Length, 0, &p)[0];
        assert_eq!(text(&t, c), whole[..start + stop.len()]);
        // Not before min_tokens.
        let c = &plan(
            &t,
            11,
            40,
            FinishReason::Length,
            10,
            &params(1, None, &[&stop]),
        )[0];
        assert!(c.tokens > 10 || c.stop_reason.is_none());
        // A stop string that never comes leaves the choice alone.
        let c = &plan(
            &t,
            11,
            40,
            FinishReason::Length,
            0,
            &params(1, None, &["§never§"]),
        )[0];
        assert_eq!(
            (c.tokens, c.finish, c.text_len),
            (40, FinishReason::Length, None)
        );
    }

    #[test]
    fn logprobs_are_deterministic_and_valid() {
        let t = Tokenizer::Builtin;
        let a = logprobs(&t, 3, 4, 5);
        assert_eq!(a, logprobs(&t, 3, 4, 5));
        assert_eq!(a.top.len(), 5);
        assert_eq!(a.top[0].0, a.token, "the sampled token is the most likely");
        assert!(a.logprob < 0.0 && a.logprob > 0.5f64.ln() - 1e-9);
        let total: f64 = a.top.iter().map(|(_, l)| l.exp()).sum();
        assert!(total <= 1.0, "{total}");
        assert!(a.top.windows(2).all(|w| w[0].1 > w[1].1), "sorted");
        assert!(logprobs(&t, 3, 4, 0).top.is_empty());
        let v = chat_entry(&a);
        assert_eq!(v["token"], a.token.as_str());
        assert_eq!(v["top_logprobs"].as_array().unwrap().len(), 5);
        let c = completion_logprobs(&[a.clone(), logprobs(&t, 3, 5, 2)], 10);
        assert_eq!(c["text_offset"][0], 10);
        assert_eq!(c["text_offset"][1], 10 + a.token.len());
    }
}
