//! A stand-in for a channel adapter: publishes inbound messages as an adapter would
//! (`claw.v1.in.<channel>.<account>.<chat token>`, a deterministic envelope id) and
//! collects what the suite sends back on `claw.v1.out.<channel>.<account>`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use clawbus_testkit::{wait_for, Suite};
use clawbus_wire::{
    decode, encode, ChatKind, ChatRef, Envelope, InboundMessage, OutboundMessage, Sender,
};
use futures::StreamExt;

pub struct FakeChannel {
    pub channel: String,
    pub account: String,
    js: async_nats::jetstream::Context,
    replies: Arc<Mutex<Vec<OutboundMessage>>>,
    n: std::sync::atomic::AtomicU64,
    _task: tokio::task::JoinHandle<()>,
}

impl FakeChannel {
    pub async fn new(s: &Suite, channel: &str, account: &str) -> FakeChannel {
        let client = s.nats.client().await.unwrap();
        let mut sub = client
            .subscribe(format!("claw.v1.out.{channel}.{account}"))
            .await
            .unwrap();
        client.flush().await.unwrap();
        let replies = Arc::new(Mutex::new(Vec::new()));
        let r = replies.clone();
        let task = tokio::spawn(async move {
            while let Some(m) = sub.next().await {
                if let Ok(env) = decode::<OutboundMessage>(&m.payload) {
                    r.lock().unwrap().push(env.body);
                }
            }
        });
        FakeChannel {
            channel: channel.into(),
            account: account.into(),
            js: async_nats::jetstream::new(client),
            replies,
            n: 0.into(),
            _task: task,
        }
    }

    /// A direct message from `sender` (its chat has the sender's id).
    pub fn dm(&self, sender: &str, text: &str) -> InboundMessage {
        self.message(ChatKind::Direct, sender, sender, text)
    }

    /// A message in group `group`.
    pub fn group(&self, group: &str, sender: &str, text: &str) -> InboundMessage {
        self.message(ChatKind::Group, group, sender, text)
    }

    fn message(&self, kind: ChatKind, chat: &str, sender: &str, text: &str) -> InboundMessage {
        let n = self.n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        InboundMessage {
            channel: self.channel.clone(),
            account: self.account.clone(),
            message_id: format!("m{n}-{}", clawbus_wire::now_ms()),
            chat: ChatRef {
                id: chat.into(),
                kind,
                ..Default::default()
            },
            sender: Sender {
                id: sender.into(),
                display_name: Some(sender.to_uppercase()),
                is_bot: false,
            },
            text: text.into(),
            ..Default::default()
        }
    }

    /// Publishes `m`; its envelope id (`<channel>:<account>:<message id>`).
    pub async fn send(&self, m: InboundMessage) -> String {
        let id = format!("{}:{}:{}", m.channel, m.account, m.message_id);
        let subject =
            clawbus_bus::subjects::inbound_chat(&m.channel, &m.account, &m.chat.id).unwrap();
        let env = Envelope::new(id.clone(), clawbus_wire::now_ms(), m);
        let mut h = async_nats::HeaderMap::new();
        h.insert("Nats-Msg-Id", id.as_str());
        self.js
            .publish_with_headers(subject, h, encode(&env).unwrap().into())
            .await
            .unwrap()
            .await
            .unwrap();
        id
    }

    /// The reply to inbound message `id` (its last chunk), waiting up to 30 s.
    pub async fn reply(&self, id: &str) -> OutboundMessage {
        let found = wait_for(Duration::from_secs(30), || async {
            self.replies
                .lock()
                .unwrap()
                .iter()
                .any(|r| r.inbound_id == id && r.last)
        })
        .await;
        assert!(found, "no reply to {id}; replies: {:?}", self.all());
        let all = self.replies.lock().unwrap();
        let chunks: Vec<&OutboundMessage> = all.iter().filter(|r| r.inbound_id == id).collect();
        let mut last = (*chunks.last().unwrap()).clone();
        last.text = chunks.iter().map(|c| c.text.as_str()).collect();
        last
    }

    /// Sends `m` and waits for its reply's text.
    pub async fn ask(&self, m: InboundMessage) -> String {
        let id = self.send(m).await;
        self.reply(&id).await.text
    }

    /// Every reply so far.
    pub fn all(&self) -> Vec<OutboundMessage> {
        self.replies.lock().unwrap().clone()
    }

    /// Replies so far to messages of `chat`.
    pub fn replies_in(&self, chat: &str) -> Vec<OutboundMessage> {
        self.all()
            .into_iter()
            .filter(|r| r.chat_id == chat)
            .collect()
    }
}
