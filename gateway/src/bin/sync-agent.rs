//! `sync-agent`: the reference replication agent.
//!
//! ```text
//! sync-agent replicate --gateway HOST:PORT --disk-id ID --key-file FILE --state-dir DIR
//!                      [--json] [--verify] [--bandwidth-limit RATE] [--full | --rescan]
//!                      [--retry-timeout SECS] [--block-size BYTES] [--delta-block-size BYTES]
//!                      SOURCE
//! sync-agent keygen --out FILE
//! ```
//!
//! Exit status: 0 on success, 1 on failure (one `sync-agent: error: ...` line on stderr),
//! 2 on a usage error.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use sync_gateway::agent::{self, error::chain, throttle::parse_rate, AgentError, ReplicateOptions};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(
    name = "sync-agent",
    version,
    about = "Replicates a disk image or block device to a sync gateway"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Stream the source's changes to the gateway and end with a checkpoint (snapshot).
    Replicate(ReplicateArgs),
    /// Write a new random replication key (64 hex characters, mode 0600).
    Keygen {
        /// Key file to create; an existing file is never overwritten.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
}

#[derive(Debug, Args)]
struct ReplicateArgs {
    /// Gateway address.
    #[arg(long, value_name = "HOST:PORT")]
    gateway: String,
    /// Disk id the gateway knows this source by.
    #[arg(long, value_name = "ID")]
    disk_id: String,
    /// Replication key of this disk (64 hex characters).
    #[arg(long, value_name = "FILE")]
    key_file: PathBuf,
    /// Where block maps and pass state are kept (one subdirectory per disk).
    #[arg(long, value_name = "DIR")]
    state_dir: PathBuf,
    /// Print one JSON object with the run's figures on stdout.
    #[arg(long)]
    json: bool,
    /// Ask the gateway for the snapshot's SHA-256 and compare it with the source's.
    #[arg(long)]
    verify: bool,
    /// Cap on wire bytes per second, e.g. 500k, 50M, 1G (binary units).
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    bandwidth_limit: Option<u64>,
    /// Send every block even when an incremental pass is possible.
    #[arg(long, conflicts_with = "rescan")]
    full: bool,
    /// Verify and repair: compare every block with the gateway's copy by SHA-256 (a delta
    /// pass) and send those that differ, even when an incremental pass is possible.
    #[arg(long)]
    rescan: bool,
    /// Give up after this many seconds without a working connection.
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    retry_timeout: u64,
    /// Largest block per frame (capped by the gateway, rounded down to 4 KiB).
    #[arg(long, value_name = "BYTES", default_value_t = 1 << 20)]
    block_size: u64,
    /// Granularity of a delta pass's first comparison (a multiple of 4096); blocks that differ
    /// are then compared per 4 KiB. A delta pass runs without a baseline when the gateway
    /// already holds the disk, and with --rescan.
    #[arg(long, value_name = "BYTES", default_value_t = agent::delta::DEFAULT_BLOCK_SIZE)]
    delta_block_size: u64,
    /// Image file or block device to replicate.
    source: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("sync-agent: error: {}", chain(&e));
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<ExitCode, AgentError> {
    let args = match command {
        Command::Keygen { out } => {
            agent::keygen(&out)?;
            return Ok(ExitCode::SUCCESS);
        }
        Command::Replicate(args) => args,
    };
    let opts = ReplicateOptions {
        gateway: args.gateway,
        disk_id: args.disk_id,
        key_file: args.key_file,
        state_dir: args.state_dir,
        source: args.source,
        verify: args.verify,
        bandwidth_limit: args.bandwidth_limit,
        full: args.full,
        rescan: args.rescan,
        retry_timeout: Duration::from_secs(args.retry_timeout),
        block_size: args.block_size,
        delta_block_size: args.delta_block_size,
        progress: std::io::stderr().is_terminal(),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| AgentError::Internal(format!("cannot start the runtime: {e}")))?;
    let report = runtime.block_on(async {
        tokio::select! {
            r = agent::replicate(&opts) => r,
            _ = tokio::signal::ctrl_c() => Err(AgentError::Internal(
                "interrupted; the next run resumes the pass".into(),
            )),
        }
    })?;
    if args.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.human());
    }
    if report.verified == Some(false) {
        eprintln!(
            "sync-agent: error: verification failed: the snapshot's SHA-256 differs from the source's ({})",
            report.digest.as_deref().unwrap_or("?")
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn init_logging() {
    let filter =
        EnvFilter::try_from_env("SYNC_AGENT_LOG").unwrap_or_else(|_| EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}
