//! A moto server (PyPI `moto[server]`) on a free loopback port, killed on drop.
//!
//! moto_server is found on PATH (scripts/test puts `$REPO/.venv/bin` there) or in
//! `$REPO/.venv/bin`. A missing moto FAILS the test: these tests are the AWS backend's only
//! check, and a silent skip would pass CI with nothing tested.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long moto may take to start: it imports every service's models, ~1–3 s here; 60 s
/// covers a loaded CI machine.
const START_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug)]
pub struct Moto {
    child: Child,
    pub addr: SocketAddr,
}

impl Moto {
    pub fn start() -> Moto {
        let exe = find_moto_server();
        // Port 0 cannot be passed to moto and read back; take a free port and hand it over.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let child = Command::new(&exe)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", exe.display()));
        let mut moto = Moto { child, addr };
        let t0 = Instant::now();
        loop {
            if let Some(status) = moto.child.try_wait().unwrap() {
                panic!("moto_server exited at startup with {status}");
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return moto;
            }
            assert!(
                t0.elapsed() < START_TIMEOUT,
                "moto_server did not listen on {addr} within {START_TIMEOUT:?}"
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
