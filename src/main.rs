//! The `rag-sidecar` binary: command line, configuration, runtime, logging,
//! signals. Everything else lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use rag_sidecar::app::{App, AppError};
use rag_sidecar::config::{Config, Overrides, ProcessEnv};
use rag_sidecar::trace::TraceError;

// The allocator: jemalloc by default (Cargo.toml [features]; `mimalloc`
// takes precedence when enabled, `--no-default-features` is glibc's).
// bench/alloc.sh measures the three in one run; docs/benchmarks.md has why
// jemalloc: the most throughput and the least CPU per request of the three,
// with an idle RSS near glibc's (mimalloc's was 10 MiB more).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
#[cfg(all(feature = "jemalloc", not(feature = "mimalloc")))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read at its start: freed pages go back to the
/// system within a second (its default keeps them ten), so a burst of
/// memory held for clients (at most `memory_budget`) does not stay in the
/// pod's RSS, which is what its memory limit kills on.
#[cfg(all(feature = "jemalloc", not(feature = "mimalloc")))]
#[allow(non_upper_case_globals, reason = "the symbol jemalloc reads")]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static malloc_conf: &[u8; 40] = b"dirty_decay_ms:1000,muzzy_decay_ms:1000\0";

/// Exit status for a bad configuration (BSD `EX_USAGE`, as linkerd does).
const EXIT_CONFIG: u8 = 64;

#[derive(Debug, Parser)]
#[command(
    name = "rag-sidecar",
    version = env!("RAG_SIDECAR_VERSION"),
    about = "Caching, rate-limiting, retrying, observable reverse proxy for a legacy Flask RAG app"
)]
struct Cli {
    /// TOML configuration file (also RAG_SIDECAR_CONFIG).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to listen on (LISTEN_ADDR), e.g. 0.0.0.0:5003.
    #[arg(long, global = true, value_name = "ADDR")]
    listen: Option<String>,
    /// The app's URL (UPSTREAM_URL), e.g. http://127.0.0.1:5000.
    #[arg(long, global = true, value_name = "URL")]
    upstream: Option<String>,
    /// Serve the sidecar's own endpoints on this address instead.
    #[arg(long, global = true, value_name = "ADDR")]
    admin_listen: Option<String>,
    /// DEBUG, INFO, WARNING, ERROR or a tracing filter (LOG_LEVEL).
    #[arg(long, global = true, value_name = "LEVEL")]
    log_level: Option<String>,
    /// text or json (LOG_FORMAT).
    #[arg(long, global = true, value_name = "FORMAT")]
    log_format: Option<String>,
    /// Worker threads (NUM_THREADS).
    #[arg(long, global = true, value_name = "N")]
    threads: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate the configuration and print it (secrets masked).
    CheckConfig,
    /// Run the sidecar (the default).
    Run,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let overrides = Overrides {
        config: cli.config,
        listen: cli.listen,
        upstream: cli.upstream,
        admin_listen: cli.admin_listen,
        log_level: cli.log_level,
        log_format: cli.log_format,
        threads: cli.threads,
    };
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    let (cfg, report) = match Config::load(&overrides, &ProcessEnv, &cwd) {
        Ok(loaded) => loaded,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // The file as it was loaded, for the reload watcher to compare with.
    let loaded_file = report
        .config_file
        .as_ref()
        .and_then(|p| std::fs::read(p).ok());
    if let Some(Command::CheckConfig) = cli.command {
        println!("# rag-sidecar effective configuration (secrets masked)");
        if let Some(p) = &report.config_file {
            println!("# file: {}", p.display());
        }
        if let Some(p) = &report.dotenv_file {
            println!("# .env: {}", p.display());
        }
        print!("{}", cfg.to_toml());
        return ExitCode::SUCCESS;
    }
    run(cfg, report, loaded_file, move || {
        Config::load(&overrides, &ProcessEnv, &cwd).map(|(cfg, _)| cfg)
    })
}

/// Runs the sidecar; `load` reads the configuration's sources again (a
/// reload).
fn run(
    cfg: Config,
    report: rag_sidecar::config::LoadReport,
    loaded_file: Option<Vec<u8>>,
    load: impl Fn() -> Result<Config, rag_sidecar::config::ConfigErrors> + Send + 'static,
) -> ExitCode {
    let _guards = match rag_sidecar::logging::init(&cfg.log) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("config error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    for name in &report.ignored_env {
        tracing::debug!("{name} is set but means nothing to a proxy; ignored");
    }
    // Worker 0 of the thread-per-core server runs here; `App::run` starts
    // the other `threads - 1` on their own current-thread runtimes.
    let mut builder = tokio::runtime::Builder::new_current_thread();
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let listen = cfg.listen;
        let upstream = cfg.upstream.to_string();
        let threads = cfg.threads;
        let server = match App::bind(cfg).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("{e}");
                // A bad OTEL_* value is a configuration error like any other.
                let config = matches!(e, AppError::Trace(TraceError::Env { .. }));
                return ExitCode::from(if config { EXIT_CONFIG } else { 1 });
            }
        };
        tracing::info!(
            listen = %server.local_addr().map_or(listen, |a| a),
            admin = %server
                .admin_addr()
                .map_or_else(|| "proxy-port".to_string(), |a| a.to_string()),
            %upstream,
            threads,
            config = %shown(report.config_file.as_deref()),
            dotenv = %shown(report.dotenv_file.as_deref()),
            "rag-sidecar started"
        );
        // Reloads on SIGHUP and when the file changes.
        let watching = tokio::spawn(rag_sidecar::app::reload::watch(
            server.reloader(),
            report.config_file.clone().map(|p| (p, loaded_file)),
            load,
        ));
        server.run(shutdown_signal()).await;
        watching.abort();
        ExitCode::SUCCESS
    })
}

/// Resolves on SIGTERM or SIGINT, which starts the drain. A second signal
/// during the drain ends the process at once (exit 1), as an operator who
/// presses Ctrl-C twice expects.
async fn shutdown_signal() {
    let first = signal().await;
    tracing::info!("{first} received: draining (a second signal exits at once)");
    tokio::spawn(async {
        let second = signal().await;
        tracing::warn!("{second} received again: exiting without waiting for in-flight requests");
        std::process::exit(1);
    });
}

/// The next SIGINT or SIGTERM, by name.
async fn signal() -> &'static str {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => "SIGINT",
        () = term => "SIGTERM",
    }
}

/// A path for the start-up line, or `none`.
fn shown(p: Option<&std::path::Path>) -> String {
    p.map_or_else(|| "none".to_string(), |p| p.display().to_string())
}
