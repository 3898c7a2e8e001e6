//! A real IRC server for the channels service's tests (Debian's `ngircd`, installed by
//! `make setup`), on a free loopback port with a configuration of its own, and a small
//! but real IRC client that people in the tests talk through.

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::OwnedWriteHalf;

use crate::{free_port, wait_for};

/// The ngircd binary: `CLAWBUS_NGIRCD`, else `ngircd` on the PATH or in /usr/sbin.
pub fn ngircd_binary() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("CLAWBUS_NGIRCD") {
        return p.into();
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("ngircd"))
                .find(|p| p.exists())
        })
        .unwrap_or_else(|| "/usr/sbin/ngircd".into())
}

/// A running ngircd.
pub struct IrcServer {
    pub port: u16,
    /// With TLS: its port, and the PEM file of the CA that signed its certificate.
    pub tls: Option<(u16, std::path::PathBuf)>,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Drop for IrcServer {
    fn drop(&mut self) {
        self.stop();
    }
}

impl IrcServer {
    pub async fn start() -> anyhow::Result<IrcServer> {
        let dir = tempfile::tempdir()?;
        let mut s = IrcServer {
            port: free_port(),
            tls: None,
            dir,
            child: None,
        };
        s.spawn().await?;
        Ok(s)
    }

    /// A server that also takes TLS connections, with a certificate for 127.0.0.1
    /// signed by a CA of its own (made with openssl).
    pub async fn start_tls() -> anyhow::Result<IrcServer> {
        let dir = tempfile::tempdir()?;
        let d = dir.path();
        let run = |args: &[&str]| -> anyhow::Result<()> {
            let out = Command::new("openssl").args(args).current_dir(d).output()?;
            anyhow::ensure!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Ok(())
        };
        run(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=clawbus test CA",
        ])?;
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ])?;
        std::fs::write(d.join("ext.cnf"), "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n")?;
        run(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ])?;
        let ca = d.join("ca.pem");
        let mut s = IrcServer {
            port: free_port(),
            tls: Some((free_port(), ca)),
            dir,
            child: None,
        };
        s.spawn().await?;
        Ok(s)
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let conf = self.dir.path().join("ngircd.conf");
        std::fs::write(
            &conf,
            format!(
                "[Global]\nName = irc.clawbus.test\nInfo = clawbus test server\n\
                 AdminInfo1 = clawbus tests\nAdminEMail = tests@clawbus.invalid\n\
                 Listen = 127.0.0.1\nPorts = {}\nMotdPhrase = \"clawbus tests\"\n\
                 [Limits]\nMaxNickLength = 30\nPingTimeout = 120\nPongTimeout = 20\n\
                 [Options]\nPAM = no\nIdent = no\nDNS = no\n{}",
                self.port,
                match &self.tls {
                    Some((port, _)) => format!(
                        "[SSL]\nCertFile = {0}/server.pem\nKeyFile = {0}/server.key\nPorts = {port}\n",
                        self.dir.path().display()
                    ),
                    None => String::new(),
                }
            ),
        )?;
        let bin = ngircd_binary();
        let child = Command::new(&bin)
            .arg("-n")
            .arg("-f")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("{} (run `make setup`)", bin.display()))?;
        self.child = Some(child);
        let addr = self.addr();
        let up = wait_for(Duration::from_secs(10), || async {
            tokio::net::TcpStream::connect(&addr).await.is_ok()
        })
        .await;
        anyhow::ensure!(up, "ngircd did not listen on {addr}");
        if let Some((port, _)) = &self.tls {
            let tls = format!("127.0.0.1:{port}");
            let up = wait_for(Duration::from_secs(10), || async {
                tokio::net::TcpStream::connect(&tls).await.is_ok()
            })
            .await;
            anyhow::ensure!(up, "ngircd did not listen for TLS on {tls}");
        }
        Ok(())
    }

    /// Kills the server (every client loses its connection).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        self.spawn().await
    }
}

/// A message a client saw: `(from nick, target, text)`.
pub type Privmsg = (String, String, String);

/// An IRC client: registers, answers PINGs, records every PRIVMSG it receives.
pub struct IrcClient {
    pub nick: String,
    writer: Arc<tokio::sync::Mutex<OwnedWriteHalf>>,
    lines: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for IrcClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl IrcClient {
    /// Connects as `nick` and waits for the welcome.
    pub async fn connect(addr: &str, nick: &str) -> anyhow::Result<IrcClient> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        let (r, mut w) = stream.into_split();
        w.write_all(format!("NICK {nick}\r\nUSER {nick} 0 * :{nick}\r\n").as_bytes())
            .await?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let writer = Arc::new(tokio::sync::Mutex::new(w));
        let (l, pong_w) = (lines.clone(), writer.clone());
        let task = tokio::spawn(async move {
            let mut r = BufReader::new(r).lines();
            while let Ok(Some(line)) = r.next_line().await {
                if let Some(token) = line.strip_prefix("PING ") {
                    let _ = pong_w
                        .lock()
                        .await
                        .write_all(format!("PONG {token}\r\n").as_bytes())
                        .await;
                }
                l.lock().unwrap().push(line);
            }
        });
        let c = IrcClient {
            nick: nick.to_owned(),
            writer,
            lines,
            task,
        };
        let welcomed = wait_for(Duration::from_secs(10), || async {
            c.has(|l| l.split(' ').nth(1) == Some("001"))
        })
        .await;
        anyhow::ensure!(
            welcomed,
            "no welcome from {addr}: {:?}",
            c.lines.lock().unwrap()
        );
        Ok(c)
    }

    async fn raw(&self, s: &str) -> anyhow::Result<()> {
        self.writer.lock().await.write_all(s.as_bytes()).await?;
        Ok(())
    }

    fn has(&self, f: impl Fn(&str) -> bool) -> bool {
        self.lines.lock().unwrap().iter().any(|l| f(l))
    }

    /// Joins `channel` and waits until in it.
    pub async fn join(&self, channel: &str) -> anyhow::Result<()> {
        self.raw(&format!("JOIN {channel}\r\n")).await?;
        let ok = wait_for(Duration::from_secs(10), || async {
            self.has(|l| l.contains(" 366 ") && l.contains(channel))
        })
        .await;
        anyhow::ensure!(ok, "could not join {channel}");
        Ok(())
    }

    /// Sends `text` to a channel or nick.
    pub async fn say(&self, target: &str, text: &str) -> anyhow::Result<()> {
        self.raw(&format!("PRIVMSG {target} :{text}\r\n")).await
    }

    /// Sends `text` to a channel or nick as these bytes, whatever their encoding (an
    /// old client's Latin-1).
    pub async fn say_bytes(&self, target: &str, text: &[u8]) -> anyhow::Result<()> {
        let mut line = format!("PRIVMSG {target} :").into_bytes();
        line.extend_from_slice(text);
        line.extend_from_slice(b"\r\n");
        self.writer.lock().await.write_all(&line).await?;
        Ok(())
    }

    /// Every PRIVMSG received so far.
    pub fn privmsgs(&self) -> Vec<Privmsg> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| {
                let rest = l.strip_prefix(':')?;
                let (prefix, rest) = rest.split_once(' ')?;
                let rest = rest.strip_prefix("PRIVMSG ")?;
                let (target, text) = rest.split_once(" :")?;
                let from = prefix.split('!').next()?;
                Some((from.to_owned(), target.to_owned(), text.to_owned()))
            })
            .collect()
    }

    /// Returns once everything the server had taken from any client before this call
    /// was relayed to this one: two PING round trips (the server reads every waiting
    /// connection on each turn of its loop, and answers this one in order).
    pub async fn sync(&self) -> anyhow::Result<()> {
        for _ in 0..2 {
            let token = format!("sync{}", self.lines.lock().unwrap().len());
            self.raw(&format!("PING :{token}\r\n")).await?;
            let ponged = wait_for(Duration::from_secs(10), || async {
                self.has(|l| l.contains(" PONG ") && l.ends_with(&token))
            })
            .await;
            anyhow::ensure!(ponged, "no PONG for {token}");
        }
        Ok(())
    }

    /// Waits up to `timeout` until `nick` is seen in a channel with this client: joining
    /// after it, or in a channel's names list when it was there first.
    pub async fn wait_joined(&self, nick: &str, timeout: Duration) -> bool {
        let joined = format!(":{nick}!");
        wait_for(timeout, || async {
            self.has(|l| {
                (l.starts_with(&joined) && l.contains(" JOIN "))
                    || (l.contains(" 353 ") && l.split([' ', ':', '@', '+']).any(|w| w == nick))
            })
        })
        .await
    }

    /// Every raw line received so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits up to `timeout` until some PRIVMSG from `from` satisfies `f`.
    pub async fn wait_from(
        &self,
        from: &str,
        timeout: Duration,
        f: impl Fn(&str) -> bool,
    ) -> Option<Privmsg> {
        let mut found = None;
        wait_for(timeout, || {
            found = self
                .privmsgs()
                .into_iter()
                .find(|(n, _, t)| n.eq_ignore_ascii_case(from) && f(t));
            let ok = found.is_some();
            async move { ok }
        })
        .await;
        found
    }
}
