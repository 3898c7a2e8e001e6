//! The start-up every service shares: logs, config, admin endpoints, NATS, topology.

use prometheus::Registry;
use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;

use clawbus_config::{Config, Service};
use clawbus_telemetry::Readiness;

use crate::{topology, Bus, BusError, BusMetrics, ConnectOpts};

/// What every service has once started.
pub struct ServiceBase {
    pub name: &'static str,
    pub cfg: Config,
    pub bus: Bus,
    pub registry: Registry,
    pub readiness: Readiness,
    /// Cancelled on SIGINT/SIGTERM; every task of the service watches it.
    pub shutdown: CancellationToken,
}

/// Why a service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] clawbus_config::ConfigError),
    #[error("admin listener on {addr}: {source}")]
    Admin {
        addr: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// Loads config, starts logs and the admin endpoints (at the service's configured
/// address), connects to NATS as the configured user and waits until the streams the
/// service uses are provisioned.
/// `components` are the parts of the service that must report ready (besides the NATS
/// connection) before `/readyz` answers 200: registered here, before the admin
/// endpoint exists, so it never reports ready while one has not started yet.
pub async fn start(
    service: Service,
    components: &[&'static str],
) -> Result<ServiceBase, StartError> {
    // Whatever the service creates (database, WAL, workspace files, tokens) is its
    // owner's alone, whatever umask it was started with.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let name = service.name();
    let cfg = match Config::load() {
        Ok(c) => c,
        Err(e) => {
            clawbus_telemetry::init_logs(name, name, "info", "json");
            tracing::error!(error = %e, "Configuration rejected");
            return Err(e.into());
        }
    };
    clawbus_telemetry::init_logs(name, &cfg.replica_id(), &cfg.log.level, &cfg.log.format);
    let registry = Registry::new_custom(Some("".into()), None).unwrap_or_default();
    let readiness = Readiness::new();
    readiness.register("nats");
    for c in components {
        readiness.register(c);
    }
    let shutdown = CancellationToken::new();
    {
        let s = shutdown.clone();
        tokio::spawn(async move {
            clawbus_telemetry::shutdown_signal().await;
            s.cancel();
        });
    }
    let addr = service.admin(&cfg).to_owned();
    let limits =
        clawbus_telemetry::http::HttpLimits::from_config(&cfg.http, cfg.http.admin_max_connections);
    clawbus_telemetry::serve_admin(
        &addr,
        limits,
        readiness.clone(),
        registry.clone(),
        shutdown.clone(),
    )
    .await
    .map_err(|source| StartError::Admin { addr, source })?;
    let metrics = BusMetrics::new(&registry);
    // Which replica this process is, for dashboards joining on `instance`.
    clawbus_telemetry::metrics::gauge_vec(
        &registry,
        "clawbus_replica_info",
        "Always 1: the service and replica id of this process",
        &["service", "replica"],
    )
    .with_label_values(&[name, cfg.replica_id().as_str()])
    .set(1);
    tracing::info!("Replica starting");
    let credentials = cfg.nats.credentials()?;
    let opts = ConnectOpts {
        url: cfg.nats.url.clone(),
        name: format!("clawbus-{name}"),
        user: credentials.as_ref().map(|(u, _)| u.clone()),
        password: credentials.map(|(_, p)| p.expose_secret().to_owned()),
    };
    let bus = Bus::connect(&opts, metrics, &shutdown).await?;
    verify_retrying(&bus, service, cfg.nats.replicas, &shutdown).await?;
    readiness.set("nats", true);
    tracing::info!(url = %redact_url(&cfg.nats.url), user = opts.user.as_deref().unwrap_or("(none)"), "Connected to NATS, topology verified");
    Ok(ServiceBase {
        name,
        cfg,
        bus,
        registry,
        readiness,
        shutdown,
    })
}

/// Runs `op` until it succeeds, for up to 30 s: on a NATS cluster, an object another
/// service just created may take a moment to be visible from every node.
pub async fn patiently<T, E: std::fmt::Display, F, Fut>(what: &str, mut op: F) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut pause = std::time::Duration::from_millis(50);
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if std::time::Instant::now() + pause > deadline => return Err(e),
            Err(e) => {
                tracing::warn!(error = %e, "{what} not available yet; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(std::time::Duration::from_secs(1));
            }
        }
    }
}

/// Waits until the streams this service uses exist as declared: provisioning is its
/// own step (`clawbus provision`, run by `clawbus up` and compose before the services),
/// and on a cluster a stream may take a moment to be visible from every node. A stream
/// that drifted from its declaration fails at once.
async fn verify_retrying(
    bus: &Bus,
    service: Service,
    replicas: usize,
    shutdown: &CancellationToken,
) -> Result<(), BusError> {
    let names = crate::rights::streams_of(service);
    let mut attempts = 0u32;
    loop {
        match topology::verify(&bus.js, replicas, &names).await {
            Ok(()) => return Ok(()),
            Err(e @ BusError::Drift { .. }) => return Err(e),
            Err(e) => {
                if attempts.is_multiple_of(20) {
                    tracing::warn!(error = %e, "Topology not provisioned yet; waiting");
                }
                attempts += 1;
                if crate::consumer::sleep_or_cancel(std::time::Duration::from_millis(250), shutdown)
                    .await
                {
                    return Err(e);
                }
            }
        }
    }
}

impl ServiceBase {
    /// Drains both NATS connections (flushes pending publishes and acks).
    pub async fn drain(&self) {
        let _ = self.bus.client.flush().await;
        let _ = self.bus.consumer_client.flush().await;
        let _ = self.bus.consumer_client.drain().await;
        let _ = self.bus.client.drain().await;
        tracing::info!("Stopped");
    }
}

/// A URL (or comma-separated URL list) without `user:password@` parts, for logs.
pub fn redact_url(url: &str) -> String {
    if url.contains(',') {
        return url
            .split(',')
            .map(|u| redact_url(u.trim()))
            .collect::<Vec<_>>()
            .join(",");
    }
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn credentials_never_reach_the_logs() {
        assert_eq!(
            super::redact_url("nats://agent:s3cret@nats:4222"),
            "nats://***@nats:4222"
        );
        assert_eq!(
            super::redact_url("nats://127.0.0.1:4222"),
            "nats://127.0.0.1:4222"
        );
        assert_eq!(
            super::redact_url("nats://a:x@n1:4222, nats://a:x@n2:4222"),
            "nats://***@n1:4222,nats://***@n2:4222"
        );
    }

    #[test]
    fn a_url_list_names_every_server() {
        let a = crate::server_addrs("nats://n1:4222,nats://n2:4223, nats://n3:4224").unwrap();
        assert_eq!(a.len(), 3);
        assert!(crate::server_addrs(" , ").is_err());
        assert!(crate::server_addrs("nats://n1:4222,http://[bad").is_err());
    }
}
