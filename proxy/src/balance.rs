//! Services from the discovery file (`--discovery`), and the per-connection balancer.
//!
//! - `balance/discovery`: the file's model and its validation (pure).
//! - `balance/p2c`: power-of-two-choices over any cost.
//! - `balance/ewma`: the peak-EWMA latency estimate per endpoint (per-request cost).
//! - here: the loaded table (which original destinations are services), reloaded when
//!   the file changes, and the pickers: a backend by weight, then an endpoint by
//!   power-of-two-choices over open connections (per connection) or over peak-EWMA
//!   latency (per HTTP request), skipping endpoints set aside after failing to
//!   connect; a failed connect moves on to another endpoint and, once the backend has
//!   none left, to another backend ([`Attempts`]).
//!
//! # Reloading
//!
//! Each new outbound connection asks for the current table ([`Balancer::table`]). At
//! most every [`CHECK_INTERVAL`] that costs a `stat` of the file (its modification and
//! change times, size and inode, as in `reload`); so a change is in force within about
//! 250 ms of the first connection after it, well inside the 1 s the design promises,
//! and a busy proxy does not `stat` once per connection. Open connections keep the
//! endpoint they were given and are never touched. A file that no longer validates is
//! logged and counted (`discovery_updates_total{result="invalid"}`), and the last good
//! table stays in force.
//!
//! An endpoint's state (open connections, failures) belongs to its address and
//! survives reloads, so a weight change does not forget which endpoint is busy or
//! broken.

use std::cell::Cell;
use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use tokio::time::Instant;
use tracing::{info, warn};

use crate::metrics::{EndpointGauge, Metrics};
use crate::reload::{stamps, Stamp};

mod discovery;
mod ewma;
mod p2c;

pub use self::discovery::{Discovery, DiscoveryError, ServiceProtocol};
#[cfg(test)]
pub use self::ewma::FAILURE_RTT;
pub use self::ewma::{InFlight, PeakEwma};

/// How often, at most, a new connection checks whether the file changed.
pub const CHECK_INTERVAL: Duration = Duration::from_millis(250);

/// Consecutive connect failures after which an endpoint is set aside.
pub const FAILURES_TO_SET_ASIDE: u32 = 3;

/// How long an endpoint that keeps failing is set aside. Afterwards it is tried again;
/// one more failure sets it aside again, a success clears its record.
pub const PENALTY: Duration = Duration::from_secs(10);

/// Why the balancer could not start.
#[derive(Debug, thiserror::Error)]
pub enum BalancerError {
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
    #[error("discovery file {path}: endpoint {endpoint} has an identity, which needs mTLS: give --identity-cert, --identity-key and --trust-anchors")]
    IdentityWithoutMtls { path: PathBuf, endpoint: SocketAddr },
}

/// The discovery file, loaded, and reloaded when it changes.
pub struct Balancer {
    path: PathBuf,
    /// Whether we have an identity: without one, endpoints with an identity are errors.
    mtls: bool,
    metrics: Arc<Metrics>,
    loaded: RwLock<Loaded>,
}

struct Loaded {
    stamp: Vec<Stamp>,
    checked: Instant,
    table: Arc<Table>,
}

impl Balancer {
    /// Loads the file; an error here stops the proxy from starting (exit 2 in `main`).
    /// The balancer reports `balancer_endpoints` to `metrics` from now on.
    pub fn new(
        path: &Path,
        mtls: bool,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Balancer>, BalancerError> {
        let paths = [path.to_path_buf()];
        let stamp = stamps(&paths);
        let table = Table::build(load(path, mtls)?, &Table::default());
        metrics.discovery_update(true);
        let balancer = Arc::new(Balancer {
            path: path.to_path_buf(),
            mtls,
            metrics: metrics.clone(),
            loaded: RwLock::new(Loaded {
                stamp,
                checked: Instant::now(),
                table: Arc::new(table),
            }),
        });
        // Weak: the metrics outlive nothing here, but a cycle would keep both forever.
        let weak = Arc::downgrade(&balancer);
        metrics.set_balancer_endpoints(Box::new(move || {
            weak.upgrade()
                .map(|b| b.endpoint_gauges(Instant::now()))
                .unwrap_or_default()
        }));
        Ok(balancer)
    }

    /// Validates a discovery file as [`Balancer::new`] would, without starting
    /// anything: `mtls` says whether the proxy has an identity (endpoints with an
    /// identity need one).
    pub fn check(path: &Path, mtls: bool) -> Result<Discovery, BalancerError> {
        load(path, mtls)
    }

    /// The table for a new connection, reloaded first when the file changed (checked
    /// at most every [`CHECK_INTERVAL`]).
    pub fn table(&self) -> Arc<Table> {
        let now = Instant::now();
        let due = |loaded: &Loaded| now.saturating_duration_since(loaded.checked) >= CHECK_INTERVAL;
        {
            let loaded = self.loaded.read().unwrap_or_else(PoisonError::into_inner);
            if !due(&loaded) {
                return loaded.table.clone();
            }
        }
        let mut loaded = self.loaded.write().unwrap_or_else(PoisonError::into_inner);
        // Another connection may have checked while we waited for the lock.
        if !due(&loaded) {
            return loaded.table.clone();
        }
        loaded.checked = now;
        let stamp = stamps(std::slice::from_ref(&self.path));
        if stamp == loaded.stamp {
            return loaded.table.clone();
        }
        // Recorded even when the new version is invalid, so that it is not re-read
        // (and re-logged) until the file changes again.
        loaded.stamp = stamp;
        match load(&self.path, self.mtls) {
            Ok(discovery) => {
                let table = Table::build(discovery, &loaded.table);
                info!(path = %self.path.display(), services = table.services.len(), "discovery file reloaded");
                loaded.table = Arc::new(table);
                self.metrics.discovery_update(true);
            }
            Err(error) => {
                warn!(%error, "invalid discovery file, keeping the previous version");
                self.metrics.discovery_update(false);
            }
        }
        loaded.table.clone()
    }

    /// `balancer_endpoints`: per service and backend, the endpoints ready and set aside.
    fn endpoint_gauges(&self, now: Instant) -> Vec<EndpointGauge> {
        let table = self.table();
        let mut gauges = Vec::new();
        for service in &table.services {
            for backend in &service.backends {
                let failed = backend
                    .endpoints
                    .iter()
                    .filter(|e| !e.state.is_ready(now))
                    .count();
                for (state, count) in [
                    ("ready", backend.endpoints.len() - failed),
                    ("failed", failed),
                ] {
                    gauges.push(EndpointGauge {
                        service: service.name.clone(),
                        backend: backend.name.clone(),
                        state,
                        count: count as i64,
                    });
                }
            }
        }
        gauges
    }
}

/// Reads and validates the file; endpoints with an identity need mTLS.
fn load(path: &Path, mtls: bool) -> Result<Discovery, BalancerError> {
    let discovery = Discovery::load(path)?;
    if !mtls {
        let with_identity = discovery
            .services
            .iter()
            .flat_map(|s| &s.backends)
            .flat_map(|b| &b.endpoints)
            .find(|e| e.identity.is_some());
        if let Some(endpoint) = with_identity {
            return Err(BalancerError::IdentityWithoutMtls {
                path: path.to_path_buf(),
                endpoint: endpoint.addr,
            });
        }
    }
    Ok(discovery)
}

/// The services of one version of the discovery file, by the addresses clients dial.
#[derive(Debug, Default)]
pub struct Table {
    by_addr: HashMap<SocketAddr, Arc<Service>>,
    services: Vec<Arc<Service>>,
}

impl Table {
    /// The service clients reach by dialling `addr`, if any. IPv4-mapped IPv6 addresses
    /// are their IPv4 address.
    pub fn service(&self, addr: SocketAddr) -> Option<&Arc<Service>> {
        self.by_addr
            .get(&SocketAddr::new(addr.ip().to_canonical(), addr.port()))
    }

    /// The table of a discovery file's text (tests of other modules).
    #[cfg(test)]
    pub(crate) fn parse(text: &str) -> Table {
        let discovery = Discovery::parse(Path::new("discovery.toml"), text);
        Table::build(discovery.expect("a valid test file"), &Table::default())
    }

    /// Builds the table of `discovery`, reusing the endpoint states of `previous`.
    fn build(discovery: Discovery, previous: &Table) -> Table {
        let mut states: HashMap<SocketAddr, Arc<EndpointState>> = previous
            .services
            .iter()
            .flat_map(|s| &s.backends)
            .flat_map(|b| &b.endpoints)
            .map(|e| (e.addr, e.state.clone()))
            .collect();
        let mut table = Table::default();
        for spec in discovery.services {
            let backends = spec
                .backends
                .into_iter()
                .map(|b| Backend {
                    name: b.name.into(),
                    weight: b.weight,
                    endpoints: b
                        .endpoints
                        .into_iter()
                        .map(|e| Endpoint {
                            addr: e.addr,
                            identity: e.identity,
                            state: states.entry(e.addr).or_default().clone(),
                        })
                        .collect(),
                })
                .collect();
            let service = Arc::new(Service {
                name: spec.name.into(),
                protocol: spec.protocol,
                backends,
            });
            for addr in spec.addrs {
                table.by_addr.insert(addr, service.clone());
            }
            table.services.push(service);
        }
        table
    }
}

/// One service: what it speaks and its weighted backends.
#[derive(Debug)]
pub struct Service {
    pub name: Arc<str>,
    pub protocol: ServiceProtocol,
    pub backends: Vec<Backend>,
}

/// Services are compared by identity: two routes to the same `Arc<Service>` are equal.
impl PartialEq for Service {
    fn eq(&self, other: &Service) -> bool {
        std::ptr::eq(self, other)
    }
}
impl Eq for Service {}

impl Service {
    /// A backend chosen by weight; `None` when every weight is zero (the service
    /// refuses new connections).
    pub fn pick_backend(&self, rng: &mut Rng) -> Option<&Backend> {
        pick_weighted(self.backends.iter().map(|b| b.weight), rng).map(|i| &self.backends[i])
    }

    /// The endpoints one connection or request tries, in order (see [`Attempts`]).
    pub fn attempts(&self, load: Load) -> Attempts<'_> {
        self.attempts_after(load, &[])
    }

    /// [`Service::attempts`] of a request that already tried `tried` (a retry: the
    /// backend is chosen again by weight among those with an untried endpoint).
    pub fn attempts_after(&self, load: Load, tried: &[SocketAddr]) -> Attempts<'_> {
        Attempts {
            service: self,
            load,
            backend: None,
            exhausted: Vec::new(),
            tried: tried.to_vec(),
        }
    }
}

/// What power-of-two-choices compares endpoints by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Load {
    /// Open connections (opaque TCP, one pick per connection).
    Connections,
    /// Peak-EWMA latency × requests in flight (HTTP, one pick per request).
    Latency,
}

/// One connection's (or request's) way through a service. The first endpoint comes
/// from a backend chosen by weight; a refused or timed-out connect (always safe to
/// retry: nothing was sent) moves on to another untried endpoint of the same backend
/// and, when that backend has none left, to another backend chosen by weight among
/// those not yet exhausted. Backends of weight 0 are never used: the operator drained
/// them, and a drained backend may be gone.
#[derive(Debug)]
pub struct Attempts<'a> {
    service: &'a Service,
    load: Load,
    backend: Option<usize>,
    exhausted: Vec<usize>,
    tried: Vec<SocketAddr>,
}

impl<'a> Attempts<'a> {
    /// The next backend and endpoint to try; `None` when every backend of positive
    /// weight has been exhausted (on the first call: every weight is zero).
    pub fn next(&mut self, now: Instant, rng: &mut Rng) -> Option<(&'a Backend, &'a Endpoint)> {
        let backends = &self.service.backends;
        loop {
            let index = match self.backend {
                Some(index) => index,
                None => {
                    let exhausted = &self.exhausted;
                    let weights = backends.iter().enumerate().map(|(i, b)| {
                        if exhausted.contains(&i) {
                            0
                        } else {
                            b.weight
                        }
                    });
                    let index = pick_weighted(weights, rng)?;
                    self.backend = Some(index);
                    index
                }
            };
            let backend = backends.get(index)?;
            if let Some(endpoint) = backend.pick_endpoint_by(&self.tried, now, rng, self.load) {
                self.tried.push(endpoint.addr);
                return Some((backend, endpoint));
            }
            self.exhausted.push(index);
            self.backend = None;
        }
    }

    /// How many endpoints were handed out so far.
    pub fn tried(&self) -> usize {
        self.tried.len()
    }
}

#[derive(Debug)]
pub struct Backend {
    pub name: Arc<str>,
    pub weight: u32,
    pub endpoints: Vec<Endpoint>,
}

impl Backend {
    /// An endpoint for a new connection: [`Backend::pick_endpoint_by`] open
    /// connections.
    pub fn pick_endpoint(
        &self,
        tried: &[SocketAddr],
        now: Instant,
        rng: &mut Rng,
    ) -> Option<&Endpoint> {
        self.pick_endpoint_by(tried, now, rng, Load::Connections)
    }

    /// An endpoint for a new connection or request: of those not in `tried` and not
    /// set aside, the less loaded (by `load`) of two chosen at random. When every
    /// untried endpoint is set aside they are used anyway (a backend that may be
    /// broken beats no backend); `None` once all have been tried.
    pub fn pick_endpoint_by(
        &self,
        tried: &[SocketAddr],
        now: Instant,
        rng: &mut Rng,
        load: Load,
    ) -> Option<&Endpoint> {
        let cost = |e: &Endpoint| match load {
            Load::Connections => e.state.open() as f64,
            Load::Latency => e.state.latency.cost(now),
        };
        // The common case without a scan (per request, over many endpoints): nothing
        // tried yet, and the two drawn are both ready. Conditioned on that, the pair is
        // uniform over the ready pairs, exactly as drawn below after the scan.
        if tried.is_empty() && self.endpoints.len() >= 2 {
            let drawn = p2c::draw(self.endpoints.len(), rng);
            let (a, b) = (&self.endpoints[drawn.0], &self.endpoints[drawn.1]);
            if a.state.is_ready(now) && b.state.is_ready(now) {
                return Some(if cost(b) < cost(a) { b } else { a });
            }
        }
        let untried = || self.endpoints.iter().filter(|e| !tried.contains(&e.addr));
        let ready: Vec<&Endpoint> = untried().filter(|e| e.state.is_ready(now)).collect();
        let candidates = if ready.is_empty() {
            untried().collect()
        } else {
            ready
        };
        p2c::pick(&candidates, rng, |e| cost(e))
    }
}

#[derive(Debug)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// When set, reached over mTLS to its proxy, which must prove this identity.
    pub identity: Option<String>,
    pub state: Arc<EndpointState>,
}

/// What the balancer knows of one endpoint address.
#[derive(Debug, Default)]
pub struct EndpointState {
    open: AtomicUsize,
    health: Mutex<Health>,
    /// Latency and requests in flight, for per-request balancing.
    pub latency: Arc<PeakEwma>,
}

#[derive(Debug, Default)]
struct Health {
    consecutive_failures: u32,
    set_aside_until: Option<Instant>,
}

impl EndpointState {
    /// Connections open (or being opened) to this endpoint.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Counts a connection to this endpoint until the guard is dropped.
    pub fn opened(self: &Arc<Self>) -> OpenGuard {
        self.open.fetch_add(1, Ordering::Relaxed);
        OpenGuard(self.clone())
    }

    /// Whether the endpoint is not set aside at `now`.
    pub fn is_ready(&self, now: Instant) -> bool {
        self.health()
            .set_aside_until
            .is_none_or(|until| now >= until)
    }

    /// A connect succeeded: the failure record is cleared.
    pub fn succeeded(&self) {
        let mut health = self.health();
        health.consecutive_failures = 0;
        health.set_aside_until = None;
    }

    /// A connect failed at `now` (refused, unreachable or timed out). After
    /// [`FAILURES_TO_SET_ASIDE`] in a row the endpoint is set aside for [`PENALTY`].
    /// Returns whether it is set aside now.
    pub fn failed(&self, now: Instant) -> bool {
        let mut health = self.health();
        health.consecutive_failures = health.consecutive_failures.saturating_add(1);
        if health.consecutive_failures >= FAILURES_TO_SET_ASIDE {
            health.set_aside_until = Some(now + PENALTY);
            return true;
        }
        false
    }

    fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One open connection to an endpoint; dropping it counts the connection as closed.
#[derive(Debug)]
pub struct OpenGuard(Arc<EndpointState>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An index chosen with probability proportional to its weight; `None` when all are
/// zero (or there are none).
pub fn pick_weighted(weights: impl Iterator<Item = u32> + Clone, rng: &mut Rng) -> Option<usize> {
    let total: u64 = weights.clone().map(u64::from).sum();
    if total == 0 {
        return None;
    }
    let mut point = rng.below(total);
    for (i, weight) in weights.enumerate() {
        let weight = u64::from(weight);
        if point < weight {
            return Some(i);
        }
        point -= weight;
    }
    // Unreachable: `point < total`, the sum of the weights.
    None
}

/// A small, fast pseudo-random generator (xorshift64*) for picking: balancing needs
/// spread, not secrecy. Each thread seeds its own from the standard library's
/// per-process random hasher keys.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator with a fixed seed (tests).
    pub fn seeded(seed: u64) -> Rng {
        // splitmix64 of the seed: nearby seeds (a counter) give unrelated states, and
        // the state is never zero, where xorshift would stay.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rng((z ^ (z >> 31)) | 1)
    }

    /// A generator for one connection, seeded from the calling thread's counter
    /// (which starts at a per-thread random value).
    pub fn thread() -> Rng {
        thread_local! {
            static SEQUENCE: Cell<u64> = Cell::new(RandomState::new().hash_one(std::thread::current().id()));
        }
        Rng::seeded(SEQUENCE.with(|s| {
            let next = s.get().wrapping_add(1);
            s.set(next);
            next
        }))
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..bound` (`bound` > 0), without modulo bias worth mentioning:
    /// the high bits of a 64×64 multiplication.
    pub fn below(&mut self, bound: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(bound)) >> 64) as u64
    }
}

#[cfg(test)]
mod tests;
