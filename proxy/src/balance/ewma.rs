//! Peak-EWMA: each endpoint's latency estimate, which per-request balancing (HTTP)
//! compares two endpoints by.
//!
//! This is Finagle's estimator, which Linkerd (through tower's `PeakEwma`) uses too:
//!
//! - A response slower than the estimate replaces it at once (the *peak*): an endpoint
//!   that turns slow is avoided from its first slow response, not after an average
//!   catches up.
//! - A faster response pulls the estimate down only as fast as time passes: it is
//!   weighted `1 - e^(-Δt/τ)`, `Δt` the time since the previous observation and `τ`
//!   [`DECAY`]. One lucky fast response does not make a slow endpoint look fast.
//! - Reading the estimate observes a zero ("no news"): an endpoint that nobody picks
//!   looks cheaper and cheaper with time and is eventually tried again, so a slow
//!   endpoint is probed now and then rather than abandoned for good.
//!
//! The cost compared is `estimate × (pending + 1)`, `pending` the requests in flight to
//! the endpoint: a burst spreads over endpoints instead of piling onto the fastest one.
//! An endpoint never measured costs nothing while idle (so it is tried at once and its
//! first response sets the estimate) and [`UNMEASURED_PENDING`] per request in flight
//! once one is pending, so that a new endpoint receives one probe, not a burst (also
//! Finagle's rule; tower instead starts every endpoint at a fixed default).
//!
//! A request that fails in transport (connection refused, reset, timed out) counts as
//! a response of at least [`FAILURE_RTT`]: otherwise an endpoint that fails fast would
//! look like the fastest of all and draw every request.
//!
//! Written here rather than taken from tower's `balance`: tower's balancer owns its
//! endpoints as `Service`s fed by a `Discover` stream and picks among all of them,
//! whereas here a backend is first chosen by weight, endpoint state is shared with the
//! per-connection balancer and survives reloads of the discovery file, and the
//! connection pool is our own. The estimator itself is the few lines below.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// The estimator's time constant: how fast it forgets (Linkerd's default, 10 s).
pub const DECAY: Duration = Duration::from_secs(10);

/// What a failed request counts as, at least: as slow as a connect that timed out.
pub const FAILURE_RTT: Duration = Duration::from_secs(1);

/// The cost of each request in flight to an endpoint that has not answered yet.
pub const UNMEASURED_PENDING: Duration = Duration::from_secs(1);

/// One endpoint's latency estimate and requests in flight.
#[derive(Debug, Default)]
pub struct PeakEwma {
    pending: AtomicUsize,
    estimate: Mutex<Estimate>,
}

#[derive(Debug, Default)]
struct Estimate {
    /// Nanoseconds; 0 until the first response.
    rtt: f64,
    /// When `rtt` was last observed (a response, or a read observing zero).
    at: Option<Instant>,
    /// Whether any response was observed yet.
    measured: bool,
}

impl Estimate {
    /// Observes a latency of `rtt` nanoseconds at `now`: peak, else decaying average.
    fn observe(&mut self, rtt: f64, now: Instant) -> f64 {
        if rtt > self.rtt {
            self.rtt = rtt;
        } else {
            let elapsed = self.at.map_or(0.0, |at| {
                now.saturating_duration_since(at).as_nanos() as f64
            });
            let kept = (-elapsed / DECAY.as_nanos() as f64).exp();
            self.rtt = self.rtt * kept + rtt * (1.0 - kept);
        }
        // Clocks read on different threads may arrive out of order: never go back.
        self.at = Some(self.at.map_or(now, |at| at.max(now)));
        self.rtt
    }
}

impl PeakEwma {
    /// What sending one more request to this endpoint costs at `now`, in nanoseconds.
    pub fn cost(&self, now: Instant) -> f64 {
        let pending = self.pending.load(Ordering::Relaxed) as f64;
        let mut estimate = self.estimate();
        let rtt = estimate.observe(0.0, now);
        if !estimate.measured && pending > 0.0 {
            return UNMEASURED_PENDING.as_nanos() as f64 * pending;
        }
        rtt * (pending + 1.0)
    }

    /// The current estimate at `now`, in nanoseconds (for tests and logs).
    pub fn estimate_at(&self, now: Instant) -> f64 {
        self.estimate().observe(0.0, now)
    }

    /// Requests in flight.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    /// Counts a request sent at `now` as in flight until the returned handle says how
    /// it ended (or is dropped: a request the client gave up on teaches nothing).
    pub fn start(self: &Arc<Self>, now: Instant) -> InFlight {
        self.pending.fetch_add(1, Ordering::Relaxed);
        InFlight {
            ewma: self.clone(),
            sent: now,
        }
    }

    fn record(&self, rtt: Duration, now: Instant) {
        let mut estimate = self.estimate();
        estimate.observe(rtt.as_nanos() as f64, now);
        estimate.measured = true;
    }

    fn estimate(&self) -> std::sync::MutexGuard<'_, Estimate> {
        self.estimate.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One request in flight to an endpoint.
#[derive(Debug)]
pub struct InFlight {
    ewma: Arc<PeakEwma>,
    sent: Instant,
}

impl InFlight {
    /// The response (its head) arrived at `now`: its latency is observed.
    pub fn responded(self, now: Instant) {
        self.ewma
            .record(now.saturating_duration_since(self.sent), now);
    }

    /// The request failed in transport at `now`: observed as at least [`FAILURE_RTT`].
    pub fn failed(self, now: Instant) {
        let rtt = now.saturating_duration_since(self.sent).max(FAILURE_RTT);
        self.ewma.record(rtt, now);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.ewma.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: f64 = 1e6;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Sends a request at the current (paused) time that takes `rtt` to answer.
    async fn request(ewma: &Arc<PeakEwma>, rtt: Duration) {
        let sent = ewma.start(Instant::now());
        tokio::time::advance(rtt).await;
        sent.responded(Instant::now());
    }

    #[tokio::test(start_paused = true)]
    async fn a_slower_response_replaces_the_estimate_at_once() {
        let ewma = Arc::new(PeakEwma::default());
        request(&ewma, ms(1)).await;
        assert_eq!(ewma.estimate_at(Instant::now()), MS);
        request(&ewma, ms(50)).await;
        assert_eq!(ewma.estimate_at(Instant::now()), 50.0 * MS);
    }

    #[tokio::test(start_paused = true)]
    async fn faster_responses_pull_it_down_with_the_decay_time_constant() {
        let ewma = Arc::new(PeakEwma::default());
        request(&ewma, ms(100)).await;
        // Responses of 10 ms for one time constant: the estimate moves 1 - 1/e of the
        // way from 100 ms to 10 ms (reads in between observe zeros; none here).
        let start = Instant::now();
        while Instant::now() - start < DECAY {
            request(&ewma, ms(10)).await;
        }
        let expected = 10.0 * MS + 90.0 * MS / std::f64::consts::E;
        let got = ewma.estimate_at(Instant::now());
        assert!(
            (got - expected).abs() < 0.01 * expected,
            "{got} vs {expected}"
        );
        // And one fast response right after a slow one barely moves it.
        request(&ewma, ms(200)).await;
        request(&ewma, ms(1)).await;
        let got = ewma.estimate_at(Instant::now());
        assert!(got > 199.0 * MS, "{got}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_endpoint_looks_cheaper_with_time() {
        let ewma = Arc::new(PeakEwma::default());
        request(&ewma, ms(20)).await;
        tokio::time::advance(DECAY).await;
        let later = ewma.cost(Instant::now());
        assert!(
            (later - 20.0 * MS / std::f64::consts::E).abs() < 0.01 * MS,
            "{later}"
        );
        // Reading observes a zero, and decaying in two steps is decaying once: the
        // read above changed nothing the second one sees.
        tokio::time::advance(DECAY).await;
        let cost = ewma.cost(Instant::now());
        let expected = 20.0 * MS / std::f64::consts::E.powi(2);
        assert!((cost - expected).abs() < 0.01 * MS, "{cost} vs {expected}");
    }

    #[tokio::test(start_paused = true)]
    async fn requests_in_flight_multiply_the_cost() {
        let ewma = Arc::new(PeakEwma::default());
        request(&ewma, ms(10)).await;
        let now = Instant::now();
        let one = ewma.cost(now);
        let a = ewma.start(now);
        let _b = ewma.start(now);
        assert_eq!(ewma.pending(), 2);
        assert!((ewma.cost(now) - 3.0 * one).abs() < 1.0);
        // A request dropped unanswered (the client went away) records nothing.
        drop(a);
        assert_eq!(ewma.pending(), 1);
        assert!((ewma.cost(now) - 2.0 * one).abs() < 1.0);
    }

    #[tokio::test(start_paused = true)]
    async fn an_unmeasured_endpoint_is_free_when_idle_and_dear_when_busy() {
        let ewma = Arc::new(PeakEwma::default());
        let now = Instant::now();
        assert_eq!(ewma.cost(now), 0.0);
        let _probe = ewma.start(now);
        assert_eq!(ewma.cost(now), UNMEASURED_PENDING.as_nanos() as f64);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_counts_as_at_least_the_failure_rtt() {
        let ewma = Arc::new(PeakEwma::default());
        request(&ewma, ms(1)).await;
        let sent = ewma.start(Instant::now());
        // Refused within a millisecond: still as bad as a timed-out connect.
        tokio::time::advance(ms(1)).await;
        sent.failed(Instant::now());
        assert_eq!(
            ewma.estimate_at(Instant::now()),
            FAILURE_RTT.as_nanos() as f64
        );
        assert_eq!(ewma.pending(), 0);
    }
}
