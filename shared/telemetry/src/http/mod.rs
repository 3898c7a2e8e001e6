//! One HTTP server for every listener of the suite (the gateway's API, Telegram
//! webhooks, the admin ports), so that none of them can be held by slow clients:
//!
//! - a request's head must arrive whole within the header timeout (hyper's
//!   `header_read_timeout` for HTTP/1; for a new connection of either protocol, its
//!   first request must start within it too);
//! - a request's body must arrive whole within the body timeout of its head
//!   ([`read_body`] also enforces a size limit while streaming);
//! - a connection with no request in progress is closed after the idle timeout; a
//!   response being streamed (server-sent events of a long turn) is a request in
//!   progress, so it is never cut for being quiet;
//! - at most `max_connections` are open at once; beyond, a new connection is answered
//!   503 and closed at once (never queued), so one listener's flood cannot take the
//!   process's file descriptors, and the admin port (a listener of its own) still
//!   answers the operator's probes.
//!
//! Metrics (process-wide, in [`registry`], served by every admin port's `/metrics`):
//! `clawbus_http_connections_open`, `clawbus_http_connections_accepted_total`,
//! `clawbus_http_connections_refused_total` (label `listener`) and
//! `clawbus_http_timeouts_total` (labels `listener`, `kind` = header, body or idle).

mod body;
#[cfg(test)]
mod tests;

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::Router;
use clawbus_config::HttpConfig;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Registry};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

pub use body::{read_body, BodyError, BodyTimeout};

/// What a listener allows its clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// A request's head must arrive whole within this (and a new connection's first
    /// request must start within it). An HTTP/1 connection waiting for its next
    /// request is closed after it too: hyper arms the timer as soon as it waits.
    pub header_timeout: Duration,
    /// A request's body must arrive whole within this of its head.
    pub body_timeout: Duration,
    /// A connection with no request in progress is closed after this.
    pub idle_timeout: Duration,
    /// Most connections open at once; beyond, new ones are refused with 503.
    pub max_connections: usize,
}

impl HttpLimits {
    /// The configured timeouts with a listener's own cap on connections.
    pub fn from_config(c: &HttpConfig, max_connections: usize) -> Self {
        Self {
            header_timeout: Duration::from_secs(c.header_timeout_secs),
            body_timeout: Duration::from_secs(c.body_timeout_secs),
            idle_timeout: Duration::from_secs(c.idle_timeout_secs),
            max_connections,
        }
    }
}

impl Default for HttpLimits {
    fn default() -> Self {
        let c = HttpConfig::default();
        Self::from_config(&c, c.max_connections)
    }
}

/// After an idle connection is told to close, how long it may take to do so.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// How long to wait before accepting again after `accept` failed (out of file
/// descriptors, most likely): retrying at once would spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// Warnings about refused connections and failed accepts: at most one per period.
const WARN_EVERY: Duration = Duration::from_secs(10);
/// HTTP/2 pings on a connection whose peer has gone silent (a dead peer, not an idle
/// one: a live peer answers pings).
const H2_KEEPALIVE: Duration = Duration::from_secs(30);

/// The answer to a connection beyond the cap, written once without waiting.
const REFUSAL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: 21\r\nconnection: close\r\nretry-after: 1\r\n\r\ntoo many connections\n";

struct Metrics {
    open: IntGaugeVec,
    accepted: IntCounterVec,
    refused: IntCounterVec,
    timeouts: IntCounterVec,
}

/// The HTTP metrics of the process: listeners start and stop (a webhook moves with
/// its account's lease) but are counted once, whichever registry the service has.
static METRICS: LazyLock<(Registry, Metrics)> = LazyLock::new(|| {
    use crate::metrics::{counter_vec, gauge_vec};
    let r = Registry::new();
    let m = Metrics {
        open: gauge_vec(
            &r,
            "clawbus_http_connections_open",
            "HTTP connections open, by listener",
            &["listener"],
        ),
        accepted: counter_vec(
            &r,
            "clawbus_http_connections_accepted_total",
            "HTTP connections accepted, by listener",
            &["listener"],
        ),
        refused: counter_vec(
            &r,
            "clawbus_http_connections_refused_total",
            "HTTP connections refused at the listener's cap, by listener",
            &["listener"],
        ),
        timeouts: counter_vec(
            &r,
            "clawbus_http_timeouts_total",
            "HTTP connections or requests cut by a timeout, by listener and kind (header, body, idle)",
            &["listener", "kind"],
        ),
    };
    (r, m)
});

/// The registry of the HTTP metrics (every admin port's `/metrics` serves it).
pub fn registry() -> &'static Registry {
    &METRICS.0
}

/// One listener's metrics.
#[derive(Clone)]
struct ListenerMetrics {
    open: IntGauge,
    accepted: IntCounter,
    refused: IntCounter,
    header: IntCounter,
    body: IntCounter,
    idle: IntCounter,
}

impl ListenerMetrics {
    fn new(name: &str) -> Self {
        let m = &METRICS.1;
        let t = |kind| m.timeouts.with_label_values(&[name, kind]);
        Self {
            open: m.open.with_label_values(&[name]),
            accepted: m.accepted.with_label_values(&[name]),
            refused: m.refused.with_label_values(&[name]),
            header: t("header"),
            body: t("body"),
            idle: t("idle"),
        }
    }
}

/// Serves `app` on `listener` (named `name` in logs and metrics) within `limits`
/// until `shutdown`; then stops accepting and returns once every connection has
/// finished its requests (a caller with a drain deadline drops this future).
pub async fn serve(
    listener: TcpListener,
    name: impl Into<String>,
    app: Router,
    limits: HttpLimits,
    shutdown: CancellationToken,
) {
    let name: String = name.into();
    let name = name.as_str();
    let metrics = ListenerMetrics::new(name);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(H2_KEEPALIVE);
    let builder = Arc::new(builder);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let (mut refused_warn, mut accept_warn) = (Throttle::default(), Throttle::default());
    loop {
        let stream = tokio::select! {
            () = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    if let Some(n) = accept_warn.due() {
                        tracing::warn!(listener = name, error = %e, times = n, "Cannot accept connections");
                    }
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                    }
                }
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            metrics.refused.inc();
            if let Some(n) = refused_warn.due() {
                tracing::warn!(
                    listener = name,
                    max_connections = limits.max_connections,
                    refused = n,
                    "Connections refused: the listener is at its cap"
                );
            }
            // Nothing is read: a client that sent its request gets a reset instead.
            let _ = stream.try_write(REFUSAL);
            continue;
        };
        metrics.accepted.inc();
        let _ = stream.set_nodelay(true);
        tokio::spawn(connection(
            stream,
            builder.clone(),
            app.clone(),
            limits,
            metrics.clone(),
            shutdown.clone(),
            permit,
        ));
    }
    // Every permit back: every connection has finished.
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let _ = slots.acquire_many(all).await;
}

/// Whether a connection has a request in progress, and has had one.
#[derive(Debug, Clone, Copy, Default)]
struct Activity {
    in_flight: usize,
    served: bool,
}

/// A request in progress, from its head until its response has been written whole
/// (or dropped).
struct InFlight(watch::Sender<Activity>);

impl InFlight {
    fn start(tx: &watch::Sender<Activity>) -> Self {
        tx.send_modify(|a| {
            a.in_flight += 1;
            a.served = true;
        });
        Self(tx.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0
            .send_modify(|a| a.in_flight = a.in_flight.saturating_sub(1));
    }
}

/// A response body that keeps its request in progress until it has been sent.
struct Tracked {
    inner: Body,
    _in_flight: InFlight,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Resolves when the connection has had no request in progress for too long: the
/// header timeout before its first request, the idle timeout after. Says which.
async fn idle(mut rx: watch::Receiver<Activity>, limits: HttpLimits) -> &'static str {
    loop {
        let a = *rx.borrow_and_update();
        if a.in_flight > 0 {
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
            continue;
        }
        let (limit, kind) = if a.served {
            (limits.idle_timeout, "idle")
        } else {
            (limits.header_timeout, "header")
        };
        tokio::select! {
            () = tokio::time::sleep(limit) => return kind,
            r = rx.changed() => if r.is_err() {
                std::future::pending::<()>().await;
            },
        }
    }
}

async fn connection(
    stream: TcpStream,
    builder: Arc<auto::Builder<TokioExecutor>>,
    app: Router,
    limits: HttpLimits,
    metrics: ListenerMetrics,
    shutdown: CancellationToken,
    _permit: OwnedSemaphorePermit,
) {
    metrics.open.inc();
    let (tx, rx) = watch::channel(Activity::default());
    let body_timeouts = metrics.body.clone();
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let in_flight = InFlight::start(&tx);
        let req = req.map(|b| {
            Body::new(body::Deadline::new(
                Body::new(b),
                limits.body_timeout,
                body_timeouts.clone(),
            ))
        });
        let app = app.clone();
        async move {
            let resp = match app.oneshot(req).await {
                Ok(r) => r,
                Err(e) => match e {},
            };
            Ok::<_, Infallible>(resp.map(|inner| Tracked {
                inner,
                _in_flight: in_flight,
            }))
        }
    });
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let state = rx.clone();
    let watchdog = idle(rx, limits);
    tokio::pin!(watchdog);
    let close = tokio::time::sleep(Duration::from_secs(0));
    tokio::pin!(close);
    let (mut closing, mut draining) = (false, false);
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                match r {
                    // hyper's header timer also bounds an HTTP/1 connection's wait for its
                    // next request: that is an idle connection.
                    Err(e) if !closing && is_header_timeout(e.as_ref()) => {
                        let a = *state.borrow();
                        if a.served && a.in_flight == 0 {
                            metrics.idle.inc();
                        } else {
                            metrics.header.inc();
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "HTTP connection ended with an error"),
                    Ok(()) => {}
                }
                break;
            }
            kind = &mut watchdog, if !closing => {
                match kind {
                    "header" => metrics.header.inc(),
                    _ => metrics.idle.inc(),
                }
                closing = true;
                conn.as_mut().graceful_shutdown();
                close.as_mut().reset(Instant::now() + CLOSE_GRACE);
            }
            () = &mut close, if closing => break,
            () = shutdown.cancelled(), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
    metrics.open.dec();
}

fn is_header_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    e.downcast_ref::<hyper::Error>()
        .is_some_and(hyper::Error::is_timeout)
}

/// Lets a warning through at most once per [`WARN_EVERY`], counting what it held back.
#[derive(Default)]
struct Throttle {
    last: Option<Instant>,
    held: u64,
}

impl Throttle {
    /// `Some(times since the last warning)` when a warning is due.
    fn due(&mut self) -> Option<u64> {
        self.held += 1;
        let now = Instant::now();
        if self
            .last
            .is_some_and(|l| now.duration_since(l) < WARN_EVERY)
        {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.held))
    }
}
