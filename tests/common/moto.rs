//! A moto server (PyPI `moto[server]`) on a loopback port of its choosing, killed on drop.
//!
//! moto_server is found on PATH (scripts/test puts `$REPO/.venv/bin` there) or in
//! `$REPO/.venv/bin`. A missing moto FAILS the test: these tests are the AWS backend's only
//! check, and a silent skip would pass CI with nothing tested.
//!
//! Shared by sync-aws's tests and the gateway's (both include this file by `#[path]`): both
//! packages live one directory below the repository, which is how `.venv` is found.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

/// How long moto may take to start: it imports every service's models, ~1–3 s here; 60 s
/// covers a loaded CI machine.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// What moto's server (werkzeug) prints on stderr once it listens, followed by the port.
const LISTENING: &str = "Running on http://127.0.0.1:";

#[derive(Debug)]
pub struct Moto {
    child: Child,
    pub addr: SocketAddr,
}

impl Moto {
    pub fn start() -> Moto {
        let exe = find_moto_server();
        // Port 0, read back from moto's banner. A free port picked here and handed over could
        // be taken in between by any socket of a parallel test (test binaries run at once,
        // each connection to moto uses an ephemeral port): moto would fail to bind, or a test
        // would talk to another test's server.
        let mut child = Command::new(&exe)
            .args(["-H", "127.0.0.1", "-p", "0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", exe.display()));
        let stderr = child.stderr.take().unwrap();
        let (port_tx, port_rx) = mpsc::channel();
        std::thread::spawn(move || {
            // Read to the end: moto logs every request here and would block on a full pipe.
            let mut port_tx = Some(port_tx);
            for line in BufReader::new(stderr).split(b'\n') {
                let Ok(line) = line else { break };
                let line = String::from_utf8_lossy(&line);
                let port = line.split_once(LISTENING).and_then(|(_, rest)| {
                    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                    digits.parse::<u16>().ok()
                });
                if let (Some(port), Some(tx)) = (port, port_tx.as_ref()) {
                    let _ = tx.send(port);
                    port_tx = None;
                }
            }
        });
        // Built before it listens, so that a panic below still kills it.
        let mut moto = Moto {
            child,
            addr: ([127, 0, 0, 1], 0).into(),
        };
        let t0 = Instant::now();
        let port = loop {
            match port_rx.recv_timeout(Duration::from_millis(100)) {
                Ok(port) => break port,
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    let status = moto.child.wait().unwrap();
                    panic!("moto_server exited at startup with {status}");
                }
            }
            if let Some(status) = moto.child.try_wait().unwrap() {
                panic!("moto_server exited at startup with {status}");
            }
            assert!(
                t0.elapsed() < START_TIMEOUT,
                "moto_server did not print {LISTENING:?}<port> within {START_TIMEOUT:?}"
            );
        };
        moto.addr = ([127, 0, 0, 1], port).into();
        loop {
            if TcpStream::connect_timeout(&moto.addr, Duration::from_millis(200)).is_ok() {
                return moto;
            }
            if let Some(status) = moto.child.try_wait().unwrap() {
                panic!("moto_server exited at startup with {status}");
            }
            assert!(
                t0.elapsed() < START_TIMEOUT,
                "moto_server did not listen on {} within {START_TIMEOUT:?}",
                moto.addr
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn find_moto_server() -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("moto_server"))
        .find(|p| p.is_file());
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let venv = repo.join(".venv/bin/moto_server");
    on_path.or_else(|| venv.is_file().then_some(venv)).unwrap_or_else(|| {
        panic!(
            "moto_server not found on PATH nor in {}: scripts/test installs it from tests/requirements.txt \
             (or by hand: python3 -m venv .venv && .venv/bin/pip install -r tests/requirements.txt)",
            repo.join(".venv/bin").display()
        )
    })
}
