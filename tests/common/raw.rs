//! A synchronous raw protocol client for tests that speak to the gateway frame by frame,
//! including frames no real agent would send.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use sync_gateway::protocol::{Frame, FrameCodec};
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
