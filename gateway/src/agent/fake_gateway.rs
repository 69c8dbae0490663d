//! An in-memory gateway for the agent's own end-to-end tests, with fault injection.
//! It follows protocol v1 (digest checks, seq checks, acks, checkpoints, hash queries) but
//! nothing else.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use futures::{SinkExt, StreamExt};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio_util::codec::Framed;

use crate::protocol::auth::{gateway_proof, verify_agent, DiskKey, Transcript};
use crate::protocol::{CheckpointAck, ErrorCode, Frame, FrameCodec, HashReply, Welcome, PREAMBLE};

/// What the fake has made "durable".
#[derive(Debug, Default)]
pub struct FakeDisk {
    pub data: Vec<u8>,
    pub durable_seq: u64,
    pub resume_offset: u64,
    pub checkpoint_seq: u64,
    pub label: String,
    pub snapshot_id: String,
    pub snapshots: u32,
    pub data_frames: u64,
    pub hash_queries: u64,
    pub connections: u32,
    /// Data frames that broke the ascending offset order within a connection.
    pub out_of_order: Vec<String>,
}

/// Misbehaviour to inject; each fires once.
#[derive(Debug, Default)]
pub struct Faults {
    /// Close the connection after this many data frames (counted over the fake's lifetime).
    pub drop_after_frames: Option<u64>,
    /// Answer a fatal error after this many data frames.
    pub fatal_after_frames: Option<u64>,
    /// Take the snapshot, then close instead of sending the checkpoint ack.
    pub drop_before_checkpoint_ack: bool,
    /// Take the snapshot, then send a fatal error instead of the checkpoint ack.
    pub fatal_instead_of_checkpoint_ack: bool,
    /// Prove the key wrongly.
    pub bad_proof: bool,
    /// Close the connection on receiving this many hash queries (over the fake's lifetime),
    /// without answering the last.
    pub drop_at_query: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct FakeGateway {
    pub addr: SocketAddr,
    pub disk: Arc<Mutex<FakeDisk>>,
    pub faults: Arc<Mutex<Faults>>,
    pub window: u64,
}

impl FakeGateway {
    pub async fn start(key: DiskKey, size: usize, window: u64) -> FakeGateway {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gw = FakeGateway {
            addr: listener.local_addr().unwrap(),
            disk: Arc::new(Mutex::new(FakeDisk {
                data: vec![0; size],
                ..FakeDisk::default()
            })),
            faults: Arc::new(Mutex::new(Faults::default())),
            window,
        };
        let g = gw.clone();
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let g = g.clone();
                let key = key.clone();
                tokio::spawn(async move {
                    let _ = g.session(sock, key).await;
                });
            }
        });
        gw
    }

    async fn session(&self, mut sock: tokio::net::TcpStream, key: DiskKey) -> Option<()> {
        self.disk.lock().unwrap().connections += 1;
        let mut pre = [0u8; 4];
        sock.read_exact(&mut pre).await.ok()?;
        assert_eq!(pre, PREAMBLE);
        let mut f = Framed::new(sock, FrameCodec::default());
        let Some(Ok(Frame::Hello(hello))) = f.next().await else {
            return None;
        };
        let size = self.disk.lock().unwrap().data.len() as u64;
        if hello.disk_size != size {
            let _ = f
                .send(Frame::error(ErrorCode::DiskSizeMismatch, "size"))
                .await;
            return None;
        }
        let server_nonce: [u8; 32] = rand::random();
        f.send(Frame::Challenge {
            version: 1,
            server_nonce,
        })
        .await
        .ok()?;
        let Some(Ok(Frame::Auth { client_nonce, mac })) = f.next().await else {
            return None;
        };
        let t = Transcript {
            version: 1,
            server_nonce: &server_nonce,
            client_nonce: &client_nonce,
            disk_size: size,
            disk_id: &hello.disk_id,
        };
        if !verify_agent(&key, &t, &mac) {
            let _ = f.send(Frame::error(ErrorCode::AuthFailed, "bad mac")).await;
            return None;
        }
        let mut proof = gateway_proof(&key, &t);
        if self.faults.lock().unwrap().bad_proof {
            proof[0] ^= 1;
        }
        let welcome = {
            let d = self.disk.lock().unwrap();
            Welcome {
                server_proof: proof,
                durable_seq: d.durable_seq,
                resume_offset: d.resume_offset,
                checkpoint_seq: d.checkpoint_seq,
                max_payload: 1 << 20,
                window: self.window,
                checkpoint_label: d.label.clone(),
                snapshot_id: d.snapshot_id.clone(),
            }
        };
        f.send(Frame::Welcome(welcome)).await.ok()?;
        // Data frames of one connection (one pass, resends first) ascend in offset.
        let mut data_end = 0u64;
        while let Some(Ok(frame)) = f.next().await {
            match frame {
                Frame::Data(d) => {
                    let reply = {
                        let mut disk = self.disk.lock().unwrap();
                        assert!(d.seq > disk.durable_seq, "seq {} regressed", d.seq);
                        if d.offset < data_end {
                            disk.out_of_order.push(format!(
                                "seq {} at offset {} after a write ending at {data_end}",
                                d.seq, d.offset
                            ));
                        }
                        data_end = d.end();
                        let plain = if d.is_zero() {
                            vec![0; d.length as usize]
                        } else if d.is_lz4() {
                            lz4_flex::block::decompress(&d.payload, d.length as usize).unwrap()
                        } else {
                            d.payload.to_vec()
                        };
                        if !d.is_zero() {
                            assert_eq!(d.digest, <[u8; 32]>::from(Sha256::digest(&plain)));
                        }
                        let off = d.offset as usize;
                        disk.data[off..off + plain.len()].copy_from_slice(&plain);
                        disk.durable_seq = d.seq;
                        disk.resume_offset = d.end();
                        disk.data_frames += 1;
                        let n = disk.data_frames;
                        let mut faults = self.faults.lock().unwrap();
                        if faults.drop_after_frames.is_some_and(|k| n >= k) {
                            faults.drop_after_frames = None;
                            return None;
                        }
                        if faults.fatal_after_frames.is_some_and(|k| n >= k) {
                            faults.fatal_after_frames = None;
                            Frame::error(ErrorCode::Revoked, "injected")
                        } else {
                            Frame::Ack { durable_seq: d.seq }
                        }
                    };
                    if matches!(reply, Frame::Error { .. }) {
                        return refuse(f, reply).await;
                    }
                    f.send(reply).await.ok()?;
                }
                Frame::Checkpoint(c) => {
                    let (ack, fault) = {
                        let mut disk = self.disk.lock().unwrap();
                        assert!(c.seq > disk.durable_seq);
                        disk.snapshots += 1;
                        disk.durable_seq = c.seq;
                        disk.checkpoint_seq = c.seq;
                        disk.resume_offset = 0;
                        disk.label = c.label.clone();
                        disk.snapshot_id = format!("snap-{}", disk.snapshots);
                        let digest = (c.flags & 1 != 0)
                            .then(|| <[u8; 32]>::from(Sha256::digest(&disk.data)));
                        let mut faults = self.faults.lock().unwrap();
                        let fault = if faults.drop_before_checkpoint_ack {
                            faults.drop_before_checkpoint_ack = false;
                            Some(None)
                        } else if faults.fatal_instead_of_checkpoint_ack {
                            faults.fatal_instead_of_checkpoint_ack = false;
                            Some(Some(Frame::error(ErrorCode::Revoked, "injected")))
                        } else {
                            None
                        };
                        let ack = CheckpointAck {
                            seq: c.seq,
                            created_unix_ms: 1,
                            digest,
                            snapshot_id: disk.snapshot_id.clone(),
                        };
                        (ack, fault)
                    };
                    match fault {
                        Some(None) => return None,
                        Some(Some(e)) => return refuse(f, e).await,
                        None => {}
                    }
                    f.send(Frame::Ack { durable_seq: c.seq }).await.ok()?;
                    f.send(Frame::CheckpointAck(ack)).await.ok()?;
                }
                Frame::HashQuery(q) => {
                    let reply = {
                        let mut disk = self.disk.lock().unwrap();
                        disk.hash_queries += 1;
                        let n = disk.hash_queries;
                        let mut faults = self.faults.lock().unwrap();
                        if faults.drop_at_query.is_some_and(|k| n >= k) {
                            faults.drop_at_query = None;
                            return None;
                        }
                        let bs = q.block_size as usize;
                        let len = disk.data.len();
                        let differs = q
                            .hashes
                            .iter()
                            .enumerate()
                            .map(|(i, want)| {
                                let start = q.offset as usize + i * bs;
                                assert!(start < len, "query past the end");
                                let got: [u8; 32] =
                                    Sha256::digest(&disk.data[start..(start + bs).min(len)]).into();
                                got != *want
                            })
                            .collect();
                        HashReply {
                            offset: q.offset,
                            block_size: q.block_size,
                            differs,
                        }
                    };
                    f.send(Frame::HashReply(reply)).await.ok()?;
                }
                _ => return None,
            }
        }
        None
    }
}

/// Sends a fatal error the way a gateway should: then stop writing and drain what the agent still
/// has in flight, so that closing does not reset the connection and destroy the error frame.
async fn refuse(mut f: Framed<tokio::net::TcpStream, FrameCodec>, e: Frame) -> Option<()> {
    f.send(e).await.ok()?;
    let _ = tokio::io::AsyncWriteExt::shutdown(f.get_mut()).await;
    let drain = async { while let Some(Ok(_)) = f.next().await {} };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), drain).await;
    None
}
