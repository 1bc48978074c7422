//! Trace formats, told apart by content (not by file name):
//!
//! - **Mooncake** jsonl (kvcache-ai/Mooncake, FAST'25 traces), chosen when the first non-blank line starts with
//!   `{`: one object per line with `timestamp` (ms from the trace start), `input_length` and `output_length`
//!   (tokens) and `hash_ids` (ids of 512-token prefix blocks; the same id is the same block of text). Other
//!   fields are ignored.
//! - **Azure LLM inference trace** CSV, chosen otherwise: a header line naming the columns `TIMESTAMP`,
//!   `ContextTokens` and `GeneratedTokens` (any order, any case, other columns ignored); `TIMESTAMP` is a
//!   date-time (`2023-11-16 18:15:46.6805900`) or a number of seconds; arrivals are taken relative to the
//!   earliest one.
//!
//! A trace out of time order is sorted by arrival, and [`Trace::notes`] says so. Errors name the line, and for
//! CSV the column, of the first bad value.

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

/// A trace's format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TraceFormat {
    /// Mooncake jsonl.
    MooncakeJsonl,
    /// Azure LLM inference trace CSV.
    AzureCsv,
}

impl TraceFormat {
    /// The format's name, with what in the content chose it.
    pub fn describe(self) -> &'static str {
        match self {
            TraceFormat::MooncakeJsonl => "Mooncake jsonl (the first line is a JSON object)",
            TraceFormat::AzureCsv => {
                "Azure CSV (the first line is a header with TIMESTAMP, ContextTokens, GeneratedTokens)"
            }
        }
    }
}

/// A parsed trace.
#[derive(Clone, Debug)]
pub struct Trace {
    /// The format it was read as.
    pub format: TraceFormat,
    /// Requests in order of arrival.
    pub requests: Vec<TraceRequest>,
    /// What the parser changed, for the user (e.g. that it sorted the requests).
    pub notes: Vec<String>,
}

#[derive(Deserialize)]
struct MooncakeLine {
    timestamp: f64,
    input_length: u32,
    output_length: u32,
    #[serde(default)]
    hash_ids: Vec<u64>,
}

/// Parses a trace from its text; the format comes from the content (module docs).
///
/// Errors: [`ReplayError::Trace`] for an empty text, a first line that is neither a JSON object nor a CSV header
/// with the Azure columns, or a value that does not parse (naming its line, and for CSV its column).
pub fn parse(text: &str) -> Result<Trace, ReplayError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let Some(first) = text.lines().find(|l| !l.trim().is_empty()) else {
        return Err(ReplayError::Trace(
            "the file is empty: a trace is Mooncake jsonl or Azure CSV".into(),
        ));
    };
    let (format, mut requests) = if first.trim_start().starts_with('{') {
        (TraceFormat::MooncakeJsonl, parse_mooncake(text)?)
    } else {
        (TraceFormat::AzureCsv, parse_azure_csv(text)?)
    };
    if requests.is_empty() {
        return Err(ReplayError::Trace(
            "the file has a CSV header but no request".into(),
        ));
    }
    let mut notes = Vec::new();
    if let Some(i) = requests
        .windows(2)
        .position(|w| w[1].0.arrival_ms < w[0].0.arrival_ms)
    {
        notes.push(format!(
            "the trace is not in time order (line {} arrives before line {}): sorted {} requests by arrival",
            requests[i + 1].1,
            requests[i].1,
            requests.len()
        ));
        // Stable: requests of the same arrival keep their order in the file.
        requests.sort_by(|a, b| a.0.arrival_ms.total_cmp(&b.0.arrival_ms));
    }
    Ok(Trace {
        format,
        requests: requests.into_iter().map(|(r, _)| r).collect(),
        notes,
    })
}

fn bad(line: usize, why: impl std::fmt::Display) -> ReplayError {
    ReplayError::Trace(format!("line {line}: {why}"))
}

/// Requests with their line numbers (1-based).
type Lines = Vec<(TraceRequest, usize)>;

fn parse_mooncake(text: &str) -> Result<Lines, ReplayError> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let m: MooncakeLine = serde_json::from_str(l).map_err(|e| {
                bad(
                    i + 1,
                    format!(
                        "{e} (a Mooncake line is {{\"timestamp\": ms, \"input_length\": tokens, \
                         \"output_length\": tokens, \"hash_ids\": [..]}})"
                    ),
                )
            })?;
            if !m.timestamp.is_finite() || m.timestamp < 0.0 {
                return Err(bad(i + 1, "timestamp must be a non-negative number of ms"));
            }
            Ok((
                TraceRequest {
                    arrival_ms: m.timestamp,
                    input_tokens: m.input_length,
                    output_tokens: m.output_length,
                    hash_ids: m.hash_ids,
                },
                i + 1,
            ))
        })
        .collect()
}

/// Seconds since an arbitrary epoch of `2023-11-16 18:15:46.6805900` (days via a civil-date formula), or of a
/// plain number.
fn parse_time_secs(s: &str) -> Option<f64> {
    let s = s.trim();
    if let Ok(v) = s.parse::<f64>() {
        return v.is_finite().then_some(v);
    }
    let (date, time) = s.split_once([' ', 'T'])?;
    let mut d = date.split('-').map(|p| p.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    // A calendar date, not any integers: keeps the day arithmetic below in range (fuzz finding).
    if !(1..=9999).contains(&y) || !(1..=12).contains(&m) || !(1..=31).contains(&day) {
        return None;
    }
    let mut t = time.trim_end_matches('Z').split(':');
    let (hh, mm) = (
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
    );
    let ss = t.next().unwrap_or("0").parse::<f64>().ok()?;
    if !(hh.is_finite() && mm.is_finite() && ss.is_finite()) {
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

/// The Azure columns pdx reads.
const AZURE_COLUMNS: [&str; 3] = ["TIMESTAMP", "ContextTokens", "GeneratedTokens"];

fn parse_azure_csv(text: &str) -> Result<Lines, ReplayError> {
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty());
    let (hi, header) = lines.next().expect("parse checked a non-blank line");
    let cells: Vec<String> = header
        .split(',')
        .map(|c| c.trim().trim_matches('"').to_string())
        .collect();
    let col = |name: &str| cells.iter().position(|h| h.eq_ignore_ascii_case(name));
    let found: Vec<Option<usize>> = AZURE_COLUMNS.iter().map(|n| col(n)).collect();
    if found.iter().any(Option::is_none) {
        let missing: Vec<&str> = AZURE_COLUMNS
            .iter()
            .zip(&found)
            .filter(|(_, f)| f.is_none())
            .map(|(n, _)| *n)
            .collect();
        let shown: String = header.chars().take(120).collect();
        return Err(bad(
            hi + 1,
            format!(
                "not a trace: the first line is not a JSON object (Mooncake jsonl), and as a CSV header \
                 (Azure) it lacks the column{} {} (it reads `{shown}`)",
                if missing.len() > 1 { "s" } else { "" },
                missing.join(", ")
            ),
        ));
    }
    let (ti, ci, gi) = (
        found[0].expect("checked"),
        found[1].expect("checked"),
        found[2].expect("checked"),
    );
    let mut rows = Vec::new();
    for (i, l) in lines {
        let f: Vec<&str> = l.split(',').map(|c| c.trim().trim_matches('"')).collect();
        let get = |k: usize| {
            f.get(k).copied().ok_or_else(|| {
                bad(
                    i + 1,
                    format!(
                        "{} columns, but the header names {} (column {} is missing)",
                        f.len(),
                        cells.len(),
                        cells[k]
                    ),
                )
            })
        };
        let cell = |k: usize, why: &str| {
            let v = f.get(k).copied().unwrap_or_default();
            bad(i + 1, format!("column {}: `{v}` {why}", cells[k]))
        };
        let t = parse_time_secs(get(ti)?).ok_or_else(|| {
            cell(
                ti,
                "is neither a date-time (2023-11-16 18:15:46.68) nor a number of seconds",
            )
        })?;
        let tokens = |k: usize| -> Result<u32, ReplayError> {
            get(k)?
                .parse::<u32>()
                .map_err(|_| cell(k, "is not a whole number of tokens"))
        };
        rows.push((t, tokens(ci)?, tokens(gi)?, i + 1));
    }
    let t0 = rows.iter().map(|r| r.0).fold(f64::INFINITY, f64::min);
    Ok(rows
        .into_iter()
        .map(|(t, input, output, line)| {
            (
                TraceRequest {
                    arrival_ms: (t - t0) * 1000.0,
                    input_tokens: input,
                    output_tokens: output,
                    hash_ids: Vec::new(),
                },
                line,
            )
        })
        .collect())
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
        assert_eq!(t.format, TraceFormat::MooncakeJsonl);
        let r = &t.requests;
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].arrival_ms, 0.0); // sorted by arrival
        assert_eq!(r[1].hash_ids, vec![0, 7]);
        assert_eq!(r[1].input_tokens, 600);
        assert!(
            t.notes[0].contains("line 2 arrives before line 1"),
            "{:?}",
            t.notes
        );
        assert!(parse("{\"timestamp\": -1, \"input_length\": 1, \"output_length\": 1}").is_err());
        let err = parse("{}\n").unwrap_err().to_string();
        assert!(err.contains("line 1") && err.contains("timestamp"), "{err}");
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
        assert_eq!(t.format, TraceFormat::AzureCsv);
        assert!(t.notes.is_empty());
        let r = &t.requests;
        assert_eq!(r[0].arrival_ms, 0.0);
        assert!(
            (r[1].arrival_ms - 4314.579).abs() < 0.01,
            "{}",
            r[1].arrival_ms
        );
        // Across midnight: 5 h 44 min 13.3194100 s after the first.
        assert!(
            (r[2].arrival_ms - 20_653_319.41).abs() < 1.0,
            "{}",
            r[2].arrival_ms
        );
        assert_eq!((r[1].input_tokens, r[1].output_tokens), (396, 109));
        // Column order and case do not matter; other columns are ignored.
        let t = parse("generatedtokens,extra,ContextTokens,timestamp\n7,x,5,12.5\n").unwrap();
        assert_eq!(
            (t.requests[0].input_tokens, t.requests[0].output_tokens),
            (5, 7)
        );
    }

    #[test]
    fn an_unsorted_azure_csv_is_sorted_and_says_so() {
        // Before: arrivals were taken relative to the first line, so a later line that arrived earlier gave a
        // negative arrival and a panic ("cannot convert float seconds to Duration").
        let t = parse(
            "TIMESTAMP,ContextTokens,GeneratedTokens\n\
             2023-11-16 18:15:50,1,1\n\
             2023-11-16 18:15:40,2,2\n\
             2023-11-16 18:15:45,3,3\n",
        )
        .unwrap();
        let inputs: Vec<u32> = t.requests.iter().map(|r| r.input_tokens).collect();
        assert_eq!(inputs, vec![2, 3, 1]);
        let arrivals: Vec<f64> = t.requests.iter().map(|r| r.arrival_ms).collect();
        assert_eq!(arrivals, vec![0.0, 5000.0, 10_000.0]);
        assert!(
            t.notes[0].contains("not in time order") && t.notes[0].contains("line 3"),
            "{:?}",
            t.notes
        );
    }

    #[test]
    fn bad_csv_values_name_line_and_column() {
        let err = parse("TIMESTAMP,ContextTokens,GeneratedTokens\n1,2,3\n2,lots,3\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("line 3")
                && err.contains("column ContextTokens")
                && err.contains("`lots`"),
            "{err}"
        );
        let err = parse("TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,1,2\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("column TIMESTAMP"), "{err}");
        let err = parse("TIMESTAMP,ContextTokens,GeneratedTokens\n1,2\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("column GeneratedTokens is missing"), "{err}");
    }

    #[test]
    fn unknown_csv_headers_name_the_missing_columns() {
        // Before: anything not starting with TIMESTAMP was read as jsonl and failed with a JSON parse error.
        let err = parse("time,prompt_tokens,GeneratedTokens\n1,2,3\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("TIMESTAMP, ContextTokens") && err.contains("time,prompt_tokens"),
            "{err}"
        );
        assert!(!err.contains("expected value"), "no JSON error: {err}");
    }

    #[test]
    fn an_empty_file_says_it_is_empty() {
        for text in ["", "\n\n  \n", "\u{feff}"] {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains("empty"), "{err}");
        }
        let err = parse("TIMESTAMP,ContextTokens,GeneratedTokens\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("no request"), "{err}");
    }
}
