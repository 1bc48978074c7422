//! The Prometheus text exposition format (version 0.0.4, and the OpenMetrics text that
//! `prometheus_client` writes, which vLLM and SGLang serve on `/metrics`): a strict, bounded,
//! zero-copy parser of sample lines, shared by the router's telemetry scraper and `pdx plan`.
//!
//! A line is blank, a comment (`# HELP`, `# TYPE`, `# EOF`, any `#` line), or a sample:
//! `name[{label="value",...}] value [timestamp] [# {exemplar labels} value [timestamp]]`, tokens
//! separated by spaces or tabs (Prometheus's `exposition_formats.md`; OpenMetrics 1.0 for exemplars).
//! Names match `[a-zA-Z_:][a-zA-Z0-9_:]*`, label names `[a-zA-Z_][a-zA-Z0-9_]*`, label values are
//! quoted with `\\`, `\"` and `\n` as the only escapes; values are decimal floats, `NaN`, `+Inf`,
//! `-Inf`; timestamps are integers (or decimals, as OpenMetrics allows). Anything else is an error,
//! naming the line: what a worker sends is untrusted, and a body that does not parse is a failed
//! scrape rather than a guess. Sizes are bounded by [`Limits`].

use std::borrow::Cow;

/// Bounds on one text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest text, bytes.
    pub max_bytes: usize,
    /// Longest line, bytes.
    pub max_line_bytes: usize,
    /// Most samples.
    pub max_samples: usize,
    /// Most labels on one sample.
    pub max_labels: usize,
}

impl Default for Limits {
    /// 8 MiB, lines of 64 KiB, 200 000 samples, 64 labels per sample (a vLLM `/metrics` is some tens
    /// of KiB and a few hundred samples).
    fn default() -> Self {
        Self {
            max_bytes: 8 << 20,
            max_line_bytes: 64 << 10,
            max_samples: 200_000,
            max_labels: 64,
        }
    }
}

/// What is wrong with a text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PromError {
    /// The text is over [`Limits::max_bytes`].
    #[error("metrics text of {bytes} bytes is over the limit of {max}")]
    TooLarge {
        /// Its size.
        bytes: usize,
        /// The limit.
        max: usize,
    },
    /// More samples than [`Limits::max_samples`].
    #[error("more than {max} samples")]
    TooManySamples {
        /// The limit.
        max: usize,
    },
    /// A line that is not a comment or a well-formed sample (or is too long, or has too many labels).
    #[error("line {line}: {what}")]
    BadLine {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        what: &'static str,
    },
}

/// One sample, borrowing from the text.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample<'a> {
    /// Metric name as written (with `_total`, `_sum`, `_count`, `_bucket` suffixes).
    pub name: &'a str,
    /// The label block between the braces, already checked (see [`Sample::labels`]).
    raw_labels: &'a str,
    /// Value.
    pub value: f64,
}

impl<'a> Sample<'a> {
    /// The labels in order, values unescaped (borrowed unless they hold escapes).
    pub fn labels(&self) -> Labels<'a> {
        Labels {
            rest: self.raw_labels,
        }
    }

    /// The value of label `key`, if present.
    pub fn label(&self, key: &str) -> Option<Cow<'a, str>> {
        self.labels().find(|(k, _)| *k == key).map(|(_, v)| v)
    }
}

/// Iterator over a checked label block.
#[derive(Debug, Clone)]
pub struct Labels<'a> {
    rest: &'a str,
}

impl<'a> Iterator for Labels<'a> {
    type Item = (&'a str, Cow<'a, str>);

    fn next(&mut self) -> Option<Self::Item> {
        // The block was checked by `labels_block`, so every step here holds.
        let s = self.rest.trim_start_matches([' ', '\t', ',']);
        if s.is_empty() {
            return None;
        }
        let eq = s.find('=')?;
        let key = s[..eq].trim_end_matches([' ', '\t']);
        let after = s[eq + 1..].trim_start_matches([' ', '\t']);
        let body = after.strip_prefix('"')?;
        let (end, escaped) = value_end(body.as_bytes())?;
        let raw = &body[..end];
        self.rest = &body[end + 1..];
        let v = if escaped {
            let mut out = String::with_capacity(raw.len());
            let mut chars = raw.chars();
            while let Some(c) = chars.next() {
                if c == '\\' {
                    match chars.next() {
                        Some('n') => out.push('\n'),
                        Some(c) => out.push(c),
                        None => {}
                    }
                } else {
                    out.push(c);
                }
            }
            Cow::Owned(out)
        } else {
            Cow::Borrowed(raw)
        };
        Some((key, v))
    }
}

/// The end of a quoted label value (the index of its closing quote) and whether it holds escapes;
/// `None` when unterminated or with an escape other than `\\`, `\"`, `\n`.
fn value_end(b: &[u8]) -> Option<(usize, bool)> {
    let mut i = 0;
    let mut escaped = false;
    while i < b.len() {
        match b[i] {
            b'"' => return Some((i, escaped)),
            b'\\' => {
                if !matches!(b.get(i + 1), Some(b'\\' | b'"' | b'n')) {
                    return None;
                }
                escaped = true;
                i += 2;
            }
            b'\n' => return None,
            _ => i += 1,
        }
    }
    None
}

fn is_blank(c: u8) -> bool {
    c == b' ' || c == b'\t'
}

fn skip_blanks(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && is_blank(b[i]) {
        i += 1;
    }
    i
}

/// Length of a name at the start of `b` (`[a-zA-Z_:][a-zA-Z0-9_:]*`, colons allowed when `colons`).
fn name_len(b: &[u8], colons: bool) -> usize {
    let ok = |c: u8, first: bool| {
        c.is_ascii_alphabetic()
            || c == b'_'
            || (colons && c == b':')
            || (!first && c.is_ascii_digit())
    };
    b.iter()
        .enumerate()
        .take_while(|&(i, &c)| ok(c, i == 0))
        .count()
}

/// Checks the label block starting after `{` at `b[i..]`; returns the index after `}` and the label count.
fn labels_block(b: &[u8], mut i: usize, max_labels: usize) -> Result<(usize, usize), &'static str> {
    let mut n = 0;
    loop {
        i = skip_blanks(b, i);
        match b.get(i) {
            Some(b'}') => return Ok((i + 1, n)),
            None => return Err("unterminated label block"),
            _ => {}
        }
        let k = name_len(&b[i..], false);
        if k == 0 {
            return Err("bad label name");
        }
        i = skip_blanks(b, i + k);
        if b.get(i) != Some(&b'=') {
            return Err("label name without `=`");
        }
        i = skip_blanks(b, i + 1);
        if b.get(i) != Some(&b'"') {
            return Err("label value not quoted");
        }
        let (end, _) = value_end(&b[i + 1..]).ok_or("bad or unterminated label value")?;
        i += 1 + end + 1;
        n += 1;
        if n > max_labels {
            return Err("too many labels");
        }
        i = skip_blanks(b, i);
        match b.get(i) {
            Some(b',') => i += 1,
            Some(b'}') => return Ok((i + 1, n)),
            _ => return Err("expected `,` or `}` after a label"),
        }
    }
}

/// A float as the format writes it.
fn parse_value(s: &str) -> Option<f64> {
    match s {
        "NaN" => return Some(f64::NAN),
        "+Inf" | "Inf" => return Some(f64::INFINITY),
        "-Inf" => return Some(f64::NEG_INFINITY),
        _ => {}
    }
    let digits = s
        .bytes()
        .all(|c| c.is_ascii_digit() || matches!(c, b'.' | b'e' | b'E' | b'+' | b'-'));
    if !digits || !s.bytes().any(|c| c.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn is_timestamp(s: &str) -> bool {
    let s = s.strip_prefix('-').unwrap_or(s);
    let (int, frac) = s.split_once('.').unwrap_or((s, "0"));
    !int.is_empty()
        && int.bytes().all(|c| c.is_ascii_digit())
        && !frac.is_empty()
        && frac.bytes().all(|c| c.is_ascii_digit())
}

/// The next blank-separated token of `b` from `i`: `(start, end)`, or `None` at the end.
fn token(b: &[u8], i: usize) -> Option<(usize, usize)> {
    let s = skip_blanks(b, i);
    if s >= b.len() {
        return None;
    }
    let mut e = s;
    while e < b.len() && !is_blank(b[e]) {
        e += 1;
    }
    Some((s, e))
}

/// Parses one line (without its `\n`): `Ok(None)` for a blank or comment line.
///
/// Errors: what is wrong with the line (`line` is left 0 in [`PromError::BadLine`]; [`for_each_sample`]
/// numbers it).
pub fn parse_line(line: &str, max_labels: usize) -> Result<Option<Sample<'_>>, PromError> {
    let bad = |what| PromError::BadLine { line: 0, what };
    let b = line.as_bytes();
    if b.iter().all(|&c| is_blank(c)) || b.first() == Some(&b'#') {
        return Ok(None);
    }
    if b.iter().any(|&c| c < 0x20 && c != b'\t') {
        return Err(bad("control character"));
    }
    let n = name_len(b, true);
    if n == 0 {
        return Err(bad("bad metric name"));
    }
    let name = &line[..n];
    let mut i = n;
    let mut raw_labels = "";
    if b.get(i) == Some(&b'{') {
        let (end, _) = labels_block(b, i + 1, max_labels).map_err(bad)?;
        raw_labels = &line[i + 1..end - 1];
        i = end;
    }
    if i < b.len() && !is_blank(b[i]) {
        return Err(bad("junk after the metric name"));
    }
    let (vs, ve) = token(b, i).ok_or_else(|| bad("no value"))?;
    let value = parse_value(&line[vs..ve]).ok_or_else(|| bad("bad value"))?;
    let mut i = ve;
    if let Some((s, e)) = token(b, i) {
        if &line[s..e] != "#" {
            if !is_timestamp(&line[s..e]) {
                return Err(bad("bad timestamp"));
            }
            i = e;
        }
    }
    if let Some((s, e)) = token(b, i) {
        // OpenMetrics exemplar: `# {labels} value [timestamp]`; checked, then ignored.
        if &line[s..e] != "#" {
            return Err(bad("junk after the value"));
        }
        let j = skip_blanks(b, e);
        if b.get(j) != Some(&b'{') {
            return Err(bad("bad exemplar"));
        }
        let (end, _) = labels_block(b, j + 1, max_labels).map_err(bad)?;
        let (vs, ve) = token(b, end).ok_or_else(|| bad("exemplar without a value"))?;
        parse_value(&line[vs..ve]).ok_or_else(|| bad("bad exemplar value"))?;
        if let Some((s, e)) = token(b, ve) {
            if !is_timestamp(&line[s..e]) || token(b, e).is_some() {
                return Err(bad("junk after the exemplar"));
            }
        }
    }
    Ok(Some(Sample {
        name,
        raw_labels,
        value,
    }))
}

/// Calls `f` with every sample of `text`, in order; returns how many there were.
///
/// Errors: [`PromError::TooLarge`], [`PromError::TooManySamples`], or [`PromError::BadLine`] for the first
/// line that is too long or not well formed (nothing after it is read; the samples before it were given).
pub fn for_each_sample<'a>(
    text: &'a str,
    limits: &Limits,
    mut f: impl FnMut(Sample<'a>),
) -> Result<usize, PromError> {
    if text.len() > limits.max_bytes {
        return Err(PromError::TooLarge {
            bytes: text.len(),
            max: limits.max_bytes,
        });
    }
    let mut count = 0;
    for (k, line) in text.split('\n').enumerate() {
        let numbered = |e: PromError| match e {
            PromError::BadLine { what, .. } => PromError::BadLine { line: k + 1, what },
            e => e,
        };
        if line.len() > limits.max_line_bytes {
            return Err(numbered(PromError::BadLine {
                line: 0,
                what: "line too long",
            }));
        }
        if let Some(s) = parse_line(line, limits.max_labels).map_err(numbered)? {
            count += 1;
            if count > limits.max_samples {
                return Err(PromError::TooManySamples {
                    max: limits.max_samples,
                });
            }
            f(s);
        }
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    const VLLM: &str =
        "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n\
# TYPE vllm:num_requests_waiting gauge\n\
vllm:num_requests_waiting{engine=\"0\",model_name=\"Qwen/Qwen3-0.6B\"} 3.0\n\
vllm:kv_cache_usage_perc{engine=\"0\",model_name=\"Qwen/Qwen3-0.6B\"} 0.25\n\
vllm:time_to_first_token_seconds_bucket{le=\"+Inf\",model_name=\"m\"} 12\n\
sglang:token_usage{model_name=\"a\\\"b\\\\c\\nd\"} 1e-3 1712345678000\n\
up 1\n\
\n\
x_total{a=\"1\",} -Inf # {trace_id=\"abc\"} 1.0 1.5\n\
# EOF\n";

    /// Name, labels, value.
    type Owned = (String, Vec<(String, String)>, f64);

    fn all(text: &str) -> Result<Vec<Owned>, PromError> {
        let mut out = Vec::new();
        for_each_sample(text, &Limits::default(), |s| {
            out.push((
                s.name.to_string(),
                s.labels()
                    .map(|(k, v)| (k.to_string(), v.into_owned()))
                    .collect(),
                s.value,
            ))
        })?;
        Ok(out)
    }

    #[test]
    fn parses_what_engines_serve() {
        let s = all(VLLM).unwrap();
        assert_eq!(s.len(), 6);
        assert_eq!(s[0].0, "vllm:num_requests_waiting");
        assert_eq!(
            s[0].1,
            vec![
                ("engine".into(), "0".into()),
                ("model_name".into(), "Qwen/Qwen3-0.6B".into())
            ]
        );
        assert_eq!(s[0].2, 3.0);
        assert_eq!(s[1].2, 0.25);
        assert_eq!(s[2].1[0].1, "+Inf");
        assert_eq!(s[3].1[0].1, "a\"b\\c\nd", "escapes undone");
        assert_eq!(s[3].2, 0.001);
        assert_eq!(s[4], ("up".into(), vec![], 1.0));
        assert_eq!(s[5].2, f64::NEG_INFINITY);
        let mut one = None;
        for_each_sample(VLLM, &Limits::default(), |s| {
            if s.name == "vllm:kv_cache_usage_perc" {
                one = s.label("model_name").map(Cow::into_owned);
            }
        })
        .unwrap();
        assert_eq!(one.as_deref(), Some("Qwen/Qwen3-0.6B"));
        // What prometheus-client writes (the router's and the mock's own /metrics).
        let m = "# TYPE a counter\na_total{x=\"y\"} 7\n# EOF\n";
        assert_eq!(all(m).unwrap()[0].2, 7.0);
        assert!(all("a NaN").unwrap()[0].2.is_nan());
    }

    #[test]
    fn malformed_lines_are_errors_naming_the_line() {
        for (text, line) in [
            ("ok 1\nbroken{model=\"x} 1\n", 2),
            ("a{b=\"c\" d=\"e\"} 1", 1),
            ("a{b=c} 1", 1),
            ("a{1b=\"c\"} 1", 1),
            ("a{b=\"\\x\"} 1", 1),
            ("a 1 2 3", 1),
            ("a x", 1),
            ("a", 1),
            ("a 0x10", 1),
            ("a 1 1.", 1),
            ("9a 1", 1),
            ("a-b 1", 1),
            ("a{b=\"c\"}1", 1),
            ("a 1\r", 1),
            ("a 1 # trace", 1),
            ("a\u{0} 1", 1),
        ] {
            match all(text) {
                Err(PromError::BadLine { line: l, .. }) => assert_eq!(l, line, "{text:?}"),
                other => panic!("{text:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn sizes_are_bounded() {
        let lim = Limits {
            max_bytes: 100,
            max_line_bytes: 20,
            max_samples: 2,
            max_labels: 2,
        };
        let f = |t: &str| for_each_sample(t, &lim, |_| {});
        assert!(matches!(
            f(&"a 1\n".repeat(30)),
            Err(PromError::TooLarge { bytes: 120, .. })
        ));
        assert!(matches!(
            f("a 1\nb 2\nc 3\n"),
            Err(PromError::TooManySamples { max: 2 })
        ));
        assert!(matches!(
            f("a{b=\"1111111111111111\"} 1"),
            Err(PromError::BadLine { line: 1, .. })
        ));
        assert!(matches!(
            parse_line("a{b=\"1\",c=\"2\",d=\"3\"} 1", 2),
            Err(PromError::BadLine { .. })
        ));
        assert_eq!(f("# only comments\n\n"), Ok(0));
    }
}
