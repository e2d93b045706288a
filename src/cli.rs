//! The command line: `run`, `check` and `dev`, logging setup, and exit codes
//! (0 fine, 1 failed at run time, 2 bad config or usage).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};
use std::time::Duration;

use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

use crate::clock::SystemClock;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::telemetry;

#[derive(Debug, Parser)]
#[command(
    name = "token-sidecar",
    version,
    about = "Injects per-merchant OAuth access tokens into requests to partner payment APIs",
    long_about = "Applications send plain HTTP to the sidecar on localhost; it matches each request to a \
                  configured route, takes that merchant's access token from an expiry-aware cache \
                  (fetching it once however many requests wait), injects it and forwards the request \
                  over TLS to the provider.\n\nWith only --config, `run` is implied."
)]
pub struct Cli {
    #[command(flatten)]
    pub config: ConfigArg,

    /// Log line format; the filter comes from TOKEN_SIDECAR_LOG (e.g. `info`, `token_sidecar=debug`)
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Option<Command>,
}

/// `--config FILE`, for the commands that read one (`dev` runs its own).
#[derive(Debug, Clone, clap::Args)]
pub struct ConfigArg {
    /// Config file (TOML); relative paths inside it are relative to its directory
    #[arg(long, env = "TOKEN_SIDECAR_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve: the proxy listener and the admin listener
    Run(ConfigArg),
    /// Validate the config and every secret it references; exit 0 with a summary or 2 with every problem
    Check(ConfigArg),
    /// Self-contained demo: local stand-ins for the four token endpoint shapes and an echo upstream,
    /// on an embedded config (no --config)
    Dev(crate::dev::DevArgs),
    /// Ask a running sidecar's admin listener whether it is ready (exit 0) or not (exit 1): a
    /// health check for images without a shell
    Probe(crate::probe::ProbeArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

const EXIT_RUNTIME: u8 = 1;
const EXIT_CONFIG: u8 = 2;

/// The async runtime for the cores the process may use: with one (a pod limited to a core, or
/// pinned), a current-thread runtime, which hands no task between threads.
fn runtime_builder() -> tokio::runtime::Builder {
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    if cores == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    }
}

/// Parses arguments, runs the command, and maps the outcome to an exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match runtime_builder().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("token-sidecar: cannot start the async runtime: {err}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    match cli.command {
        Some(Command::Dev(args)) => {
            init_logging(cli.log_format, None);
            runtime_result(runtime.block_on(crate::dev::run(args)))
        }
        Some(Command::Probe(args)) => {
            init_logging(cli.log_format, None);
            runtime.block_on(crate::probe::run(args))
        }
        Some(Command::Check(arg)) => {
            init_logging(cli.log_format, None);
            check(arg.config.or(cli.config.config))
        }
        command @ (Some(Command::Run(_)) | None) => {
            let own = match command {
                Some(Command::Run(arg)) => arg.config,
                _ => None,
            };
            let path = own.or(cli.config.config);
            let Some((config, path)) = load(path.clone()).zip(path) else {
                return ExitCode::from(EXIT_CONFIG);
            };
            runtime_result(runtime.block_on(run(config, path, cli.log_format)))
        }
    }
}

/// `run`: traces (when configured) and logging, then the sidecar until it is told to stop.
async fn run(config: Config, path: PathBuf, format: LogFormat) -> anyhow::Result<()> {
    let metrics = Metrics::new();
    let tracing = telemetry::start(&config.telemetry, &config.extra_roots, metrics.clone())?;
    init_logging(format, tracing.as_ref());
    if tracing.is_some() {
        tracing::info!("exporting traces over OTLP");
    }
    let served = crate::server::run(config, path, Arc::new(SystemClock), metrics).await;
    if let Some(tracing) = tracing {
        tracing.shutdown(Duration::from_secs(3)).await;
    }
    Ok(served?)
}

fn check(path: Option<PathBuf>) -> ExitCode {
    match load(path) {
        Some(config) => {
            for warning in &config.warnings {
                eprintln!("warning: {warning}");
            }
            println!("config OK: {}", config.summary());
            ExitCode::SUCCESS
        }
        None => ExitCode::from(EXIT_CONFIG),
    }
}

fn load(path: Option<PathBuf>) -> Option<Config> {
    let Some(path) = path else {
        eprintln!("token-sidecar: no config: pass --config FILE or set TOKEN_SIDECAR_CONFIG (or try `token-sidecar dev`)");
        return None;
    };
    match Config::load(&path) {
        Ok(config) => Some(config),
        Err(err) => {
            eprintln!("{err}");
            None
        }
    }
}

fn runtime_result(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("token-sidecar: {err:#}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

/// The log on stderr, as `TOKEN_SIDECAR_LOG` filters it, and beside it the trace exporter's
/// layer (which sees only the spans made for export, and the log never sees those). Without
/// traces, one global filter: per-layer filtering costs every disabled event a little more.
fn init_logging(format: LogFormat, traces: Option<&telemetry::Tracing>) {
    let wanted = std::env::var("TOKEN_SIDECAR_LOG").unwrap_or_else(|_| "info".to_owned());
    let filter =
        EnvFilter::try_new(log_filter(&wanted)).unwrap_or_else(|_| EnvFilter::new(log_filter("info")));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let Some(traces) = traces else {
        let log = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(ansi)
            .with_writer(std::io::stderr);
        let _ = match format {
            LogFormat::Text => log.try_init(),
            LogFormat::Json => log.json().try_init(),
        };
        return;
    };
    let log = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let log = match format {
        LogFormat::Text => log.boxed(),
        LogFormat::Json => log.json().boxed(),
    };
    let _ = tracing_subscriber::registry()
        .with(log.with_filter(filter))
        .with(traces.layer())
        .try_init();
}

/// The filter for `TOKEN_SIDECAR_LOG`: the spans made for trace export are never logged, and
/// the file watcher's library is held at `debug` unless named (at `trace` it logs every file
/// event, and a log file in a watched directory then feeds itself: 40 MB in 3 s).
fn log_filter(wanted: &str) -> String {
    let mut filter = format!("{wanted},{}=off", telemetry::TARGET);
    if !wanted.contains("notify") {
        filter.push_str(",notify=debug");
    }
    filter
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watchers_library_never_traces_unless_asked() {
        assert_eq!(log_filter("trace"), "trace,token_sidecar::otel=off,notify=debug");
        assert_eq!(
            log_filter("info,notify=trace"),
            "info,notify=trace,token_sidecar::otel=off"
        );
    }
}
