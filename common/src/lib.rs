//! What the gateway's clients of the outside world share, so that each cloud's crate does not
//! write it again: [`boot`] (the `boot_mode` setting), [`retry`] (full-jitter backoff and the retry counters status reports),
//! [`https`] (the one hyper + rustls client set-up: ring, TLS 1.2/1.3, plain http allowed
//! for loopback test servers) and [`publish`] (what the two image publishers share: command
//! line and exit status, image file hashing and sniffing, the digest tag, tokens, poll pacing).

pub mod boot;
pub mod https;
pub mod publish;
pub mod retry;
