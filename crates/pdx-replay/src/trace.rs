//! Trace formats.
//!
//! - **Mooncake** jsonl (kvcache-ai/Mooncake, FAST'25 traces): one object per line with `timestamp` (ms from
//!   the trace start), `input_length` and `output_length` (tokens) and `hash_ids` (ids of 512-token prefix
//!   blocks; the same id is the same block of text).
//! - **Azure LLM inference trace** CSV: header `TIMESTAMP,ContextTokens,GeneratedTokens`; `TIMESTAMP` is a
//!   date-time (`2023-11-16 18:15:46.6805900`) or a number of seconds; arrivals are taken relative to the first.

use serde::Deserialize;

use crate::ReplayError;

/// Tokens per Mooncake `hash_ids` block.
pub const MOONCAKE_BLOCK_TOKENS: usize = 512;

/// One request of a trace.
#[derive(Clone, Debug, PartialEq)]
pub struct TraceRequest {
    /// Arrival time from the start of the trace, in ms.
    pub arrival_ms: f64,
    /// Prompt length in tokens (ISL).
    pub input_tokens: u32,
    /// Output length in tokens (OSL).
    pub output_tokens: u32,
    /// Prefix-block ids (Mooncake); empty for formats without them.
    pub hash_ids: Vec<u64>,
}

#[derive(Deserialize)]
struct MooncakeLine {
    timestamp: f64,
    input_length: u32,
    output_length: u32,
    #[serde(default)]
    hash_ids: Vec<u64>,
}

/// Parses a trace from its text, by format: CSV when the first line starts with `TIMESTAMP`, jsonl otherwise.
///
/// Errors: [`ReplayError::Trace`] naming the line that does not parse.
pub fn parse(text: &str) -> Result<Vec<TraceRequest>, ReplayError> {
    let first = text.lines().next().unwrap_or_default();
    let mut out = if first.trim_start().starts_with("TIMESTAMP") {
        parse_azure_csv(text)?
    } else {
        parse_mooncake(text)?
    };
    out.sort_by(|a, b| a.arrival_ms.total_cmp(&b.arrival_ms));
    Ok(out)
}

fn bad(line: usize, why: impl std::fmt::Display) -> ReplayError {
    ReplayError::Trace(format!("line {line}: {why}"))
}

fn parse_mooncake(text: &str) -> Result<Vec<TraceRequest>, ReplayError> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let m: MooncakeLine = serde_json::from_str(l).map_err(|e| bad(i + 1, e))?;
            if !m.timestamp.is_finite() || m.timestamp < 0.0 {
                return Err(bad(i + 1, "timestamp must be a non-negative number of ms"));
            }
            Ok(TraceRequest {
                arrival_ms: m.timestamp,
                input_tokens: m.input_length,
                output_tokens: m.output_length,
                hash_ids: m.hash_ids,
            })
        })
        .collect()
}

/// Seconds since an arbitrary epoch of `2023-11-16 18:15:46.6805900` (days via a civil-date formula), or of a
/// plain number.
fn parse_time_secs(s: &str) -> Option<f64> {
    let s = s.trim();
    if let Ok(v) = s.parse::<f64>() {
        return Some(v);
    }
    let (date, time) = s.split_once([' ', 'T'])?;
    let mut d = date.split('-').map(|p| p.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.trim_end_matches('Z').split(':');
    let (hh, mm) = (
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
    );
    let ss = t.next().unwrap_or("0").parse::<f64>().ok()?;
    // A calendar date, not any integers: keeps the day arithmetic below in range (fuzz finding).
    if !(1..=9999).contains(&y) || !(1..=12).contains(&m) || !(1..=31).contains(&day) {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe;
    Some(days as f64 * 86_400.0 + hh * 3600.0 + mm * 60.0 + ss)
}

fn parse_azure_csv(text: &str) -> Result<Vec<TraceRequest>, ReplayError> {
    let mut lines = text.lines().enumerate();
    let header: Vec<String> = lines
        .next()
        .map(|(_, h)| h.split(',').map(|c| c.trim().to_string()).collect())
        .unwrap_or_default();
    let col = |name: &str| {
        header
            .iter()
            .position(|h| h == name)
            .ok_or_else(|| bad(1, format!("missing column {name}")))
    };
    let (ti, ci, gi) = (
        col("TIMESTAMP")?,
        col("ContextTokens")?,
        col("GeneratedTokens")?,
    );
    let mut first: Option<f64> = None;
    lines
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let f: Vec<&str> = l.split(',').collect();
            let get = |k: usize| {
                f.get(k)
                    .copied()
                    .ok_or_else(|| bad(i + 1, "too few columns"))
            };
            let t = parse_time_secs(get(ti)?).ok_or_else(|| bad(i + 1, "bad TIMESTAMP"))?;
            let t0 = *first.get_or_insert(t);
            let num = |k: usize| -> Result<u32, ReplayError> {
                get(k)?.trim().parse().map_err(|e| bad(i + 1, e))
            };
            Ok(TraceRequest {
                arrival_ms: (t - t0) * 1000.0,
                input_tokens: num(ci)?,
                output_tokens: num(gi)?,
                hash_ids: Vec::new(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mooncake_lines() {
        let t = parse(
            "{\"timestamp\": 3000, \"input_length\": 600, \"output_length\": 5, \"hash_ids\": [0, 7]}\n\
             {\"timestamp\": 0, \"input_length\": 10, \"output_length\": 2, \"hash_ids\": [0]}\n",
        )
        .unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].arrival_ms, 0.0); // sorted by arrival
        assert_eq!(t[1].hash_ids, vec![0, 7]);
        assert_eq!(t[1].input_tokens, 600);
        assert!(parse("{\"timestamp\": -1, \"input_length\": 1, \"output_length\": 1}").is_err());
        let err = parse("{}\n").unwrap_err().to_string();
        assert!(err.contains("line 1"), "{err}");
    }

    #[test]
    fn azure_dates_out_of_calendar_range_are_errors_not_overflows() {
        // Found by the `trace` fuzz target: a year of 17 digits overflowed the day arithmetic.
        let err = parse(
            "TIMESTAMP,ContextTokens,GeneratedTokens\n\
             204444444440000023-11-16 18:15:46,374,44\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("line 2"), "{err}");
        assert!(
            parse("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-13-01 00:00:00,1,1\n").is_err()
        );
    }

    #[test]
    fn azure_csv() {
        let t = parse(
            "TIMESTAMP,ContextTokens,GeneratedTokens\n\
             2023-11-16 18:15:46.6805900,374,44\n\
             2023-11-16 18:15:50.9951690,396,109\n\
             2023-11-17 00:00:00,10,1\n",
        )
        .unwrap();
        assert_eq!(t[0].arrival_ms, 0.0);
        assert!(
            (t[1].arrival_ms - 4314.579).abs() < 0.01,
            "{}",
            t[1].arrival_ms
        );
        // Across midnight: 5 h 44 min 13.3194100 s after the first.
        assert!(
            (t[2].arrival_ms - 20_653_319.41).abs() < 1.0,
            "{}",
            t[2].arrival_ms
        );
        assert_eq!((t[1].input_tokens, t[1].output_tokens), (396, 109));
        assert!(parse("TIMESTAMP,ContextTokens\n1,2\n").is_err());
        assert!(parse("TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,1,2\n").is_err());
    }
}
