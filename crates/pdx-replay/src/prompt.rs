//! Prompts of exact token lengths built from real text.
//!
//! The corpus is GSM8K and MT-Bench text (`../shared/traces`), or any text files, split into the mock's
//! built-in tokens (`pdx_tokens::builtin_tokens`); a prompt of `n` tokens is `n` corpus tokens joined by single
//! spaces, which the built-in tokenizer counts as exactly `n`. For Mooncake `hash_ids`, block id `h` is always
//! the same 512-token run of the corpus (its start chosen by a hash of `h`), so requests that share ids share
//! real prompt prefixes.

use xxhash_rust::xxh3::xxh3_64;

use crate::trace::{TraceRequest, MOONCAKE_BLOCK_TOKENS};
use crate::ReplayError;

/// Real text as a list of built-in tokens.
pub struct Corpus {
    tokens: Vec<String>,
}

impl Corpus {
    /// Builds a corpus from texts. Errors: [`ReplayError::Corpus`] with fewer than 2 × 512 tokens.
    pub fn from_texts<'a>(texts: impl IntoIterator<Item = &'a str>) -> Result<Corpus, ReplayError> {
        let tokens: Vec<String> = texts
            .into_iter()
            .flat_map(|t| pdx_tokens::builtin_tokens(t).into_iter().map(str::to_owned))
            .collect();
        if tokens.len() < 2 * MOONCAKE_BLOCK_TOKENS {
            return Err(ReplayError::Corpus(format!(
                "only {} tokens of text; need at least {}",
                tokens.len(),
                2 * MOONCAKE_BLOCK_TOKENS
            )));
        }
        Ok(Corpus { tokens })
    }

    /// Loads jsonl files of GSM8K (`question`, `answer`) or MT-Bench (`turns`) records, or plain text files.
    /// Errors: [`ReplayError::Corpus`] when a file cannot be read or the text is too short.
    pub fn load(paths: &[std::path::PathBuf]) -> Result<Corpus, ReplayError> {
        let mut texts = Vec::new();
        for p in paths {
            let raw = std::fs::read_to_string(p)
                .map_err(|e| ReplayError::Corpus(format!("{}: {e}", p.display())))?;
            for line in raw.lines() {
                match serde_json::from_str::<serde_json::Value>(line) {
                    Ok(v) if v.is_object() => {
                        for key in ["question", "answer"] {
                            if let Some(s) = v.get(key).and_then(|s| s.as_str()) {
                                texts.push(s.to_string());
                            }
                        }
                        if let Some(turns) = v.get("turns").and_then(|t| t.as_array()) {
                            texts
                                .extend(turns.iter().filter_map(|t| t.as_str().map(str::to_owned)));
                        }
                    }
                    _ => texts.push(line.to_string()),
                }
            }
        }
        Corpus::from_texts(texts.iter().map(String::as_str))
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// True when empty (never, once built).
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Appends `n` corpus tokens starting at a position derived from `key`, wrapping around.
    fn push_run(&self, out: &mut String, key: u64, n: usize) {
        let start = (xxh3_64(&key.to_le_bytes()) % self.tokens.len() as u64) as usize;
        for i in 0..n {
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str(&self.tokens[(start + i) % self.tokens.len()]);
        }
    }

    /// A prompt of exactly `tokens` built-in tokens for `req`: its `hash_ids` blocks in order (the last one
    /// cut to fit), or, without ids, a run chosen by `fallback_key`.
    pub fn prompt(&self, req: &TraceRequest, tokens: usize, fallback_key: u64) -> String {
        let mut out = String::with_capacity(tokens * 6);
        if req.hash_ids.is_empty() {
            // Keys of id-less requests live apart from block ids.
            self.push_run(&mut out, fallback_key ^ 0xA5A5_0000_0000_0000, tokens);
            return out;
        }
        let mut left = tokens;
        for &h in &req.hash_ids {
            if left == 0 {
                break;
            }
            let n = left.min(MOONCAKE_BLOCK_TOKENS);
            self.push_run(&mut out, h, n);
            left -= n;
        }
        if left > 0 {
            // More tokens than the ids cover (a scaled trace): continue with a run unique to this request.
            self.push_run(&mut out, fallback_key ^ 0x5A5A_0000_0000_0000, left);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus() -> Corpus {
        let text = "Janet's ducks lay 16 eggs per day. She eats three for breakfast, bakes muffins with four; \
                    sells the remainder at $2 each! ";
        Corpus::from_texts(std::iter::repeat_n(text, 100)).unwrap()
    }

    fn req(ids: Vec<u64>) -> TraceRequest {
        TraceRequest {
            arrival_ms: 0.0,
            input_tokens: 0,
            output_tokens: 1,
            hash_ids: ids,
        }
    }

    #[test]
    fn prompts_have_exact_token_counts() {
        let c = corpus();
        for n in [1, 7, 511, 512, 513, 1500] {
            let p = c.prompt(&req(vec![0, 1, 2]), n, 9);
            assert_eq!(pdx_tokens::count_builtin_tokens(&p), n, "{n}");
            let q = c.prompt(&req(vec![]), n, 9);
            assert_eq!(pdx_tokens::count_builtin_tokens(&q), n, "{n}");
        }
    }

    #[test]
    fn shared_hash_ids_share_prefixes() {
        let c = corpus();
        let a = c.prompt(&req(vec![0, 1, 2]), 1536, 1);
        let b = c.prompt(&req(vec![0, 1, 5]), 1536, 2);
        let d = c.prompt(&req(vec![4, 1, 2]), 1536, 3);
        let tokens = |s: &str| s.split(' ').map(str::to_owned).collect::<Vec<_>>();
        let (ta, tb, td) = (tokens(&a), tokens(&b), tokens(&d));
        assert_eq!(ta[..1024], tb[..1024], "ids 0,1 shared");
        assert_ne!(ta[1024..], tb[1024..], "id 2 vs 5 differ");
        assert_ne!(ta[..512], td[..512], "id 0 vs 4 differ");
        assert_eq!(c.prompt(&req(vec![0, 1, 2]), 1536, 99), a, "deterministic");
    }

    #[test]
    fn short_corpus_is_an_error() {
        assert!(Corpus::from_texts(["too short"]).is_err());
    }
}
