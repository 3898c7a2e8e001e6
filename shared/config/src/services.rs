//! The one registry of the suite's services: their names, start order, whether they
//! run as replicas and where their admin endpoints are configured. The supervisor
//! (`clawbus up`), the testkit, the service start-up and the NATS rights derive from it.

use crate::Config;

/// A service of the suite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Service {
    Gateway,
    Router,
    Agent,
    Store,
    Sandbox,
    Channels,
}

/// Every service, in start order (the store first: others wait for its history).
pub const SERVICES: [Service; 6] = [
    Service::Store,
    Service::Sandbox,
    Service::Router,
    Service::Agent,
    Service::Gateway,
    Service::Channels,
];

impl Service {
    /// Its name: binary `clawbus-<name>`, NATS user, log and metrics label.
    pub fn name(self) -> &'static str {
        match self {
            Service::Gateway => "gateway",
            Service::Router => "router",
            Service::Agent => "agent",
            Service::Store => "store",
            Service::Sandbox => "sandbox",
            Service::Channels => "channels",
        }
    }

    /// True for services that run as several replicas (`clawbus up --replicas N`);
    /// gateways run side by side only with an account each.
    pub fn scales(self) -> bool {
        !matches!(self, Service::Gateway)
    }

    /// The configured admin address (`[admin] <name>`).
    pub fn admin(self, cfg: &Config) -> &str {
        match self {
            Service::Gateway => &cfg.admin.gateway,
            Service::Router => &cfg.admin.router,
            Service::Agent => &cfg.admin.agent,
            Service::Store => &cfg.admin.store,
            Service::Sandbox => &cfg.admin.sandbox,
            Service::Channels => &cfg.admin.channels,
        }
    }

    /// The service of this name.
    pub fn named(name: &str) -> Option<Service> {
        SERVICES.into_iter().find(|s| s.name() == name)
    }
}
