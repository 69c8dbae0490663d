//! What the three programs share at their edges: log setup, the signals that stop a server,
//! and errors printed with their causes on one line.

use tokio_util::sync::CancellationToken;

/// The error and its causes on one line, `a: b: c`. A cause whose text the line already holds
/// is not repeated (hyper's errors, `#[error(transparent)]` and io wrappers repeat their source).
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let s = e.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = e.source();
    }
    out
}

/// Logs to stderr with `filter` (tracing syntax; `info` when it does not parse), as JSON
/// lines or as text (coloured on a terminal).
pub fn init_logging(filter: &str, json: bool) {
    init(filter, json, None);
}

/// [`init_logging`], and every event that passes the filter is also kept in a bounded
/// in-memory ring (the gateway's recent log, for diagnostics bundles; see
/// [`crate::diagnostics::logring`]).
pub fn init_logging_with_capture(filter: &str, json: bool) {
    use crate::diagnostics::logring::{self, LogRing, MAX_LOG_BYTES, MAX_LOG_LINES};
    let ring = logring::install(std::sync::Arc::new(LogRing::new(
        MAX_LOG_BYTES,
        MAX_LOG_LINES,
    )));
    init(filter, json, Some(ring));
}

fn init(
    filter: &str,
    json: bool,
    capture: Option<std::sync::Arc<crate::diagnostics::logring::LogRing>>,
) {
    use std::io::IsTerminal;
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let stderr = fmt_layer(json, std::io::stderr().is_terminal(), std::io::stderr);
    let ring = capture.map(|r| fmt_layer(json, false, crate::diagnostics::logring::RingWriter(r)));
    tracing_subscriber::registry()
        .with(filter)
        .with(stderr)
        .with(ring)
        .init();
}

/// One formatting layer: text or JSON lines into `writer`.
fn fmt_layer<S, W>(
    json: bool,
    ansi: bool,
    writer: W,
) -> Box<dyn tracing_subscriber::Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    use tracing_subscriber::Layer;
    let layer = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(writer);
    if json {
        layer.json().boxed()
    } else {
        layer.boxed()
    }
}

/// Cancels `cancel` on the first SIGTERM or SIGINT: the one shutdown story of the servers.
pub async fn shutdown_on_signal(cancel: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    cancel.cancel();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("wrapper: inner")]
    struct Repeats(#[source] std::io::Error);

    #[test]
    fn causes_are_joined_once() {
        let e = Outer(std::io::Error::other("inner"));
        assert_eq!(error_chain(&e), "outer: inner");
        let e = Repeats(std::io::Error::other("inner"));
        assert_eq!(error_chain(&e), "wrapper: inner");
    }
}
