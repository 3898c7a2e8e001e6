//! The rights as declared: no user beyond its job, compose's file in step.

use super::*;

#[test]
fn no_service_may_use_the_whole_jetstream_api() {
    for user in users() {
        let r = rights(user, &Scope::of(&clawbus_config::Config::default())).unwrap();
        for p in &r.publish {
            assert!(
                !p.starts_with("$JS.API.>") && p != "$JS.API.*" && !p.starts_with(">"),
                "{user} may publish {p}"
            );
        }
        assert_eq!(r.subscribe[0], format!("_INBOX_{user}.>"));
        assert!(!r.subscribe.iter().any(|s| s == "_INBOX.>" || s == ">"));
    }
    assert!(rights("intruder", &Scope::of(&clawbus_config::Config::default())).is_none());
}

#[test]
fn provisioning_and_the_operator_change_and_read_nothing_else() {
    let scope = Scope::of(&clawbus_config::Config::default());
    let provision = rights(PROVISION, &scope).unwrap();
    for p in &provision.publish {
        let api = p.strip_prefix("$JS.API.").unwrap_or_else(|| panic!("{p}"));
        let ok = api == "INFO"
            || api.starts_with("STREAM.CREATE.")
            || api.starts_with("STREAM.INFO.")
            || RETIRED_CONSUMERS
                .iter()
                .any(|(s, n)| api == format!("CONSUMER.DELETE.{s}.{n}"))
            || crate::topology::fixed_consumers(&clawbus_config::Config::default())
                .iter()
                .any(|d| api.starts_with(&format!("CONSUMER.CREATE.{}.{}.", d.stream, d.durable)));
        assert!(ok, "provision may publish {p}");
        assert!(!p.contains('>'), "provision: {p}");
    }
    let operator = rights(OPERATOR, &scope).unwrap();
    for p in &operator.publish {
        assert!(p.starts_with("$JS.API."), "operator may publish {p}");
        assert!(
            !p.contains("CREATE") && !p.contains("DELETE") && !p.contains("UPDATE"),
            "operator: {p}"
        );
    }
    let admin = rights(ADMIN, &scope).unwrap();
    assert!(!admin
        .publish
        .iter()
        .any(|p| p.starts_with("claw.v1.out.http")
            || p == "claw.v1.out.>"
            || p.starts_with("claw.v1.out.*")));
}

#[test]
fn each_service_parks_in_its_own_dead_letters_only() {
    let mut scope = Scope::of(&clawbus_config::Config::default());
    let dlq = |user: &str, scope: &Scope| -> Vec<String> {
        rights(user, scope)
            .unwrap()
            .publish
            .into_iter()
            .filter(|p| p.starts_with("claw.v1.dlq") || p == "claw.v1.>" || p == ">")
            .collect()
    };
    assert!(
        dlq("gateway", &scope).is_empty(),
        "no Slack, nothing to park"
    );
    scope
        .channel_accounts
        .push(("slack".into(), "default".into()));
    assert_eq!(dlq("gateway", &scope), ["claw.v1.dlq.gateway"]);
    assert_eq!(dlq("channels", &scope), ["claw.v1.dlq.channels"]);
}

#[test]
fn the_compose_configuration_matches_the_rights() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/nats/nats-server.conf"
    );
    let file = std::fs::read_to_string(path).unwrap();
    assert!(
        file == compose_config(),
        "deploy/nats/nats-server.conf differs from the declared rights: regenerate it with \
         `cargo run -p clawbus-cli -- nats-config --env-passwords > deploy/nats/nats-server.conf`"
    );
}
