//! Scheduled turns: cron jobs kept in the KV bucket `claw_cron` (`job.<id>` → job,
//! `fired.<id>` → the last slot fired), managed with `clawbus cron add|list|rm` and
//! fired by the router. A job runs `at` a time, `every` an interval (from its
//! creation), or on a `cron` expression (five or six fields) in a time zone.
//!
//! Every router replica schedules every job; a slot becomes one turn with the id
//! `turn:cron:<job>:<slot>`, which JetStream keeps once however many replicas publish
//! it, and the slot is recorded as fired so a restart does not fire it again.

use std::str::FromStr;

use async_nats::jetstream::kv;
use serde::{Deserialize, Serialize};

use crate::kv_keys;

/// Slots searched at most when looking for the latest one due (a schedule every
/// second, behind by a day, is not caught up slot by slot).
const MAX_SCAN: usize = 100_000;

/// When a job runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Schedule {
    /// Once, at this time (Unix ms).
    At { at_ms: i64 },
    /// Every `every_ms`, counted from `anchor_ms`.
    Every { every_ms: i64, anchor_ms: i64 },
    /// A cron expression in an IANA time zone (`UTC` by default).
    Cron { expr: String, tz: String },
}

/// Where a job's answer goes: a channel account's chat (`announce`), or nowhere but
/// the session's transcript.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Delivery {
    pub channel: String,
    pub account: String,
    pub to: String,
}

/// A cron job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
    pub name: String,
    pub schedule: Schedule,
    pub agent_id: String,
    /// `main` (the agent's main session), `isolated` (a session of the job's own,
    /// started afresh each run) or `session:<key>`.
    pub session: String,
    pub message: String,
    #[serde(default)]
    pub deliver: Option<Delivery>,
    /// A one-shot (`at`) job is removed after it fired, unless kept.
    #[serde(default)]
    pub keep_after_run: bool,
    pub created_ms: i64,
}

impl Job {
    /// The session key a run uses, and whether it starts afresh.
    pub fn session_key(&self, main_key: &str) -> (String, bool) {
        match self.session.as_str() {
            "main" => (format!("agent:{}:{main_key}", self.agent_id), false),
            "isolated" => (format!("agent:{}:cron:{}", self.agent_id, self.id), true),
            s => (s.strip_prefix("session:").unwrap_or(s).to_owned(), false),
        }
    }
}

/// Why a job cannot be made.
pub fn check(job: &Job, agents: &[String]) -> Result<(), String> {
    if !crate::subjects::is_token(&job.id) {
        return Err("a job id is letters, digits, `_` and `-`".into());
    }
    if job.name.trim().is_empty() || job.name.len() > 200 {
        return Err("--name must be 1-200 characters".into());
    }
    if job.message.trim().is_empty() || job.message.len() > 64 * 1024 {
        return Err("--message must be 1 byte to 64 KiB".into());
    }
    if !agents.contains(&job.agent_id) {
        return Err(format!("there is no agent `{}`", job.agent_id));
    }
    match job.session.as_str() {
        "main" | "isolated" => {}
        s => {
            let key = s
                .strip_prefix("session:")
                .ok_or("--session is main, isolated or session:<key>")?;
            let own = format!("agent:{}:", job.agent_id);
            if !key.starts_with(&own)
                || key.len() > 256
                || key.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                return Err(format!(
                    "--session session:<key> needs a key starting with `{own}` (no spaces)"
                ));
            }
        }
    }
    if let Some(d) = &job.deliver {
        if !crate::subjects::is_token(&d.channel) || !crate::subjects::is_token(&d.account) {
            return Err("--channel and --account are letters, digits, `_` and `-`".into());
        }
        if d.to.trim().is_empty() || d.to.len() > 256 {
            return Err("--to names the chat to announce to".into());
        }
    }
    match &job.schedule {
        Schedule::At { .. } => Ok(()),
        Schedule::Every { every_ms, .. } if *every_ms < 1000 => {
            Err("--every is at least 1s".into())
        }
        Schedule::Every { .. } => Ok(()),
        Schedule::Cron { expr, tz } => {
            parse_tz(tz)?;
            parse_cron(expr).map(|_| ())
        }
    }
}

pub fn parse_tz(tz: &str) -> Result<chrono_tz::Tz, String> {
    chrono_tz::Tz::from_str(tz)
        .map_err(|_| format!("unknown time zone `{tz}` (an IANA name such as Europe/Paris)"))
}

pub fn parse_cron(expr: &str) -> Result<croner::Cron, String> {
    if expr.len() > 200 {
        return Err("the cron expression is too long".into());
    }
    croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Optional)
        .build()
        .parse(expr)
        .map_err(|e| format!("invalid cron expression `{expr}`: {e}"))
}

pub use clawbus_config::parse_duration;

/// The latest slot of `job` at or before `now` and after `after` (exclusive), if any.
pub fn due(job: &Job, after: i64, now: i64) -> Option<i64> {
    match &job.schedule {
        Schedule::At { at_ms } => (*at_ms <= now && *at_ms > after).then_some(*at_ms),
        Schedule::Every {
            every_ms,
            anchor_ms,
        } => {
            if now < anchor_ms + every_ms {
                return None;
            }
            let k = (now - anchor_ms) / every_ms;
            let slot = anchor_ms + k * every_ms;
            (slot > after).then_some(slot)
        }
        Schedule::Cron { expr, tz } => {
            let cron = parse_cron(expr).ok()?;
            let tz = parse_tz(tz).ok()?;
            use chrono::TimeZone;
            let start = tz
                .timestamp_millis_opt(after.max(job.created_ms))
                .single()?;
            let mut latest = None;
            for t in cron.iter_after(start).take(MAX_SCAN) {
                let ms = t.timestamp_millis();
                if ms > now {
                    break;
                }
                latest = Some(ms);
            }
            latest
        }
    }
}

/// The next slot of `job` after `after`, for `clawbus cron list`.
pub fn next(job: &Job, after: i64) -> Option<i64> {
    match &job.schedule {
        Schedule::At { at_ms } => (*at_ms > after).then_some(*at_ms),
        Schedule::Every {
            every_ms,
            anchor_ms,
        } => {
            let k = if after < *anchor_ms {
                1
            } else {
                (after - anchor_ms) / every_ms + 1
            };
            Some(anchor_ms + k * every_ms)
        }
        Schedule::Cron { expr, tz } => {
            use chrono::TimeZone;
            let cron = parse_cron(expr).ok()?;
            let tz = parse_tz(tz).ok()?;
            let start = tz.timestamp_millis_opt(after).single()?;
            cron.iter_after(start).next().map(|t| t.timestamp_millis())
        }
    }
}

/// Every job, by id.
pub async fn jobs(kv: &kv::Store) -> Result<Vec<Job>, String> {
    let mut out = Vec::new();
    for k in kv_keys(kv, "job.*").await.map_err(|e| e.to_string())? {
        if let Ok(Some(v)) = kv.get(&k).await {
            if let Ok(j) = serde_json::from_slice::<Job>(&v) {
                out.push(j);
            }
        }
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

pub async fn put(kv: &kv::Store, job: &Job) -> Result<(), String> {
    let v = serde_json::to_vec(job).map_err(|e| e.to_string())?;
    kv.create(format!("job.{}", job.id), v.into())
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Removes a job; false when there was none.
pub async fn remove(kv: &kv::Store, id: &str) -> Result<bool, String> {
    if !crate::subjects::is_token(id) {
        return Err(format!(
            "`{}` is not a job id",
            id.chars().take(40).collect::<String>()
        ));
    }
    let key = format!("job.{id}");
    match kv.get(&key).await {
        Ok(Some(_)) => {}
        Ok(None) => return Ok(false),
        Err(e) => return Err(e.to_string()),
    }
    kv.purge(&key).await.map_err(|e| e.to_string())?;
    let _ = kv.purge(format!("fired.{id}")).await;
    Ok(true)
}

/// The last slot fired of a job (0: none), with its revision for a compare-and-set.
pub async fn fired(kv: &kv::Store, id: &str) -> Result<(i64, u64), String> {
    match kv.entry(format!("fired.{id}")).await {
        Ok(Some(e)) if e.operation == kv::Operation::Put => Ok((
            std::str::from_utf8(&e.value)
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0),
            e.revision,
        )),
        Ok(_) => Ok((0, 0)),
        Err(e) => Err(e.to_string()),
    }
}

/// Records `slot` as fired (never moving backwards).
pub async fn record(kv: &kv::Store, id: &str, slot: i64) -> Result<(), String> {
    for _ in 0..5 {
        let (last, rev) = fired(kv, id).await?;
        if last >= slot {
            return Ok(());
        }
        let key = format!("fired.{id}");
        let value = slot.to_string().into_bytes().into();
        let r = if rev == 0 {
            kv.create(&key, value)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        } else {
            kv.update(&key, value, rev)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        if r.is_ok() {
            return Ok(());
        }
    }
    Err(format!("the fired slot of job {id} keeps changing"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(schedule: Schedule) -> Job {
        Job {
            id: "j1".into(),
            name: "n".into(),
            schedule,
            agent_id: "main".into(),
            session: "main".into(),
            message: "m".into(),
            deliver: None,
            keep_after_run: false,
            created_ms: 0,
        }
    }

    #[test]
    fn slots_fall_where_the_schedule_says() {
        let every = job(Schedule::Every {
            every_ms: 10_000,
            anchor_ms: 1_000,
        });
        assert_eq!(due(&every, 0, 5_000), None);
        assert_eq!(due(&every, 0, 25_000), Some(21_000));
        assert_eq!(due(&every, 21_000, 25_000), None, "fired already");
        assert_eq!(next(&every, 25_000), Some(31_000));
        let at = job(Schedule::At { at_ms: 50 });
        assert_eq!(due(&at, 0, 49), None);
        assert_eq!(due(&at, 0, 51), Some(50));
        assert_eq!(due(&at, 50, 100), None);
        // 07:30 every day in Paris: 06:30 UTC in winter.
        let cron = job(Schedule::Cron {
            expr: "30 7 * * *".into(),
            tz: "Europe/Paris".into(),
        });
        let jan_2_2026_noon = 1_767_355_200_000;
        let slot = due(&cron, 0, jan_2_2026_noon).unwrap();
        assert_eq!(slot, 1_767_335_400_000, "2026-01-02 06:30 UTC");
        assert_eq!(next(&cron, jan_2_2026_noon), Some(slot + 86_400_000));
    }

    #[test]
    fn bad_schedules_and_durations_are_refused() {
        assert_eq!(parse_duration("1h30m"), Ok(5_400_000));
        assert_eq!(parse_duration("45s"), Ok(45_000));
        for bad in ["", "5", "m", "-5m", "5x", "99999999999999999999d", "0s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert!(parse_cron("61 * * * *").is_err());
        assert!(parse_cron("not cron").is_err());
        assert!(parse_tz("Mars/Olympus").is_err());
        let agents = vec!["main".to_owned()];
        let mut j = job(Schedule::Every {
            every_ms: 500,
            anchor_ms: 0,
        });
        assert!(check(&j, &agents).is_err(), "under a second");
        j.schedule = Schedule::At { at_ms: 1 };
        assert!(check(&j, &agents).is_ok());
        j.session = "session:agent:other:x".into();
        assert!(check(&j, &agents).is_err());
        j.session = "main".into();
        j.agent_id = "ghost".into();
        assert!(check(&j, &agents).is_err());
    }
}
