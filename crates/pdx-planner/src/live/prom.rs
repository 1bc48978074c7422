//! The Prometheus text format, as much as `pdx plan` reads: `name{label="value",...} number`
//! lines (comments and other lines skipped; a malformed sample line is skipped, not fatal). The line
//! parser is the shared one of `pdx-protocol` (also the router's telemetry scraper's).

/// One sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name (with `_sum`, `_count`, `_bucket` suffixes as written).
    pub name: String,
    /// Labels in order.
    pub labels: Vec<(String, String)>,
    /// Value.
    pub value: f64,
}

/// The samples of a `/metrics` text. Lines go through the shared strict parser
/// ([`pdx_protocol::prom::parse_line`]); `pdx plan` reads its own router's metrics and keeps what it can,
/// so a malformed line is skipped rather than failing the whole read.
pub fn parse(text: &str) -> Vec<Sample> {
    let max_labels = pdx_protocol::prom::Limits::default().max_labels;
    text.lines()
        .filter_map(|line| pdx_protocol::prom::parse_line(line.trim(), max_labels).ok()?)
        .map(|s| Sample {
            name: s.name.to_string(),
            labels: s
                .labels()
                .map(|(k, v)| (k.to_string(), v.into_owned()))
                .collect(),
            value: s.value,
        })
        .collect()
}

/// Sum of the samples named `name` whose labels include every `(key, value)` of `want`.
pub fn sum(samples: &[Sample], name: &str, want: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            want.iter()
                .all(|(k, v)| s.labels.iter().any(|(a, b)| a == k && b == v))
        })
        .map(|s| s.value)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_sums() {
        let t = "# HELP x\n# TYPE pdx_pool_choices_total counter\n\
                 pdx_pool_choices_total{model=\"m\",role=\"prefill\",pool=\"p\"} 12\n\
                 pdx_pool_choices_total{model=\"m\",role=\"decode\",pool=\"d\"} 5\n\
                 vllm:time_to_first_token_seconds_sum{model_name=\"a\\\"b\"} 1.5\n\
                 plain 3\n\
                 broken{model=\"x} 1\n\
                 nan_value{a=\"b\"} x\n";
        let s = parse(t);
        assert_eq!(s.len(), 4);
        assert_eq!(sum(&s, "pdx_pool_choices_total", &[("pool", "p")]), 12.0);
        assert_eq!(sum(&s, "pdx_pool_choices_total", &[]), 17.0);
        assert_eq!(sum(&s, "pdx_pool_choices_total", &[("pool", "q")]), 0.0);
        assert_eq!(s[2].labels[0].1, "a\"b");
        assert_eq!(sum(&s, "plain", &[]), 3.0);
    }
}
