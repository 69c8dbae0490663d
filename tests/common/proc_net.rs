//! Listening sockets of a process, from /proc: what the gateway accepts connections on.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Inodes of the sockets process `pid` holds open.
pub fn socket_inodes(pid: u32) -> BTreeSet<u64> {
    let mut inodes = BTreeSet::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        let Ok(target) = std::fs::read_link(e.path()) else {
            continue; // closed meanwhile
        };
        let t = target.to_string_lossy();
        if let Some(n) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
            inodes.insert(n.parse().unwrap());
        }
    }
    inodes
}

/// An address in /proc/net/tcp{,6}: 32-bit words in hex, each in host (little-endian) order.
pub fn parse_proc_addr(s: &str) -> SocketAddr {
    let (ip, port) = s.split_once(':').unwrap();
    let port = u16::from_str_radix(port, 16).unwrap();
    let mut bytes = Vec::new();
    for word in ip.as_bytes().chunks(8) {
        let w = u32::from_str_radix(std::str::from_utf8(word).unwrap(), 16).unwrap();
        bytes.extend_from_slice(&w.to_le_bytes());
    }
    let ip = match bytes.len() {
        4 => IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3])),
        16 => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(bytes).unwrap())),
        n => panic!("address of {n} bytes: {s}"),
    };
    SocketAddr::new(ip, port)
}

/// TCP sockets process `pid` holds: (state as /proc spells it, local address, peer address).
fn tcp_sockets(pid: u32) -> Vec<(String, SocketAddr, SocketAddr)> {
    let inodes = socket_inodes(pid);
    let mut out = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue; // no IPv6 in this kernel
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || !inodes.contains(&f[9].parse::<u64>().unwrap()) {
                continue;
            }
            out.push((
                f[3].to_string(),
                parse_proc_addr(f[1]),
                parse_proc_addr(f[2]),
            ));
        }
    }
    out
}

/// TCP sockets in state LISTEN (0A) that process `pid` holds.
pub fn listening_sockets(pid: u32) -> BTreeSet<SocketAddr> {
    tcp_sockets(pid)
        .into_iter()
        .filter(|(state, _, _)| state == "0A")
        .map(|(_, local, _)| local)
        .collect()
}

/// The peers of the TCP connections process `pid` holds (every state but LISTEN).
pub fn connected_peers(pid: u32) -> BTreeSet<SocketAddr> {
    tcp_sockets(pid)
        .into_iter()
        .filter(|(state, _, _)| state != "0A")
        .map(|(_, _, peer)| peer)
        .collect()
}
