//! `--plot`: a PNG of TTFT and TPOT (mean ITL) per request over the replay's time.

use std::path::Path;

use plotters::prelude::*;

use crate::report::Points;
use crate::ReplayError;

/// Where fonts are looked for (Debian's `fonts-dejavu-core`), unless `PDX_PLOT_FONT` names a `.ttf` file.
const FONT_PATHS: [&str; 2] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

fn register_font() -> Result<(), ReplayError> {
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

/// One panel: its y label, its points `(s, ms)` and their colour.
type Series<'a> = (&'a str, Vec<(f64, f64)>, RGBColor);

fn err(e: impl std::fmt::Display) -> ReplayError {
    ReplayError::Invalid(format!("plot: {e}"))
}

/// Draws TTFT (top) and TPOT (bottom), ms, against the send time, s, into a 1200 × 800 PNG at `path`.
///
/// Errors: no font available, or the file cannot be written.
pub fn write_png(path: &Path, points: &Points, title: &str) -> Result<(), ReplayError> {
    register_font()?;
    let root = BitMapBackend::new(path, (1200, 800)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let root = root.titled(title, ("sans-serif", 22)).map_err(err)?;
    let (top, bottom) = root.split_vertically(390);
    let t_max = points.iter().map(|p| p.0).fold(1.0, f64::max) * 1.02;
    let series: [Series; 2] = [
        (
            "TTFT (ms)",
            points.iter().map(|p| (p.0, p.1)).collect(),
            RGBColor(31, 119, 180),
        ),
        (
            "TPOT (ms)",
            points
                .iter()
                .filter_map(|p| p.2.map(|v| (p.0, v)))
                .collect(),
            RGBColor(214, 39, 40),
        ),
    ];
    for (area, (label, data, color)) in [top, bottom].iter().zip(series) {
        let y_max = data.iter().map(|p| p.1).fold(1.0, f64::max) * 1.1;
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
        chart
            .draw_series(
                data.iter()
                    .map(|&(x, y)| Circle::new((x, y), 2, color.filled())),
            )
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
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
    register_font()?;
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

    #[test]
    fn writes_a_png() {
        let dir = std::env::temp_dir().join(format!("pdx-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("replay.png");
        let points: Points = (0..50)
            .map(|i| (i as f64 * 0.1, 10.0 + i as f64, Some(3.0)))
            .collect();
        write_png(&path, &points, "test").unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        assert!(bytes.len() > 5_000, "a drawn chart, not an empty image");
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
        assert_eq!(&std::fs::read(&lines).unwrap()[..4], b"\x89PNG");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
