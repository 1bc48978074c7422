//! `--plot`: a PNG of TTFT and TPOT (mean ITL) per request over the replay's time, with the SLO targets, the
//! p50/p90/p99 of each panel, and the failed requests marked at their send time.

use std::path::Path;

use plotters::prelude::*;

use crate::report::{RequestRecord, Slo};
use crate::ReplayError;

/// Where fonts are looked for (Debian's `fonts-dejavu-core`), unless `PDX_PLOT_FONT` names a `.ttf` file.
const FONT_PATHS: [&str; 2] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

/// Registers the plot's font. Called before a replay starts, so a missing font stops it before any request.
///
/// Errors: [`ReplayError::Invalid`] when no TrueType font is found.
pub fn check_font() -> Result<(), ReplayError> {
    static REGISTERED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        let path = std::env::var("PDX_PLOT_FONT")
            .ok()
            .into_iter()
            .chain(FONT_PATHS.iter().map(|s| s.to_string()))
            .find(|p| Path::new(p).exists());
        let Some(bytes) = path.and_then(|p| std::fs::read(p).ok()) else {
            return false;
        };
        // plotters keeps fonts for the life of the process.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(ReplayError::Invalid(
            "--plot needs a TrueType font: install fonts-dejavu-core or set PDX_PLOT_FONT".into(),
        ))
    }
}

fn err(e: impl std::fmt::Display) -> ReplayError {
    ReplayError::Output(format!("plot: {e}"))
}

/// p50, p90 and p99 of `v` (nearest rank), `None` when empty.
fn quantiles(v: &[f64]) -> Option<[f64; 3]> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let q = |p: f64| s[((p * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1];
    Some([q(0.5), q(0.9), q(0.99)])
}

const BLUE: RGBColor = RGBColor(31, 119, 180);
const RED: RGBColor = RGBColor(214, 39, 40);
const GREY: RGBColor = RGBColor(90, 90, 90);
const ORANGE: RGBColor = RGBColor(255, 127, 14);

/// Draws TTFT (top) and TPOT (bottom), ms, against the send time, s, into a 1200 × 800 PNG at `path`: every
/// succeeded request is a dot, every failed one a red cross on the time axis, each panel has its SLO target
/// (solid line, when given) and its p50/p90/p99 (dashed lines over a shaded p50–p99 band). `title` heads it.
/// When no request succeeded, the image says so instead of drawing empty axes.
///
/// Errors: no font ([`check_font`]), or the file cannot be written.
pub fn write_png(
    path: &Path,
    records: &[RequestRecord],
    slo: Slo,
    title: &str,
) -> Result<(), ReplayError> {
    check_font()?;
    let root = BitMapBackend::new(path, (1200, 800)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let root = root.titled(title, ("sans-serif", 20)).map_err(err)?;
    let ok: Vec<&RequestRecord> = records.iter().filter(|r| r.succeeded()).collect();
    let failed: Vec<f64> = records
        .iter()
        .filter(|r| !r.succeeded())
        .map(|r| r.sent_s)
        .collect();
    if ok.is_empty() {
        let (_, h) = root.dim_in_pixel();
        // The failures as the report groups them, most frequent first.
        let report = crate::report::build(records, 0.0, Slo::default());
        let mut lines = vec![format!(
            "All {} requests failed: nothing to plot.",
            records.len()
        )];
        lines.extend(
            report
                .failures
                .iter()
                .take(5)
                .map(|g| format!("{} × {g}", g.count)),
        );
        for (i, line) in lines.iter().enumerate() {
            let shown: String = line.chars().take(110).collect();
            root.draw(&Text::new(
                shown,
                (40, h as i32 / 2 - 40 + 36 * i as i32),
                ("sans-serif", 22).into_font().color(&RED),
            ))
            .map_err(err)?;
        }
        root.present().map_err(err)?;
        return Ok(());
    }
    let (top, bottom) = root.split_vertically(380);
    let t_max = records.iter().map(|r| r.sent_s).fold(1.0, f64::max) * 1.02;
    let panels = [
        (
            "TTFT (ms)",
            ok.iter()
                .filter_map(|r| r.ttft_ms.map(|v| (r.sent_s, v)))
                .collect::<Vec<_>>(),
            BLUE,
            slo.ttft_ms,
        ),
        (
            "TPOT (ms)",
            ok.iter()
                .filter_map(|r| r.tpot_ms.map(|v| (r.sent_s, v)))
                .collect::<Vec<_>>(),
            ORANGE,
            slo.itl_ms,
        ),
    ];
    for (area, (label, data, color, target)) in [top, bottom].iter().zip(panels) {
        let values: Vec<f64> = data.iter().map(|p| p.1).collect();
        let q = quantiles(&values);
        let y_max = values
            .iter()
            .copied()
            .chain(target)
            .chain(q.map(|q| q[2]))
            .fold(1.0, f64::max)
            * 1.1;
        let mut chart = ChartBuilder::on(area)
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(64)
            .build_cartesian_2d(0.0..t_max, 0.0..y_max)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("time since start (s)")
            .y_desc(label)
            .draw()
            .map_err(err)?;
        if let Some([p50, p90, p99]) = q {
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(0.0, p50), (t_max, p99)],
                    color.mix(0.08).filled(),
                )))
                .map_err(err)?;
            for (name, v, mix) in [("p50", p50, 0.5), ("p90", p90, 0.7), ("p99", p99, 0.9)] {
                let style = GREY.mix(mix).stroke_width(1);
                chart
                    .draw_series(DashedLineSeries::new([(0.0, v), (t_max, v)], 6, 4, style))
                    .map_err(err)?
                    .label(format!("{name} {v:.1} ms"))
                    .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], style));
            }
        }
        if let Some(t) = target {
            let style = RED.stroke_width(2);
            chart
                .draw_series(LineSeries::new([(0.0, t), (t_max, t)], style))
                .map_err(err)?
                .label(format!("SLO {t} ms"))
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], style));
        }
        chart
            .draw_series(
                data.iter()
                    .map(|&(x, y)| Circle::new((x, y), 2, color.filled())),
            )
            .map_err(err)?
            .label(format!("{} succeeded", data.len()))
            .legend(move |(x, y)| Circle::new((x + 9, y), 3, color.filled()));
        if !failed.is_empty() {
            chart
                .draw_series(
                    failed
                        .iter()
                        .map(|&x| Cross::new((x, 0.0), 5, RED.stroke_width(2))),
                )
                .map_err(err)?
                .label(format!("{} failed (at send time)", failed.len()))
                .legend(|(x, y)| Cross::new((x + 9, y), 4, RED.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(GREY)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

/// Today's date and time in UTC, `2026-05-01 12:34 UTC` (days from the Unix epoch by Howard Hinnant's
/// civil-from-days algorithm).
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60
    )
}

/// One panel of [`write_lines_png`]: its y label and its named series of `(x, y)` points.
pub type Panel = (String, Vec<(String, Vec<(f64, f64)>)>);

const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// Draws panels of line series stacked vertically (shared x axis labelled `x_label`) into a
/// 1200 × 400·panels PNG at `path` (`pdx sim --planner-plot`: request rate, replicas per pool).
///
/// Errors: no font available, or the file cannot be written.
pub fn write_lines_png(
    path: &Path,
    title: &str,
    x_label: &str,
    panels: &[Panel],
) -> Result<(), ReplayError> {
    check_font()?;
    let h = 40 + 380 * panels.len().max(1) as u32;
    let root = BitMapBackend::new(path, (1200, h)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let root = root.titled(title, ("sans-serif", 22)).map_err(err)?;
    let areas = root.split_evenly((panels.len().max(1), 1));
    let x_max = panels
        .iter()
        .flat_map(|p| p.1.iter().flat_map(|s| s.1.iter().map(|q| q.0)))
        .fold(1.0, f64::max);
    for (area, (label, series)) in areas.iter().zip(panels) {
        let y_max = series
            .iter()
            .flat_map(|s| s.1.iter().map(|q| q.1))
            .fold(1.0, f64::max)
            * 1.1;
        let mut chart = ChartBuilder::on(area)
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(64)
            .build_cartesian_2d(0.0..x_max, 0.0..y_max)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc(label.as_str())
            .draw()
            .map_err(err)?;
        for (k, (name, pts)) in series.iter().enumerate() {
            let color = PALETTE[k % PALETTE.len()];
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
                .map_err(err)?
                .label(name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(i: usize, ok: bool) -> RequestRecord {
        RequestRecord {
            index: i,
            sent_s: i as f64 * 0.1,
            ttft_ms: ok.then_some(10.0 + i as f64),
            tpot_ms: ok.then_some(3.0),
            error: (!ok).then(|| "http_503".into()),
            message: (!ok).then(|| "overloaded".into()),
            ..Default::default()
        }
    }

    fn png(name: &str, records: &[RequestRecord]) -> Vec<u8> {
        let dir = std::env::temp_dir().join(format!("pdx-plot-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("replay.png");
        let slo = Slo {
            ttft_ms: Some(40.0),
            itl_ms: Some(5.0),
        };
        write_png(&path, records, slo, "pdx replay: test").unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        bytes
    }

    #[test]
    fn writes_line_panels() {
        let dir = std::env::temp_dir().join(format!("pdx-plot-{}-lines", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let lines = dir.join("lines.png");
        let panels: Vec<Panel> = vec![
            (
                "rate".into(),
                vec![("req/s".into(), vec![(0.0, 1.0), (10.0, 4.0)])],
            ),
            (
                "replicas".into(),
                vec![
                    ("prefill".into(), vec![(0.0, 1.0), (10.0, 3.0)]),
                    ("decode".into(), vec![(0.0, 2.0), (10.0, 2.0)]),
                ],
            ),
        ];
        write_lines_png(&lines, "planner", "time (s)", &panels).unwrap();
        let bytes = std::fs::read(&lines).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        assert!(bytes.len() > 5_000, "a drawn chart, not an empty image");
    }

    #[test]
    fn writes_a_png_with_failures_marked() {
        let records: Vec<RequestRecord> = (0..50).map(|i| record(i, i % 10 != 3)).collect();
        let bytes = png("mixed", &records);
        assert!(bytes.len() > 5_000, "a drawn chart, not an empty image");
    }

    #[test]
    fn an_all_failed_run_draws_a_message_not_axes() {
        let records: Vec<RequestRecord> = (0..5).map(|i| record(i, false)).collect();
        let failed = png("failed", &records);
        let ok: Vec<RequestRecord> = (0..5).map(|i| record(i, true)).collect();
        let drawn = png("ok", &ok);
        assert!(
            failed.len() < drawn.len(),
            "a line of text is a smaller PNG than two charts ({} vs {})",
            failed.len(),
            drawn.len()
        );
    }

    #[test]
    fn quantiles_by_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantiles(&v), Some([50.0, 90.0, 99.0]));
        assert_eq!(quantiles(&[]), None);
        assert_eq!(quantiles(&[7.0]), Some([7.0, 7.0, 7.0]));
    }

    #[test]
    fn utc_date_format() {
        let s = utc_now();
        assert_eq!(s.len(), "2026-05-01 12:34 UTC".len(), "{s}");
        assert!(s.starts_with("20") && s.ends_with(" UTC"), "{s}");
    }
}
