//! `sessions_history`: the transcript of one of the agent's own sessions, through the
//! store's history queries on the bus (`claw.v1.store.history.<partition>`).

use std::time::Duration;

use clawbus_bus::{subjects, topology, Bus, TraceContext};
use clawbus_wire::{Envelope, HistoryRequest, HistoryResponse, Role};
use serde::Deserialize;

use crate::ToolError;

/// Entries returned at most.
const MAX_ENTRIES: u32 = 200;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryArgs {
    #[serde(rename = "sessionKey")]
    session_key: String,
    #[serde(default)]
    limit: Option<u32>,
}

pub async fn history(
    bus: &Bus,
    agent: &str,
    max_bytes: usize,
    a: HistoryArgs,
) -> Result<String, ToolError> {
    let own = format!("agent:{agent}:");
    if !a.session_key.starts_with(&own) || a.session_key.len() > 512 {
        return Err(ToolError::denied(format!(
            "an agent reads its own sessions only (keys starting with `{own}`)"
        )));
    }
    let limit = a.limit.unwrap_or(40).clamp(1, MAX_ENTRIES);
    let req = Envelope::new(
        format!("sessions_history:{}", clawbus_wire::now_ms()),
        clawbus_wire::now_ms(),
        HistoryRequest {
            session_key: a.session_key.clone(),
            limit,
            min_seq: None,
        },
    );
    let subject = subjects::store_history(subjects::event_partition(
        &a.session_key,
        topology::PARTITIONS,
    ));
    let resp: HistoryResponse = ask_store(bus, subject, &req).await?;
    if let Some(e) = resp.error {
        return Err(ToolError::unavailable(format!("store: {}", e.message)));
    }
    if resp.entries.is_empty() {
        return Ok(format!("The session {} has no messages.", a.session_key));
    }
    let mut out = String::new();
    for e in resp.entries {
        let who = match e.role {
            Role::Tool => format!("tool {}", e.name.as_deref().unwrap_or("result")),
            r => r.as_str().to_owned(),
        };
        if !e.content.is_empty() {
            out.push_str(&format!("[{who}] {}\n", e.content));
        }
        for c in &e.tool_calls {
            out.push_str(&format!("[assistant called {}] {}\n", c.name, c.arguments));
        }
        if out.len() > max_bytes {
            let mut end = max_bytes;
            while !out.is_char_boundary(end) {
                end -= 1;
            }
            out.truncate(end);
            out.push_str("\n[cut]");
            break;
        }
    }
    Ok(out)
}

/// A request to the store; its answer, or why it gave none.
async fn ask_store<Req: clawbus_wire::Kind, Resp: clawbus_wire::Kind>(
    bus: &Bus,
    subject: String,
    req: &Envelope<Req>,
) -> Result<Resp, ToolError> {
    Ok(bus
        .request::<Req, Resp>(subject, req, &TraceContext::root(), Duration::from_secs(5))
        .await
        .map_err(|e| ToolError::unavailable(format!("the store did not answer: {e}")))?
        .body)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListArgs {
    #[serde(default)]
    limit: Option<u32>,
    #[serde(default, rename = "activeMinutes")]
    active_minutes: Option<u32>,
}

/// `sessions_list`: the agent's own sessions, the most recently active first.
pub async fn list(bus: &Bus, agent: &str, a: ListArgs) -> Result<String, ToolError> {
    let req = Envelope::new(
        format!("sessions_list:{}", clawbus_wire::now_ms()),
        clawbus_wire::now_ms(),
        clawbus_wire::SessionsRequest {
            agent_id: agent.to_owned(),
            limit: a.limit.unwrap_or(50).clamp(1, MAX_ENTRIES),
            active_minutes: a.active_minutes,
        },
    );
    let resp: clawbus_wire::SessionsResponse =
        ask_store(bus, subjects::STORE_SESSIONS.to_owned(), &req).await?;
    if let Some(e) = resp.error {
        return Err(ToolError::unavailable(format!("store: {}", e.message)));
    }
    if resp.sessions.is_empty() {
        return Ok("No sessions.".into());
    }
    Ok(resp
        .sessions
        .iter()
        .map(|s| {
            let when = utc(s.last_ts);
            format!("{}  {} messages  last {when}", s.session_key, s.messages)
        })
        .collect::<Vec<_>>()
        .join("\n"))
}

/// A time as `YYYY-MM-DD HH:MM UTC`.
fn utc(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).map_or_else(
        || ms.to_string(),
        |t| t.format("%Y-%m-%d %H:%M UTC").to_string(),
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn times_read_as_utc_dates() {
        assert_eq!(super::utc(0), "1970-01-01 00:00 UTC");
        assert_eq!(super::utc(1_767_335_400_000), "2026-01-02 06:30 UTC");
    }
}
