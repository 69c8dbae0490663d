//! The metrics port: Prometheus text exposition (format 0.0.4) on a loopback address.
//!
//! ```text
//! GET /metrics   200  text/plain; version=0.0.4   every metric below
//! GET /other     404
//! POST /metrics  405  (any method but GET and HEAD)
//! ```
//!
//! It is read-only by construction: the gateway accepts no inbound control, and the config
//! refuses a non-loopback address, so metrics stay on the appliance (a local agent ships them).
//!
//! It never blocks the data path: a scrape reads relaxed atomics ([`DiskStats`],
//! [`GatewayStats`]) and the disk registry's read lock, never a disk's state lock or a channel.
//! It is bounded: at most [`MAX_CONNECTIONS`] connections (the permit is taken before `accept`),
//! each closed after [`CONNECTION_LIFETIME`] whatever it is doing, with a header read timeout.
//! It stops with the gateway's one cancellation token.
//!
//! Metric names (frozen: dashboards and alerts use them):
//!
//! | name | type | labels |
//! |---|---|---|
//! | `sync_gateway_build_info` | gauge (always 1) | `version` |
//! | `sync_gateway_uptime_seconds` | gauge | |
//! | `sync_gateway_connections_accepted_total` | counter | |
//! | `sync_gateway_handshakes_refused_total` | counter | `code` |
//! | `sync_gateway_disk_bytes_received_total` | counter | `disk` |
//! | `sync_gateway_disk_bytes_written_total` | counter | `disk` |
//! | `sync_gateway_disk_bytes_zeroed_total` | counter | `disk` |
//! | `sync_gateway_disk_frames_total` | counter | `disk` |
//! | `sync_gateway_disk_syncs_total` | counter | `disk` |
//! | `sync_gateway_disk_checkpoints_total` | counter | `disk` |
//! | `sync_gateway_disk_hash_queries_total` | counter | `disk` |
//! | `sync_gateway_disk_sessions_total` | counter | `disk` |
//! | `sync_gateway_disk_errors_total` | counter | `disk`, `code` |
//! | `sync_gateway_disk_connected` | gauge (0/1) | `disk` |
//! | `sync_gateway_disk_durable_seq` | gauge | `disk` |
//! | `sync_gateway_disk_checkpoint_seq` | gauge | `disk` |
//! | `sync_gateway_disk_last_ack_timestamp_seconds` | gauge (0: none) | `disk` |
//! | `sync_gateway_disk_state` | gauge (1 for the current state) | `disk`, `state` |
//! | `sync_gateway_disk_lag_seconds` | gauge | `disk` |
//! | `sync_gateway_disk_backlog_bytes` | gauge | `disk` |

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

use super::disk::{DiskRegistry, DiskStats, ErrorCounts};

/// Concurrent scrape connections; more wait in the kernel's accept queue. A scraper or two and
/// a person with curl need no more.
pub const MAX_CONNECTIONS: usize = 4;
/// Time allowed for a request's headers to arrive.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection is closed after this long even when kept alive, so a stuck client cannot hold a
/// permit for ever.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);

/// The Prometheus text format's content type.
const CONTENT_TYPE_0_0_4: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Gateway-wide counters.
#[derive(Debug)]
pub struct GatewayStats {
    started: Instant,
    /// Connections accepted on the data port.
    pub connections_accepted: AtomicU64,
    /// Handshakes refused, by the code sent to the peer.
    pub handshakes_refused: ErrorCounts,
}

impl Default for GatewayStats {
    fn default() -> Self {
        GatewayStats {
            started: Instant::now(),
            connections_accepted: AtomicU64::new(0),
            handshakes_refused: ErrorCounts::default(),
        }
    }
}

/// What a scrape reads.
#[derive(Debug, Clone)]
pub struct Sources {
    pub gateway: Arc<GatewayStats>,
    pub disks: Arc<DiskRegistry>,
}

/// Serves the metrics port until `cancel` fires. Connections still open then are dropped: a
/// scrape has nothing to drain.
pub async fn serve(listener: TcpListener, sources: Sources, cancel: CancellationToken) {
    let acceptor = crate::net::Acceptor::new(listener, MAX_CONNECTIONS, "metrics");
    let tracker = TaskTracker::new();
    while let Some((stream, _peer, permit)) = acceptor.next(&cancel).await {
        let sources = sources.clone();
        let cancel = cancel.clone();
        tracker.spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let sources = sources.clone();
                async move { Ok::<_, Infallible>(respond(&req, &sources)) }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .max_buf_size(16 * 1024);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = cancel.cancelled() => {}
                r = tokio::time::timeout(CONNECTION_LIFETIME, conn) => {
                    if let Ok(Err(e)) = r {
                        debug!(error = %e, "metrics connection ended");
                    }
                }
            }
            drop(permit);
        });
    }
    drop(acceptor);
    tracker.close();
    tracker.wait().await;
}

fn respond(req: &Request<Incoming>, sources: &Sources) -> Response<Full<Bytes>> {
    let plain = |status: StatusCode, text: &'static str| {
        let mut r = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
        *r.status_mut() = status;
        r.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r
    };
    if req.uri().path() != "/metrics" {
        return plain(
            StatusCode::NOT_FOUND,
            "not found: the only path is /metrics\n",
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed: metrics are read with GET\n",
        );
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let mut r = Response::new(Full::new(Bytes::from(render(sources))));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE_0_0_4));
    r
}

/// Renders every metric in the text exposition format 0.0.4.
pub fn render(sources: &Sources) -> String {
    let mut out = String::with_capacity(4096);
    let g = &sources.gateway;
    family(
        &mut out,
        "sync_gateway_build_info",
        "gauge",
        "Build of the running gateway (always 1).",
    );
    sample(
        &mut out,
        "sync_gateway_build_info",
        &[("version", env!("CARGO_PKG_VERSION"))],
        "1",
    );
    family(
        &mut out,
        "sync_gateway_uptime_seconds",
        "gauge",
        "Seconds since the gateway started.",
    );
    sample(
        &mut out,
        "sync_gateway_uptime_seconds",
        &[],
        &format!("{:.3}", g.started.elapsed().as_secs_f64()),
    );
    family(
        &mut out,
        "sync_gateway_connections_accepted_total",
        "counter",
        "Connections accepted on the data port.",
    );
    sample(
        &mut out,
        "sync_gateway_connections_accepted_total",
        &[],
        &g.connections_accepted.load(Ordering::Relaxed).to_string(),
    );
    family(
        &mut out,
        "sync_gateway_handshakes_refused_total",
        "counter",
        "Handshakes refused, by the error code sent to the peer.",
    );
    for (code, n) in g.handshakes_refused.nonzero() {
        sample(
            &mut out,
            "sync_gateway_handshakes_refused_total",
            &[("code", code)],
            &n.to_string(),
        );
    }

    let mut disks = sources.disks.all();
    disks.sort_by(|a, b| a.id.cmp(&b.id));
    type Read = fn(&DiskStats) -> String;
    fn load(a: &AtomicU64) -> String {
        a.load(Ordering::Relaxed).to_string()
    }
    let per_disk: [(&str, &str, &str, Read); 12] = [
        (
            "sync_gateway_disk_bytes_received_total",
            "counter",
            "Payload bytes of data frames received (compressed as sent).",
            |s| load(&s.bytes_received),
        ),
        (
            "sync_gateway_disk_bytes_written_total",
            "counter",
            "Bytes of data blocks written to the volume.",
            |s| load(&s.bytes_written),
        ),
        (
            "sync_gateway_disk_bytes_zeroed_total",
            "counter",
            "Bytes of zero runs applied to the volume.",
            |s| load(&s.bytes_zeroed),
        ),
        (
            "sync_gateway_disk_frames_total",
            "counter",
            "Frames received from authenticated agents.",
            |s| load(&s.frames),
        ),
        (
            "sync_gateway_disk_syncs_total",
            "counter",
            "fdatasyncs that made data durable and were acked.",
            |s| load(&s.syncs),
        ),
        (
            "sync_gateway_disk_checkpoints_total",
            "counter",
            "Checkpoints completed (snapshot initiated and acked).",
            |s| load(&s.checkpoints),
        ),
        (
            "sync_gateway_disk_hash_queries_total",
            "counter",
            "Delta-resync hash queries answered.",
            |s| load(&s.hash_queries),
        ),
        (
            "sync_gateway_disk_sessions_total",
            "counter",
            "Agent sessions that authenticated.",
            |s| load(&s.sessions),
        ),
        (
            "sync_gateway_disk_connected",
            "gauge",
            "1 while an authenticated agent is connected, else 0.",
            |s| u8::from(s.connected()).to_string(),
        ),
        (
            "sync_gateway_disk_durable_seq",
            "gauge",
            "Newest durable (acked) sequence number.",
            |s| load(&s.durable_seq),
        ),
        (
            "sync_gateway_disk_checkpoint_seq",
            "gauge",
            "Sequence number of the last completed checkpoint (0: none).",
            |s| load(&s.checkpoint_seq),
        ),
        (
            "sync_gateway_disk_last_ack_timestamp_seconds",
            "gauge",
            "Unix time of the last ack sent to the agent (0: none since start).",
            |s| {
                let ms = s.last_ack_unix_ms.load(Ordering::Relaxed);
                format!("{}.{:03}", ms / 1000, ms % 1000)
            },
        ),
    ];
    for (name, kind, help, read) in per_disk {
        family(&mut out, name, kind, help);
        for d in &disks {
            sample(&mut out, name, &[("disk", &d.id)], &read(&d.stats));
        }
    }
    let now_ms = super::disk::unix_ms();
    let progress: Vec<_> = disks.iter().map(|d| (d, d.progress(now_ms))).collect();
    family(
        &mut out,
        "sync_gateway_disk_state",
        "gauge",
        "Replication state of the disk: 1 for the current state, 0 for the others.",
    );
    for (d, p) in &progress {
        for s in crate::api::DiskState::ALL {
            sample(
                &mut out,
                "sync_gateway_disk_state",
                &[("disk", &d.id), ("state", s.as_str())],
                if *s == p.state { "1" } else { "0" },
            );
        }
    }
    family(
        &mut out,
        "sync_gateway_disk_lag_seconds",
        "gauge",
        "Age of the newest checkpoint's snapshot (absent before the first checkpoint).",
    );
    for (d, p) in &progress {
        if let Some(lag) = p.lag_secs {
            sample(
                &mut out,
                "sync_gateway_disk_lag_seconds",
                &[("disk", &d.id)],
                &lag.to_string(),
            );
        }
    }
    family(
        &mut out,
        "sync_gateway_disk_backlog_bytes",
        "gauge",
        "Bytes of the disk the current pass has still to cover (0 at a checkpoint).",
    );
    for (d, p) in &progress {
        sample(
            &mut out,
            "sync_gateway_disk_backlog_bytes",
            &[("disk", &d.id)],
            &p.backlog.to_string(),
        );
    }
    family(
        &mut out,
        "sync_gateway_disk_errors_total",
        "counter",
        "Sessions that ended with an error, by the error code.",
    );
    for d in &disks {
        for (code, n) in d.stats.errors.nonzero() {
            sample(
                &mut out,
                "sync_gateway_disk_errors_total",
                &[("disk", &d.id), ("code", code)],
                &n.to_string(),
            );
        }
    }
    out
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {}", escape_help(help));
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: &str) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{k}=\"{}\"", escape_label(v));
        }
        out.push('}');
    }
    out.push(' ');
    out.push_str(value);
    out.push('\n');
}

/// Label values escape backslash, double quote and line feed.
fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// Help text escapes backslash and line feed.
fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::protocol::ErrorCode;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escape_label("x\ny"), "x\\ny");
        let mut out = String::new();
        sample(&mut out, "m_total", &[("disk", "d\"1"), ("code", "x")], "3");
        assert_eq!(out, "m_total{disk=\"d\\\"1\",code=\"x\"} 3\n");
    }

    #[test]
    fn an_empty_gateway_renders_every_family() {
        let sources = Sources {
            gateway: Arc::new(GatewayStats::default()),
            disks: Arc::new(DiskRegistry::default()),
        };
        sources
            .gateway
            .handshakes_refused
            .record(ErrorCode::AuthFailed);
        sources
            .gateway
            .handshakes_refused
            .record(ErrorCode::Other(999));
        let text = render(&sources);
        assert!(text.contains(&format!(
            "sync_gateway_build_info{{version=\"{}\"}} 1\n",
            env!("CARGO_PKG_VERSION")
        )));
        assert!(text.contains("sync_gateway_handshakes_refused_total{code=\"auth_failed\"} 1\n"));
        assert!(text.contains("sync_gateway_handshakes_refused_total{code=\"unknown_error\"} 1\n"));
        assert!(text.contains("# TYPE sync_gateway_disk_bytes_written_total counter\n"));
        // every counter family ends in _total
        for line in text.lines().filter(|l| l.starts_with("# TYPE")) {
            let parts: Vec<&str> = line.split(' ').collect();
            assert_eq!(parts.len(), 4, "{line}");
            assert_eq!(
                parts[3] == "counter",
                parts[2].ends_with("_total"),
                "{line}"
            );
        }
    }
}
