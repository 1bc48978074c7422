//! The Prometheus text format, as much as `pdx plan` reads: `name{label="value",...} number`
//! lines (comments and other lines skipped; a malformed sample line is skipped, not fatal).

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

fn parse_labels(s: &str) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut rest = s;
    while !rest.trim().is_empty() {
        let (k, r) = rest.split_once('=')?;
        let r = r.trim_start().strip_prefix('"')?;
        // Values may hold escaped quotes.
        let mut val = String::new();
        let mut chars = r.char_indices();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next()?.1 {
                    'n' => val.push('\n'),
                    c => val.push(c),
                },
                '"' => {
                    end = Some(i);
                    break;
                }
                c => val.push(c),
            }
        }
        out.push((k.trim().trim_start_matches(',').trim().to_string(), val));
        rest = r[end? + 1..].trim_start().trim_start_matches(',');
    }
    Some(out)
}

/// The samples of a `/metrics` text.
pub fn parse(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, labels, rest) = match line.find('{') {
            Some(i) => {
                let Some(j) = line.rfind('}') else { continue };
                let Some(l) = parse_labels(&line[i + 1..j]) else {
                    continue;
                };
                (&line[..i], l, &line[j + 1..])
            }
            None => match line.split_once(' ') {
                Some((n, r)) => (n, Vec::new(), r),
                None => continue,
            },
        };
        let Some(v) = rest.split_whitespace().next().and_then(|v| v.parse().ok()) else {
            continue;
        };
        out.push(Sample {
            name: name.to_string(),
            labels,
            value: v,
        });
    }
    out
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
