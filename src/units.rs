//! Byte sizes on the command line: `4096`, `64KiB`, `16MiB`, `1GiB` (also `K`, `M`, `G`, `KB`…, all powers of
//! 1024), and doubling ranges `4KiB..64MiB`, or comma-separated lists.

/// Parses one size in bytes. Errors: a message naming the bad input.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("bad size `{s}`"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        other => {
            return Err(format!(
                "unknown unit `{other}` in `{s}` (B, KiB, MiB, GiB)"
            ))
        }
    };
    n.checked_mul(mult)
        .filter(|&v| v > 0)
        .ok_or_else(|| format!("size `{s}` is zero or too large"))
}

/// Parses `A..B` (A, 2A, 4A, … up to B), or `A,B,C`, or a single size. Errors: bad sizes, an empty range.
pub fn parse_sizes(s: &str) -> Result<Vec<u64>, String> {
    if let Some((a, b)) = s.split_once("..") {
        let (mut a, b) = (parse_size(a)?, parse_size(b)?);
        if a > b {
            return Err(format!("empty range `{s}`"));
        }
        let mut out = Vec::new();
        while a <= b {
            out.push(a);
            a = a.checked_mul(2).ok_or("range overflows")?;
        }
        return Ok(out);
    }
    s.split(',').map(parse_size).collect()
}

/// Formats bytes the way they are parsed: `4KiB`, `16MiB`, `1000B`.
pub fn format_size(b: u64) -> String {
    match b {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{}GiB", b >> 30),
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{}MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{}KiB", b >> 10),
        b => format!("{b}B"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64KiB").unwrap(), 65536);
        assert_eq!(parse_size("16MiB").unwrap(), 16 << 20);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("1g").unwrap(), 1 << 30);
        assert!(parse_size("0").is_err());
        assert!(parse_size("12XB").is_err());
        assert!(parse_size("KiB").is_err());
        assert!(parse_size("99999999999GiB").is_err());
    }

    #[test]
    fn ranges_and_lists() {
        assert_eq!(
            parse_sizes("4KiB..32KiB").unwrap(),
            vec![4096, 8192, 16384, 32768]
        );
        assert_eq!(parse_sizes("64KiB..100KiB").unwrap(), vec![65536]);
        assert_eq!(parse_sizes("1MiB,4KiB").unwrap(), vec![1 << 20, 4096]);
        assert!(parse_sizes("1MiB..4KiB").is_err());
        assert_eq!(format_size(65536), "64KiB");
        assert_eq!(format_size(1000), "1000B");
        assert_eq!(format_size(3 << 30), "3GiB");
    }
}
