//! The gateway's one config struct: loaded from TOML, overridden from the environment.
//!
//! Every field has a doc comment and a default; `sync-gateway check-config` prints the
//! effective configuration. Unknown keys are rejected, in the file and in the environment.
//!
//! Environment overrides: `SYNC_GATEWAY_<KEY>` sets a top-level key, `SYNC_GATEWAY_<TABLE>__<KEY>`
//! a key in a table (`SYNC_GATEWAY_LIMITS__SYNC_BYTES=8388608`). Values parse as TOML values
//! when they can, else as strings. `[[disks]]` cannot be set from the environment.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::protocol::{self, auth::DiskKey, MAX_BLOCK_LEN};
use crate::retention::RetentionPolicy;

/// Environment prefix for overrides.
pub const ENV_PREFIX: &str = "SYNC_GATEWAY_";

/// Gateway configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address of the data port that agents connect to. Port 0 picks a free port; the bound
    /// address is written to `DATA_DIR/listen.addr`.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Directory for volumes (local backend), snapshots and replication state.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Where volumes and snapshots live.
    #[serde(default)]
    pub backend: BackendConfig,
    /// Resource bounds and batching.
    #[serde(default)]
    pub limits: Limits,
    /// Log output.
    #[serde(default)]
    pub log: LogConfig,
    /// Snapshot retention tiers, e.g. `[[retention.tiers]] every_secs = 600, keep_secs = 3600`.
    /// Absent: in standalone mode every snapshot is kept; with a `[control_plane]` the AWS
    /// DRS-like default applies (every 10 min kept 1 h, hourly kept 24 h, daily kept 7 d).
    /// When set, old snapshots are pruned after each checkpoint and every minute; the newest
    /// completed snapshot and the current checkpoint's are always kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<RetentionPolicy>,
    /// Prometheus metrics port. Absent (the default): no metrics port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<MetricsConfig>,
    /// The control plane this gateway registers with and reports to. Absent (the default):
    /// standalone mode, disks come from `[[disks]]` only. Present: `[[disks]]` may be empty and
    /// disks arrive by command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_plane: Option<ControlPlaneConfig>,
    /// Disks served in standalone mode (no control plane), or in addition to assigned ones.
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// Where `collect_diagnostics` bundles go when the command carries no presigned URL.
    #[serde(default)]
    pub diagnostics: DiagnosticsConfig,
}

/// The `[diagnostics]` table: the OSS bucket and prefix that diagnostics bundles are uploaded
/// to when a `collect_diagnostics` command carries no `upload_url`. Uploads are signed with the
/// gateway's own RAM role credentials, so this works on `aliyun` gateways; elsewhere commands
/// must carry a presigned URL.
///
/// ```toml
/// [diagnostics]
/// oss_bucket = "acme-support"
/// oss_prefix = "sync-gateway/diagnostics/"
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiagnosticsConfig {
    /// OSS bucket of bundles. Absent (the default): only commands with an `upload_url` upload.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oss_bucket: Option<String>,
    /// Key prefix of bundles in the bucket (a command's `key_prefix` replaces it).
    pub oss_prefix: String,
    /// OSS endpoint, `scheme://host[:port]`. Default `https://oss-REGION.aliyuncs.com`; tests
    /// point it at a local OSS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oss_endpoint: Option<String>,
    /// Region of the bucket, e.g. `cn-hangzhou`. Default: the gateway's own region.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oss_region: Option<String>,
}

/// Default key prefix of diagnostics bundles.
pub const DEFAULT_DIAGNOSTICS_PREFIX: &str = "sync-gateway/diagnostics/";

impl Default for DiagnosticsConfig {
    fn default() -> Self {
        DiagnosticsConfig {
            oss_bucket: None,
            oss_prefix: DEFAULT_DIAGNOSTICS_PREFIX.into(),
            oss_endpoint: None,
            oss_region: None,
        }
    }
}

impl DiagnosticsConfig {
    fn validate(&self) -> Result<(), String> {
        if let Some(b) = &self.oss_bucket {
            // OSS's bucket naming rule.
            let ok = (3..=63).contains(&b.len())
                && b.bytes()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
                && !b.starts_with('-')
                && !b.ends_with('-');
            if !ok {
                return Err(format!(
                    "diagnostics.oss_bucket {b:?}: 3-63 lowercase letters, digits and '-', not \
                     starting or ending with '-'"
                ));
            }
        }
        let prefix = crate::api::CollectDiagnostics {
            upload_url: None,
            key_prefix: Some(self.oss_prefix.clone()),
        };
        prefix
            .validate()
            .map_err(|e| format!("diagnostics.oss_prefix: {e}"))?;
        if let Some(e) = &self.oss_endpoint {
            let uri: Result<hyper::Uri, _> = e.parse();
            let ok = uri.as_ref().is_ok_and(|u| {
                matches!(u.scheme_str(), Some("http" | "https"))
                    && u.host().is_some()
                    && matches!(u.path(), "" | "/")
                    && u.query().is_none()
            });
            if !ok {
                return Err(format!(
                    "diagnostics.oss_endpoint {e:?}: expected scheme://host[:port], e.g. \
                     https://oss-cn-hangzhou.aliyuncs.com"
                ));
            }
        }
        if self.oss_region.as_deref().is_some_and(|r| {
            r.is_empty()
                || !r
                    .bytes()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        }) {
            return Err(
                "diagnostics.oss_region: expected a region id like cn-hangzhou".to_string(),
            );
        }
        Ok(())
    }
}

/// The upward channel: connections the gateway opens to its control plane (it accepts none).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlPlaneConfig {
    /// Base URL, `https://…` in production (`http://` is accepted for a local control plane).
    pub url: String,
    /// File holding the one-time bootstrap token (from user-data). Read only until the gateway
    /// has registered; its credential is then kept in `DATA_DIR/state/control-plane.json`
    /// (mode 0600) and the token is never used again.
    pub bootstrap_token_file: PathBuf,
    /// Extra CA certificates (PEM) trusted for an https URL, e.g. a private control plane's CA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Seconds between status reports when nothing changes (a change reports at once).
    #[serde(default = "default_report_interval")]
    pub report_interval_secs: u64,
    /// Seconds a command poll is held open by the control plane (long poll).
    #[serde(default = "default_poll_wait")]
    pub poll_wait_secs: u64,
    /// Status reports kept while the control plane is unreachable; the oldest are dropped
    /// beyond this (and counted in the next report).
    #[serde(default = "default_report_queue")]
    pub report_queue: usize,
    /// Longest pause between retries while the control plane is unreachable (backoff with
    /// jitter grows up to this).
    #[serde(default = "default_max_backoff")]
    pub max_backoff_secs: u64,
}

fn default_report_interval() -> u64 {
    5
}

fn default_poll_wait() -> u64 {
    25
}

fn default_report_queue() -> usize {
    64
}

fn default_max_backoff() -> u64 {
    30
}

/// Which backend provides volumes and snapshots.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum BackendConfig {
    /// Sparse files under `DATA_DIR/disks`, snapshots under `DATA_DIR/snapshots`.
    Local {
        /// Write with O_DIRECT from aligned buffers when the filesystem allows it (it falls
        /// back to buffered writes by itself when it does not).
        #[serde(default = "yes")]
        direct_io: bool,
        /// Bandwidth cap in bytes/s for the background copy of a snapshot on filesystems
        /// without reflinks, so it leaves disk bandwidth to replication (0: no cap). Writes
        /// that must preserve a region first are never throttled.
        #[serde(default)]
        snapshot_copy_bytes_per_sec: u64,
    },
    /// EBS volumes attached to this EC2 instance, EBS snapshots, launches by AMI (see
    /// [`sync_aws::AwsSettings`] for the keys).
    Aws(Box<sync_aws::AwsSettings>),
    /// ECS cloud disks attached to this ECS instance, ECS snapshots, launches by custom image
    /// (see [`sync_aliyun::settings::AliyunSettings`] for the keys).
    Aliyun(Box<sync_aliyun::settings::AliyunSettings>),
}

impl Default for BackendConfig {
    fn default() -> Self {
        BackendConfig::Local {
            direct_io: true,
            snapshot_copy_bytes_per_sec: 0,
        }
    }
}

/// Resource bounds. Memory held for in-flight data never exceeds `gateway_inflight_bytes`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Concurrent agent connections; a connection beyond this waits in the accept queue.
    pub max_connections: usize,
    /// Largest uncompressed block accepted in one data frame (at most 8 MiB).
    pub max_block_bytes: u32,
    /// Bytes received but not yet written that one connection may hold; also the window
    /// announced to the agent. A slow disk fills its own window and slows only its own agent.
    pub connection_inflight_bytes: u64,
    /// Bytes received but not yet written across all connections.
    pub gateway_inflight_bytes: u64,
    /// Written-but-unsynced bytes that trigger an `fdatasync` and an ack.
    pub sync_bytes: u64,
    /// Idle time after the last write before unsynced data is synced and acked anyway.
    pub sync_linger_ms: u64,
    /// Time allowed for preamble, hello and auth.
    pub handshake_timeout_secs: u64,
    /// An authenticated agent silent for this long (also mid-frame) is disconnected.
    pub idle_timeout_secs: u64,
    /// On shutdown, how long to wait for in-flight writes to become durable.
    pub drain_timeout_secs: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 256,
            max_block_bytes: 1 << 20,
            connection_inflight_bytes: 64 << 20,
            gateway_inflight_bytes: 1 << 30,
            sync_bytes: 16 << 20,
            sync_linger_ms: 5,
            handshake_timeout_secs: 10,
            idle_timeout_secs: 120,
            drain_timeout_secs: 30,
        }
    }
}

/// The metrics port: `GET /metrics` in the Prometheus text format, nothing else.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Loopback address of the metrics port (`127.0.0.1:9500`). Only loopback is accepted: the
    /// gateway takes no inbound connections but agents', and metrics stay on the appliance for
    /// a local collector. Port 0 picks a free port; the bound address is written to
    /// `DATA_DIR/metrics.addr`.
    #[serde(default = "default_metrics_listen")]
    pub listen: SocketAddr,
}

/// Log output.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` for people, `json` for log shippers.
    pub format: LogFormat,
    /// Filter in `tracing` syntax, e.g. `info` or `sync_gateway=debug`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// One replicated disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// Disk id the agent names (letters, digits, `-`, `_`, `.`; at most 64).
    pub id: String,
    /// Size of the source disk in bytes; the agent must announce the same size.
    pub size_bytes: u64,
    /// File holding the 32-byte replication key as 64 hex characters.
    pub key_file: PathBuf,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 1500))
}

fn default_metrics_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9500))
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("/var/lib/sync-gateway")
}

fn yes() -> bool {
    true
}

/// Why a config could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config {origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("invalid config: {0}")]
    Invalid(String),
    #[error("disk {disk}: cannot load its replication key")]
    Key {
        disk: String,
        #[source]
        source: protocol::auth::KeyError,
    },
}

impl Config {
    /// Loads `path`, applies environment overrides and validates the result.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml(&text, &path.display().to_string(), std::env::vars())
    }

    /// Parses TOML text with the given environment.
    pub fn from_toml(
        text: &str,
        origin: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut value: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Parse {
            origin: origin.to_string(),
            message: e.to_string(),
        })?;
        let overridden = apply_env(&mut value, env)?;
        let origin = if overridden.is_empty() {
            origin.to_string()
        } else {
            format!("{origin} (with {})", overridden.join(", "))
        };
        let config: Config =
            Config::deserialize(toml::Value::Table(value)).map_err(|e| ConfigError::Parse {
                origin: origin.clone(),
                message: e.to_string(),
            })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if l.max_block_bytes < 4096 || l.max_block_bytes > MAX_BLOCK_LEN {
            return bad(format!(
                "limits.max_block_bytes must be between 4096 and {MAX_BLOCK_LEN}"
            ));
        }
        if l.connection_inflight_bytes < 2 * u64::from(l.max_block_bytes) {
            return bad("limits.connection_inflight_bytes must hold two blocks".into());
        }
        if l.gateway_inflight_bytes < l.connection_inflight_bytes {
            return bad(
                "limits.gateway_inflight_bytes must be at least connection_inflight_bytes".into(),
            );
        }
        if l.gateway_inflight_bytes > u64::from(u32::MAX) {
            return bad("limits.gateway_inflight_bytes must be below 4 GiB".into());
        }
        if l.max_connections == 0 {
            return bad("limits.max_connections must be at least 1".into());
        }
        if l.drain_timeout_secs == 0 || l.idle_timeout_secs == 0 || l.handshake_timeout_secs == 0 {
            return bad("limits: timeouts must be at least 1 second".into());
        }
        if l.sync_bytes == 0 {
            return bad("limits.sync_bytes must be positive".into());
        }
        if let Some(m) = &self.metrics {
            if !m.listen.ip().is_loopback() {
                return bad(format!(
                    "metrics.listen {} is not a loopback address: the gateway accepts no inbound \
                     connections but agents' on the data port, so metrics stay on the appliance \
                     (use 127.0.0.1 or [::1] and let a local collector forward them)",
                    m.listen
                ));
            }
        }
        if let Some(cp) = &self.control_plane {
            crate::http_client::JsonClient::new(&cp.url, None)
                .map_err(|e| ConfigError::Invalid(format!("control_plane.url: {e}")))?;
            if cp.report_interval_secs == 0 || cp.report_interval_secs > 3600 {
                return bad("control_plane.report_interval_secs must be 1..=3600".into());
            }
            if cp.poll_wait_secs == 0 || cp.poll_wait_secs > crate::api::MAX_POLL_WAIT_SECS {
                return bad(format!(
                    "control_plane.poll_wait_secs must be 1..={}",
                    crate::api::MAX_POLL_WAIT_SECS
                ));
            }
            if cp.report_queue == 0 || cp.report_queue > 10_000 {
                return bad("control_plane.report_queue must be 1..=10000".into());
            }
            if cp.max_backoff_secs == 0 || cp.max_backoff_secs > 3600 {
                return bad("control_plane.max_backoff_secs must be 1..=3600".into());
            }
        }
        if let Some(r) = &self.retention {
            r.validate()
                .map_err(|e| ConfigError::Invalid(format!("retention: {e}")))?;
        }
        self.diagnostics.validate().map_err(ConfigError::Invalid)?;
        let mut seen = std::collections::HashSet::new();
        for d in &self.disks {
            if !protocol::valid_disk_id(&d.id) {
                return bad(format!(
                    "disk id {:?} must be 1-64 of letters, digits, '-', '_', '.' and not start with '.'",
                    d.id
                ));
            }
            if !seen.insert(d.id.as_str()) {
                return bad(format!("disk id {:?} appears twice", d.id));
            }
            if d.size_bytes == 0 {
                return bad(format!("disk {}: size_bytes must be positive", d.id));
            }
        }
        Ok(())
    }

    /// Loads every disk's key, failing on the first unreadable one.
    pub fn load_keys(&self) -> Result<Vec<(DiskConfig, DiskKey)>, ConfigError> {
        self.disks
            .iter()
            .map(|d| {
                DiskKey::load(&d.key_file)
                    .map(|k| (d.clone(), k))
                    .map_err(|source| ConfigError::Key {
                        disk: d.id.clone(),
                        source,
                    })
            })
            .collect()
    }

    /// The effective config as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

/// Applies `SYNC_GATEWAY_*` overrides; returns the variables it used.
fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Vec<String>, ConfigError> {
    let mut used = Vec::new();
    for (name, raw) in env {
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        if rest == "LOG" {
            continue; // SYNC_GATEWAY_LOG is the log filter, read by main
        }
        let path: Vec<String> = rest.split("__").map(|p| p.to_ascii_lowercase()).collect();
        if path.iter().any(|p| p.is_empty()) || path.len() > 2 {
            return Err(ConfigError::Invalid(format!(
                "environment variable {name} does not name a config key"
            )));
        }
        let value = parse_env_value(&raw);
        let slot = if path.len() == 1 {
            &mut *table
        } else {
            let entry = table
                .entry(path[0].clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            match entry {
                toml::Value::Table(t) => t,
                _ => {
                    return Err(ConfigError::Invalid(format!(
                        "environment variable {name}: {} is not a table",
                        path[0]
                    )))
                }
            }
        };
        slot.insert(path[path.len() - 1].clone(), value);
        used.push(name);
    }
    used.sort();
    Ok(used)
}

fn parse_env_value(raw: &str) -> toml::Value {
    #[derive(Deserialize)]
    struct Probe {
        v: toml::Value,
    }
    match toml::from_str::<Probe>(&format!("v = {raw}")) {
        Ok(p) => p.v,
        Err(_) => toml::Value::String(raw.to_string()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const ISSUE_EXAMPLE: &str = r#"
listen = "127.0.0.1:1500"
data_dir = "/var/lib/sync-gateway"
[backend]
kind = "local"
[[disks]]
id = "disk-1"
size_bytes = 67108864
key_file = "/etc/sync-gateway/keys/disk-1.key"   # 32 random bytes as 64 hex characters
"#;

    fn no_env() -> Vec<(String, String)> {
        Vec::new()
    }

    #[test]
    fn the_aws_backend_table_loads_and_typos_are_refused() {
        let text = r#"
listen = "127.0.0.1:1500"
data_dir = "/var/lib/sync-gateway"
[backend]
kind = "aws"
region = "us-east-1"
endpoint_url = "http://127.0.0.1:5000"
imds_endpoint = "http://127.0.0.1:5001"
device_dir = "/dev/disk/by-id"
volume_type = "io2"
iops = 4000
tags = { team = "dr" }
boot_mode = "uefi"
"#;
        let c = Config::from_toml(text, "test", no_env()).unwrap();
        let BackendConfig::Aws(a) = &c.backend else {
            panic!("not aws: {:?}", c.backend)
        };
        assert_eq!(a.region.as_deref(), Some("us-east-1"));
        assert_eq!(a.imds_endpoint, "http://127.0.0.1:5001");
        assert_eq!(a.volume_type, "io2");
        assert_eq!(a.iops, Some(4000));
        assert_eq!(a.boot_mode, sync_aws::BootModeSetting::Uefi);
        // Defaults: real IMDS, gp3, encrypted.
        let c = Config::from_toml(
            "data_dir = \"/x\"\n[backend]\nkind = \"aws\"\n",
            "test",
            no_env(),
        )
        .unwrap();
        let BackendConfig::Aws(a) = &c.backend else {
            panic!()
        };
        assert_eq!(a.imds_endpoint, "http://169.254.169.254");
        assert!(a.encrypted && a.volume_type == "gp3");
        let err = Config::from_toml(
            "data_dir = \"/x\"\n[backend]\nkind = \"aws\"\nregoin = \"x\"\n",
            "test",
            no_env(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("regoin"), "{err}");
    }

    #[test]
    fn the_documented_example_loads() {
        let c = Config::from_toml(ISSUE_EXAMPLE, "test", no_env()).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:1500");
        assert_eq!(c.disks[0].size_bytes, 64 << 20);
        assert!(matches!(
            c.backend,
            BackendConfig::Local {
                direct_io: true,
                ..
            }
        ));
        assert_eq!(c.limits.sync_bytes, 16 << 20);
        // the rendered effective config loads again
        Config::from_toml(&c.to_toml(), "rendered", no_env()).unwrap();
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let e = Config::from_toml("listn = \"1.2.3.4:5\"", "t", no_env()).unwrap_err();
        assert!(e.to_string().contains("listn"), "{e}");
        let e = Config::from_toml("[limits]\nsync_byte = 1", "t", no_env()).unwrap_err();
        assert!(e.to_string().contains("sync_byte"), "{e}");
        let e = Config::from_toml("[backend]\nkind = \"floppy\"", "t", no_env()).unwrap_err();
        assert!(e.to_string().contains("floppy"), "{e}");
    }

    #[test]
    fn environment_overrides() {
        let env = vec![
            ("SYNC_GATEWAY_LISTEN".to_string(), "127.0.0.1:0".to_string()),
            ("SYNC_GATEWAY_DATA_DIR".into(), "/tmp/x".into()),
            ("SYNC_GATEWAY_LIMITS__SYNC_BYTES".into(), "8388608".into()),
            ("SYNC_GATEWAY_LOG".into(), "debug".into()),
            ("OTHER".into(), "1".into()),
        ];
        let c = Config::from_toml(ISSUE_EXAMPLE, "t", env).unwrap();
        assert_eq!(c.listen.port(), 0);
        assert_eq!(c.data_dir, PathBuf::from("/tmp/x"));
        assert_eq!(c.limits.sync_bytes, 8 << 20);
        let env = vec![("SYNC_GATEWAY_LIMITS__NOPE".to_string(), "1".to_string())];
        let e = Config::from_toml(ISSUE_EXAMPLE, "t", env).unwrap_err();
        assert!(e.to_string().contains("SYNC_GATEWAY_LIMITS__NOPE"), "{e}");
    }

    #[test]
    fn metrics_port_is_optional_and_loopback_only() {
        let c = Config::from_toml(ISSUE_EXAMPLE, "t", no_env()).unwrap();
        assert!(c.metrics.is_none());
        assert!(!c.to_toml().contains("metrics"));
        let text = format!("{ISSUE_EXAMPLE}\n[metrics]\nlisten = \"127.0.0.1:0\"\n");
        let c = Config::from_toml(&text, "t", no_env()).unwrap();
        assert_eq!(c.metrics.as_ref().unwrap().listen.port(), 0);
        Config::from_toml(&c.to_toml(), "rendered", no_env()).unwrap();
        let c = Config::from_toml("[metrics]\n", "t", no_env()).unwrap();
        assert_eq!(c.metrics.unwrap().listen.to_string(), "127.0.0.1:9500");
        let c = Config::from_toml("[metrics]\nlisten = \"[::1]:9500\"", "t", no_env()).unwrap();
        assert!(c.metrics.unwrap().listen.is_ipv6());
        for addr in ["0.0.0.0:9500", "10.0.0.5:9500", "[::]:9500"] {
            let text = format!("[metrics]\nlisten = \"{addr}\"");
            let e = Config::from_toml(&text, "t", no_env()).unwrap_err();
            assert!(e.to_string().contains("not a loopback address"), "{e}");
        }
        let e = Config::from_toml("[metrics]\nport = 1", "t", no_env()).unwrap_err();
        assert!(e.to_string().contains("port"), "{e}");
        let env = vec![(
            "SYNC_GATEWAY_METRICS__LISTEN".to_string(),
            "0.0.0.0:9500".to_string(),
        )];
        assert!(Config::from_toml(ISSUE_EXAMPLE, "t", env).is_err());
    }

    #[test]
    fn the_diagnostics_table_has_defaults_loads_and_is_checked() {
        let c = Config::from_toml(ISSUE_EXAMPLE, "t", no_env()).unwrap();
        assert_eq!(c.diagnostics, DiagnosticsConfig::default());
        assert_eq!(c.diagnostics.oss_prefix, "sync-gateway/diagnostics/");
        assert!(c.diagnostics.oss_bucket.is_none());
        let text = format!(
            "{ISSUE_EXAMPLE}\n[diagnostics]\noss_bucket = \"acme-support\"\n\
             oss_endpoint = \"http://127.0.0.1:9000\"\noss_region = \"cn-hangzhou\"\n"
        );
        let c = Config::from_toml(&text, "t", no_env()).unwrap();
        assert_eq!(c.diagnostics.oss_bucket.as_deref(), Some("acme-support"));
        assert_eq!(c.diagnostics.oss_prefix, DEFAULT_DIAGNOSTICS_PREFIX);
        assert_eq!(c.diagnostics.oss_region.as_deref(), Some("cn-hangzhou"));
        Config::from_toml(&c.to_toml(), "rendered", no_env()).unwrap();
        let env = vec![(
            "SYNC_GATEWAY_DIAGNOSTICS__OSS_PREFIX".to_string(),
            "case-42/".to_string(),
        )];
        let c = Config::from_toml(&text, "t", env).unwrap();
        assert_eq!(c.diagnostics.oss_prefix, "case-42/");
        for (bad, what) in [
            ("oss_bukket = \"b\"", "oss_bukket"),
            ("oss_bucket = \"Has_Caps\"", "oss_bucket"),
            ("oss_bucket = \"ab\"", "oss_bucket"),
            ("oss_prefix = \"/abs/\"", "oss_prefix"),
            ("oss_prefix = \"a/../b\"", "oss_prefix"),
            (
                "oss_endpoint = \"oss-cn-hangzhou.aliyuncs.com\"",
                "oss_endpoint",
            ),
            (
                "oss_endpoint = \"http://127.0.0.1:9/bucket\"",
                "oss_endpoint",
            ),
            ("oss_region = \"\"", "oss_region"),
        ] {
            let text = format!("{ISSUE_EXAMPLE}\n[diagnostics]\n{bad}\n");
            let e = Config::from_toml(&text, "t", no_env()).unwrap_err();
            assert!(e.to_string().contains(what), "{bad}: {e}");
        }
    }

    #[test]
    fn validation_names_the_problem() {
        let dup = format!(
            "{ISSUE_EXAMPLE}\n[[disks]]\nid = \"disk-1\"\nsize_bytes = 1\nkey_file = \"k\"\n"
        );
        let e = Config::from_toml(&dup, "t", no_env()).unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
        let bad_id = "[[disks]]\nid = \"../x\"\nsize_bytes = 1\nkey_file = \"k\"\n";
        assert!(Config::from_toml(bad_id, "t", no_env()).is_err());
    }
}
