//! An emulator of the Telegram Bot API (<https://core.telegram.org/bots/api>) for the
//! channels service's tests: `POST /bot<token>/<method>` with a JSON body, answered
//! `{"ok": true, "result": …}` or `{"ok": false, "error_code": n, "description": "…"}`
//! with the same HTTP status, `parameters.retry_after` on 429, as Telegram does.
//!
//! Methods: `getMe`, `setWebhook` (updates are then POSTed to the URL with the
//! `X-Telegram-Bot-Api-Secret-Token` header, again until answered 2xx, and
//! `getUpdates` answers 409), `deleteWebhook`, `getUpdates` (long poll: waits up to `timeout` seconds for an
//! update at or after `offset`; an `offset` confirms, and forgets, every earlier
//! update), `sendMessage` (HTML parse mode checked like Telegram: only its tags,
//! balanced, known entities, at most 4096 characters of text), `sendChatAction`.
//! An unknown token gets 401 `Unauthorized`. A `getUpdates` while another waits for
//! the same bot ends the waiting one with 409 `Conflict: terminated by other getUpdates
//! request`, as Telegram does when two instances of a bot poll (`conflicts` counts them).
//! `push_raw` queues an update whose message is any JSON text, even one no JSON
//! library would produce (a lone surrogate escape), as a hostile client could cause.
//!
//! Tests script people (`dm`, `group`), read what the bot sent (`sent`), take the
//! platform down (`set_down`: 502 Bad Gateway to everything), rate-limit the next
//! sends (`rate_limit_sends`), or hold sends in flight (`hold_sends`) and then fail
//! them as a connection cut before Telegram took the message would.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::{watch, Notify};

/// The emulated bot.
pub const BOT_ID: i64 = 7_000_001;
pub const BOT_USERNAME: &str = "clawbus_test_bot";

/// A message the bot sent.
#[derive(Debug, Clone)]
pub struct Sent {
    pub message_id: i64,
    pub chat_id: String,
    pub text: String,
    pub parse_mode: Option<String>,
    pub reply_to: Option<i64>,
    pub thread_id: Option<i64>,
}

#[derive(Default)]
struct Inner {
    /// Bots whose tokens are accepted; updates and sends are the first one's.
    tokens: Vec<String>,
    /// getUpdates calls waiting right now.
    waiting: AtomicU64,
    /// Updates not confirmed yet, oldest first: their ids and JSON text.
    updates: Mutex<Vec<(i64, String)>>,
    /// Polls of the first bot started: a poll ends with 409 once a later one started.
    poll_generation: AtomicU64,
    /// Polls of the first bot running now.
    polling: AtomicU64,
    /// Polls ended by a later poll of the same bot (two pollers at once).
    conflicts: AtomicU64,
    next_update: AtomicI64,
    next_message: AtomicI64,
    arrived: Notify,
    sent: Mutex<Vec<Sent>>,
    actions: AtomicU64,
    down: AtomicBool,
    rate_limited: AtomicU32,
    /// sendMessage calls waiting at the hold.
    held: AtomicU64,
    hold: Option<watch::Sender<bool>>,
    /// Held sends fail (not taken) when released.
    drop_held: AtomicBool,
    /// Sends are held once this many messages were sent (negative: never).
    hold_after: AtomicI64,
    /// getUpdates calls answered.
    polls: AtomicU64,
    /// editMessageText calls that changed a message.
    edits: AtomicU64,
    /// The webhook set by `setWebhook`: (url, secret).
    webhook: Mutex<Option<(String, String)>>,
    /// Webhook calls Telegram made, and those answered 2xx.
    hook_calls: AtomicU64,
    hook_delivered: AtomicU64,
}

pub struct TelegramEmulator {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
    hold: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TelegramEmulator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn fail(status: u16, description: &str) -> Response {
    let mut body = json!({"ok": false, "error_code": status, "description": description});
    if status == 429 {
        body["parameters"] = json!({"retry_after": 1});
    }
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        Json(body),
    )
        .into_response()
}

fn ok(result: Value) -> Response {
    Json(json!({"ok": true, "result": result})).into_response()
}

impl TelegramEmulator {
    pub async fn start(token: &str) -> anyhow::Result<TelegramEmulator> {
        Self::start_many(&[token]).await
    }

    /// An emulator accepting several bots' tokens (benchmarks of many accounts); the
    /// people of [`Self::dm`] and [`Self::group`] write to the first bot.
    pub async fn start_many(tokens: &[&str]) -> anyhow::Result<TelegramEmulator> {
        let (hold, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            tokens: tokens.iter().map(|t| t.to_string()).collect(),
            next_update: AtomicI64::new(1000),
            next_message: AtomicI64::new(1),
            hold: Some(hold.clone()),
            hold_after: AtomicI64::new(-1),
            ..Default::default()
        });
        let app = Router::new()
            .route("/{bot}/{method}", post(handle))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(TelegramEmulator {
            addr,
            inner,
            hold,
            task,
        })
    }

    /// The API root to configure (`[channels.telegram] api_root`).
    pub fn api_root(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn push(&self, message: Value) -> i64 {
        self.push_raw(&message.to_string())
    }

    /// Queues an update whose `message` is the JSON text `message` as it is (it may be
    /// one the bot cannot read); its `update_id`.
    pub fn push_raw(&self, message: &str) -> i64 {
        let id = self.inner.next_update.fetch_add(1, Ordering::SeqCst);
        let update = format!(r#"{{"update_id":{id},"message":{message}}}"#);
        let hook = self.inner.webhook.lock().unwrap().clone();
        match hook {
            // As Telegram: POST it to the webhook, again until it is answered 2xx.
            Some((url, secret)) => {
                let inner = self.inner.clone();
                tokio::spawn(async move {
                    let http = reqwest::Client::new();
                    for _ in 0..100 {
                        inner.hook_calls.fetch_add(1, Ordering::SeqCst);
                        let r = http
                            .post(&url)
                            .header("X-Telegram-Bot-Api-Secret-Token", &secret)
                            .header("content-type", "application/json")
                            .body(update.clone())
                            .send()
                            .await;
                        if r.is_ok_and(|r| r.status().is_success()) {
                            inner.hook_delivered.fetch_add(1, Ordering::SeqCst);
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                });
            }
            None => {
                self.inner.updates.lock().unwrap().push((id, update));
                self.inner.arrived.notify_waiters();
            }
        }
        id
    }

    /// The webhook the bot set: (url, secret).
    pub fn webhook(&self) -> Option<(String, String)> {
        self.inner.webhook.lock().unwrap().clone()
    }

    /// Webhook calls made, and those answered 2xx.
    pub fn webhook_calls(&self) -> (u64, u64) {
        (
            self.inner.hook_calls.load(Ordering::SeqCst),
            self.inner.hook_delivered.load(Ordering::SeqCst),
        )
    }

    fn message(&self, chat: Value, from: i64, text: &str, entities: Value) -> Value {
        let id = self.inner.next_message.fetch_add(1, Ordering::SeqCst);
        json!({
            "message_id": id, "date": 1_700_000_000, "text": text, "entities": entities,
            "from": {"id": from, "is_bot": false, "first_name": format!("User{from}")},
            "chat": chat,
        })
    }

    /// A direct message from user `from`; its `<chat>:<message id>`.
    pub fn dm(&self, from: i64, text: &str) -> String {
        let m = self.message(
            json!({"id": from, "type": "private", "first_name": format!("User{from}")}),
            from,
            text,
            json!([]),
        );
        let id = format!("{from}:{}", m["message_id"]);
        self.push(m);
        id
    }

    /// A message in group `chat` (negative, as Telegram's) from `from`, mentioning the
    /// bot by `@username` first when `mention`.
    pub fn group(&self, chat: i64, from: i64, text: &str, mention: bool) -> String {
        let (text, entities) = if mention {
            let at = format!("@{BOT_USERNAME}");
            (
                format!("{at} {text}"),
                json!([{"type": "mention", "offset": 0, "length": at.encode_utf16().count()}]),
            )
        } else {
            (text.to_owned(), json!([]))
        };
        let m = self.message(
            json!({"id": chat, "type": "supergroup", "title": "Family"}),
            from,
            &text,
            entities,
        );
        let id = format!("{chat}:{}", m["message_id"]);
        self.push(m);
        id
    }

    /// Everything the bot sent, in order.
    pub fn sent(&self) -> Vec<Sent> {
        self.inner.sent.lock().unwrap().clone()
    }

    /// What the bot sent to `chat`.
    pub fn sent_to(&self, chat: i64) -> Vec<Sent> {
        let c = chat.to_string();
        self.sent().into_iter().filter(|s| s.chat_id == c).collect()
    }

    /// `sendChatAction` calls so far.
    pub fn chat_actions(&self) -> u64 {
        self.inner.actions.load(Ordering::SeqCst)
    }

    /// `editMessageText` calls that changed a message.
    pub fn edits(&self) -> u64 {
        self.inner.edits.load(Ordering::SeqCst)
    }

    /// `getUpdates` calls waiting for news right now.
    pub fn waiting_polls(&self) -> u64 {
        self.inner.waiting.load(Ordering::SeqCst)
    }

    /// `getUpdates` calls ended by another poll of the bot (409 Conflict): two
    /// instances of the bot polling at once.
    pub fn conflicts(&self) -> u64 {
        self.inner.conflicts.load(Ordering::SeqCst)
    }

    /// `getUpdates` calls answered so far.
    pub fn polls(&self) -> u64 {
        self.inner.polls.load(Ordering::SeqCst)
    }

    /// Updates not confirmed by an offset yet.
    pub fn unconfirmed(&self) -> usize {
        self.inner.updates.lock().unwrap().len()
    }

    /// While down, every call gets 502 Bad Gateway.
    pub fn set_down(&self, down: bool) {
        self.inner.down.store(down, Ordering::SeqCst);
    }

    /// The next `n` sends get 429 with `retry_after: 1`.
    pub fn rate_limit_sends(&self, n: u32) {
        self.inner.rate_limited.store(n, Ordering::SeqCst);
    }

    /// Once `n` messages were sent in all, further sends wait until
    /// [`Self::release_failing`].
    pub fn hold_sends_after(&self, n: usize) {
        self.inner.drop_held.store(false, Ordering::SeqCst);
        self.inner.hold_after.store(n as i64, Ordering::SeqCst);
        self.hold.send_replace(true);
    }

    /// Sends waiting at the hold.
    pub fn held(&self) -> u64 {
        self.inner.held.load(Ordering::SeqCst)
    }

    /// Ends the hold; the sends that waited fail (Telegram never took them).
    pub fn release_failing(&self) {
        self.inner.drop_held.store(true, Ordering::SeqCst);
        self.inner.hold_after.store(-1, Ordering::SeqCst);
        self.hold.send_replace(false);
    }
}

async fn handle(
    State(s): State<Arc<Inner>>,
    Path((bot, method)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Response {
    let Some(which) = bot
        .strip_prefix("bot")
        .and_then(|t| s.tokens.iter().position(|x| x == t))
    else {
        return fail(401, "Unauthorized");
    };
    if s.down.load(Ordering::SeqCst) {
        return fail(502, "Bad Gateway");
    }
    let Ok(req) = serde_json::from_slice::<Value>(&body) else {
        return fail(400, "Bad Request: invalid JSON in the request body");
    };
    match method.as_str() {
        "getMe" => ok(json!({
            "id": BOT_ID, "is_bot": true, "first_name": "Claw", "username": BOT_USERNAME,
            "can_join_groups": true, "can_read_all_group_messages": false,
        })),
        "getUpdates" if s.webhook.lock().unwrap().is_some() => fail(
            409,
            "Conflict: can't use getUpdates method while webhook is active; use deleteWebhook to delete the webhook first",
        ),
        "getUpdates" if which > 0 => {
            // Other bots hear nothing: their long polls wait out their timeout.
            s.waiting.fetch_add(1, Ordering::SeqCst);
            let t = req["timeout"].as_u64().unwrap_or(0).min(50);
            tokio::time::sleep(Duration::from_secs(t)).await;
            s.waiting.fetch_sub(1, Ordering::SeqCst);
            ok(json!([]))
        }
        "getUpdates" => {
            let gen = s.poll_generation.fetch_add(1, Ordering::SeqCst) + 1;
            // Counted while the call runs, uncounted when its client is gone too.
            let _waiting = Waiting::new(&s.waiting);
            let _polling = Waiting::new(&s.polling);
            if s.polling.load(Ordering::SeqCst) > 1 {
                s.conflicts.fetch_add(1, Ordering::SeqCst);
                s.arrived.notify_waiters(); // the earlier poll ends with 409
            }
            get_updates(&s, &req, gen).await
        }
        "sendMessage" => send_message(&s, &req).await,
        "setWebhook" => {
            let (Some(url), secret) = (req["url"].as_str(), req["secret_token"].as_str()) else {
                return fail(400, "Bad Request: bad webhook: URL is empty");
            };
            *s.webhook.lock().unwrap() = Some((url.to_owned(), secret.unwrap_or_default().to_owned()));
            ok(json!(true))
        }
        "deleteWebhook" => {
            *s.webhook.lock().unwrap() = None;
            ok(json!(true))
        }
        "editMessageText" => edit_message(&s, &req),
        "sendChatAction" => {
            s.actions.fetch_add(1, Ordering::SeqCst);
            ok(json!(true))
        }
        _ => fail(404, "Not Found"),
    }
}

/// Counts a running call; uncounted when it ends or is dropped.
struct Waiting<'a>(&'a AtomicU64);

impl<'a> Waiting<'a> {
    fn new(n: &'a AtomicU64) -> Self {
        n.fetch_add(1, Ordering::SeqCst);
        Waiting(n)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn get_updates(s: &Inner, req: &Value, gen: u64) -> Response {
    let offset = req["offset"].as_i64().unwrap_or(0);
    let timeout = req["timeout"].as_u64().unwrap_or(0).min(50);
    let limit = req["limit"].as_u64().unwrap_or(100).clamp(1, 100) as usize;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
    loop {
        let arrived = s.arrived.notified();
        if s.poll_generation.load(Ordering::SeqCst) != gen {
            return fail(
                409,
                "Conflict: terminated by other getUpdates request; make sure that only one bot instance is running",
            );
        }
        let found: Vec<String> = {
            let mut u = s.updates.lock().unwrap();
            // An offset confirms every update before it.
            u.retain(|(id, _)| *id >= offset);
            u.iter().take(limit).map(|(_, x)| x.clone()).collect()
        };
        if !found.is_empty() || tokio::time::Instant::now() >= deadline {
            s.polls.fetch_add(1, Ordering::SeqCst);
            // Written as text: an update may hold what no JSON value can.
            let body = format!(r#"{{"ok":true,"result":[{}]}}"#, found.join(","));
            return ([("content-type", "application/json")], body).into_response();
        }
        let _ = tokio::time::timeout_at(deadline, arrived).await;
    }
}

async fn send_message(s: &Inner, req: &Value) -> Response {
    let chat_id = match &req["chat_id"] {
        Value::Number(n) => n.to_string(),
        Value::String(c) if c.parse::<i64>().is_ok() => c.clone(),
        _ => return fail(400, "Bad Request: chat not found"),
    };
    let text = req["text"].as_str().unwrap_or_default();
    let parse_mode = req["parse_mode"].as_str().map(str::to_owned);
    let visible = match parse_mode.as_deref() {
        Some("HTML") => match check_html(text) {
            Ok(v) => v,
            Err(e) => return fail(400, &format!("Bad Request: can't parse entities: {e}")),
        },
        None => text.to_owned(),
        Some(_) => return fail(400, "Bad Request: unsupported parse_mode"),
    };
    if visible.trim().is_empty() {
        return fail(400, "Bad Request: message text is empty");
    }
    if visible.chars().count() > 4096 {
        return fail(400, "Bad Request: message is too long");
    }
    if s.rate_limited
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        return fail(429, "Too Many Requests: retry after 1");
    }
    // The hold: a send waits; released "failing", Telegram never took it.
    if let Some(h) = &s.hold {
        let mut rx = h.subscribe();
        let after = s.hold_after.load(Ordering::SeqCst);
        let count = s.sent.lock().unwrap().len() as i64;
        if *rx.borrow() && after >= 0 && count >= after {
            s.held.fetch_add(1, Ordering::SeqCst);
            let _ = rx.wait_for(|held| !held).await;
            s.held.fetch_sub(1, Ordering::SeqCst);
            if s.drop_held.load(Ordering::SeqCst) {
                return fail(502, "Bad Gateway");
            }
        }
    }
    let message_id = s.next_message.fetch_add(1, Ordering::SeqCst);
    s.sent.lock().unwrap().push(Sent {
        message_id,
        chat_id: chat_id.clone(),
        text: text.to_owned(),
        parse_mode,
        reply_to: req["reply_parameters"]["message_id"].as_i64(),
        thread_id: req["message_thread_id"].as_i64(),
    });
    ok(json!({
        "message_id": message_id, "date": 1_700_000_000, "text": visible,
        "chat": {"id": chat_id.parse::<i64>().unwrap_or_default(), "type": "private"},
        "from": {"id": BOT_ID, "is_bot": true, "first_name": "Claw", "username": BOT_USERNAME},
    }))
}

fn edit_message(s: &Inner, req: &Value) -> Response {
    let chat = match &req["chat_id"] {
        Value::Number(n) => n.to_string(),
        Value::String(c) => c.clone(),
        _ => return fail(400, "Bad Request: chat not found"),
    };
    let Some(id) = req["message_id"].as_i64() else {
        return fail(400, "Bad Request: message identifier is not specified");
    };
    let text = req["text"].as_str().unwrap_or_default();
    let parse_mode = req["parse_mode"].as_str().map(str::to_owned);
    let visible = match parse_mode.as_deref() {
        Some("HTML") => match check_html(text) {
            Ok(v) => v,
            Err(e) => return fail(400, &format!("Bad Request: can't parse entities: {e}")),
        },
        _ => text.to_owned(),
    };
    if visible.chars().count() > 4096 {
        return fail(400, "Bad Request: MESSAGE_TOO_LONG");
    }
    let mut sent = s.sent.lock().unwrap();
    let Some(m) = sent
        .iter_mut()
        .find(|m| m.chat_id == chat && m.message_id == id)
    else {
        return fail(400, "Bad Request: message to edit not found");
    };
    if m.text == text && m.parse_mode == parse_mode {
        return fail(
            400,
            "Bad Request: message is not modified: specified new message content and reply markup are exactly the same as a current content and reply markup of the message",
        );
    }
    m.text = text.to_owned();
    m.parse_mode = parse_mode;
    s.edits.fetch_add(1, Ordering::SeqCst);
    ok(
        json!({"message_id": id, "date": 1_700_000_000, "text": visible,
        "chat": {"id": chat.parse::<i64>().unwrap_or_default(), "type": "private"}}),
    )
}

/// Telegram's HTML parse mode: its tags only, properly nested, entities it knows; the
/// visible text.
pub fn check_html(html: &str) -> Result<String, String> {
    const TAGS: &[&str] = &[
        "b",
        "strong",
        "i",
        "em",
        "u",
        "ins",
        "s",
        "strike",
        "del",
        "span",
        "tg-spoiler",
        "a",
        "code",
        "pre",
        "blockquote",
        "tg-emoji",
    ];
    let mut stack: Vec<String> = Vec::new();
    let mut visible = String::new();
    let mut rest = html;
    while let Some(c) = rest.chars().next() {
        match c {
            '<' => {
                let end = rest.find('>').ok_or("unclosed start tag")?;
                let inner = &rest[1..end];
                if let Some(name) = inner.strip_prefix('/') {
                    let open = stack.pop().ok_or(format!("unexpected end tag {name}"))?;
                    if open != name.trim() {
                        return Err(format!("expected end tag {open}, found {name}"));
                    }
                } else {
                    let name = inner.split_whitespace().next().unwrap_or_default();
                    if !TAGS.contains(&name) {
                        return Err(format!("unsupported start tag \"{name}\""));
                    }
                    stack.push(name.to_owned());
                }
                rest = &rest[end + 1..];
            }
            '&' => {
                let end = rest.find(';').ok_or("unclosed entity")?;
                let ent = &rest[1..end];
                visible.push(match ent {
                    "lt" => '<',
                    "gt" => '>',
                    "amp" => '&',
                    "quot" => '"',
                    _ => return Err(format!("unsupported entity &{ent};")),
                });
                rest = &rest[end + 1..];
            }
            c => {
                visible.push(c);
                rest = &rest[c.len_utf8()..];
            }
        }
    }
    if let Some(open) = stack.pop() {
        return Err(format!(
            "can't find end tag corresponding to start tag \"{open}\""
        ));
    }
    Ok(visible)
}
