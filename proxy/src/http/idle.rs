//! Whether a connection has requests in flight, and for how long it has had none, so
//! that an HTTP/2 connection left idle can be closed: HTTP/1 has a keep-alive timeout
//! (hyper's header read timeout) but hyper's HTTP/2 server has none, and a client could
//! otherwise hold an idle connection, and a `--max-connections` slot, forever.
//!
//! Each request holds an [`InFlight`] from the moment it arrives until its response body
//! ends or is dropped (the stream is over, or was reset).

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// The requests in flight on one connection.
pub struct Activity {
    state: Mutex<State>,
    changed: Notify,
}

struct State {
    in_flight: usize,
    /// When the last request ended (or the connection started).
    idle_since: Instant,
}

/// One request in flight, until dropped.
pub struct InFlight(Arc<Activity>);

impl Activity {
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity {
            state: Mutex::new(State {
                in_flight: 0,
                idle_since: Instant::now(),
            }),
            changed: Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A request arrived.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.lock().in_flight += 1;
        self.changed.notify_waiters();
        InFlight(self.clone())
    }

    /// The requests in flight now.
    pub fn in_flight(&self) -> usize {
        self.lock().in_flight
    }

    /// Completes once no request has been in flight for `timeout`.
    pub async fn idle_for(&self, timeout: Duration) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before the state is read, so a change in between wakes it.
            changed.as_mut().enable();
            let idle_since = {
                let state = self.lock();
                (state.in_flight == 0).then_some(state.idle_since)
            };
            match idle_since {
                Some(since) if Instant::now() >= since + timeout => return,
                Some(since) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(since + timeout) => {}
                        () = &mut changed => {}
                    }
                }
                None => changed.await,
            }
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.in_flight -= 1;
        if state.in_flight == 0 {
            state.idle_since = Instant::now();
        }
        drop(state);
        self.0.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(60);

    #[tokio::test(start_paused = true)]
    async fn idle_for_the_timeout_counts_from_the_last_request_and_never_during_one() {
        let activity = Activity::new();
        let started = Instant::now();
        let request = activity.start();
        let waiting = tokio::spawn({
            let activity = activity.clone();
            async move { activity.idle_for(TIMEOUT).await }
        });
        // A request in flight for twice the timeout: not idle.
        tokio::time::sleep(TIMEOUT * 2).await;
        assert!(!waiting.is_finished());
        drop(request);
        let ended = Instant::now();
        waiting.await.unwrap();
        assert_eq!(ended.duration_since(started), TIMEOUT * 2);
        assert_eq!(Instant::now().duration_since(ended), TIMEOUT);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_during_the_wait_starts_it_again() {
        let activity = Activity::new();
        let started = Instant::now();
        let waiting = tokio::spawn({
            let activity = activity.clone();
            async move { activity.idle_for(TIMEOUT).await }
        });
        tokio::time::sleep(TIMEOUT / 2).await;
        drop(activity.start());
        waiting.await.unwrap();
        assert_eq!(Instant::now().duration_since(started), TIMEOUT * 3 / 2);
    }
}
