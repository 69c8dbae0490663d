//! `--bandwidth-limit`: rate parsing and an async token bucket over wire bytes.

use std::time::Duration;

use tokio::time::Instant;

/// Parses `500k`, `50M`, `1G`, `1.5M`, `100MiB`, `2000` into bytes per second (binary suffixes).
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let body = lower
        .strip_suffix("/s")
        .unwrap_or(&lower)
        .trim_end_matches("ib")
        .trim_end_matches('b');
    let (num, mult) = match body.char_indices().last() {
        Some((i, 'k')) => (&body[..i], 1u64 << 10),
        Some((i, 'm')) => (&body[..i], 1 << 20),
        Some((i, 'g')) => (&body[..i], 1 << 30),
        _ => (body, 1),
    };
    let value: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("invalid rate {t:?} (examples: 500k, 50M, 1G)"))?;
    let bytes = value * mult as f64;
    if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 {
        return Err(format!("rate {t:?} out of range"));
    }
    Ok(bytes as u64)
}

/// Token bucket. A write larger than the bucket goes into debt and the next one waits it off, so
/// the long-run rate is exact whatever the frame size.
#[derive(Debug)]
pub struct Throttle {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Throttle {
    /// A bucket that refills at `rate` bytes/s and holds at most 50 ms worth (at least 64 KiB):
    /// small enough that the rate holds over short measurements, large enough for whole frames.
    pub fn new(rate: u64) -> Self {
        let rate = rate.max(1) as f64;
        let burst = (rate / 20.0).max(64.0 * 1024.0);
        Throttle {
            rate,
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

    /// Waits until `n` more bytes may go on the wire.
    pub async fn consume(&mut self, n: usize) {
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
        self.tokens -= n as f64;
        if self.tokens < 0.0 {
            tokio::time::sleep(Duration::from_secs_f64(-self.tokens / self.rate)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates() {
        assert_eq!(parse_rate("500k"), Ok(500 << 10));
        assert_eq!(parse_rate("50M"), Ok(50 << 20));
        assert_eq!(parse_rate("1G"), Ok(1 << 30));
        assert_eq!(parse_rate("1g"), Ok(1 << 30));
        assert_eq!(parse_rate("100MiB"), Ok(100 << 20));
        assert_eq!(parse_rate("2MB/s"), Ok(2 << 20));
        assert_eq!(parse_rate("1.5M"), Ok(3 << 19));
        assert_eq!(parse_rate("2000"), Ok(2000));
        assert!(parse_rate("").is_err());
        assert!(parse_rate("0").is_err());
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("-5M").is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn bucket_holds_the_rate() {
        let mut t = Throttle::new(1 << 20);
        let start = Instant::now();
        for _ in 0..40 {
            t.consume(256 << 10).await; // 10 MiB total at 1 MiB/s
        }
        let secs = start.elapsed().as_secs_f64();
        assert!((9.8..10.1).contains(&secs), "took {secs}");
    }
}
