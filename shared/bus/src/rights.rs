//! Who may do what on the bus: one NATS user per service, one for provisioning, one
//! for the operator's read-only CLI commands and one for the owner's CLI commands that
//! change state, each with only the subjects its job needs (DESIGN.md invariant 6).
//! `clawbus up` renders these rights into the nats-server configuration it generates,
//! `clawbus nats-config` prints them for a deployment of your own, and
//! `deploy/nats/nats-server.conf` (compose) is checked against them by a test.
//!
//! What a right means here, per JetStream API subject:
//! - a consumer is created through `$JS.API.CONSUMER.CREATE.<stream>.<name>.<filter>`,
//!   so a right naming the filter lets a user create consumers of its own subjects only;
//! - `$JS.API.CONSUMER.MSG.NEXT.<stream>.<name>` pulls and `$JS.ACK.<stream>.<name>.>`
//!   acknowledges: both name the consumer;
//! - `$JS.API.DIRECT.GET.<stream>.<subject>` reads the last message of one subject,
//!   while `$JS.API.DIRECT.GET.<stream>` (a body naming any sequence) is the operator's,
//!   on the dead letters only.
//!
//! Rights are allow-lists, never "everything but": a JetStream API subject added by a
//! later nats-server is nobody's until it is listed here.
//!
//! Every user gets its own inbox prefix (`_INBOX_<user>`), so no user can subscribe to
//! another's replies.

use clawbus_config::{Service, SERVICES};

use crate::topology::{
    ConsumerDecl, KV_APPROVALS, KV_CHANNEL_OFFSETS, KV_CRON, KV_DELIVERIES, KV_HANDOVERS,
    KV_LEASES, KV_PAIRING, KV_PROCESSES, KV_PROFILES, KV_RUNS, KV_SESSIONS, KV_TOOL_CALLS,
    PARTITIONS, RETIRED_CONSUMERS, ROUTER_PARTITIONS, STREAM_DEAD_LETTERS, STREAM_EVENTS,
    STREAM_INBOUND, STREAM_OUTBOUND, STREAM_TURNS,
};

/// The user that creates streams, buckets and the fixed consumers (`clawbus provision`).
pub const PROVISION: &str = "provision";
/// The user of the `clawbus` CLI's read-only bus commands (`status`, `dlq`): reads
/// stream and consumer state and the dead letters, changes nothing.
pub const OPERATOR: &str = "operator";
/// The user of the CLI's commands that change what the suite lets in (`pairing`,
/// `approvals`, `cron`): the pairing, approval and cron buckets, and telling an
/// approved sender on their channel.
pub const ADMIN: &str = "admin";
/// Every NATS user of the suite: provisioning, the operator, the admin, then one per
/// service of the registry ([`clawbus_config::SERVICES`]).
pub fn users() -> Vec<&'static str> {
    [PROVISION, OPERATOR, ADMIN]
        .into_iter()
        .chain(SERVICES.iter().map(|s| s.name()))
        .collect()
}

/// A user's rights, as nats-server `permissions`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rights {
    pub publish: Vec<String>,
    pub publish_deny: Vec<String>,
    pub subscribe: Vec<String>,
    /// May answer requests it received (a responder), whatever their reply subject.
    pub allow_responses: bool,
}

/// The inbox prefix of a user's connections (request replies, JetStream API answers,
/// pull deliveries): only that user may subscribe to it.
pub fn inbox_prefix(user: &str) -> String {
    format!("_INBOX_{user}")
}

/// JetStream stream names behind the KV buckets.
fn kv_stream(bucket: &str) -> String {
    format!("KV_{bucket}")
}

/// Streams (and KV bucket streams) a service publishes to or consumes from: it checks
/// them against their declarations at start-up, and may read their configuration.
pub fn streams_of(service: Service) -> Vec<String> {
    let (names, buckets): (&[&str], &[&str]) = match service {
        Service::Gateway => (&[STREAM_INBOUND, STREAM_OUTBOUND], &[]),
        Service::Router => (
            &[
                STREAM_INBOUND,
                STREAM_TURNS,
                STREAM_OUTBOUND,
                STREAM_DEAD_LETTERS,
            ],
            &[
                KV_LEASES,
                KV_HANDOVERS,
                KV_SESSIONS,
                KV_PAIRING,
                KV_APPROVALS,
                KV_CRON,
            ],
        ),
        Service::Agent => (
            &[
                STREAM_TURNS,
                STREAM_OUTBOUND,
                STREAM_EVENTS,
                STREAM_DEAD_LETTERS,
            ],
            &[KV_RUNS, KV_PROFILES, KV_LEASES, KV_HANDOVERS],
        ),
        Service::Store => (
            &[STREAM_EVENTS, STREAM_DEAD_LETTERS],
            &[KV_LEASES, KV_HANDOVERS],
        ),
        Service::Sandbox => (
            &[STREAM_OUTBOUND],
            &[KV_TOOL_CALLS, KV_APPROVALS, KV_PROCESSES],
        ),
        Service::Channels => (
            &[STREAM_INBOUND, STREAM_OUTBOUND, STREAM_DEAD_LETTERS],
            &[KV_LEASES, KV_HANDOVERS, KV_CHANNEL_OFFSETS, KV_DELIVERIES],
        ),
    };
    names
        .iter()
        .map(|s| s.to_string())
        .chain(buckets.iter().map(|b| kv_stream(b)))
        .collect()
}

/// The name of a gateway's reply consumer (one per gateway account).
pub fn gateway_reply_consumer(account: &str) -> String {
    format!("gateway-{account}")
}

/// Rights to work one named consumer: bind it (create or update with its declared
/// filter), rewind it, read its state, pull from it and acknowledge.
fn consumer(stream: &str, name: &str, filter: &str) -> Vec<String> {
    vec![
        format!("$JS.API.CONSUMER.CREATE.{stream}.{name}.{filter}"),
        format!("$JS.API.CONSUMER.INFO.{stream}.{name}"),
        format!("$JS.API.CONSUMER.RESET.{stream}.{name}"),
        format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.{name}"),
        format!("$JS.ACK.{stream}.{name}.>"),
    ]
}

/// What provisioning may do: create each declared stream and bucket (a create of an
/// existing one with its declared configuration is a no-op, any other is refused by the
/// server), read their configuration to find drift, create the fixed consumers by name
/// and filter, delete the consumers of earlier releases. Never update, purge, delete or
/// snapshot a stream, read or delete a message, or create any other consumer (a push
/// consumer delivering to its own inbox would read every message): the fixed consumers
/// exist as pull consumers once provisioned, and the server refuses turning a pull
/// consumer into a push one.
fn provisioning() -> Vec<String> {
    let mut p = vec!["$JS.API.INFO".to_owned()];
    let streams = crate::topology::streams(1).into_iter().map(|s| s.name);
    let buckets = crate::topology::buckets(1)
        .into_iter()
        .map(|b| kv_stream(&b.bucket));
    for s in streams.chain(buckets) {
        p.push(format!("$JS.API.STREAM.CREATE.{s}"));
        p.push(format!("$JS.API.STREAM.INFO.{s}"));
    }
    // Names and filters do not depend on the configuration (only tunables do).
    for d in crate::topology::fixed_consumers(&clawbus_config::Config::default()) {
        p.push(format!(
            "$JS.API.CONSUMER.CREATE.{}.{}.{}",
            d.stream, d.durable, d.filter_subjects[0]
        ));
    }
    for (stream, name) in RETIRED_CONSUMERS {
        p.push(format!("$JS.API.CONSUMER.DELETE.{stream}.{name}"));
    }
    p
}

/// Rights on the lease bucket for one group: its own keys only; and on its own keys of
/// the bucket counting deliveries across handovers.
fn leases(group: &str) -> Vec<String> {
    let kv = kv_stream(KV_LEASES);
    let handovers = kv_stream(KV_HANDOVERS);
    vec![
        format!("$KV.{KV_LEASES}.{group}.>"),
        format!("$JS.API.DIRECT.GET.{kv}.$KV.{KV_LEASES}.{group}.>"),
        // Listing the group's members: a consumer filtered to them.
        format!("$JS.API.CONSUMER.CREATE.{kv}.*.$KV.{KV_LEASES}.{group}.m.>"),
        format!("$KV.{KV_HANDOVERS}.{group}.>"),
        format!("$JS.API.DIRECT.GET.{handovers}.$KV.{KV_HANDOVERS}.{group}.>"),
    ]
}

/// What the rights depend on in a deployment's configuration.
#[derive(Debug, Clone)]
pub struct Scope {
    /// The gateway's `[gateway] account` (its subjects and reply consumer carry it).
    pub gateway_account: String,
    /// The channel accounts the channels service runs, `(channel, account)`: each one's
    /// reply consumer is named in the rights.
    pub channel_accounts: Vec<(String, String)>,
}

impl Scope {
    /// The scope of configuration `cfg`.
    pub fn of(cfg: &clawbus_config::Config) -> Scope {
        Scope {
            gateway_account: cfg.gateway.account.clone(),
            channel_accounts: cfg
                .channel_accounts()
                .into_iter()
                .map(|a| (a.channel, a.account))
                .collect(),
        }
    }
}

/// The rights of `user`; `None` for a user the suite does not know.
pub fn rights(user: &str, scope: &Scope) -> Option<Rights> {
    let gateway_account = scope.gateway_account.as_str();
    let inbox = vec![format!("{}.>", inbox_prefix(user))];
    let service = Service::named(user);
    let mut publish: Vec<String> = service
        .map(streams_of)
        .unwrap_or_default()
        .iter()
        .map(|s| format!("$JS.API.STREAM.INFO.{s}"))
        .collect();
    let mut r = Rights {
        subscribe: inbox,
        ..Default::default()
    };
    match (user, service) {
        (PROVISION, _) => publish = provisioning(),
        (OPERATOR, _) => {
            publish.extend(
                [
                    "$JS.API.INFO",
                    "$JS.API.STREAM.NAMES",
                    "$JS.API.STREAM.LIST",
                    "$JS.API.STREAM.INFO.*",
                    "$JS.API.CONSUMER.NAMES.*",
                    "$JS.API.CONSUMER.LIST.*",
                    "$JS.API.CONSUMER.INFO.*.*",
                ]
                .map(String::from),
            );
            // Dead letters are the operator's to read, by sequence.
            publish.push(format!("$JS.API.DIRECT.GET.{STREAM_DEAD_LETTERS}"));
            publish.push(format!("$JS.API.STREAM.MSG.GET.{STREAM_DEAD_LETTERS}"));
        }
        (ADMIN, _) => {
            // Approvals: list the pending ones (a watch) and decide them.
            let approvals = kv_stream(KV_APPROVALS);
            publish.extend([
                format!("$KV.{KV_APPROVALS}.pending.*"),
                format!("$JS.API.DIRECT.GET.{approvals}.>"),
                format!("$JS.API.CONSUMER.CREATE.{approvals}.*.$KV.{KV_APPROVALS}.pending.>"),
                format!("$JS.API.CONSUMER.CREATE.{approvals}"),
            ]);
            // Pairing requests and approved senders; cron jobs.
            for bucket in [KV_APPROVALS, KV_PAIRING, KV_CRON] {
                publish.push(format!("$JS.API.STREAM.INFO.{}", kv_stream(bucket)));
            }
            for bucket in [KV_PAIRING, KV_CRON] {
                publish.extend([
                    format!("$KV.{bucket}.>"),
                    format!("$JS.API.DIRECT.GET.{}.>", kv_stream(bucket)),
                ]);
            }
            // An approved sender is told in the chat they asked from: a platform's
            // chat, never a reply of the gateway's HTTP API.
            for c in clawbus_config::ADAPTERS {
                publish.push(format!("claw.v1.out.{c}.*"));
            }
        }
        (_, Some(Service::Gateway)) => {
            let a = gateway_account;
            let name = gateway_reply_consumer(a);
            publish.push(format!("claw.v1.in.http.{a}"));
            publish.push(format!("claw.v1.in.http.{a}.*"));
            // Slack's Events API arrives at the gateway; an event it cannot read is
            // parked in its dead letters.
            let mut slack = false;
            for (_, account) in scope.channel_accounts.iter().filter(|(c, _)| c == "slack") {
                publish.push(format!("claw.v1.in.slack.{account}.*"));
                slack = true;
            }
            if slack {
                publish.push("claw.v1.dlq.gateway".into());
            }
            publish.extend(consumer(
                STREAM_OUTBOUND,
                &name,
                &format!("claw.v1.out.http.{a}"),
            ));
            // A reconnecting gateway replaces its reply consumer.
            publish.push(format!("$JS.API.CONSUMER.DELETE.{STREAM_OUTBOUND}.{name}"));
            r.subscribe.push("claw.v1.evt.delta.>".into());
        }
        (_, Some(Service::Router)) => {
            for p in 0..ROUTER_PARTITIONS {
                let d = ConsumerDecl::router(p, 1);
                publish.extend(consumer(d.stream, &d.durable, &d.filter_subjects[0]));
            }
            publish.extend(
                [
                    "claw.v1.turn.>".to_owned(),
                    "claw.v1.out.>".to_owned(),
                    "claw.v1.dlq.router".to_owned(),
                ]
                .into_iter()
                .chain(leases("router")),
            );
            // Session state and group context, pairing requests and approvals (listed
            // from the stream's subjects), and `/approve`.
            for bucket in [KV_SESSIONS, KV_PAIRING, KV_CRON] {
                publish.extend([
                    format!("$KV.{bucket}.>"),
                    format!("$JS.API.DIRECT.GET.{}.>", kv_stream(bucket)),
                ]);
            }
            let sessions = kv_stream(KV_SESSIONS);
            publish.extend([
                format!("$KV.{KV_APPROVALS}.pending.*"),
                format!("$JS.API.DIRECT.GET.{}.>", kv_stream(KV_APPROVALS)),
                // `/stop` and the interrupt mode reach the run in progress.
                "claw.v1.ctl.*".to_owned(),
                // `/usage` asks the store.
                crate::subjects::STORE_USAGE.to_owned(),
                // The session state cache follows the bucket (an ordered consumer).
                format!("$JS.API.CONSUMER.CREATE.{sessions}"),
                format!("$JS.API.CONSUMER.CREATE.{sessions}.>"),
                format!("$JS.API.CONSUMER.DELETE.{sessions}.>"),
                format!("$JS.FC.{sessions}.>"),
            ]);
        }
        (_, Some(Service::Agent)) => {
            // An owner creates a consumer per acquisition (`agent-p<p>-<epoch>`) and
            // deletes its predecessors': any consumer name on the turn stream, but
            // only with a filter of one partition's turns.
            let s = STREAM_TURNS;
            publish.extend([
                format!("$JS.API.CONSUMER.CREATE.{s}.*.claw.v1.turn.*.>"),
                format!("$JS.API.CONSUMER.NAMES.{s}"),
                format!("$JS.API.CONSUMER.INFO.{s}.*"),
                format!("$JS.API.CONSUMER.DELETE.{s}.*"),
                format!("$JS.API.CONSUMER.MSG.NEXT.{s}.*"),
                format!("$JS.ACK.{s}.>"),
            ]);
            publish.extend([
                "claw.v1.out.>".to_owned(),
                "claw.v1.evt.>".to_owned(),
                "claw.v1.store.history.*".to_owned(),
                // Tool calls and the tool registry (request/reply to the sandbox).
                "claw.v1.tool.*".to_owned(),
                crate::subjects::TOOLS_LIST.to_owned(),
                "claw.v1.dlq.agent".to_owned(),
                // The last event of a session (literal subjects only).
                format!("$JS.API.DIRECT.GET.{STREAM_EVENTS}.>"),
                format!("$KV.{KV_RUNS}.>"),
                format!("$JS.API.DIRECT.GET.{}.>", kv_stream(KV_RUNS)),
                format!("$KV.{KV_PROFILES}.>"),
                format!("$JS.API.DIRECT.GET.{}.>", kv_stream(KV_PROFILES)),
                // Queue modes: the session's waiting turns (by sequence and subject).
                format!("$JS.API.DIRECT.GET.{STREAM_TURNS}"),
            ]);
            publish.extend(leases("agent"));
            // `/stop` and the interrupt mode.
            r.subscribe.push("claw.v1.ctl.*".into());
        }
        (_, Some(Service::Store)) => {
            for p in 0..PARTITIONS {
                let d = ConsumerDecl::store(p, 1);
                publish.extend(consumer(d.stream, &d.durable, &d.filter_subjects[0]));
            }
            publish.push("claw.v1.dlq.store".into());
            publish.extend(leases("store"));
            r.subscribe.push("claw.v1.store.history.*".into());
            r.subscribe.push(crate::subjects::STORE_SESSIONS.into());
            r.subscribe.push(crate::subjects::STORE_USAGE.into());
            r.allow_responses = true;
        }
        (_, Some(Service::Sandbox)) => {
            // Answers the tool registry and tool calls (queue group `sandbox`); records
            // each call before and after running it.
            r.subscribe.push(crate::subjects::TOOLS_LIST.to_owned());
            r.subscribe.push("claw.v1.tool.*".into());
            r.allow_responses = true;
            // sessions_history and sessions_list ask the store; message sends to a chat.
            publish.push("claw.v1.store.history.*".into());
            publish.push(crate::subjects::STORE_SESSIONS.into());
            publish.push("claw.v1.out.*.*".into());
            for bucket in [KV_TOOL_CALLS, KV_APPROVALS, KV_PROCESSES] {
                publish.extend([
                    format!("$KV.{bucket}.>"),
                    format!("$JS.API.DIRECT.GET.{}.>", kv_stream(bucket)),
                ]);
            }
            // Background sessions: passed on between replicas (listed from the
            // bucket's stream info and direct gets).
            r.subscribe.push("claw.v1.sandbox.process.*".into());
            publish.push("claw.v1.sandbox.process.*".into());
        }
        (_, Some(Service::Channels)) => {
            // Publishes what its platforms' people write; delivers the replies of the
            // accounts it runs (one consumer each); leases and its two buckets.
            // (Slack's events come in through the gateway.)
            for c in clawbus_config::ADAPTERS.iter().filter(|c| **c != "slack") {
                publish.push(format!("claw.v1.in.{c}.*"));
                publish.push(format!("claw.v1.in.{c}.*.*"));
            }
            for (channel, account) in &scope.channel_accounts {
                let d = crate::topology::channel_consumer(channel, account, 1);
                publish.extend(consumer(d.stream, &d.durable, &d.filter_subjects[0]));
            }
            publish.push("claw.v1.dlq.channels".into());
            // Drafts: the agent's live deltas (`stream_mode = "partial"`).
            r.subscribe.push("claw.v1.evt.delta.>".into());
            publish.extend(leases("channels"));
            for bucket in [KV_CHANNEL_OFFSETS, KV_DELIVERIES] {
                publish.extend([
                    format!("$KV.{bucket}.>"),
                    format!("$JS.API.DIRECT.GET.{}.>", kv_stream(bucket)),
                ]);
            }
        }
        (_, None) => return None,
    }
    r.publish = publish;
    Some(r)
}

/// The `authorization` block of a nats-server configuration with every user of
/// [`users`]; `password(user)` gives the value to write after `password:` (a quoted
/// literal, or a `$VARIABLE` the server reads from its environment). No user means no
/// access: anonymous clients are refused.
pub fn render_authorization(scope: &Scope, password: impl Fn(&str) -> String) -> String {
    let list = |items: &[String]| {
        items
            .iter()
            .map(|s| format!("\"{s}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut out = String::from("authorization {\n  users: [\n");
    for user in users() {
        let r = rights(user, scope).expect("every listed user has rights");
        out.push_str(&format!(
            "    {{\n      user: {user}, password: {}\n      permissions: {{\n",
            password(user)
        ));
        out.push_str(&format!(
            "        publish: {{\n          allow: [{}]\n",
            list(&r.publish)
        ));
        if !r.publish_deny.is_empty() {
            out.push_str(&format!("          deny: [{}]\n", list(&r.publish_deny)));
        }
        out.push_str("        }\n");
        out.push_str(&format!(
            "        subscribe: {{\n          allow: [{}]\n        }}\n",
            list(&r.subscribe)
        ));
        if r.allow_responses {
            out.push_str("        allow_responses: true\n");
        }
        out.push_str("      }\n    }\n");
    }
    out.push_str("  ]\n}\n");
    out
}

/// The environment variable compose passes a user's password in.
pub fn password_variable(user: &str) -> String {
    format!("CLAWBUS_NATS_{}_PASSWORD", user.to_uppercase())
}

/// The scope of the compose deployment: the gateway's default account and the default
/// account of each channel adapter (`TELEGRAM_BOT_TOKEN`, ...).
pub fn compose_scope() -> Scope {
    Scope {
        gateway_account: clawbus_config::GatewayConfig::default().account,
        channel_accounts: clawbus_config::ADAPTERS
            .iter()
            .map(|c| (c.to_string(), "default".to_owned()))
            .collect(),
    }
}

/// The nats-server configuration of `deploy/nats/nats-server.conf` (compose): passwords
/// from the environment, the gateway's default account.
pub fn compose_config() -> String {
    let header = "\
# nats-server for a containerised clawbus: JetStream on, one user per service plus the
# provisioning, operator and admin users, each allowed only what its job needs.
# Generated by `clawbus nats-config --env-passwords`; a test checks that this file
# matches the rights in shared/bus/src/rights.rs. Passwords come from the environment.
port: 4222
http_port: 8222
jetstream {
  max_file_store: 10G
}
";
    format!(
        "{header}{}",
        render_authorization(&compose_scope(), |u| {
            format!("${}", password_variable(u))
        })
    )
}

#[cfg(test)]
mod tests;
