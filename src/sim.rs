//! `pdx sim`: runs the simulator and prints its report (a table, or JSON with `--json`), and
//! writes the plots and planner log asked for.

use std::io::Write;

/// Runs `pdx sim`.
pub fn run(args: &pdx_sim::SimArgs) -> anyhow::Result<()> {
    let t0 = std::time::Instant::now();
    let out = pdx_sim::run(args)?;
    let wall = t0.elapsed().as_secs_f64();
    if let Some(path) = &args.plot {
        pdx_replay::plot::write_png(
            path,
            &out.records,
            out.report.slo,
            &format!("pdx sim: {}", args.cluster.display()),
        )?;
    }
    if let Some(path) = &args.planner_log {
        let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
        for d in &out.decisions {
            serde_json::to_writer(&mut f, d)?;
            writeln!(f)?;
        }
        f.flush()?;
    }
    if let Some(path) = &args.planner_plot {
        let names: Vec<String> = out.pools.iter().map(|p| p.name.clone()).collect();
        pdx_replay::plot::write_lines_png(
            path,
            &format!("pdx sim planner: {}", args.cluster.display()),
            "virtual time (s)",
            &out.planner_panels(&names),
        )?;
    }
    let text = if args.json {
        serde_json::to_string_pretty(&out)? + "\n"
    } else {
        format!("{}simulated in {wall:.2} s of wall time\n", out.to_table())
    };
    // A reader that went away (`| head`) is not an error worth a panic.
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|_| stdout.flush())
    {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => return Err(e.into()),
        _ => {}
    }
    Ok(())
}
