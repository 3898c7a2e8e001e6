//! The router's scheduler: fires cron jobs (KV `claw_cron`, see
//! [`clawbus_bus::cron`]) and heartbeats as turns. Every router replica runs it; a
//! slot's turn has a deterministic id, so JetStream keeps one however many replicas
//! publish it, and the slot is recorded as fired so a restart does not fire it again
//! (a slot missed while no router ran fires once, late).

use std::time::Duration;

use async_nats::jetstream::kv;
use clawbus_bus::cron::{self, Job};
use clawbus_bus::{subjects, topology, Bus, TraceContext};
use clawbus_config::Config;
use clawbus_wire::{ChatKind, ChatRef, Envelope, InboundMessage, Sender, TurnRequest};
use tokio_util::sync::CancellationToken;

use crate::state::States;

/// How often due slots are looked for.
const TICK: Duration = Duration::from_millis(500);

/// The prompt of a heartbeat turn, when `[heartbeat] prompt` says none.
pub const HEARTBEAT_PROMPT: &str = "Heartbeat: read HEARTBEAT.md in your workspace if it \
exists and follow it. If nothing needs attention, reply exactly HEARTBEAT_OK.";

pub struct Scheduler {
    pub bus: Bus,
    pub cfg: Config,
    pub cron: kv::Store,
    pub states: States,
}

impl Scheduler {
    pub async fn run(self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Err(e) = self.fire_due().await {
                tracing::warn!(error = %e, "Scheduler pass failed; trying again");
            }
        }
    }

    async fn fire_due(&self) -> Result<(), String> {
        let now = clawbus_wire::now_ms();
        for job in cron::jobs(&self.cron).await? {
            let (last, _) = cron::fired(&self.cron, &job.id).await?;
            let Some(slot) = cron::due(&job, last, now) else {
                continue;
            };
            self.fire(&job, slot).await?;
            cron::record(&self.cron, &job.id, slot).await?;
            if matches!(job.schedule, cron::Schedule::At { .. }) && !job.keep_after_run {
                cron::remove(&self.cron, &job.id).await?;
            }
        }
        self.heartbeats(now).await
    }

    /// Publishes one slot of a job as a turn.
    async fn fire(&self, job: &Job, slot: i64) -> Result<(), String> {
        let (session_key, reset) = job.session_key(&self.cfg.session.main_key);
        let (channel, account, chat) = match &job.deliver {
            Some(d) => (d.channel.clone(), d.account.clone(), d.to.clone()),
            None => ("cron".to_owned(), "default".to_owned(), job.id.clone()),
        };
        let inbound = InboundMessage {
            channel,
            account,
            message_id: format!("{}:{slot}", job.id),
            chat: ChatRef {
                id: chat,
                kind: ChatKind::Direct,
                ..Default::default()
            },
            sender: Sender {
                id: "cron".into(),
                display_name: Some(format!("cron job {}", job.name)),
                is_bot: false,
            },
            text: job.message.clone(),
            ..Default::default()
        };
        let id = format!("cron:{}:{slot}", job.id);
        tracing::info!(job = %job.id, slot, session_key = %session_key, "Cron job due");
        self.publish(&id, &session_key, &job.agent_id, inbound, reset, false)
            .await
    }

    /// The heartbeat of each agent it is on for, every `every_minutes` inside the
    /// active hours, in the agent's main session, answered where its owner last wrote.
    async fn heartbeats(&self, now: i64) -> Result<(), String> {
        let hb = &self.cfg.heartbeat;
        let every = hb.every_ms();
        if every == 0 {
            return Ok(());
        }
        let slot = now - now.rem_euclid(every);
        if !active_at(&hb.active_hours, slot) {
            return Ok(());
        }
        for agent in hb.agents(&self.cfg.router.default_agent) {
            let key = format!("heartbeat-{agent}");
            let (last, _) = cron::fired(&self.cron, &key).await?;
            if last >= slot {
                continue;
            }
            let session_key = format!("agent:{agent}:{}", self.cfg.session.main_key);
            let (mut st, _) = self.states.load(&session_key).await?;
            let route = st.last_route.clone();
            let (channel, account, chat) = route
                .map(|r| (r.channel, r.account, r.chat_id))
                .unwrap_or_else(|| ("heartbeat".into(), "default".into(), agent.clone()));
            let inbound = InboundMessage {
                channel,
                account,
                message_id: format!("heartbeat:{slot}"),
                chat: ChatRef {
                    id: chat,
                    kind: ChatKind::Direct,
                    ..Default::default()
                },
                sender: Sender {
                    id: "heartbeat".into(),
                    ..Default::default()
                },
                text: with_events(&st.events, hb.prompt.as_deref().unwrap_or(HEARTBEAT_PROMPT)),
                ..Default::default()
            };
            let id = format!("heartbeat:{agent}:{slot}");
            self.publish(&id, &session_key, &agent, inbound, false, true)
                .await?;
            cron::record(&self.cron, &key, slot).await?;
            if !st.events.is_empty() {
                st.events.clear();
                self.states.save(&session_key, &st).await?;
            }
        }
        Ok(())
    }

    async fn publish(
        &self,
        id: &str,
        session_key: &str,
        agent: &str,
        inbound: InboundMessage,
        reset: bool,
        heartbeat: bool,
    ) -> Result<(), String> {
        let partition = subjects::partition(session_key, topology::PARTITIONS);
        let turn = TurnRequest {
            run_id: format!("run:{id}"),
            session_key: session_key.to_owned(),
            agent_id: agent.to_owned(),
            inbound_id: id.to_owned(),
            inbound,
            reset,
            heartbeat,
            ..Default::default()
        };
        let env = Envelope::new(format!("turn:{id}"), clawbus_wire::now_ms(), turn);
        self.bus
            .publish_durable(
                subjects::turn(partition, session_key),
                &env,
                &TraceContext::root(),
            )
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

/// The heartbeat's message with the system events that came since the last one.
fn with_events(events: &[String], prompt: &str) -> String {
    if events.is_empty() {
        return prompt.to_owned();
    }
    let mut s = String::from("System events since the last heartbeat:\n");
    for e in events {
        s.push_str(&format!("- {e}\n"));
    }
    s.push('\n');
    s.push_str(prompt);
    s
}

/// Whether `ms` falls inside the active hours (in their time zone).
pub fn active_at(h: &clawbus_config::ActiveHours, ms: i64) -> bool {
    use chrono::{TimeZone, Timelike};
    let (Some(start), Some(end)) = (
        clawbus_config::minute_of_day(&h.start),
        clawbus_config::minute_of_day(&h.end),
    ) else {
        return false;
    };
    let Ok(tz) = cron::parse_tz(&h.timezone) else {
        return false;
    };
    let Some(t) = tz.timestamp_millis_opt(ms).single() else {
        return false;
    };
    let minute = t.hour() * 60 + t.minute();
    if start <= end {
        (start..end).contains(&minute)
    } else {
        minute >= start || minute < end
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn active_hours_take_their_time_zone_and_may_span_midnight() {
        let h = |start: &str, end: &str, tz: &str| clawbus_config::ActiveHours {
            start: start.into(),
            end: end.into(),
            timezone: tz.into(),
        };
        // 2026-01-02 06:30 UTC = 07:30 in Paris.
        let t = 1_767_335_400_000;
        assert!(active_at(&h("07:00", "22:00", "Europe/Paris"), t));
        assert!(!active_at(&h("07:00", "22:00", "UTC"), t));
        assert!(active_at(&h("22:00", "07:00", "UTC"), t), "spans midnight");
        assert!(active_at(&h("00:00", "24:00", "UTC"), t));
        assert!(!active_at(&h("07:00", "22:00", "Nowhere/Land"), t));
    }
}
