//! A real Matrix homeserver for the channels service's tests: Synapse (installed by
//! `make setup` into `.tools/synapse`), SQLite, on a free loopback port with open
//! registration, and Matrix users the tests act as, over the client-server API.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use serde_json::{json, Value};

use crate::{free_port, wait_for};

/// Where `make setup` installs Synapse.
pub fn synapse_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.tools/synapse")
}

/// A running Synapse.
pub struct MatrixServer {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    http: reqwest::Client,
}

impl Drop for MatrixServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl MatrixServer {
    pub async fn start() -> anyhow::Result<MatrixServer> {
        let lib = synapse_dir();
        anyhow::ensure!(
            lib.join("synapse").exists(),
            "{} lacks Synapse: run `make setup`",
            lib.display()
        );
        let dir = tempfile::tempdir()?;
        let port = free_port();
        let d = dir.path().display().to_string();
        std::fs::write(
            dir.path().join("log.yaml"),
            format!(
                "version: 1\nformatters:\n  f:\n    format: '%(asctime)s %(levelname)s %(name)s %(message)s'\n\
                 handlers:\n  file:\n    class: logging.FileHandler\n    filename: {d}/homeserver.log\n    formatter: f\n\
                 root:\n  level: WARNING\n  handlers: [file]\ndisable_existing_loggers: false\n"
            ),
        )?;
        let limit = "{per_second: 1000, burst_count: 1000}";
        std::fs::write(
            dir.path().join("homeserver.yaml"),
            format!(
                "server_name: localhost\npid_file: {d}/homeserver.pid\n\
                 listeners:\n  - port: {port}\n    bind_addresses: ['127.0.0.1']\n    type: http\n    tls: false\n    x_forwarded: false\n    resources:\n      - names: [client]\n        compress: false\n\
                 database:\n  name: sqlite3\n  args:\n    database: {d}/homeserver.db\n\
                 log_config: {d}/log.yaml\nmedia_store_path: {d}/media\nsigning_key_path: {d}/signing.key\n\
                 report_stats: false\ntrusted_key_servers: []\nsuppress_key_server_warning: true\n\
                 enable_registration: true\nenable_registration_without_verification: true\n\
                 macaroon_secret_key: test-macaroon-{port}\nform_secret: test-form-{port}\n\
                 rc_message: {limit}\nrc_registration: {limit}\n\
                 rc_login:\n  address: {limit}\n  account: {limit}\n  failed_attempts: {limit}\n\
                 rc_joins:\n  local: {limit}\n  remote: {limit}\n\
                 rc_invites:\n  per_room: {limit}\n  per_user: {limit}\n"
            ),
        )?;
        let conf = dir.path().join("homeserver.yaml");
        let keys = Command::new("python3")
            .args(["-m", "synapse.app.homeserver", "--generate-keys", "-c"])
            .arg(&conf)
            .env("PYTHONPATH", &lib)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .context("python3 (run `make setup`)")?;
        anyhow::ensure!(
            keys.status.success(),
            "synapse --generate-keys: {}",
            String::from_utf8_lossy(&keys.stderr)
        );
        let child = Command::new("python3")
            .args(["-m", "synapse.app.homeserver", "-c"])
            .arg(&conf)
            .env("PYTHONPATH", &lib)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(
                dir.path().join("stderr.log"),
            )?))
            .spawn()?;
        let s = MatrixServer {
            port,
            dir,
            child: Some(child),
            http: reqwest::Client::new(),
        };
        let url = format!("{}/_matrix/client/versions", s.url());
        let up = wait_for(Duration::from_secs(60), || async {
            s.http
                .get(&url)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        })
        .await;
        anyhow::ensure!(
            up,
            "synapse did not start: {}",
            std::fs::read_to_string(s.dir.path().join("stderr.log")).unwrap_or_default()
        );
        Ok(s)
    }

    /// The homeserver URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Registers `user` (open registration) and logs in.
    pub async fn register(&self, user: &str) -> anyhow::Result<MatrixUser> {
        let r: Value = self
            .http
            .post(format!("{}/_matrix/client/v3/register", self.url()))
            .json(
                &json!({"username": user, "password": format!("pw-{user}-0123456789"),
                "auth": {"type": "m.login.dummy"}}),
            )
            .send()
            .await?
            .json()
            .await?;
        Ok(MatrixUser {
            user_id: r["user_id"]
                .as_str()
                .context(format!("register: {r}"))?
                .to_owned(),
            token: r["access_token"].as_str().context("no token")?.to_owned(),
            base: format!("{}/_matrix/client/v3", self.url()),
            http: self.http.clone(),
        })
    }
}

/// A Matrix user the test acts as.
pub struct MatrixUser {
    pub user_id: String,
    pub token: String,
    base: String,
    http: reqwest::Client,
}

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

impl MatrixUser {
    async fn req(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let mut r = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await?;
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or_default();
        anyhow::ensure!(status.is_success(), "{path}: {status} {v}");
        Ok(v)
    }

    /// Creates a room inviting `invite`; a direct chat when `direct`. Its id.
    pub async fn create_room(&self, invite: &[&str], direct: bool) -> anyhow::Result<String> {
        let v = self
            .req(
                reqwest::Method::POST,
                "/createRoom",
                Some(json!({"invite": invite, "is_direct": direct,
                    "preset": if direct { "trusted_private_chat" } else { "private_chat" }})),
            )
            .await?;
        Ok(v["room_id"].as_str().context("no room id")?.to_owned())
    }

    pub async fn join(&self, room: &str) -> anyhow::Result<()> {
        self.req(
            reqwest::Method::POST,
            &format!("/join/{}", enc(room)),
            Some(json!({})),
        )
        .await
        .map(|_| ())
    }

    /// Sends a message with `content`; its event id.
    pub async fn send(&self, room: &str, content: Value) -> anyhow::Result<String> {
        let txn = uuid::Uuid::new_v4().simple().to_string();
        let v = self
            .req(
                reqwest::Method::PUT,
                &format!("/rooms/{}/send/m.room.message/{txn}", enc(room)),
                Some(content),
            )
            .await?;
        Ok(v["event_id"].as_str().unwrap_or_default().to_owned())
    }

    /// The user ids of the room's joined members.
    pub async fn members(&self, room: &str) -> anyhow::Result<Vec<String>> {
        let v = self
            .req(
                reqwest::Method::GET,
                &format!("/rooms/{}/joined_members", enc(room)),
                None,
            )
            .await?;
        Ok(v["joined"]
            .as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default())
    }

    /// Sends plain text.
    pub async fn say(&self, room: &str, text: &str) -> anyhow::Result<String> {
        self.send(room, json!({"msgtype": "m.text", "body": text}))
            .await
    }

    /// The room's messages, oldest first (the latest 200).
    pub async fn messages(&self, room: &str) -> anyhow::Result<Vec<Value>> {
        let v = self
            .req(
                reqwest::Method::GET,
                &format!("/rooms/{}/messages?dir=b&limit=200", enc(room)),
                None,
            )
            .await?;
        let mut all: Vec<Value> = v["chunk"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|e| e["type"] == "m.room.message")
            .collect();
        all.reverse();
        Ok(all)
    }

    /// Messages of `sender` in `room`, waiting up to `timeout` until there are `n`.
    pub async fn wait_messages(
        &self,
        room: &str,
        sender: &str,
        n: usize,
        timeout: Duration,
    ) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let found: Vec<Value> = self
                .messages(room)
                .await
                .unwrap_or_default()
                .into_iter()
                .filter(|e| e["sender"] == sender)
                .collect();
            if found.len() >= n || tokio::time::Instant::now() >= deadline {
                return found;
            }
            // A condition polled at a short interval, as `wait_for` does.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
