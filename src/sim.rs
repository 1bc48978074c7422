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
            &out.points,
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
    if args.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print!("{}", out.to_table());
        println!("simulated in {wall:.2} s of wall time");
    }
    Ok(())
}
