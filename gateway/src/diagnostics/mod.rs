//! The `collect_diagnostics` command: a support bundle of the gateway, built as a `.tar.gz`
//! and uploaded to OSS (the `[diagnostics]` bucket, signed with the gateway's RAM role) or to
//! a presigned PUT URL carried by the command.
//!
//! ```text
//!  diagnostics-<gateway id>-<YYYYMMDDTHHMMSSZ>.tar.gz
//!  └── diagnostics-<gateway id>-<YYYYMMDDTHHMMSSZ>/
//!      ├── README.txt         what each file is, how secrets were removed, what was left out
//!      ├── versions.json      gateway version and git commit, OS release, kernel, host
//!      ├── status.json        the StatusReport the gateway reports upward, taken now
//!      ├── config.toml        the effective config (file + environment), secrets redacted
//!      ├── logs/gateway.log   the recent log from memory (≤ 4 MiB / 20 000 events)
//!      └── state/*.json       DATA_DIR/state's JSON files, secrets redacted
//! ```
//!
//! Secrets never enter a bundle: see [`redact`] for the two nets (by field name, then by value
//! over every file). The archive is built under `DATA_DIR/diagnostics.tmp/` (mode 0700) and
//! removed after the upload, whether it worked or not. Nothing here panics on bad input; every
//! failure is a [`DiagnosticsError`] that says what to do.

pub mod archive;
pub mod logring;
pub mod redact;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use sync_aliyun::oss::{OssClient, OssConfig, PutOptions};
use time::OffsetDateTime;

use crate::api::{self, CollectDiagnostics, DiagnosticsBundle};
use crate::backend::AliyunAccess;
use crate::config::{Config, DiagnosticsConfig};
use crate::server::Control;
use crate::upward::StatusSource;
use archive::Member;
use redact::Scrubber;

/// Where bundles are built, under the data dir.
pub const WORK_DIR: &str = "diagnostics.tmp";
/// A state file larger than this is listed, not included (state files are a few KiB).
const MAX_STATE_FILE: u64 = 1 << 20;
/// State files included at most (a state dir holds a few per disk).
const MAX_STATE_FILES: usize = 1000;
/// How long fetching the cloud credentials (to scrub them) may take.
const CREDENTIALS_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an upload may take, retries included. A bundle is a few MiB: even at 100 KiB/s
/// it is up in well under this; past it the peer is stalled, and the command must answer.
pub const UPLOAD_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// Why a bundle was not delivered.
#[derive(Debug, thiserror::Error)]
pub enum DiagnosticsError {
    #[error("bad collect_diagnostics args: {0}")]
    BadArgs(String),
    #[error(
        "nowhere to upload the diagnostics bundle: the command carries no upload_url and \
         {reason}; configure [diagnostics] oss_bucket on an aliyun gateway (its RAM role signs \
         the upload) or issue the command with an upload_url (a presigned PUT URL)"
    )]
    NoTarget { reason: String },
    #[error("diagnostics upload settings: {0}")]
    Setup(String),
    #[error("cannot build the diagnostics bundle in {path}")]
    Build {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The message is the upload error's chain with every known secret scrubbed from it.
    #[error("diagnostics bundle upload to {target} failed: {message}")]
    Upload { target: String, message: String },
}

/// Where the bundle goes.
#[derive(Debug)]
pub enum Target {
    /// A presigned PUT URL; it names the object.
    Presigned { url: String },
    /// The configured bucket, signed with the gateway's own credentials.
    Bucket {
        /// Boxed: the client is large, the other variant a URL.
        client: Box<OssClient>,
        bucket: String,
        prefix: String,
        access: AliyunAccess,
    },
}

impl Target {
    /// Where it points, without anything that grants access.
    pub fn describe(&self) -> String {
        match self {
            Target::Presigned { url } => url_without_query(url),
            Target::Bucket { bucket, prefix, .. } => format!("oss://{bucket}/{prefix}"),
        }
    }
}

/// Builds and uploads bundles of one running gateway.
#[derive(Debug, Clone)]
pub struct Collector {
    config: Arc<Config>,
    control: Control,
    status: Arc<StatusSource>,
}

/// One bundle at a time per process (they share the work dir).
static COLLECTING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

impl Collector {
    pub fn new(config: Arc<Config>, control: Control, status: Arc<StatusSource>) -> Self {
        Collector {
            config,
            control,
            status,
        }
    }

    /// Builds a bundle for `command_id` and uploads it where `args` (or the config) says.
    pub async fn collect(
        &self,
        gateway_id: &str,
        command_id: &str,
        args: &CollectDiagnostics,
    ) -> Result<DiagnosticsBundle, DiagnosticsError> {
        args.validate().map_err(DiagnosticsError::BadArgs)?;
        // Before any work: an unusable target fails at once.
        let target = match &args.upload_url {
            Some(url) => Target::Presigned { url: url.clone() },
            None => bucket_target(
                &self.config.diagnostics,
                self.control.shared().backend.aliyun_access(),
                self.control.shared().backend.kind(),
                args.key_prefix.as_deref(),
            )?,
        };
        let _one_at_a_time = COLLECTING.lock().await;
        let mut scrubber = self.known_secrets(&target).await;
        let now = OffsetDateTime::now_utc();
        let who = if gateway_id.is_empty() {
            self.status.hostname()
        } else {
            gateway_id
        };
        let top = bundle_name(who, now);
        let file_name = format!("{top}.tar.gz");
        let (members, notes) = self
            .members(gateway_id, command_id, now, &mut scrubber)
            .await;
        // Every secret is known now; every file goes through the value net.
        let members: Vec<Member> = members
            .into_iter()
            .map(|m| Member {
                data: scrubber
                    .scrub(&String::from_utf8_lossy(&m.data))
                    .into_bytes(),
                ..m
            })
            .collect();
        let header = vec![
            format!("Diagnostics bundle of sync-gateway {gateway_id}"),
            format!(
                "Collected {} for command {command_id}, by sync-gateway {} ({}).",
                rfc3339(now),
                env!("CARGO_PKG_VERSION"),
                git_commit()
            ),
        ];
        let mut readme = archive::readme(&top, &header, &members, &notes);
        readme.data = scrubber
            .scrub(&String::from_utf8_lossy(&readme.data))
            .into_bytes();
        let mut all = vec![readme];
        all.extend(members);

        let work = WorkDir::create(&self.config.data_dir.join(WORK_DIR))?;
        let path = work.path.join(&file_name);
        let mtime = u64::try_from(now.unix_timestamp()).unwrap_or(0);
        let (p, t) = (path.clone(), top.clone());
        let written = tokio::task::spawn_blocking(move || archive::write(&p, &t, &all, mtime))
            .await
            .map_err(|e| DiagnosticsError::Build {
                path: path.clone(),
                source: std::io::Error::other(e),
            })?
            .map_err(|source| DiagnosticsError::Build {
                path: path.clone(),
                source,
            })?;
        let uploaded = tokio::time::timeout(
            UPLOAD_TIMEOUT,
            upload(&target, &path, &file_name, &written, &scrubber),
        )
        .await
        .unwrap_or_else(|_| {
            Err(DiagnosticsError::Upload {
                target: target.describe(),
                message: format!("no answer within {} s", UPLOAD_TIMEOUT.as_secs()),
            })
        });
        drop(work);
        uploaded
    }

    /// Every secret this gateway holds, for the value net.
    async fn known_secrets(&self, target: &Target) -> Scrubber {
        let mut s = Scrubber::default();
        let read = |p: &Path| std::fs::read_to_string(p).ok();
        if let Some(cp) = &self.config.control_plane {
            if let Some(token) = read(&cp.bootstrap_token_file) {
                s.add(&token);
            }
        }
        let reg = self.config.data_dir.join(crate::upward::REGISTRATION_FILE);
        if let Some(v) = read(&reg).and_then(|t| serde_json::from_str::<Value>(&t).ok()) {
            s.add_all_strings(&v["credential"]);
        }
        for d in &self.config.disks {
            if let Some(k) = read(&d.key_file) {
                s.add(&k);
            }
        }
        for disk in self.control.shared().disks.all() {
            if let Some(k) = disk.key() {
                s.add(&k.to_hex());
            }
        }
        for a in self.control.assignments().values() {
            if let Some(k) = &a.agent_key {
                s.add(k);
            }
        }
        let access = match target {
            Target::Presigned { url } => {
                s.add_url_secrets(url);
                self.control.shared().backend.aliyun_access()
            }
            Target::Bucket { access, .. } => Some(access.clone()),
        };
        if let Some(access) = access {
            let creds =
                tokio::time::timeout(CREDENTIALS_TIMEOUT, access.credentials.credentials()).await;
            if let Ok(Ok(c)) = creds {
                s.add(&c.access_key_secret);
                if let Some(t) = &c.security_token {
                    s.add(t);
                }
            }
        }
        s
    }

    /// The bundle's files (before the value net) and notes on what was left out.
    async fn members(
        &self,
        gateway_id: &str,
        command_id: &str,
        now: OffsetDateTime,
        scrubber: &mut Scrubber,
    ) -> (Vec<Member>, Vec<String>) {
        let mut notes = Vec::new();
        let mut members = vec![Member::new(
            "versions.json",
            pretty(&versions(gateway_id, command_id, now, &self.status)),
            "gateway version and git commit, OS release, kernel, host",
        )];
        let report = self.status.report(gateway_id, 0).await;
        members.push(Member::new(
            "status.json",
            pretty(&serde_json::to_value(&report).unwrap_or(Value::Null)),
            "status report (gateway, disks, launches) as sent to the control plane, taken now",
        ));
        members.push(Member::new(
            "config.toml",
            redacted_config(&self.config, scrubber),
            "effective config (file and SYNC_GATEWAY_* environment), secrets redacted",
        ));
        members.push(log_member(logring::installed().as_deref()));
        let state_dir = self.config.data_dir.join("state");
        let mut count = 0;
        state_members(
            &state_dir,
            "state",
            0,
            &mut count,
            &mut members,
            &mut notes,
            scrubber,
        );
        notes.push(
            "disk contents, volumes and snapshots: never included; the journal (journalctl -u \
             sync-gateway) is not read, logs/gateway.log is the process's own recent log"
                .into(),
        );
        (members, notes)
    }
}

/// The configured bucket as a target, or why there is none.
pub fn bucket_target(
    diag: &DiagnosticsConfig,
    access: Option<AliyunAccess>,
    backend_kind: &str,
    key_prefix: Option<&str>,
) -> Result<Target, DiagnosticsError> {
    let Some(bucket) = &diag.oss_bucket else {
        return Err(DiagnosticsError::NoTarget {
            reason: "the gateway config has no [diagnostics] oss_bucket".into(),
        });
    };
    let Some(access) = access else {
        return Err(DiagnosticsError::NoTarget {
            reason: format!(
                "[diagnostics] oss_bucket is set, but this gateway's {backend_kind} backend has \
                 no Alibaba Cloud credentials to sign the upload with"
            ),
        });
    };
    let region = diag
        .oss_region
        .clone()
        .unwrap_or_else(|| access.region.clone());
    let mut cfg = OssConfig::new(&region, bucket);
    cfg.endpoint = diag.oss_endpoint.clone();
    let client = OssClient::with_provider(cfg, access.credentials.clone())
        .map_err(|e| DiagnosticsError::Setup(crate::cli::error_chain(&e)))?;
    let mut prefix = key_prefix.unwrap_or(&diag.oss_prefix).to_string();
    if !prefix.is_empty() && !prefix.ends_with('/') {
        prefix.push('/');
    }
    Ok(Target::Bucket {
        client: Box::new(client),
        bucket: bucket.clone(),
        prefix,
        access,
    })
}

/// Uploads the archive at `path`; errors are scrubbed of every secret `scrubber` knows.
pub async fn upload(
    target: &Target,
    path: &Path,
    file_name: &str,
    written: &archive::Written,
    scrubber: &Scrubber,
) -> Result<DiagnosticsBundle, DiagnosticsError> {
    let failed = |target: String, e: &sync_aliyun::oss::OssError| DiagnosticsError::Upload {
        target,
        message: scrubber.scrub(&crate::cli::error_chain(e)),
    };
    match target {
        Target::Presigned { url } => {
            let shown = target.describe();
            sync_aliyun::oss::put_file_to_presigned_url(url, path, None, None)
                .await
                .map_err(|e| failed(shown.clone(), &e))?;
            let object_path = url
                .split(['?', '#'])
                .next()
                .and_then(|u| u.split_once("://"))
                .and_then(|(_, rest)| rest.find('/').map(|i| &rest[i..]))
                .unwrap_or("/");
            Ok(DiagnosticsBundle {
                object_key: redact::percent_decode(object_path.trim_start_matches('/')),
                bucket: None,
                url: shown,
                file_name: file_name.to_string(),
                size_bytes: written.size,
                sha256: written.sha256.clone(),
            })
        }
        Target::Bucket {
            client,
            bucket,
            prefix,
            ..
        } => {
            let key = format!("{prefix}{file_name}");
            let opts = PutOptions {
                content_type: Some("application/gzip".into()),
                metadata: vec![("sha256".into(), written.sha256.clone())],
                progress: None,
            };
            client
                .put_object_from_file(&key, path, &opts)
                .await
                .map_err(|e| failed(format!("oss://{bucket}/{key}"), &e))?;
            Ok(DiagnosticsBundle {
                url: client.object_url(&key, &[]),
                object_key: key,
                bucket: Some(bucket.clone()),
                file_name: file_name.to_string(),
                size_bytes: written.size,
                sha256: written.sha256.clone(),
            })
        }
    }
}

/// `url` without query, fragment or user info.
fn url_without_query(url: &str) -> String {
    api::redact_url(url.split(['?', '#']).next().unwrap_or(url))
}

/// `diagnostics-<who>-<UTC time>`, file-name and object-key safe.
fn bundle_name(who: &str, now: OffsetDateTime) -> String {
    let who: String = who
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    let stamp = now
        .format(time::macros::format_description!(
            "[year][month][day]T[hour][minute][second]Z"
        ))
        .unwrap_or_else(|_| now.unix_timestamp().to_string());
    format!("diagnostics-{who}-{stamp}")
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

/// The commit the gateway was built from: `SYNC_GATEWAY_GIT_COMMIT` at build time.
pub fn git_commit() -> &'static str {
    option_env!("SYNC_GATEWAY_GIT_COMMIT").unwrap_or("unknown")
}

fn pretty(v: &Value) -> Vec<u8> {
    let mut b = serde_json::to_vec_pretty(v).unwrap_or_default();
    b.push(b'\n');
    b
}

/// Versions of everything the gateway runs on.
fn versions(
    gateway_id: &str,
    command_id: &str,
    now: OffsetDateTime,
    status: &StatusSource,
) -> Value {
    let proc = |name: &str| {
        std::fs::read_to_string(format!("/proc/sys/kernel/{name}"))
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into())
    };
    let os_release: serde_json::Map<String, Value> = std::fs::read_to_string("/etc/os-release")
        .or_else(|_| std::fs::read_to_string("/usr/lib/os-release"))
        .map(|t| parse_os_release(&t))
        .unwrap_or_default();
    json!({
        "sync_gateway": {
            "version": env!("CARGO_PKG_VERSION"),
            "git_commit": git_commit(),
            "build": if cfg!(debug_assertions) { "debug" } else { "release" },
            "target": format!("{}-{}", std::env::consts::ARCH, std::env::consts::OS),
        },
        "gateway_id": gateway_id,
        "command_id": command_id,
        "collected_at": rfc3339(now),
        "hostname": status.hostname(),
        "backend": status.backend_kind(),
        "kernel": {
            "sysname": proc("ostype"),
            "release": proc("osrelease"),
            "version": proc("version"),
            "machine": std::env::consts::ARCH,
        },
        "os_release": os_release,
        "pid": std::process::id(),
    })
}

/// `KEY=value` / `KEY="value"` lines of os-release(5).
fn parse_os_release(text: &str) -> serde_json::Map<String, Value> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            if l.starts_with('#') {
                return None;
            }
            let (k, v) = l.split_once('=')?;
            let v = v.trim().trim_matches('"').trim_matches('\'');
            Some((k.trim().to_string(), Value::String(v.to_string())))
        })
        .collect()
}

/// The effective config as TOML, secrets redacted by field name; what was removed goes to
/// `found`.
pub fn redacted_config(config: &Config, found: &mut Scrubber) -> String {
    let mut v = match serde_json::to_value(config) {
        Ok(v) => v,
        Err(e) => return format!("# cannot render the config: {e}\n"),
    };
    redact::redact_json(&mut v, found);
    redact::drop_nulls(&mut v);
    let body = toml::to_string_pretty(&v).unwrap_or_else(|e| format!("# cannot render: {e}\n"));
    format!(
        "# Effective sync-gateway config (file and SYNC_GATEWAY_* environment).\n\
         # Secret values read {}; key and token files are named, never included.\n\n{body}",
        redact::REDACTED
    )
}

/// The log ring as a member.
fn log_member(ring: Option<&logring::LogRing>) -> Member {
    match ring {
        Some(r) => {
            let snap = r.snapshot();
            let about = if snap.dropped > 0 {
                format!(
                    "recent log: the last {} events ({} older ones dropped to stay within {} MiB)",
                    snap.lines,
                    snap.dropped,
                    logring::MAX_LOG_BYTES >> 20
                )
            } else {
                format!("recent log: all {} events since the start", snap.lines)
            };
            Member::new("logs/gateway.log", snap.text, about)
        }
        None => Member::new(
            "logs/gateway.log",
            "log capture is not enabled in this process\n",
            "recent log (not captured)",
        ),
    }
}

/// Adds the JSON files under `dir` (as `rel/…`), redacted by field name, to `members`; what is
/// skipped goes to `notes`. Symlinks are never followed (a link could point anywhere).
fn state_members(
    dir: &Path,
    rel: &str,
    depth: usize,
    count: &mut usize,
    members: &mut Vec<Member>,
    notes: &mut Vec<String>,
    found: &mut Scrubber,
) {
    let mut entries: Vec<_> = match std::fs::read_dir(dir) {
        Ok(rd) => rd.flatten().collect(),
        Err(e) => {
            notes.push(format!("{rel}/: cannot be read: {e}"));
            return;
        }
    };
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name().to_string_lossy().into_owned();
        let shown = format!("{rel}/{name}");
        let Ok(meta) = std::fs::symlink_metadata(e.path()) else {
            continue;
        };
        if meta.file_type().is_symlink() {
            notes.push(format!("{shown}: a symlink, not followed"));
        } else if meta.is_dir() {
            if depth < 2 {
                state_members(&e.path(), &shown, depth + 1, count, members, notes, found);
            } else {
                notes.push(format!("{shown}/: too deep, not read"));
            }
        } else if !meta.is_file() {
            notes.push(format!("{shown}: not a regular file"));
        } else if !name.ends_with(".json") || name.starts_with('.') {
            notes.push(format!(
                "{shown} ({} bytes): not a JSON state file, not included",
                meta.len()
            ));
        } else if meta.len() > MAX_STATE_FILE {
            notes.push(format!(
                "{shown} ({} bytes): larger than {MAX_STATE_FILE} bytes, not included",
                meta.len()
            ));
        } else if *count >= MAX_STATE_FILES {
            notes.push(format!(
                "{shown}: more than {MAX_STATE_FILES} state files, not included"
            ));
        } else {
            let parsed = std::fs::read(e.path())
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<Value>(&b).map_err(|e| e.to_string()));
            match parsed {
                Ok(mut v) => {
                    redact::redact_json(&mut v, found);
                    *count += 1;
                    members.push(Member::new(
                        shown,
                        pretty(&v),
                        "gateway state file, secrets redacted",
                    ));
                }
                Err(err) => notes.push(format!("{shown}: unreadable ({err}), not included")),
            }
        }
    }
}

/// `DATA_DIR/diagnostics.tmp`: emptied of leftovers when made, removed when dropped.
#[derive(Debug)]
struct WorkDir {
    path: PathBuf,
}

impl WorkDir {
    fn create(path: &Path) -> Result<WorkDir, DiagnosticsError> {
        let err = |source| DiagnosticsError::Build {
            path: path.to_path_buf(),
            source,
        };
        match std::fs::remove_dir_all(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(e)),
        }
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(path)
            .map_err(err)?;
        Ok(WorkDir {
            path: path.to_path_buf(),
        })
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e,
                "cannot remove the diagnostics work dir");
        }
    }
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
