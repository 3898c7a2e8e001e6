//! IRC: one connection per account (plain or TLS), registration with an optional
//! server password, NickServ identification, joining the configured channels, and
//! reconnecting with backoff. Channel messages are group messages (addressed
//! `nick: …` or naming the bot counts as a mention), private messages direct ones.
//! Replies are plain text, one `PRIVMSG` per line, cut to fit IRC's 512-byte lines and
//! paced so the server's flood protection never drops the bot.
//!
//! IRC has no message ids and no history: an inbound message's id is the connection's
//! start time and a sequence number; a message sent while the bot is not connected is
//! never seen (the platform keeps nothing). A sender is known by nickname only.

pub mod proto;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clawbus_bus::ownership::Fence;
use clawbus_config::IrcSpec;
use clawbus_wire::{ChatKind, ChatRef, InboundMessage, Sender};
use secrecy::ExposeSecret;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::typing::Typing;
use crate::{Ctx, Platform, SendError, Target};

/// Bytes of text in one `PRIVMSG` line: 512 less the command, the target and the
/// prefix the server adds when relaying (`:nick!user@host `, up to ~100 bytes).
const MAX_LINE_TEXT: usize = 350;
/// Lines sent at once before pacing starts, and the pace after.
const BURST: u32 = 5;
const PACE: Duration = Duration::from_millis(400);
/// Silence from the server after which the bot asks (PING), and gives up.
const PING_AFTER: Duration = Duration::from_secs(90);
const DEAD_AFTER: Duration = Duration::from_secs(180);

type Outgoing = (String, oneshot::Sender<Result<(), String>>);

/// The sending side of an IRC account: lines go to the live connection's writer.
pub struct Irc {
    writer: Mutex<Option<mpsc::Sender<Outgoing>>>,
}

impl Irc {
    fn writer(&self) -> Option<mpsc::Sender<Outgoing>> {
        self.writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_writer(&self, w: Option<mpsc::Sender<Outgoing>>) {
        *self.writer.lock().unwrap_or_else(|p| p.into_inner()) = w;
    }

    /// Writes one line on the live connection, waiting until it was written.
    async fn line(&self, line: String) -> Result<(), SendError> {
        let w = self
            .writer()
            .ok_or_else(|| SendError::Transient("not connected to the IRC server".into()))?;
        let (tx, rx) = oneshot::channel();
        w.send((line, tx))
            .await
            .map_err(|_| SendError::Transient("IRC connection closed".into()))?;
        rx.await
            .map_err(|_| SendError::Transient("IRC connection closed".into()))?
            .map_err(SendError::Transient)
    }
}

impl Platform for Irc {
    fn max_text(&self) -> usize {
        MAX_LINE_TEXT
    }

    fn rendered_len(&self, markdown: &str) -> usize {
        crate::markdown::plain(markdown).chars().count()
    }

    async fn send(&self, markdown: &str, to: &Target) -> Result<String, SendError> {
        let target = &to.chat_id;
        if !valid_target(target) {
            return Err(SendError::Refused(format!(
                "`{}` is not an IRC channel or nickname",
                target.chars().take(64).collect::<String>()
            )));
        }
        let text = crate::markdown::plain(markdown);
        let mut n = 0;
        for l in proto::lines(&text, MAX_LINE_TEXT) {
            self.line(format!("PRIVMSG {target} :{l}")).await?;
            n += 1;
        }
        Ok(format!("{target}:{n}"))
    }

    async fn typing(&self, _chat_id: &str, _thread_id: Option<&str>) -> Result<(), SendError> {
        Ok(()) // IRC has no typing indicator
    }
}

fn valid_target(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 64
        && !t.starts_with(':')
        && !t
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == ',')
}

/// Runs one IRC account until `stop`.
pub async fn run(ctx: Ctx, fence: Fence, stop: CancellationToken) {
    let Some(spec) = ctx.spec.irc.clone() else {
        tracing::error!(account = %ctx.spec.account, "IRC account without a server");
        return;
    };
    let Some((_, records)) = ctx.buckets().await else {
        return;
    };
    let platform = Arc::new(Irc {
        writer: Mutex::new(None),
    });
    let conn = ConnCtx {
        bus: ctx.bus.clone(),
        spec,
        account: ctx.spec.account.clone(),
        metrics: ctx.metrics.clone(),
        platform: platform.clone(),
        fence: fence.clone(),
    };
    // IRC has no typing indicator.
    ctx.serve(platform, records, Typing::new(false), fence, stop, |work| {
        connection(conn, work)
    })
    .await;
}

struct ConnCtx {
    bus: clawbus_bus::Bus,
    spec: IrcSpec,
    account: String,
    metrics: crate::metrics::ChannelMetrics,
    platform: Arc<Irc>,
    fence: Fence,
}

/// Connects, and connects again after a loss, with backoff (1 s doubling to 60 s).
async fn connection(c: ConnCtx, stop: CancellationToken) {
    let labels = ["irc", c.account.as_str()];
    let up = c.metrics.account_up.with_label_values(&labels);
    let mut wait = Duration::from_secs(1);
    while !stop.is_cancelled() && !c.fence.is_lost() {
        let started = Instant::now();
        let result = match connect(&c.spec).await {
            Ok(Stream::Plain(s)) => session(&c, s, &stop).await,
            Ok(Stream::Tls(s)) => session(&c, *s, &stop).await,
            Err(e) => Err(e),
        };
        c.platform.set_writer(None);
        up.set(0);
        match result {
            Ok(()) => return,
            Err(e) => {
                c.metrics
                    .errors
                    .with_label_values(&["irc", c.account.as_str(), "connection"])
                    .inc();
                tracing::warn!(server = %c.spec.host, error = %e, wait_ms = wait.as_millis() as u64, "IRC connection lost; reconnecting");
            }
        }
        if started.elapsed() > Duration::from_secs(60) {
            wait = Duration::from_secs(1);
        }
        if clawbus_bus::consumer::sleep_or_cancel(wait, &stop).await {
            return;
        }
        wait = (wait * 2).min(crate::RECONNECT_MAX);
    }
}

enum Stream {
    Plain(tokio::net::TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>),
}

async fn connect(spec: &IrcSpec) -> Result<Stream, String> {
    let tcp = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::net::TcpStream::connect((spec.host.as_str(), spec.port)),
    )
    .await
    .map_err(|_| format!("connecting to {}:{} timed out", spec.host, spec.port))?
    .map_err(|e| format!("connecting to {}:{}: {e}", spec.host, spec.port))?;
    let _ = tcp.set_nodelay(true);
    if !spec.tls {
        return Ok(Stream::Plain(tcp));
    }
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = &spec.ca_file {
        use tokio_rustls::rustls::pki_types::{pem::PemObject, CertificateDer};
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("tls_ca_file {}: {e}", path.display()))?;
        for c in certs {
            let c = c.map_err(|e| format!("tls_ca_file {}: {e}", path.display()))?;
            roots
                .add(c)
                .map_err(|e| format!("tls_ca_file {}: {e}", path.display()))?;
        }
    }
    let config = tokio_rustls::rustls::ClientConfig::builder_with_provider(Arc::new(
        tokio_rustls::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from(spec.host.clone())
        .map_err(|e| format!("{}: {e}", spec.host))?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS with {}: {e}", spec.host))?;
    Ok(Stream::Tls(Box::new(tls)))
}

/// One connection's life: register, identify, join, then relay both ways until the
/// connection ends (`Err`) or `stop` (`Ok`, after a QUIT).
async fn session<S: AsyncRead + AsyncWrite + Unpin>(
    c: &ConnCtx,
    stream: S,
    stop: &CancellationToken,
) -> Result<(), String> {
    let (r, mut w) = tokio::io::split(stream);
    let mut reader = BufReader::new(r).take(0);
    let spec = &c.spec;
    let mut nick = spec.nick.clone();
    if let Some(p) = &spec.password {
        write(&mut w, &format!("PASS {}", proto::clean(p.expose_secret()))).await?;
    }
    write(&mut w, &format!("NICK {nick}")).await?;
    write(&mut w, &format!("USER {nick} 0 * :clawbus assistant")).await?;
    let epoch = clawbus_wire::now_ms();
    let mut seq: u64 = 0;
    let (tx, mut rx) = mpsc::channel::<Outgoing>(64);
    let mut registered = false;
    let mut last_heard = Instant::now();
    let mut pinged = false;
    let mut tokens = BURST;
    let mut last_sent = Instant::now();
    let mut buf = Vec::with_capacity(1024);
    // The line in progress went over the limit: what is left of it is dropped.
    let mut discarding = false;
    let mut lines_read: u64 = 0;
    let mut tick = tokio::time::interval(Duration::from_secs(15));
    loop {
        // Read no further than a line's limit at once: a longer one is cut and parked,
        // never held whole. `buf` keeps what a cancelled read had of a line.
        reader.set_limit((proto::MAX_LINE - buf.len()) as u64);
        tokio::select! {
            read = reader.read_until(b'\n', &mut buf) => {
                match read {
                    Ok(0) => return Err("the server closed the connection".into()),
                    Err(e) => return Err(format!("reading: {e}")),
                    Ok(_) => {}
                }
                last_heard = Instant::now();
                pinged = false;
                let complete = buf.ends_with(b"\n");
                if !complete && buf.len() < proto::MAX_LINE {
                    continue; // the rest of the line is still to come
                }
                if std::mem::replace(&mut discarding, !complete) {
                    buf.clear();
                    continue; // the end of a line already parked
                }
                lines_read += 1;
                let raw = std::mem::take(&mut buf);
                let text = match proto::decode(&raw) {
                    Ok(text) if complete => text,
                    read => {
                        let why = read.err().unwrap_or_else(|| format!("a line over {} bytes", proto::MAX_LINE));
                        if park(c, &raw, epoch, lines_read, &why, stop).await.is_err() {
                            let _ = write(&mut w, "QUIT :shutting down").await;
                            return Ok(());
                        }
                        continue;
                    }
                };
                let line = match proto::parse(&text) {
                    Ok(Some(line)) => line,
                    Ok(None) => continue,
                    Err(why) => {
                        if park(c, &raw, epoch, lines_read, why, stop).await.is_err() {
                            let _ = write(&mut w, "QUIT :shutting down").await;
                            return Ok(());
                        }
                        continue;
                    }
                };
                match line.command {
                    "PING" => {
                        let token = line.params.first().copied().unwrap_or("");
                        write(&mut w, &format!("PONG :{}", proto::clean(token))).await?;
                    }
                    "001" => {
                        registered = true;
                        if let Some(n) = line.params.first() {
                            nick = (*n).to_owned();
                        }
                        if let Some(p) = &spec.nickserv_password {
                            write(&mut w, &format!("PRIVMSG NickServ :IDENTIFY {}", proto::clean(p.expose_secret()))).await?;
                        }
                        if !spec.join.is_empty() {
                            write(&mut w, &format!("JOIN {}", spec.join.join(","))).await?;
                        }
                        c.platform.set_writer(Some(tx.clone()));
                        c.metrics.account_up.with_label_values(&["irc", c.account.as_str()]).set(1);
                        tracing::info!(server = %spec.host, nick = %nick, "Connected to IRC");
                    }
                    // Nickname taken (or erroneous) before registration: try another.
                    "433" | "432" if !registered => {
                        nick = format!("{}_", nick.chars().take(28).collect::<String>());
                        write(&mut w, &format!("NICK {nick}")).await?;
                    }
                    "NICK" if line.nick().is_some_and(|n| n.eq_ignore_ascii_case(&nick)) => {
                        if let Some(n) = line.params.first() {
                            nick = (*n).to_owned();
                        }
                    }
                    "ERROR" => {
                        return Err(format!("server error: {}", line.params.join(" ")));
                    }
                    "PRIVMSG" if registered => {
                        if let Some(m) = inbound(&line, &nick, &c.account, epoch, &mut seq) {
                            // IRC has no typing indicator (a disabled one).
                            if crate::receive(&c.bus, &c.metrics, &Typing::new(false), m, stop).await.is_err() {
                                let _ = write(&mut w, "QUIT :shutting down").await;
                                return Ok(());
                            }
                        }
                    }
                    _ => {}
                }
            }
            Some((outgoing, done)) = rx.recv() => {
                // Flood control: a burst, then one line per PACE.
                let earned = (last_sent.elapsed().as_millis() / PACE.as_millis()) as u32;
                tokens = (tokens + earned).min(BURST);
                if tokens == 0 {
                    tokio::time::sleep(PACE.saturating_sub(last_sent.elapsed())).await;
                    tokens = 1;
                }
                tokens -= 1;
                last_sent = Instant::now();
                let r = write(&mut w, &outgoing).await;
                let _ = done.send(r.clone());
                r?;
            }
            _ = tick.tick() => {
                let quiet = last_heard.elapsed();
                if quiet > DEAD_AFTER {
                    return Err("no word from the server for three minutes".into());
                }
                if quiet > PING_AFTER && !pinged {
                    write(&mut w, "PING :clawbus").await?;
                    pinged = true;
                }
                // Registered under another nick (ours was taken: a ghost of a crashed
                // connection, someone else): ask for ours again.
                if registered && !nick.eq_ignore_ascii_case(&spec.nick) {
                    write(&mut w, &format!("NICK {}", spec.nick)).await?;
                }
            }
            _ = stop.cancelled() => {
                let _ = write(&mut w, "QUIT :clawbus stopping").await;
                return Ok(());
            }
        }
    }
}

/// Parks a server line that is no IRC message in the dead letters with its bytes (the
/// connection goes on); `Err` when stopping first.
async fn park(
    c: &ConnCtx,
    raw: &[u8],
    epoch: i64,
    n: u64,
    why: &str,
    stop: &CancellationToken,
) -> Result<(), ()> {
    let ev = crate::unreadable::Unreadable {
        channel: "irc",
        account: &c.account,
        // IRC has no ids: the connection's start and the line's number in it.
        id: Some(format!("{epoch}-l{n}")),
        raw,
        reason: format!("not an IRC message: {why}"),
    };
    crate::unreadable::dead_letter(&c.bus, &c.metrics, ev, stop).await
}

async fn write<W: AsyncWrite + Unpin>(w: &mut W, line: &str) -> Result<(), String> {
    let mut bytes = Vec::with_capacity(line.len() + 2);
    bytes.extend_from_slice(line.as_bytes());
    bytes.extend_from_slice(b"\r\n");
    w.write_all(&bytes)
        .await
        .map_err(|e| format!("writing: {e}"))?;
    w.flush().await.map_err(|e| format!("writing: {e}"))
}

/// The inbound message of a `PRIVMSG`, or `None` for the bot's own, CTCP other than
/// ACTION, and empty ones.
fn inbound(
    line: &proto::Line<'_>,
    me: &str,
    account: &str,
    epoch: i64,
    seq: &mut u64,
) -> Option<InboundMessage> {
    let from = line.nick()?;
    let (target, text) = (line.params.first()?, line.params.get(1)?);
    if from.eq_ignore_ascii_case(me) || from.is_empty() {
        return None;
    }
    let text = match text.strip_prefix('\u{1}') {
        Some(ctcp) => {
            let body = ctcp.trim_end_matches('\u{1}');
            format!("* {from} {}", body.strip_prefix("ACTION ")?)
        }
        None => (*text).to_owned(),
    };
    let direct = target.eq_ignore_ascii_case(me);
    let (chat, kind) = if direct {
        (from.to_owned(), ChatKind::Direct)
    } else {
        (target.to_ascii_lowercase(), ChatKind::Group)
    };
    let (text, mentions_bot) = match proto::addressed(&text, me) {
        Some(rest) if !direct => (rest.to_owned(), true),
        _ => {
            let named = !direct
                && text
                    .split(|c: char| !c.is_alphanumeric() && !"_-[]{}\\|`^".contains(c))
                    .any(|w| w.eq_ignore_ascii_case(me));
            (text, named)
        }
    };
    if text.trim().is_empty() {
        return None;
    }
    *seq += 1;
    Some(InboundMessage {
        channel: "irc".into(),
        account: account.into(),
        message_id: format!("{epoch}-{seq}"),
        chat: ChatRef {
            id: chat,
            kind,
            ..Default::default()
        },
        sender: Sender {
            id: from.to_owned(),
            display_name: Some(from.to_owned()),
            is_bot: false,
        },
        text,
        mentions_bot,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(raw: &str) -> Option<InboundMessage> {
        let mut seq = 0;
        inbound(
            &proto::parse(raw).unwrap().unwrap(),
            "claw",
            "default",
            1,
            &mut seq,
        )
    }

    #[test]
    fn channel_and_private_messages_become_group_and_direct_ones() {
        let m = msg(":Ada!a@h PRIVMSG #Family :claw: dinner at 7?").unwrap();
        assert_eq!(
            (m.chat.id.as_str(), m.chat.kind),
            ("#family", ChatKind::Group)
        );
        assert!(m.mentions_bot);
        assert_eq!(m.text, "dinner at 7?");
        assert_eq!(m.message_id, "1-1");
        let m = msg(":Ada!a@h PRIVMSG #family :ask Claw later").unwrap();
        assert!(m.mentions_bot, "naming the bot counts");
        let m = msg(":Ada!a@h PRIVMSG #family :clawbusters unite").unwrap();
        assert!(!m.mentions_bot);
        let m = msg(":Ada!a@h PRIVMSG claw :hi").unwrap();
        assert_eq!((m.chat.id.as_str(), m.chat.kind), ("Ada", ChatKind::Direct));
        assert_eq!(m.sender.id, "Ada");
    }

    #[test]
    fn own_messages_ctcp_and_empty_ones_are_skipped() {
        assert!(msg(":claw!c@h PRIVMSG #family :echo").is_none());
        assert!(msg(":Ada!a@h PRIVMSG claw :\u{1}VERSION\u{1}").is_none());
        assert_eq!(
            msg(":Ada!a@h PRIVMSG #f :\u{1}ACTION waves\u{1}")
                .unwrap()
                .text,
            "* Ada waves"
        );
        assert!(msg(":Ada!a@h PRIVMSG #f :claw:   ").is_none());
        assert!(msg(":Ada!a@h PRIVMSG #f").is_none());
        assert!(!valid_target("#a b") && !valid_target("x\r\nQUIT") && valid_target("#family"));
    }
}
