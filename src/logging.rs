//! Logging of every `pdx` command: `--log-level` and `--log-format`, on stderr.
//!
//! By default every command logs at `info`, so a server's listen address shows without `RUST_LOG`. `RUST_LOG`
//! (a `tracing` filter) still works and wins over the default, but an explicit `--log-level` wins over it. Colour
//! (ANSI escapes) only goes to a terminal: logs redirected to a file or a pipe stay plain text.

use std::io::IsTerminal;

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    Text,
    /// One JSON object per line (`timestamp`, `level`, `fields`, `target`), for log collectors.
    Json,
}

impl LogFormat {
    /// The command-line spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// The logging flags shared by every command (`global`: they go before or after the subcommand).
#[derive(Clone, Debug, clap::Args)]
pub struct LogArgs {
    /// Log level: error, warn, info, debug or trace, or a `tracing` filter such as `warn,pdx_router=debug`.
    /// RUST_LOG is used instead when it is set and this flag is not given.
    #[arg(
        long,
        global = true,
        default_value = "info",
        value_name = "LEVEL|FILTER",
        help_heading = "Logging (every command)"
    )]
    pub log_level: String,
    /// Log format: `text` (one line per event) or `json` (one JSON object per line).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value_t = LogFormat::Text,
        help_heading = "Logging (every command)"
    )]
    pub log_format: LogFormat,
}

/// Installs the global subscriber. `level_given`: `--log-level` was on the command line (it then wins over
/// `RUST_LOG`).
///
/// Errors: a filter that does not parse.
pub fn init(args: &LogArgs, level_given: bool) -> anyhow::Result<()> {
    use tracing_subscriber::EnvFilter;
    let from_env = std::env::var("RUST_LOG")
        .ok()
        .filter(|s| !level_given && !s.trim().is_empty());
    let flag = from_env.is_none();
    let directive = from_env.unwrap_or_else(|| args.log_level.clone());
    // A single bare word is a target to `tracing` (`verbose` would silently mean "everything from target
    // `verbose`"): on the flag it must be a level.
    let word = directive.trim();
    let levels = ["off", "error", "warn", "info", "debug", "trace"];
    if flag
        && !word.contains(['=', ',', '[', ':'])
        && !levels.iter().any(|l| l.eq_ignore_ascii_case(word))
    {
        anyhow::bail!(
            "--log-level `{word}` is not a level ({}) or a filter like `warn,pdx_router=debug`",
            levels.join(", ")
        );
    }
    let source = if flag { "--log-level" } else { "RUST_LOG" };
    let filter = EnvFilter::try_new(&directive)
        .map_err(|e| anyhow::anyhow!("{source} `{directive}` is not a level or filter: {e}"))?;
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match args.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}
