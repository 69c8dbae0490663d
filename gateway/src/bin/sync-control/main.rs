//! `sync-control`: the reference control plane (`serve`) and its command line.
//!
//! Every other subcommand is a client of a running `serve`: it finds it through `--url` or
//! `STATE_DIR/listen.url` (`listen.addr`), and authenticates with `--token` or
//! `STATE_DIR/operator.token`. Commands that queue work for a gateway wait for its result unless
//! `--no-wait`. Exit codes: 0 done, 1 error, 2 usage, 3 the gateway reported failure, 4 no result
//! within `--timeout`.

mod table;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand, ValueEnum};
use hyper::Method;
use serde::de::DeserializeOwned;
use serde::Serialize;
use sync_gateway::api::{
    self, AssignRequest, AssignResponse, BootstrapToken, CollectDiagnostics, CommandRef,
    CommandState, CommandView, ControlStatus, DiagnosticsBundle, LaunchRequest, Policy,
};
use sync_gateway::control_plane::{self, ServeConfig, Settings, TlsFiles};
use sync_gateway::http_client::{HttpError, JsonClient};
use sync_gateway::retention::{RetentionPolicy, Tier};
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(
    name = "sync-control",
    version,
    about = "Reference control plane of sync-gateway"
)]
struct Cli {
    /// Control plane URL (default: STATE_DIR/listen.url, then http://STATE_DIR/listen.addr).
    #[arg(long, env = "SYNC_CONTROL_URL", global = true)]
    url: Option<String>,
    /// Operator token (default: the contents of STATE_DIR/operator.token).
    #[arg(
        long,
        env = "SYNC_CONTROL_TOKEN",
        global = true,
        hide_env_values = true
    )]
    token: Option<String>,
    /// State dir of the control plane.
    #[arg(
        long,
        env = "SYNC_CONTROL_STATE_DIR",
        global = true,
        default_value = "/var/lib/sync-control"
    )]
    state_dir: PathBuf,
    /// Extra CA certificates (PEM) to trust for an https URL.
    #[arg(long, env = "SYNC_CONTROL_CA_FILE", global = true)]
    ca_file: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the control plane until SIGTERM or SIGINT.
    Serve(ServeArgs),
    /// Gateways: bootstrap tokens, list.
    #[command(subcommand)]
    Gateway(GatewayCmd),
    /// Disks: assign, revoke, snapshot.
    #[command(subcommand)]
    Disk(DiskCmd),
    /// Gateway policy.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Gateways, disks, launches and recent commands.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Cut a disk over (or, with --test, launch a test instance while replication goes on).
    Cutover {
        #[arg(long)]
        disk_id: String,
        /// A test launch instead of the real cutover.
        #[arg(long)]
        test: bool,
        /// The snapshot to launch from (test launches; default: the latest checkpoint's).
        #[arg(long, requires = "test")]
        snapshot_id: Option<String>,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Release a cut-over disk's volume.
    Finalize {
        #[arg(long)]
        disk_id: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Have a gateway bundle its recent log, redacted config and state, versions and status
    /// and upload it; prints the command with its result, then the object key on stderr.
    CollectDiagnostics {
        #[arg(long)]
        gateway: String,
        /// A presigned PUT URL for the bundle (made without a Content-Type); `-` reads it from
        /// stdin, which keeps its signature out of the process list. Default: the gateway's
        /// [diagnostics] OSS bucket.
        #[arg(long)]
        upload_url: Option<String>,
        /// Key prefix in the gateway's bucket instead of its [diagnostics] oss_prefix.
        #[arg(long, conflicts_with = "upload_url")]
        key_prefix: Option<String>,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Commands.
    #[command(subcommand)]
    Command(CommandCmd),
}

#[derive(Args, Debug)]
struct ServeArgs {
    #[arg(long, default_value = "127.0.0.1:8443")]
    listen: SocketAddr,
    /// TLS certificate chain (PEM); with --tls-key, serve https.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// A delivered command without a result is delivered again after this (1 s to 1 day).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    redeliver_after_secs: u64,
    /// Report interval told to gateways (offline after 3 silent intervals; 1 s to 1 h).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=3600))]
    report_interval_secs: u64,
    /// Long-poll wait told to gateways.
    #[arg(long, default_value_t = 25)]
    poll_wait_secs: u64,
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum GatewayCmd {
    /// Issue a one-time bootstrap token; prints only the token.
    BootstrapToken {
        #[arg(long)]
        ttl_secs: Option<u64>,
    },
    /// List registered gateways.
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum DiskCmd {
    /// Assign a disk to a gateway (again: rotate its key); prints the answer with the agent key.
    Assign {
        #[arg(long)]
        gateway: String,
        #[arg(long)]
        disk_id: String,
        /// Size in bytes (suffixes K, M, G, T: powers of 1024).
        #[arg(long, value_parser = parse_bytes)]
        size: u64,
        /// Also write the agent key (64 hex) to this file, mode 0600.
        #[arg(long)]
        key_out: Option<PathBuf>,
    },
    /// Revoke the disk's agent key.
    Revoke {
        #[arg(long)]
        disk_id: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Take a snapshot now.
    Snapshot {
        #[arg(long)]
        disk_id: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
}

#[derive(Subcommand, Debug)]
enum PolicyCmd {
    /// Set retention tiers and/or the bandwidth limit of a gateway.
    Set {
        #[arg(long)]
        gateway: String,
        /// Tiers EVERY:KEEP in seconds, comma-separated, e.g. 600:3600,3600:86400; `keep-all`
        /// turns pruning off.
        #[arg(long, value_parser = parse_retention)]
        retention: Option<RetentionPolicy>,
        /// Bytes per second per disk (suffixes K, M, G; 0: no limit).
        #[arg(long, value_parser = parse_bytes)]
        bandwidth_limit: Option<u64>,
        #[command(flatten)]
        wait: WaitArgs,
    },
}

#[derive(Subcommand, Debug)]
enum CommandCmd {
    /// A command and its result.
    Show { id: String },
}

#[derive(Args, Debug, Clone, Copy)]
struct WaitArgs {
    /// Print the queued command and return without waiting for its result.
    #[arg(long)]
    no_wait: bool,
    /// Seconds to wait for the result.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
}

/// Why a client command failed.
#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error("no --url, and no control plane address in {path} (is `sync-control serve` running with this --state-dir?)")]
    NoUrl {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no --token, and cannot read {path}")]
    NoToken {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Usage(String),
    #[error("command {id} ({kind}) failed: {message}")]
    CommandFailed {
        id: String,
        kind: String,
        message: String,
    },
    #[error("command {id} ({kind}) has no result after {secs} s (state {state:?}); see `sync-control command show {id}`")]
    Timeout {
        id: String,
        kind: String,
        secs: u64,
        state: CommandState,
    },
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
}

impl CliError {
    fn exit_code(&self) -> u8 {
        match self {
            CliError::CommandFailed { .. } => 3,
            CliError::Timeout { .. } => 4,
            CliError::Usage(_) => 2,
            _ => 1,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Serve(ref args) => return serve(&cli.state_dir, args),
        _ => client_main(cli),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "sync-control: error: {}",
                sync_gateway::cli::error_chain(&e)
            );
            ExitCode::from(e.exit_code())
        }
    }
}

fn serve(state_dir: &Path, args: &ServeArgs) -> ExitCode {
    init_logging(args.log_format);
    let config = ServeConfig {
        listen: args.listen,
        state_dir: state_dir.to_path_buf(),
        tls: match (&args.tls_cert, &args.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
            }),
            _ => None,
        },
        settings: Settings {
            redeliver_after: Duration::from_secs(args.redeliver_after_secs),
            report_interval_secs: args.report_interval_secs.max(1),
            poll_wait_secs: args.poll_wait_secs.min(api::MAX_POLL_WAIT_SECS),
        },
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("sync-control")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sync-control: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        let cancel = CancellationToken::new();
        tokio::spawn(sync_gateway::cli::shutdown_on_signal(cancel.clone()));
        control_plane::serve(config, cancel).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "sync-control: error: {}",
                sync_gateway::cli::error_chain(&e)
            );
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = std::env::var("SYNC_CONTROL_LOG").unwrap_or_else(|_| "info".into());
    sync_gateway::cli::init_logging(&filter, matches!(format, LogFormat::Json));
}

/// A connection to the control plane with the operator token.
struct Operator {
    client: JsonClient,
    token: String,
}

/// One request's deadline; waiting for a result is a loop of these.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a waiting command polls for its result.
const RESULT_POLL: Duration = Duration::from_millis(500);

impl Operator {
    fn connect(cli: &Cli) -> Result<Operator, CliError> {
        let url = match &cli.url {
            Some(u) => u.clone(),
            None => default_url(&cli.state_dir)?,
        };
        let token = match &cli.token {
            Some(t) => t.clone(),
            None => {
                let path = cli.state_dir.join(control_plane::OPERATOR_TOKEN_FILE);
                std::fs::read_to_string(&path)
                    .map_err(|source| CliError::NoToken { path, source })?
                    .trim()
                    .to_string()
            }
        };
        let client = JsonClient::new(&url, cli.ca_file.as_deref())?;
        Ok(Operator { client, token })
    }

    async fn call<B: Serialize + ?Sized, R: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<R, CliError> {
        Ok(self
            .client
            .call(method, path, Some(&self.token), body, REQUEST_TIMEOUT)
            .await?)
    }

    async fn get<R: DeserializeOwned>(&self, path: &str) -> Result<R, CliError> {
        self.call::<(), R>(Method::GET, path, None).await
    }

    /// Queues a command, then (unless `--no-wait`) waits for its result and prints it.
    async fn queue_and_wait<B: Serialize + ?Sized>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        wait: WaitArgs,
    ) -> Result<(), CliError> {
        self.queue_and_wait_view(method, path, body, wait)
            .await
            .map(|_| ())
    }

    /// [`Operator::queue_and_wait`], answering the finished command (`None` with `--no-wait`).
    async fn queue_and_wait_view<B: Serialize + ?Sized>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        wait: WaitArgs,
    ) -> Result<Option<CommandView>, CliError> {
        let queued: CommandRef = self.call(method, path, body).await?;
        if wait.no_wait {
            return print_json(&queued).map(|()| None);
        }
        let started = Instant::now();
        let view = loop {
            let view: CommandView = self
                .get(&format!("/v1/commands/{}", queued.command_id))
                .await?;
            if matches!(view.state, CommandState::Succeeded | CommandState::Failed) {
                break view;
            }
            if started.elapsed() >= Duration::from_secs(wait.timeout) {
                return Err(CliError::Timeout {
                    id: view.command_id,
                    kind: view.kind,
                    secs: wait.timeout,
                    state: view.state,
                });
            }
            tokio::time::sleep(RESULT_POLL).await;
        };
        print_json(&view)?;
        if view.state == CommandState::Failed {
            return Err(CliError::CommandFailed {
                message: view.result.map(|r| r.message).unwrap_or_default(),
                id: view.command_id,
                kind: view.kind,
            });
        }
        Ok(Some(view))
    }
}

fn default_url(state_dir: &Path) -> Result<String, CliError> {
    if let Ok(url) = std::fs::read_to_string(state_dir.join(control_plane::LISTEN_URL_FILE)) {
        return Ok(url.trim().to_string());
    }
    let path = state_dir.join(control_plane::LISTEN_ADDR_FILE);
    let addr = std::fs::read_to_string(&path).map_err(|source| CliError::NoUrl {
        path: path.clone(),
        source,
    })?;
    Ok(format!("http://{}", addr.trim()))
}

fn print_json<T: Serialize>(value: &T) -> Result<(), CliError> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| CliError::Usage(format!("cannot print the answer: {e}")))?;
    println!("{text}");
    Ok(())
}

fn client_main(cli: Cli) -> Result<(), CliError> {
    let op = Operator::connect(&cli)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CliError::Runtime)?;
    rt.block_on(run_client(&op, cli.cmd))
}

async fn run_client(op: &Operator, cmd: Cmd) -> Result<(), CliError> {
    let none = None::<&()>;
    match cmd {
        Cmd::Serve(_) => Err(CliError::Usage("serve is not a client command".into())),
        Cmd::Gateway(GatewayCmd::BootstrapToken { ttl_secs }) => {
            let body = serde_json::json!({ "ttl_secs": ttl_secs });
            let t: BootstrapToken = op
                .call(Method::POST, "/v1/bootstrap-tokens", Some(&body))
                .await?;
            println!("{}", t.token);
            Ok(())
        }
        Cmd::Gateway(GatewayCmd::List { json }) => {
            let status: ControlStatus = op.get("/v1/status").await?;
            if json {
                return print_json(&status.gateways);
            }
            print!("{}", table::gateways(&status));
            Ok(())
        }
        Cmd::Disk(DiskCmd::Assign {
            gateway,
            disk_id,
            size,
            key_out,
        }) => {
            let req = AssignRequest {
                gateway_id: gateway,
                disk_id,
                size_bytes: size,
            };
            let answer: AssignResponse = op.call(Method::POST, "/v1/disks", Some(&req)).await?;
            if let Some(path) = key_out {
                sync_gateway::durable::atomic_write(
                    &path,
                    format!("{}\n", answer.agent_key).as_bytes(),
                    0o600,
                )
                .map_err(|source| CliError::Write {
                    path: path.clone(),
                    source,
                })?;
            }
            print_json(&answer)
        }
        Cmd::Disk(DiskCmd::Revoke { disk_id, wait }) => {
            let path = format!("/v1/disks/{disk_id}/revoke");
            op.queue_and_wait(Method::POST, &path, none, wait).await
        }
        Cmd::Disk(DiskCmd::Snapshot { disk_id, wait }) => {
            let path = format!("/v1/disks/{disk_id}/snapshot");
            op.queue_and_wait(Method::POST, &path, none, wait).await
        }
        Cmd::Policy(PolicyCmd::Set {
            gateway,
            retention,
            bandwidth_limit,
            wait,
        }) => {
            if retention.is_none() && bandwidth_limit.is_none() {
                return Err(CliError::Usage(
                    "give --retention and/or --bandwidth-limit".into(),
                ));
            }
            let policy = Policy {
                retention,
                bandwidth_limit_bytes_per_sec: bandwidth_limit,
            };
            let path = format!("/v1/gateways/{gateway}/policy");
            op.queue_and_wait(Method::PUT, &path, Some(&policy), wait)
                .await
        }
        Cmd::Status { json } => {
            let status: ControlStatus = op.get("/v1/status").await?;
            if json {
                return print_json(&status);
            }
            print!("{}", table::everything(&status));
            Ok(())
        }
        Cmd::Cutover {
            disk_id,
            test,
            snapshot_id,
            wait,
        } => {
            if test {
                let path = format!("/v1/disks/{disk_id}/test-launch");
                let body = LaunchRequest { snapshot_id };
                op.queue_and_wait(Method::POST, &path, Some(&body), wait)
                    .await
            } else {
                let path = format!("/v1/disks/{disk_id}/cutover");
                op.queue_and_wait(Method::POST, &path, none, wait).await
            }
        }
        Cmd::Finalize { disk_id, wait } => {
            let path = format!("/v1/disks/{disk_id}/finalize");
            op.queue_and_wait(Method::POST, &path, none, wait).await
        }
        Cmd::CollectDiagnostics {
            gateway,
            upload_url,
            key_prefix,
            wait,
        } => {
            let upload_url = match upload_url.as_deref() {
                Some("-") => {
                    let mut line = String::new();
                    std::io::stdin().read_line(&mut line).map_err(|e| {
                        CliError::Usage(format!("cannot read the URL from stdin: {e}"))
                    })?;
                    Some(line.trim().to_string())
                }
                _ => upload_url,
            };
            let body = CollectDiagnostics {
                upload_url,
                key_prefix,
            };
            body.validate().map_err(CliError::Usage)?;
            let path = format!("/v1/gateways/{gateway}/diagnostics");
            let view = op
                .queue_and_wait_view(Method::POST, &path, Some(&body), wait)
                .await?;
            let bundle = view
                .and_then(|v| v.result)
                .and_then(|r| r.output.get("diagnostics").cloned())
                .and_then(|d| serde_json::from_value::<DiagnosticsBundle>(d).ok());
            if let Some(b) = bundle {
                let place = match &b.bucket {
                    Some(bucket) => format!("oss://{bucket}/{}", b.object_key),
                    None => b.object_key.clone(),
                };
                eprintln!(
                    "diagnostics bundle: {place} ({} bytes, sha256 {})",
                    b.size_bytes, b.sha256
                );
            }
            Ok(())
        }
        Cmd::Command(CommandCmd::Show { id }) => {
            let view: CommandView = op.get(&format!("/v1/commands/{id}")).await?;
            print_json(&view)
        }
    }
}

/// `10M` → 10 MiB; plain digits are bytes.
fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, shift) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("{s:?}: unknown suffix {c:?} (K, M, G or T)")),
            };
            (&s[..i], shift)
        }
        _ => (s, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?}: expected a number of bytes like 4096 or 10M"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// `600:3600,3600:86400` → two tiers.
fn parse_retention(s: &str) -> Result<RetentionPolicy, String> {
    // `keep-all`: no tiers, nothing is pruned.
    if s.trim() == "keep-all" {
        return Ok(RetentionPolicy { tiers: Vec::new() });
    }
    let tiers = s
        .split(',')
        .map(|t| {
            let (every, keep) = t
                .split_once(':')
                .ok_or_else(|| format!("tier {t:?}: expected EVERY_SECS:KEEP_SECS"))?;
            let num = |v: &str| {
                v.trim()
                    .parse::<u64>()
                    .map_err(|_| format!("tier {t:?}: {v:?} is not a number of seconds"))
            };
            Ok(Tier {
                every_secs: num(every)?,
                keep_secs: num(keep)?,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    let policy = RetentionPolicy { tiers };
    policy.validate().map_err(|e| e.to_string())?;
    Ok(policy)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_retention_parse() {
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert_eq!(parse_bytes("10M"), Ok(10 << 20));
        assert_eq!(parse_bytes("1g"), Ok(1 << 30));
        assert!(parse_bytes("10X").is_err());
        assert!(parse_bytes("M").is_err());
        assert!(parse_bytes("99999999999T").is_err());
        let p = parse_retention("600:3600,3600:86400");
        assert_eq!(p.map(|p| p.tiers.len()), Ok(2));
        assert!(parse_retention("600").is_err());
        assert!(parse_retention("0:10").is_err());
    }
}
