//! Exponential backoff with jitter for reconnects and retried requests: 200 ms doubling to a 10 s
//! cap, each delay drawn from its upper half so that runners restarted together spread out.

use std::time::Duration;

pub const INITIAL: Duration = Duration::from_millis(200);
pub const CAP: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    cap: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new(INITIAL, CAP)
    }
}

impl Backoff {
    pub fn new(initial: Duration, cap: Duration) -> Self {
        Backoff {
            next: initial.min(cap),
            cap,
        }
    }

    /// The un-jittered delay the next call is based on.
    pub fn peek(&self) -> Duration {
        self.next
    }

    /// The next delay, with `jitter` in `[0, 1)` choosing a point in `[d/2, d)`.
    pub fn next_with(&mut self, jitter: f64) -> Duration {
        let d = self.next;
        self.next = (d * 2).min(self.cap);
        d.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 0.999_999))
    }

    /// The next delay, randomly jittered.
    pub fn next_delay(&mut self) -> Duration {
        self.next_with(rand::random::<f64>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_to_the_cap() {
        let mut b = Backoff::default();
        let bases: Vec<Duration> = (0..10)
            .map(|_| {
                let base = b.peek();
                b.next_with(0.0);
                base
            })
            .collect();
        let ms: Vec<u128> = bases.iter().map(Duration::as_millis).collect();
        assert_eq!(
            ms,
            vec![200, 400, 800, 1600, 3200, 6400, 10000, 10000, 10000, 10000]
        );
    }

    #[test]
    fn jitter_stays_in_the_upper_half() {
        let mut b = Backoff::default();
        assert_eq!(b.clone().next_with(0.0), Duration::from_millis(100));
        assert!(b.clone().next_with(1.0) < Duration::from_millis(200));
        for _ in 0..100 {
            let d = b.clone().next_delay();
            assert!(
                d >= Duration::from_millis(100) && d < Duration::from_millis(200),
                "{d:?}"
            );
        }
        for _ in 0..20 {
            b.next_delay();
        }
        assert!(b.next_delay() <= CAP);
    }
}
