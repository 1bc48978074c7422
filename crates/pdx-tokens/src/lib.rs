//! Tokens as pdx counts them, shared by the mock engine, the router and the trace replayer: a deterministic
//! built-in tokenizer (default), a Hugging Face `tokenizer.json` (feature `hf-tokenizer`), and the chained
//! block hashes of a prompt that prefix caching and KV-aware routing key on (XXH3-64 chained per block, as
//! vLLM and Dynamo do).
//!
//! # Built-in tokenizer
//! Text is split on whitespace; inside each whitespace-separated piece every maximal run of
//! alphanumeric characters (plus `_`) is one token and every other character is one token.
//! Ids: the 270 words of [`WORDS`] map to ids `16..286`; any other token maps to
//! `1024 + xxh3_64(token) % (VOCAB_SIZE - 1024)`. Ids below 16 are special tokens
//! (chat role markers, see [`Tokenizer::chat_prompt`]).
//!
//! [`synthetic_prompt`] builds text whose built-in token count is exactly the requested
//! length, which is what a trace replayer uses to hit an ISL exactly.
//!
//! # Chat template
//! The mock does not run Jinja templates; both tokenizers use the same fixed template:
//! one role token per message, then the message's content tokens, then one
//! "assistant turn" token. A chat request with a single user message of `n` content tokens
//! therefore has a prompt of `n + 2` tokens ([`CHAT_OVERHEAD_TOKENS`] + 1 per extra message).

#![forbid(unsafe_code)]

use pdx_protocol::ChatMessage;
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

/// Errors of the tokenizers.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A `tokenizer.json` could not be loaded or used (fatal: fix the file or the build's features).
    #[error("{0}")]
    Load(String),
    /// The tokenizer failed to encode a text.
    #[error("tokenizer failed: {0}")]
    Encode(String),
}

/// Seed of the first block's hash.
const ROOT_HASH: u64 = 0x7064_782d_6b76_0001;

/// SplitMix64 finalizer: a cheap, good 64-bit mix.
#[inline]
pub fn mix64(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Chained hashes of the prompt's blocks, including a final partial block (whose hash is
/// used for its content only, never for prefix caching). Length: `ceil(tokens / block_size)`.
pub fn block_hashes(tokens: &[u32], block_size: usize) -> Vec<u64> {
    let mut out = Vec::with_capacity(tokens.len().div_ceil(block_size));
    let mut parent = None;
    let mut buf = Vec::with_capacity(block_size * 4);
    for chunk in tokens.chunks(block_size) {
        let h = chain_hash_with(&mut buf, parent, chunk);
        parent = Some(h);
        out.push(h);
    }
    out
}

/// The chained hash of one block: XXH3-64 of its token ids (little-endian `u32`s) seeded with the hash of
/// the block before it (`None`: the first block of a prompt). [`block_hashes`] is this function applied
/// block after block; the router's KV-event index uses it to continue a chain from a known parent block.
pub fn chain_block_hash(parent: Option<u64>, block_tokens: &[u32]) -> u64 {
    chain_hash_with(
        &mut Vec::with_capacity(block_tokens.len() * 4),
        parent,
        block_tokens,
    )
}

fn chain_hash_with(buf: &mut Vec<u8>, parent: Option<u64>, block_tokens: &[u32]) -> u64 {
    buf.clear();
    for t in block_tokens {
        buf.extend_from_slice(&t.to_le_bytes());
    }
    xxh3_64_with_seed(buf, parent.unwrap_or(ROOT_HASH))
}

/// Size of the built-in vocabulary (ids are `< VOCAB_SIZE`).
pub const VOCAB_SIZE: u32 = 151_936;
/// Prompt tokens a one-message chat request adds around the content (role + assistant turn).
pub const CHAT_OVERHEAD_TOKENS: usize = 2;
/// Special token: start of the assistant turn (end of the chat template).
pub const ASSISTANT_TURN_TOKEN: u32 = 5;

/// The built-in vocabulary of words, also used for generated text (each generated token is
/// one of these words, preceded by a space).
pub const WORDS: [&str; 270] = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "a",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "his",
    "from",
    "at",
    "which",
    "but",
    "have",
    "an",
    "had",
    "they",
    "you",
    "were",
    "their",
    "one",
    "all",
    "we",
    "can",
    "her",
    "has",
    "there",
    "been",
    "if",
    "more",
    "when",
    "will",
    "would",
    "who",
    "so",
    "no",
    "she",
    "other",
    "its",
    "may",
    "these",
    "what",
    "them",
    "than",
    "some",
    "him",
    "time",
    "into",
    "only",
    "do",
    "could",
    "new",
    "about",
    "two",
    "then",
    "first",
    "any",
    "like",
    "my",
    "now",
    "over",
    "such",
    "our",
    "man",
    "me",
    "even",
    "most",
    "made",
    "after",
    "also",
    "did",
    "many",
    "before",
    "must",
    "through",
    "years",
    "where",
    "much",
    "your",
    "way",
    "well",
    "down",
    "should",
    "because",
    "each",
    "just",
    "those",
    "people",
    "how",
    "too",
    "little",
    "state",
    "good",
    "very",
    "make",
    "world",
    "still",
    "own",
    "see",
    "work",
    "long",
    "get",
    "here",
    "between",
    "both",
    "life",
    "being",
    "under",
    "never",
    "day",
    "same",
    "another",
    "know",
    "while",
    "last",
    "might",
    "us",
    "great",
    "old",
    "year",
    "off",
    "come",
    "since",
    "against",
    "go",
    "came",
    "right",
    "used",
    "take",
    "three",
    "states",
    "himself",
    "few",
    "house",
    "use",
    "during",
    "without",
    "again",
    "place",
    "around",
    "however",
    "home",
    "small",
    "found",
    "thought",
    "went",
    "say",
    "part",
    "once",
    "general",
    "high",
    "upon",
    "school",
    "every",
    "does",
    "got",
    "united",
    "left",
    "number",
    "course",
    "war",
    "until",
    "always",
    "away",
    "something",
    "fact",
    "though",
    "water",
    "less",
    "public",
    "put",
    "think",
    "almost",
    "hand",
    "enough",
    "far",
    "took",
    "head",
    "yet",
    "government",
    "system",
    "better",
    "set",
    "told",
    "nothing",
    "night",
    "end",
    "why",
    "called",
    "didn",
    "eyes",
    "find",
    "going",
    "look",
    "asked",
    "later",
    "knew",
    "point",
    "next",
    "program",
    "city",
    "business",
    "give",
    "group",
    "toward",
    "young",
    "days",
    "let",
    "room",
    "president",
    "side",
    "social",
    "given",
    "present",
    "several",
    "order",
    "national",
    "possible",
    "rather",
    "second",
    "face",
    "per",
    "among",
    "form",
    "important",
    "often",
    "things",
    "early",
    "white",
    "case",
    "john",
    "become",
    "large",
    "big",
    "need",
    "four",
    "within",
    "felt",
    "along",
    "children",
    "saw",
    "best",
    "church",
    "ever",
    "least",
    "power",
    "development",
    "light",
    "thing",
    "seemed",
    "family",
    "interest",
    "want",
    "members",
    "mind",
    "country",
    "area",
];

/// A tokenizer the mock can use: encodes prompts, and supplies the pieces generated tokens
/// decode to.
pub enum Tokenizer {
    /// Deterministic built-in tokenizer (see module docs).
    Builtin,
    /// Hugging Face tokenizer.
    #[cfg(feature = "hf-tokenizer")]
    Hf(Box<HfTokenizer>),
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Tokenizer::Builtin => f.write_str("Tokenizer::Builtin"),
            #[cfg(feature = "hf-tokenizer")]
            Tokenizer::Hf(_) => f.write_str("Tokenizer::Hf"),
        }
    }
}

/// A loaded `tokenizer.json` plus the table of output pieces.
#[cfg(feature = "hf-tokenizer")]
pub struct HfTokenizer {
    inner: tokenizers::Tokenizer,
    /// `(token id, JSON-escaped decoded text)` for generated tokens.
    outputs: Vec<(u32, String)>,
}

fn builtin_id(tok: &str) -> u32 {
    if let Some(i) = WORDS.iter().position(|w| *w == tok) {
        return 16 + i as u32;
    }
    1024 + (xxh3_64(tok.as_bytes()) % u64::from(VOCAB_SIZE - 1024)) as u32
}

/// Splits `text` into built-in tokens (see module docs), calling `f` on each.
fn builtin_split<'a>(text: &'a str, mut f: impl FnMut(&'a str)) {
    for piece in text.split_whitespace() {
        let mut start: Option<usize> = None;
        for (i, c) in piece.char_indices() {
            if c.is_alphanumeric() || c == '_' {
                start.get_or_insert(i);
            } else {
                if let Some(s) = start.take() {
                    f(&piece[s..i]);
                }
                f(&piece[i..i + c.len_utf8()]);
            }
        }
        if let Some(s) = start {
            f(&piece[s..]);
        }
    }
}

/// The built-in tokens of `text`, in order. Joining them with single spaces gives text with exactly
/// as many built-in tokens (each piece is one token), which is how a replayer turns real text into
/// prompts of an exact length.
pub fn builtin_tokens(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    builtin_split(text, |t| out.push(t));
    out
}

/// Built-in token count of `text`.
pub fn count_builtin_tokens(text: &str) -> usize {
    let mut n = 0;
    builtin_split(text, |_| n += 1);
    n
}

/// Text of exactly `n_tokens` built-in tokens: words of [`WORDS`] separated by spaces, chosen
/// deterministically from `seed`. Two prompts with the same seed share their whole prefix,
/// so `synthetic_prompt(n, s)` is a prefix (in tokens) of `synthetic_prompt(m, s)` for
/// `n <= m` (useful to model prefix-cache hits).
pub fn synthetic_prompt(n_tokens: usize, seed: u64) -> String {
    let mut s = String::with_capacity(n_tokens * 6);
    for i in 0..n_tokens {
        if i > 0 {
            s.push(' ');
        }
        let h = mix64(seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        s.push_str(WORDS[(h % WORDS.len() as u64) as usize]);
    }
    s
}

fn role_token(role: &str) -> u32 {
    match role {
        "system" | "developer" => 1,
        "user" => 2,
        "assistant" => 3,
        _ => 4,
    }
}

impl Tokenizer {
    /// Loads a Hugging Face `tokenizer.json`.
    ///
    /// Errors: [`TokenizerError::Config`] when the file cannot be read or parsed, or when built
    /// without the `hf-tokenizer` feature.
    pub fn from_file(path: &std::path::Path) -> Result<Self, TokenizerError> {
        #[cfg(feature = "hf-tokenizer")]
        {
            let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| {
                TokenizerError::Load(format!("cannot load tokenizer {}: {e}", path.display()))
            })?;
            let text = WORDS.join(" ");
            let enc = inner
                .encode(text.as_str(), false)
                .map_err(|e| TokenizerError::Load(format!("tokenizer cannot encode: {e}")))?;
            let mut outputs = Vec::new();
            for &id in enc.get_ids() {
                let piece = inner.decode(&[id], false).unwrap_or_default();
                let piece = if piece.starts_with(' ') {
                    piece
                } else {
                    format!(" {piece}")
                };
                let json = serde_json::to_string(&piece).expect("string serializes");
                outputs.push((id, json[1..json.len() - 1].to_string()));
            }
            if outputs.is_empty() {
                return Err(TokenizerError::Load("tokenizer produced no tokens".into()));
            }
            Ok(Tokenizer::Hf(Box::new(HfTokenizer { inner, outputs })))
        }
        #[cfg(not(feature = "hf-tokenizer"))]
        {
            Err(TokenizerError::Load(format!(
                "cannot load {}: pdx-mock was built without the `hf-tokenizer` feature",
                path.display()
            )))
        }
    }

    /// Token ids of `text` (no special tokens added).
    ///
    /// Errors: [`TokenizerError::Tokenizer`] if the HF tokenizer fails.
    pub fn encode(&self, text: &str, out: &mut Vec<u32>) -> Result<(), TokenizerError> {
        match self {
            Tokenizer::Builtin => {
                builtin_split(text, |t| out.push(builtin_id(t)));
                Ok(())
            }
            #[cfg(feature = "hf-tokenizer")]
            Tokenizer::Hf(h) => {
                let enc = h
                    .inner
                    .encode(text, false)
                    .map_err(|e| TokenizerError::Encode(e.to_string()))?;
                out.extend_from_slice(enc.get_ids());
                Ok(())
            }
        }
    }

    /// Prompt token ids of a chat request under the fixed template (module docs).
    pub fn chat_prompt(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, TokenizerError> {
        let mut out = Vec::new();
        for m in messages {
            out.push(role_token(&m.role));
            if let Some(c) = &m.content {
                self.encode(&c.text(), &mut out)?;
            }
        }
        out.push(ASSISTANT_TURN_TOKEN);
        Ok(out)
    }

    /// Number of distinct output pieces ([`Self::output_piece`] is periodic in it).
    pub fn output_len(&self) -> usize {
        match self {
            Tokenizer::Builtin => WORDS.len(),
            #[cfg(feature = "hf-tokenizer")]
            Tokenizer::Hf(h) => h.outputs.len(),
        }
    }

    /// JSON-escaped text of the `k`-th generated token choice (`k < output_len()`),
    /// starting with a space.
    pub fn output_piece(&self, k: usize) -> &str {
        match self {
            Tokenizer::Builtin => OUTPUT_PIECES[k],
            #[cfg(feature = "hf-tokenizer")]
            Tokenizer::Hf(h) => &h.outputs[k].1,
        }
    }
}

/// `" " + WORDS[i]`, the built-in output pieces.
static OUTPUT_PIECES: std::sync::LazyLock<Vec<&'static str>> = std::sync::LazyLock::new(|| {
    WORDS
        .iter()
        .map(|w| &*Box::leak(format!(" {w}").into_boxed_str()))
        .collect()
});

/// Index of the output piece of generated token `i` of a request whose prompt hashes to
/// `seed`. Deterministic, so aggregated and disaggregated serving give the same text.
pub fn output_choice(seed: u64, i: u32, n: usize) -> usize {
    (mix64(seed ^ u64::from(i).wrapping_mul(0xA076_1D64_78BD_642F)) % n as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chain_continues_from_its_parent_block() {
        let toks: Vec<u32> = (0..50).map(|i| i * 7 + 3).collect();
        let all = block_hashes(&toks, 16);
        assert_eq!(all.len(), 4);
        assert_eq!(chain_block_hash(None, &toks[..16]), all[0]);
        for i in 1..4 {
            let end = (16 * (i + 1)).min(toks.len());
            assert_eq!(
                chain_block_hash(Some(all[i - 1]), &toks[16 * i..end]),
                all[i]
            );
        }
        // The parent is part of the key: the same tokens under another parent hash differently.
        assert_ne!(chain_block_hash(Some(all[0]), &toks[..16]), all[0]);
    }

    #[test]
    fn builtin_split_rules() {
        let mut v = Vec::new();
        Tokenizer::Builtin
            .encode("Hello, world!  the x_1 é?", &mut v)
            .unwrap();
        assert_eq!(v.len(), 8); // Hello , world ! the x_1 é ?
        assert_eq!(v[4], 16); // "the" is WORDS[0]
        assert_eq!(count_builtin_tokens("Hello, world!  the x_1 é?"), 8);
        assert_eq!(count_builtin_tokens("   "), 0);
    }

    #[test]
    fn synthetic_prompt_has_exact_length_and_shared_prefix() {
        for n in [0usize, 1, 2, 15, 16, 17, 1000] {
            let p = synthetic_prompt(n, 7);
            let mut v = Vec::new();
            Tokenizer::Builtin.encode(&p, &mut v).unwrap();
            assert_eq!(v.len(), n, "prompt {n}");
        }
        let mut a = Vec::new();
        let mut b = Vec::new();
        Tokenizer::Builtin
            .encode(&synthetic_prompt(40, 3), &mut a)
            .unwrap();
        Tokenizer::Builtin
            .encode(&synthetic_prompt(100, 3), &mut b)
            .unwrap();
        assert_eq!(a[..], b[..40]);
        assert_ne!(synthetic_prompt(40, 3), synthetic_prompt(40, 4));
    }

    #[test]
    fn chat_template_overhead_is_exact() {
        let msgs: Vec<ChatMessage> = serde_json::from_str(&format!(
            r#"[{{"role":"user","content":"{}"}}]"#,
            synthetic_prompt(30, 1)
        ))
        .unwrap();
        let ids = Tokenizer::Builtin.chat_prompt(&msgs).unwrap();
        assert_eq!(ids.len(), 30 + CHAT_OVERHEAD_TOKENS);
        assert_eq!(*ids.last().unwrap(), ASSISTANT_TURN_TOKEN);
    }

    #[test]
    fn output_text_retokenizes_to_its_length() {
        let t = Tokenizer::Builtin;
        let text: String = (0..50)
            .map(|i| t.output_piece(output_choice(9, i, t.output_len())))
            .collect();
        assert_eq!(count_builtin_tokens(&text), 50);
    }
}
