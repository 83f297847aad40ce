//! The body of a response on its way to the client, streamed frame by frame (hyper
//! applies backpressure: a frame is polled only when the client's connection can take
//! it), and recorded in `response_total` and `response_latency_seconds` once it ends.
//!
//! The end is whichever comes first: the last frame (hyper may stop polling once
//! `is_end_stream` is true, so that counts as the end too), an error, or the body
//! being dropped before its end (the client went away, or the connection was torn
//! down), which is a failure.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::Instant;

use super::headers::grpc_status;
use super::idle::InFlight;
use super::metrics::{HttpMetrics, ResponseLabels, Series};
use super::stall::Waiting;
use super::upstream::Observe;

/// What the client receives as a response body.
pub struct ResponseBody {
    inner: Inner,
    recorder: Option<Recorder>,
    /// Its request, in flight until the body ends or is dropped.
    in_flight: Option<InFlight>,
    /// On an HTTP/2 stream: told when the body has handed over something and waits to
    /// be asked for more (the stream is reset if that lasts `--http-write-timeout`).
    waiting: Option<Arc<Waiting>>,
    /// What is left of a data frame handed over in pieces.
    rest: Bytes,
}

/// On an HTTP/2 stream, data is handed over in pieces of at most this (a DATA frame's
/// default size; zero-copy slices), so that what a stream must let through within
/// `--http-write-timeout` does not depend on how much an HTTP/1 destination's body
/// happened to give in one read.
const PIECE: usize = 16 * 1024;

enum Inner {
    /// The destination's body.
    Upstream(Incoming),
    /// A body the proxy wrote itself (an error), or none at all (an upgrade).
    Local(Option<Bytes>),
}

/// Records a response once it has ended.
pub struct Recorder {
    pub metrics: HttpMetrics,
    pub series: Arc<Series>,
    pub started: Instant,
    pub status: u16,
    /// `Some` for gRPC responses: the status seen so far (headers, then trailers).
    pub grpc: Option<Option<u32>>,
    /// The proxy answered itself: a failure whatever the status.
    pub local_error: bool,
    pub observer: Option<Box<dyn Observe>>,
}

impl Recorder {
    /// Records the response; `errored` when its body did not end cleanly.
    fn finish(self, errored: bool) {
        let grpc_status = self.grpc.flatten();
        let failure = errored
            || self.local_error
            || self.status >= 500
            || grpc_status.is_some_and(|status| status != 0);
        let latency = self.started.elapsed();
        let labels = ResponseLabels {
            status: self.status,
            grpc_status,
            failure,
        };
        self.metrics.response(&self.series, labels, Some(latency));
        if let Some(observer) = self.observer {
            observer.observe(latency, failure);
        }
    }

    fn saw_trailers(&mut self, trailers: &HeaderMap) {
        if let Some(grpc) = &mut self.grpc {
            if let Some(status) = grpc_status(trailers) {
                *grpc = Some(status);
            }
        }
    }
}

impl ResponseBody {
    pub fn upstream(body: Incoming, recorder: Recorder) -> ResponseBody {
        ResponseBody::new(Inner::Upstream(body), recorder)
    }

    /// A body the proxy wrote, recorded as soon as it is written (or at once when it
    /// is empty).
    pub fn local(bytes: Option<Bytes>, recorder: Recorder) -> ResponseBody {
        let mut body = ResponseBody::new(Inner::Local(bytes.filter(|b| !b.is_empty())), recorder);
        if body.is_end_stream() {
            body.finish(false);
        }
        body
    }

    /// The response's head goes to the client first: until it is taken and the body is
    /// asked for its first frame, the response waits for the client.
    fn new(inner: Inner, recorder: Recorder) -> ResponseBody {
        let body = ResponseBody {
            inner,
            recorder: Some(recorder),
            in_flight: None,
            waiting: Waiting::current(),
            rest: Bytes::new(),
        };
        if let Some(waiting) = &body.waiting {
            if !body.is_end_stream() {
                waiting.begin();
            }
        }
        body
    }

    /// Keeps `in_flight` until the body ends or is dropped.
    pub fn hold(&mut self, in_flight: InFlight) {
        if self.recorder.is_some() {
            self.in_flight = Some(in_flight);
        }
    }

    fn finish(&mut self, errored: bool) {
        if let Some(recorder) = self.recorder.take() {
            recorder.finish(errored);
        }
        self.in_flight = None;
        if let Some(waiting) = self.waiting.take() {
            waiting.end();
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        if let Some(waiting) = &this.waiting {
            waiting.end();
        }
        let mut polled = if !this.rest.is_empty() {
            Poll::Ready(Some(Ok(Frame::data(std::mem::take(&mut this.rest)))))
        } else {
            match &mut this.inner {
                Inner::Upstream(body) => Pin::new(body).poll_frame(cx),
                Inner::Local(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            }
        };
        if let (Some(_), Poll::Ready(Some(Ok(frame)))) = (&this.waiting, &mut polled) {
            if let Some(data) = frame.data_mut().filter(|data| data.len() > PIECE) {
                this.rest = data.split_off(PIECE);
            }
        }
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(trailers), Some(recorder)) = (frame.trailers_ref(), &mut this.recorder)
                {
                    recorder.saw_trailers(trailers);
                }
                // Trailers are always the last frame, but an HTTP/1 body does not
                // say it has ended once they are read, and an HTTP/2 server sends
                // them with END_STREAM and drops the body without polling it again.
                if frame.is_trailers() || this.is_end_stream() {
                    this.finish(false);
                } else if let Some(waiting) = &this.waiting {
                    waiting.begin();
                }
            }
            Poll::Ready(Some(Err(_))) => this.finish(true),
            Poll::Ready(None) => this.finish(false),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty()
            && match &self.inner {
                Inner::Upstream(body) => body.is_end_stream(),
                Inner::Local(bytes) => bytes.is_none(),
            }
    }

    fn size_hint(&self) -> SizeHint {
        let inner = match &self.inner {
            Inner::Upstream(body) => body.size_hint(),
            Inner::Local(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
        };
        let rest = self.rest.len() as u64;
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + rest);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + rest);
        }
        hint
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // Dropped before its end: the client did not get the whole response.
        let ended = self.is_end_stream();
        self.finish(!ended);
    }
}
