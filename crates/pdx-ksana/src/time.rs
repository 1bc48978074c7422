//! Timestamps as the peer stores and answers them.
//!
//! The peer (SQLAlchemy `DateTime(timezone=True)`) keeps UTC wall time: in SQLite as the text
//! `YYYY-MM-DD HH:MM:SS.ffffff`, in MySQL as a `DATETIME` (whole seconds). Its answers serialize with pydantic:
//! an aware UTC time as `2026-01-02T03:04:05.123456Z` (`last_heartbeat`), the heartbeat's `timestamp`
//! (`datetime.now()`) as naive local time `2026-01-02T03:04:05.123456`; pydantic leaves the fraction out when
//! it is zero.

use chrono::{DateTime, Local, NaiveDateTime, Utc};

/// A point in time: microseconds since the Unix epoch, UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Ts(pub i64);

impl Ts {
    /// Now, from the system clock.
    pub fn now() -> Ts {
        Ts(Utc::now().timestamp_micros())
    }

    /// `self` minus `us` microseconds (saturating).
    pub fn minus_us(self, us: i64) -> Ts {
        Ts(self.0.saturating_sub(us))
    }

    fn utc(self) -> NaiveDateTime {
        DateTime::<Utc>::from_timestamp_micros(self.0)
            .unwrap_or(DateTime::<Utc>::UNIX_EPOCH)
            .naive_utc()
    }

    /// The stored form, `YYYY-MM-DD HH:MM:SS.ffffff` in UTC (SQLAlchemy's SQLite `DATETIME` text; MySQL reads
    /// the same literal and keeps whole seconds).
    pub fn to_db(self) -> String {
        self.utc().format("%Y-%m-%d %H:%M:%S%.6f").to_string()
    }

    /// Reads a stored time: `YYYY-MM-DD HH:MM:SS` with an optional fraction of up to 9 digits, or a `T`
    /// between date and time, as UTC. `None` for anything else.
    pub fn from_db(s: &str) -> Option<Ts> {
        let s = s.trim();
        let s = s.strip_suffix('Z').unwrap_or(s);
        let s = s.strip_suffix("+00:00").unwrap_or(s);
        for f in ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f"] {
            if let Ok(t) = NaiveDateTime::parse_from_str(s, f) {
                return Some(Ts(t.and_utc().timestamp_micros()));
            }
        }
        // A date alone (SQLAlchemy's reader accepts it too).
        chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
            .ok()
            .and_then(|d| d.and_hms_opt(0, 0, 0))
            .map(|t| Ts(t.and_utc().timestamp_micros()))
    }

    /// An aware UTC time as pydantic writes it: `2026-01-02T03:04:05.123456Z`, no fraction when it is zero.
    pub fn iso_utc(self) -> String {
        let t = self.utc();
        format!("{}Z", iso_naive(t))
    }

    /// Naive local time as pydantic writes Python's `datetime.now()`: `2026-01-02T03:04:05.123456`.
    pub fn iso_local(self) -> String {
        let t = DateTime::<Utc>::from_timestamp_micros(self.0)
            .unwrap_or(DateTime::<Utc>::UNIX_EPOCH)
            .with_timezone(&Local)
            .naive_local();
        iso_naive(t)
    }
}

fn iso_naive(t: NaiveDateTime) -> String {
    use chrono::Timelike;
    if t.nanosecond() / 1000 == 0 {
        t.format("%Y-%m-%dT%H:%M:%S").to_string()
    } else {
        t.format("%Y-%m-%dT%H:%M:%S%.6f").to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_and_answered_forms() {
        // 2026-12-05 10:33:34.569341 UTC
        let t = Ts::from_db("2026-12-05 10:33:34.569341").unwrap();
        assert_eq!(t.to_db(), "2026-12-05 10:33:34.569341");
        assert_eq!(t.iso_utc(), "2026-12-05T10:33:34.569341Z");
        let whole = Ts::from_db("2026-12-05 10:33:34").unwrap();
        assert_eq!(whole.to_db(), "2026-12-05 10:33:34.000000");
        assert_eq!(whole.iso_utc(), "2026-12-05T10:33:34Z");
        assert_eq!(t.0 - whole.0, 569_341);
        assert_eq!(
            Ts::from_db("2026-12-05T10:33:34.5Z").unwrap().0 - whole.0,
            500_000
        );
        assert_eq!(
            Ts::from_db("2026-12-05").unwrap().to_db(),
            "2026-12-05 00:00:00.000000"
        );
        for bad in [
            "",
            "yesterday",
            "2026-13-01 00:00:00",
            "2026-12-05 25:00:00",
        ] {
            assert_eq!(Ts::from_db(bad), None, "{bad}");
        }
        // Local time: the same instant, never a `Z`.
        let l = t.iso_local();
        assert!(
            !l.ends_with('Z') && l.len() == "2026-12-05T10:33:34.569341".len(),
            "{l}"
        );
    }

    #[test]
    fn now_moves_forward() {
        let a = Ts::now();
        assert!(a.0 > 1_600_000_000_000_000);
        assert!(a.minus_us(10) < a);
        assert_eq!(Ts(i64::MIN + 5).minus_us(10), Ts(i64::MIN));
    }
}
