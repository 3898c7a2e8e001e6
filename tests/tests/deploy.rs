//! The deployment files agree with the code: compose.yaml parses, runs provisioning
//! first, gives every service its own NATS user, and passes nats-server a password for
//! every user of the rights (`deploy/nats/nats-server.conf` is checked against the
//! rights in `clawbus-bus`).

use std::path::PathBuf;

use clawbus_testkit::SERVICES;
use serde_json::Value;

#[tokio::test]
async fn compose_provisions_first_and_runs_each_service_as_its_user() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let pytools = root.join(".tools/py");
    assert!(
        pytools.join("yaml").exists(),
        "{} has no PyYAML: run `make setup`",
        pytools.display()
    );
    let out = tokio::process::Command::new("python3")
        .arg(root.join("tests/py/compose_facts.py"))
        .arg(root.join("compose.yaml"))
        .env("PYTHONPATH", &pytools)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "compose.yaml does not parse: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let f: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        f["commands"]["provision"],
        serde_json::json!(["clawbus", "provision"])
    );
    assert_eq!(f["restart"]["provision"], "no");
    assert_eq!(f["nats_user"]["provision"], "provision");
    for s in SERVICES {
        let name = s.name();
        assert_eq!(
            f["depends_on"][name]["provision"]["condition"], "service_completed_successfully",
            "{name} waits for provisioning"
        );
        assert_eq!(
            f["nats_user"][name], name,
            "{name} connects as its own user"
        );
    }
    for user in clawbus_bus::rights::users() {
        let var = clawbus_bus::rights::password_variable(user);
        assert!(
            f["nats_env"].as_array().unwrap().iter().any(|v| v == &var),
            "nats-server gets {var}"
        );
    }
    assert!(f["nats_volumes"].as_array().unwrap().iter().any(|v| v
        .as_str()
        .unwrap()
        .starts_with("./deploy/nats/nats-server.conf:")));
}
