//! A circuit breaker per deployment: a policy whose calls keep ending in a costly fault (its
//! fuel, its deadline, its memory cap, a stack overflow, a trap) stops being run for a while, and its
//! tenant's requests are refused at once. Without it, a tenant whose policy loops until its
//! fuel runs out on every request holds a CPU core for as long as it sends requests, and every
//! other tenant's latency pays for it. Plain data; the engine keeps one per deployment.

use std::time::{Duration, Instant};

/// Consecutive costly faults that open the breaker.
pub const FAULTS_TO_OPEN: u32 = 3;
/// How long an open breaker refuses calls before letting one through to try again.
pub const OPEN_FOR: Duration = Duration::from_secs(10);

/// One deployment's breaker.
#[derive(Debug, Clone, Default)]
pub struct Breaker {
    consecutive_faults: u32,
    open_until: Option<Instant>,
}

impl Breaker {
    /// Whether a call may run now. When the open period has passed, one trial call is let
    /// through (and the breaker reopens at once if it faults again).
    pub fn allow(&mut self, now: Instant) -> Result<(), Duration> {
        match self.open_until {
            Some(until) if now < until => Err(until - now),
            Some(_) => {
                // Half open: the next fault reopens it.
                self.open_until = None;
                self.consecutive_faults = FAULTS_TO_OPEN - 1;
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Records how a call ended: `costly` when it hit a deadline, a limit or a trap.
    pub fn record(&mut self, costly: bool, now: Instant) {
        if !costly {
            self.consecutive_faults = 0;
            return;
        }
        self.consecutive_faults += 1;
        if self.consecutive_faults >= FAULTS_TO_OPEN {
            self.open_until = Some(now + OPEN_FOR);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_repeated_costly_faults_and_tries_again_later() {
        let t0 = Instant::now();
        let mut b = Breaker::default();
        for _ in 0..FAULTS_TO_OPEN - 1 {
            assert!(b.allow(t0).is_ok());
            b.record(true, t0);
        }
        b.record(false, t0);
        assert!(b.allow(t0).is_ok(), "a good call resets the count");
        for _ in 0..FAULTS_TO_OPEN {
            b.record(true, t0);
        }
        assert_eq!(b.allow(t0 + Duration::from_secs(1)), Err(OPEN_FOR - Duration::from_secs(1)));
        let later = t0 + OPEN_FOR;
        assert!(b.allow(later).is_ok(), "one trial call after the open period");
        b.record(true, later);
        assert!(b.allow(later).is_err(), "a failed trial reopens it at once");
        let much_later = later + OPEN_FOR;
        assert!(b.allow(much_later).is_ok());
        b.record(false, much_later);
        assert!(b.allow(much_later).is_ok());
        b.record(true, much_later);
        assert!(b.allow(much_later).is_ok(), "closed again: one fault does not open it");
    }
}
