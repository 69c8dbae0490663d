//! `sync-gateway`: the appliance's replication service.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sync_gateway::backend::Backend;
use sync_gateway::config::{Config, LogFormat};
use sync_gateway::protocol::auth::DiskKey;
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(name = "sync-gateway", version, about = "Cloud-side sync gateway")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Serve agents on the data port (and metrics on a loopback port, when configured) until
    /// SIGTERM or SIGINT.
    Run {
        /// TOML config file (see README: "Configuration").
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config (keys included) and print the effective settings.
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// List snapshots: id, disk, checkpoint label, time.
    Snapshots {
        #[arg(long, short)]
        config: PathBuf,
        /// Only this disk.
        #[arg(long)]
        disk: Option<String>,
        /// One JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Write a new random replication key (64 hex characters, mode 0600).
    Keygen {
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing key file (the agent holding the old key is locked out).
        #[arg(long)]
        force: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err((code, e)) => {
            let mut msg = e.to_string();
            let mut src = e.source();
            while let Some(s) = src {
                msg.push_str(": ");
                msg.push_str(&s.to_string());
                src = s.source();
            }
            eprintln!("sync-gateway: error: {msg}");
            ExitCode::from(code as u8)
        }
    }
}

type Failure = (i32, Box<dyn std::error::Error>);

fn fail<E: std::error::Error + 'static>(code: i32) -> impl FnOnce(E) -> Failure {
    move |e| (code, Box::new(e) as Box<dyn std::error::Error>)
}

fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("sync-gateway")
        .build()
        .map_err(fail(1))
}

fn real_main(cli: Cli) -> Result<(), Failure> {
    match cli.cmd {
        Cmd::Run { config } => {
            let config = Config::load(&config).map_err(fail(2))?;
            init_logging(&config);
            let rt = runtime()?;
            rt.block_on(async move {
                let cancel = CancellationToken::new();
                tokio::spawn(sync_gateway::cli::shutdown_on_signal(cancel.clone()));
                sync_gateway::server::run(config, cancel)
                    .await
                    .map_err(|e| (e.exit_code(), Box::new(e) as Box<dyn std::error::Error>))
            })
        }
        Cmd::CheckConfig { config } => {
            let config = Config::load(&config).map_err(fail(2))?;
            config.load_keys().map_err(fail(2))?;
            print!("{}", config.to_toml());
            eprintln!(
                "config ok: {} disk(s), data dir {}",
                config.disks.len(),
                config.data_dir.display()
            );
            Ok(())
        }
        Cmd::Snapshots { config, disk, json } => {
            let config = Config::load(&config).map_err(fail(2))?;
            let snaps = runtime()?
                .block_on(async {
                    let backend = Backend::open(&config).await?;
                    backend.list_snapshots(disk.as_deref()).await
                })
                .map_err(fail(1))?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&snaps).unwrap_or_default()
                );
            } else {
                println!(
                    "{:<34} {:<16} {:<24} {:>8} {:<10} CREATED",
                    "SNAPSHOT", "DISK", "CHECKPOINT", "SEQ", "STATE"
                );
                for s in snaps {
                    println!(
                        "{:<34} {:<16} {:<24} {:>8} {:<10} {}",
                        s.id,
                        s.disk_id,
                        s.label,
                        s.checkpoint_seq,
                        s.state.as_str(),
                        s.created
                    );
                }
            }
            Ok(())
        }
        Cmd::Keygen { out, force } => {
            if out.exists() && !force {
                return Err((
                    1,
                    format!(
                        "{} exists; refusing to replace a key (use --force)",
                        out.display()
                    )
                    .into(),
                ));
            }
            let key = DiskKey::generate();
            sync_gateway::durable::atomic_write(
                &out,
                format!("{}\n", key.to_hex()).as_bytes(),
                0o600,
            )
            .map_err(fail(1))?;
            eprintln!("wrote a new replication key to {}", out.display());
            Ok(())
        }
    }
}

fn init_logging(config: &Config) {
    let filter = std::env::var("SYNC_GATEWAY_LOG").unwrap_or_else(|_| config.log.level.clone());
    // The recent log is also kept in memory, for `collect_diagnostics` bundles.
    sync_gateway::cli::init_logging_with_capture(&filter, config.log.format == LogFormat::Json);
}
