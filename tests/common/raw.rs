//! A synchronous raw protocol client for tests that speak to the gateway frame by frame,
//! including frames no real agent would send.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use sync_gateway::protocol::auth::{self, DiskKey, Transcript};
use sync_gateway::protocol::{Frame, FrameCodec, Hello, PREAMBLE};
use tokio_util::codec::{Decoder, Encoder};

/// What one read brought.
#[derive(Debug)]
#[allow(dead_code)] // the payloads are read through Debug in failure messages
pub enum Recv {
    Frame(Frame),
    Eof,
    Timeout,
    Io(std::io::Error),
    Decode(String),
}

/// A blocking client on one TCP connection.
pub struct Client {
    s: TcpStream,
    buf: BytesMut,
    codec: FrameCodec,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
        s.set_nodelay(true).unwrap();
        Client {
            s,
            buf: BytesMut::new(),
            codec: FrameCodec::default(),
        }
    }

    /// Writes raw bytes.
    pub fn raw(&mut self, b: &[u8]) -> Result<(), String> {
        self.s.write_all(b).map_err(|e| format!("write: {e}"))
    }

    /// The wire form of a frame.
    pub fn encode(f: &Frame) -> BytesMut {
        let mut b = BytesMut::new();
        FrameCodec::default().encode(f, &mut b).unwrap();
        b
    }

    /// Writes one frame.
    pub fn send(&mut self, f: &Frame) -> Result<(), String> {
        let b = Self::encode(f);
        self.raw(&b)
    }

    /// Writes one frame, panicking when the socket refuses it.
    pub fn put(&mut self, f: &Frame) {
        self.send(f).expect("send frame");
    }

    /// Half-closes the connection (no more bytes from this side).
    pub fn shutdown_write(&mut self) -> std::io::Result<()> {
        self.s.shutdown(std::net::Shutdown::Write)
    }

    /// Next frame, EOF, or timeout after `within`.
    pub fn recv(&mut self, within: Duration) -> Recv {
        let end = Instant::now() + within;
        loop {
            match self.codec.decode(&mut self.buf) {
                Ok(Some(f)) => return Recv::Frame(f),
                Ok(None) => {}
                Err(e) => return Recv::Decode(e.to_string()),
            }
            let now = Instant::now();
            if now >= end {
                return Recv::Timeout;
            }
            self.s.set_read_timeout(Some(end - now)).unwrap();
            let mut chunk = [0u8; 64 << 10];
            match self.s.read(&mut chunk) {
                Ok(0) => {
                    return match self.codec.decode_eof(&mut self.buf) {
                        Ok(Some(f)) => Recv::Frame(f),
                        Ok(None) => Recv::Eof,
                        Err(e) => Recv::Decode(e.to_string()),
                    }
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Recv::Timeout
                }
                Err(e) => return Recv::Io(e),
            }
        }
    }
}

pub fn hello(id: &str, size: u64, min: u16, max: u16) -> Frame {
    Frame::Hello(Hello {
        min_version: min,
        max_version: max,
        disk_size: size,
        disk_id: id.into(),
        agent: "raw-test-client/1".into(),
    })
}

/// Preamble, Hello, Challenge, Auth with `key`. Returns the client after the Auth was sent and
/// the transcript values needed to check the Welcome.
pub fn send_auth(
    addr: SocketAddr,
    id: &str,
    size: u64,
    key: &DiskKey,
) -> Result<(Client, u16, [u8; 32], [u8; 32]), String> {
    let mut c = Client::connect(addr);
    c.raw(&PREAMBLE)?;
    c.send(&hello(id, size, 1, 1))?;
    let (version, server_nonce) = match c.recv(Duration::from_secs(5)) {
        Recv::Frame(Frame::Challenge {
            version,
            server_nonce,
        }) => (version, server_nonce),
        other => return Err(format!("expected Challenge, got {other:?}")),
    };
    let mut client_nonce = [0u8; 32];
    super::Rng::new(u64::from(server_nonce[0]) << 8 | u64::from(server_nonce[1]))
        .fill(&mut client_nonce);
    let t = Transcript {
        version,
        server_nonce: &server_nonce,
        client_nonce: &client_nonce,
        disk_size: size,
        disk_id: id,
    };
    let mac = auth::agent_mac(key, &t);
    c.send(&Frame::Auth { client_nonce, mac })?;
    Ok((c, version, server_nonce, client_nonce))
}
