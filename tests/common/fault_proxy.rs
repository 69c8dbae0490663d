//! An HTTP/1.1 proxy on loopback that injects faults into chosen requests: the gateway talks to
//! the real `sync-control` through it, and a test decides which requests fail.
//!
//! One request per connection: the proxy reads a request (head + `Content-Length` body), then
//! either answers it with a `503` itself (when a rule matches) or forwards it upstream with
//! `Connection: close` and relays the whole answer. Clients reconnect for the next request,
//! so every request is seen. Long polls work: the answer is relayed when upstream sends it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The proxy; it runs until dropped.
pub struct FaultProxy {
    pub addr: SocketAddr,
    upstream: Arc<Mutex<SocketAddr>>,
    /// Requests whose path contains one of these get a 503.
    fail_paths: Arc<Mutex<Vec<String>>>,
    /// Every request refused (connection closed at once): the control plane is "down".
    down: Arc<AtomicBool>,
    /// Requests answered with an injected 503, by anyone.
    pub injected: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl FaultProxy {
    pub fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let p = FaultProxy {
            addr,
            upstream: Arc::new(Mutex::new(upstream)),
            fail_paths: Arc::new(Mutex::new(Vec::new())),
            down: Arc::new(AtomicBool::new(false)),
            injected: Arc::new(AtomicU64::new(0)),
            stop: Arc::new(AtomicBool::new(false)),
        };
        let (up, fail, down, injected, stop) = (
            p.upstream.clone(),
            p.fail_paths.clone(),
            p.down.clone(),
            p.injected.clone(),
            p.stop.clone(),
        );
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                if down.load(Ordering::Relaxed) {
                    drop(conn);
                    continue;
                }
                let upstream = *up.lock().unwrap_or_else(|p| p.into_inner());
                let rules = fail.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let injected = injected.clone();
                std::thread::spawn(move || {
                    let _ = handle(conn, upstream, &rules, &injected);
                });
            }
        });
        p
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Fails (503) every request whose path contains `fragment`, until [`FaultProxy::heal`].
    pub fn fail_path(&self, fragment: &str) {
        self.fail_paths
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(fragment.to_string());
    }

    pub fn heal(&self) {
        self.fail_paths
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.down.store(false, Ordering::Relaxed);
    }

    /// Refuses every connection (closed without an answer) until healed.
    pub fn go_down(&self) {
        self.down.store(true, Ordering::Relaxed);
    }

    /// Points the proxy at a new upstream (a restarted control plane).
    pub fn set_upstream(&self, addr: SocketAddr) {
        *self.upstream.lock().unwrap_or_else(|p| p.into_inner()) = addr;
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(self.addr); // wake the accept loop
    }
}

fn handle(
    mut client: TcpStream,
    upstream: SocketAddr,
    rules: &[String],
    injected: &AtomicU64,
) -> std::io::Result<()> {
    client.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(client.try_clone()?);
    let mut head = Vec::new();
    let mut content_length = 0usize;
    let mut path = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        if path.is_empty() {
            path = line.split_whitespace().nth(1).unwrap_or("").to_string();
        }
        let lower = line.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            content_length = v.trim().parse().unwrap_or(0);
        }
        if lower.starts_with("connection:") {
            continue; // replaced below
        }
        if line == "\r\n" {
            head.extend_from_slice(b"Connection: close\r\n\r\n");
            break;
        }
        head.extend_from_slice(line.as_bytes());
    }
    let mut body = vec![0u8; content_length];
    reader.read_exact(&mut body)?;
    if rules.iter().any(|r| path.contains(r.as_str())) {
        injected.fetch_add(1, Ordering::Relaxed);
        let msg = br#"{"error":{"code":"injected_fault","message":"fault proxy: 503"}}"#;
        write!(
            client,
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            msg.len()
        )?;
        client.write_all(msg)?;
        return Ok(());
    }
    let mut up = TcpStream::connect_timeout(&upstream, Duration::from_secs(5))?;
    up.write_all(&head)?;
    up.write_all(&body)?;
    let mut answer = Vec::new();
    up.set_read_timeout(Some(Duration::from_secs(120)))?;
    up.read_to_end(&mut answer)?;
    client.write_all(&answer)?;
    Ok(())
}
