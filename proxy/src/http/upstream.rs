//! Where a request goes: the seam between the server loop, which only ever asks
//! "send this request somewhere", and the policies that answer.
//!
//! - An [`Upstream`] is decided once per client connection (by the route) and asked
//!   once per request for a [`Pick`]: the [`Endpoint`] to send it to and the labels
//!   that go with it. [`Direct`] always answers the original destination; a balanced
//!   service answers a different endpoint per request and learns from
//!   [`Pick::observer`] how each one went.
//! - An [`Endpoint`] is an address and the [`Transport`] that reaches it; it is the
//!   unit of connection pooling ([`pool::Key`]): plain TCP, or [`Transport::Mesh`], the
//!   peer proxy of a meshed destination over mTLS (HTTP/2 whatever the client spoke:
//!   [`Transport::version_for`]), its stream in [`io::Io`], opened by a [`MeshConnect`].
//! - The [`pool::Pool`] sends the request over a pooled connection to the endpoint and
//!   returns the response head, or the [`ProxyError`] the client is answered with.

pub mod balanced;
pub mod io;
pub mod pool;

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http::request::Parts;

use self::io::MeshStream;
use super::errors::ProxyError;
use super::Version;

/// How the proxy reaches an endpoint.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub enum Transport {
    /// A TCP connection to the endpoint's address, speaking the client's HTTP version.
    Plain,
    /// The endpoint is a mesh peer: an mTLS connection to its proxy, which must prove
    /// `server_id`, with a transport header naming the endpoint's port. Requests travel
    /// as HTTP/2 (HTTP/1 ones marked with `l5d-orig-proto`, see `orig_proto`), all of a
    /// key's over one connection; HTTP/1 upgrades over a dedicated HTTP/1 one.
    Mesh { server_id: Arc<str> },
}

/// A connection being opened by a [`MeshConnect`].
pub type Connecting<'a> = Pin<Box<dyn Future<Output = Result<MeshStream, ProxyError>> + Send + 'a>>;

/// Opens mTLS connections to peer proxies ([`Transport::Mesh`]). Implemented by
/// `outbound::mesh_http`, which holds the identity and the peers' inbound port.
pub trait MeshConnect: Send + Sync {
    /// An mTLS connection to the proxy of `target`, which must prove `server_id`, its
    /// transport header already sent: `target`'s port and the session protocol
    /// `session`.
    fn connect<'a>(
        &'a self,
        target: SocketAddr,
        server_id: &'a str,
        session: Version,
    ) -> Connecting<'a>;
}

impl Transport {
    /// The HTTP version spoken to the endpoint for a client that spoke `client`: the
    /// same over plain TCP; HTTP/2 to a mesh peer, whose one pooled connection carries
    /// every request (except upgrades: `orig_proto::carry`).
    pub fn version_for(&self, client: Version) -> Version {
        match self {
            Transport::Plain => client,
            Transport::Mesh { .. } => Version::Http2,
        }
    }
}

/// One place a request can be sent.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub transport: Transport,
    /// The address connections are made from (`--inbound-transparent`: the client's
    /// own address), or the kernel's choice. Part of the pool key: a connection made
    /// from one client's address must not carry another client's requests.
    pub source: Option<IpAddr>,
}

impl Endpoint {
    /// A plain TCP endpoint, connected from the kernel's choice of address.
    pub fn plain(addr: SocketAddr) -> Endpoint {
        Endpoint {
            addr,
            transport: Transport::Plain,
            source: None,
        }
    }
}

/// What an [`Upstream`] decided for one request.
pub struct Pick {
    pub endpoint: Endpoint,
    /// `dst_service` and `dst_backend`, for balanced requests.
    pub dst: Option<(Arc<str>, Arc<str>)>,
    /// Told how the request went, once its response has ended (a balancer's
    /// latency estimate, a failure accrual).
    pub observer: Option<Box<dyn Observe>>,
}

impl Pick {
    pub fn to(endpoint: Endpoint) -> Pick {
        Pick {
            endpoint,
            dst: None,
            observer: None,
        }
    }
}

/// How a picked request went: that it got a connection to its endpoint, then the
/// response's latency (headers to end of body) and whether it was a failure (see
/// `metrics`).
pub trait Observe: Send + Sync {
    /// The request got a connection to the endpoint (a new one or a pooled one): the
    /// endpoint is reachable, whatever it answers.
    fn connected(&self) {}

    fn observe(self: Box<Self>, latency: Duration, failure: bool);
}

/// Decides where each request of a connection goes.
pub trait Upstream: Send + Sync {
    /// The endpoint for the request whose head is `request`, or the error the client
    /// is answered with (a service without a usable backend, ...).
    fn pick(&self, request: &Parts) -> Result<Pick, ProxyError>;

    /// The balanced service the connection's requests are for (`dst_service`), when
    /// it is one: labelled on requests that reach no endpoint too.
    fn service(&self) -> Option<Arc<str>> {
        None
    }

    /// Told of every failed connect to `endpoint` (refused, unreachable, timed out), the
    /// last attempt's included: a balanced service counts it toward setting the
    /// endpoint aside.
    fn connect_failed(&self, _endpoint: SocketAddr) {}

    /// Another endpoint for a request whose connects to `failed` (in order) failed, so
    /// that nothing of it was sent; `None` when there is none to try (the default: a
    /// destination is one endpoint).
    fn retry(&self, _request: &Parts, _failed: &[SocketAddr]) -> Option<Pick> {
        None
    }
}

/// How many endpoints one request tries when connects fail (as for a balanced TCP
/// connection).
pub const MAX_CONNECT_ATTEMPTS: usize = 3;

/// The original destination, for every request: plaintext forwarding.
#[derive(Clone, Debug)]
pub struct Direct(pub Endpoint);

impl Upstream for Direct {
    fn pick(&self, _: &Parts) -> Result<Pick, ProxyError> {
        Ok(Pick::to(self.0.clone()))
    }
}
