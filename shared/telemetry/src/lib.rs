//! Logs, metrics and health endpoints shared by every service.
//!
//! - [`init_logs`]: JSON logs through `tracing` (or human-readable with `pretty`).
//! - [`Readiness`]: a latch that opens when every named component has reported ready;
//!   `/readyz` answers 503 until then, and again if a component reports trouble.
//! - [`serve_admin`]: `/livez`, `/readyz` and `/metrics` (Prometheus text format).
//! - [`http::serve`]: the one HTTP server of every listener, with header, body and
//!   idle timeouts and a cap on connections.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus::{Encoder, Registry, TextEncoder};
use tokio_util::sync::CancellationToken;

pub mod http;
pub mod metrics;

/// Installs the global `tracing` subscriber. `format` is `json` or `pretty`.
/// `RUST_LOG` overrides `level` when set. Every JSON line names the `service` and its
/// `replica`, so the logs of N replicas can be merged and still told apart.
pub fn init_logs(service: &'static str, replica: &str, level: &str, format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let res = if format == "pretty" {
        builder.with_target(true).try_init()
    } else {
        let json = tracing_subscriber::fmt::format()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false);
        builder
            .event_format(Identified::new(json, service, replica))
            .try_init()
    };
    if res.is_ok() {
        tracing::info!("Logging started");
    }
}

/// A JSON event format that opens every line with the process's identity.
struct Identified<F> {
    inner: F,
    /// `"service":"…","replica":"…",` (JSON-escaped).
    fields: String,
}

impl<F> Identified<F> {
    fn new(inner: F, service: &str, replica: &str) -> Self {
        let q = |s: &str| serde_json::Value::from(s).to_string();
        Self {
            inner,
            fields: format!("\"service\":{},\"replica\":{},", q(service), q(replica)),
        }
    }
}

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for Identified<F>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let mut line = String::new();
        self.inner.format_event(
            ctx,
            tracing_subscriber::fmt::format::Writer::new(&mut line),
            event,
        )?;
        match line.strip_prefix('{') {
            Some(rest) => write!(writer, "{{{}{rest}", self.fields),
            None => writer.write_str(&line),
        }
    }
}

/// Readiness of a service: ready once every registered component is ready and none
/// of their instances (one consumer among a component's many) reports trouble.
#[derive(Clone, Default, Debug)]
pub struct Readiness {
    components: Arc<Mutex<BTreeMap<&'static str, bool>>>,
    /// Instances in trouble: (component, instance).
    troubles: Arc<Mutex<std::collections::BTreeSet<(&'static str, String)>>>,
}

impl Readiness {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a component that starts not ready.
    pub fn register(&self, name: &'static str) {
        self.lock().insert(name, false);
    }

    pub fn set(&self, name: &'static str, ready: bool) {
        self.lock().insert(name, ready);
    }

    /// Reports (`true`) or clears (`false`) trouble of one instance of a component,
    /// e.g. one partition's consumer that cannot pull: the service is not ready while
    /// any instance is in trouble.
    pub fn trouble(&self, component: &'static str, instance: &str, on: bool) {
        let mut t = self.troubles.lock().unwrap_or_else(|p| p.into_inner());
        if on {
            t.insert((component, instance.to_owned()));
        } else {
            t.remove(&(component, instance.to_owned()));
        }
    }

    pub fn is_ready(&self) -> bool {
        let c = self.lock();
        !c.is_empty()
            && c.values().all(|r| *r)
            && self
                .troubles
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_empty()
    }

    /// Components not ready yet, and instances in trouble as `component (instance)`.
    pub fn pending(&self) -> Vec<String> {
        let mut p: Vec<String> = self
            .lock()
            .iter()
            .filter(|(_, r)| !**r)
            .map(|(n, _)| n.to_string())
            .collect();
        let t = self.troubles.lock().unwrap_or_else(|p| p.into_inner());
        p.extend(t.iter().map(|(c, i)| format!("{c} ({i})")));
        p
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, bool>> {
        // A poisoned lock only means a panic elsewhere; the map itself stays consistent.
        self.components.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Clone)]
struct AdminState {
    readiness: Readiness,
    registry: Registry,
}

/// Routes `/livez`, `/readyz` and `/metrics`.
pub fn admin_router(readiness: Readiness, registry: Registry) -> Router {
    Router::new()
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(AdminState {
            readiness,
            registry,
        })
}

/// Routes `/livez` and `/readyz` only, for a public listener.
pub fn health_router(readiness: Readiness) -> Router {
    Router::new()
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(AdminState {
            readiness,
            registry: Registry::new(),
        })
}

async fn readyz(State(s): State<AdminState>) -> impl IntoResponse {
    if s.readiness.is_ready() {
        (StatusCode::OK, "ready\n".to_owned())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", s.readiness.pending().join(", ")),
        )
    }
}

async fn metrics(State(s): State<AdminState>) -> impl IntoResponse {
    let mut buf = Vec::new();
    let mut families = s.registry.gather();
    families.extend(http::registry().gather());
    if let Err(e) = TextEncoder::new().encode(&families, &mut buf) {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain")],
            e.to_string().into_bytes(),
        );
    }
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        buf,
    )
}

/// Binds the admin listener and serves it within `limits` until `shutdown` is
/// cancelled: a listener of its own, so a flood of the service's other listeners
/// leaves the operator's probes answered.
pub async fn serve_admin(
    addr: &str,
    limits: http::HttpLimits,
    readiness: Readiness,
    registry: Registry,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let app = admin_router(readiness, registry);
    tokio::spawn(http::serve(listener, "admin", app, limits, shutdown));
    tracing::info!(addr = %local, "Admin endpoints listening");
    Ok(local)
}

/// Resolves when the process receives SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "Cannot listen for SIGTERM");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("Shutdown requested");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Captured log output.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn every_json_line_names_service_and_replica() {
        let out = Captured::default();
        let sink = out.clone();
        let json = tracing_subscriber::fmt::format()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false);
        let subscriber = tracing_subscriber::fmt()
            .event_format(Identified::new(json, "agent", "agent-\"1"))
            .with_writer(move || sink.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(run_id = "r1", "Turn finished");
            tracing::warn!("Second line");
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("each line is one JSON object"))
            .collect();
        assert_eq!(lines.len(), 2);
        for l in &lines {
            assert_eq!(l["service"], "agent");
            assert_eq!(l["replica"], "agent-\"1", "escaped, not broken");
        }
        assert_eq!(lines[0]["run_id"], "r1");
        assert_eq!(lines[1]["level"], "WARN");
    }

    #[test]
    fn readiness_latch() {
        let r = Readiness::new();
        assert!(!r.is_ready(), "nothing registered is not ready");
        r.register("nats");
        r.register("db");
        r.set("nats", true);
        assert!(!r.is_ready());
        assert_eq!(r.pending(), vec!["db"]);
        r.set("db", true);
        assert!(r.is_ready());
        r.set("db", false);
        assert!(!r.is_ready());
        r.set("db", true);
        // One instance of a component in trouble makes the service not ready.
        r.trouble("consumer", "store-p3", true);
        assert!(!r.is_ready());
        assert_eq!(r.pending(), vec!["consumer (store-p3)".to_owned()]);
        r.trouble("consumer", "store-p3", false);
        assert!(r.is_ready());
        r.set("db", false);
        assert!(!r.is_ready());
    }
}
