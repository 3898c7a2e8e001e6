//! The SQL both backends run. Statements are written once: parameters as `$n` (which
//! SQLite reads as numbered parameters too), and the one function that differs
//! (two-argument maximum: `MAX` in SQLite, `GREATEST` in Postgres) passed in. The
//! macros expand per backend because sqlx's row and argument types are per backend.

pub const HISTORY: &str = "SELECT entry_id, run_id, role, content, seq, ts, tool_calls,
    tool_call_id, tool_name, summary, usage FROM
    (SELECT entry_id, run_id, role, content, seq, idx, ts, tool_calls, tool_call_id,
     tool_name, summary, usage FROM transcript
     WHERE session_key = $1 ORDER BY seq DESC, idx DESC LIMIT $2) AS newest
  ORDER BY seq ASC, idx ASC";

/// The session's latest compaction summary (partial index `transcript_summaries`).
pub const LATEST_SUMMARY: &str = "SELECT entry_id, run_id, role, content, seq, ts, tool_calls,
    tool_call_id, tool_name, summary, usage FROM transcript
    WHERE session_key = $1 AND summary IS NOT NULL ORDER BY seq DESC, idx DESC LIMIT 1";

/// Sessions whose keys start with `$1`, active since `$2` (Unix ms), the most recent
/// first, at most `$3`.
pub const SESSIONS: &str = "SELECT session_key, COUNT(*) AS messages, MAX(ts) AS last_ts
    FROM transcript
    WHERE substr(session_key, 1, length(CAST($1 AS TEXT))) = CAST($1 AS TEXT)
    GROUP BY session_key HAVING MAX(ts) >= $2
    ORDER BY last_ts DESC, session_key LIMIT $3";

pub const RUNS: &str = "SELECT run_id, agent_id, status, model, error_code, error_message,
    attempt, duration_ms, seq, ts FROM runs WHERE session_key = $1 ORDER BY seq, run_id";

pub const USAGE: &str = "SELECT run_id, model, prompt_tokens, completion_tokens, total_tokens,
    cached_tokens, reasoning_tokens, cost_usd, ts
    FROM usage WHERE session_key = $1 ORDER BY ts, run_id";

/// Usage per UTC day (`ts` in Unix ms) and model; `$2` is a session key or `''` for all.
pub const USAGE_BY_DAY: &str = "SELECT (ts / 86400000) * 86400000 AS day_ms, model,
    COUNT(*) AS runs,
    CAST(SUM(prompt_tokens) AS BIGINT) AS prompt_tokens,
    CAST(SUM(completion_tokens) AS BIGINT) AS completion_tokens,
    CAST(SUM(total_tokens) AS BIGINT) AS total_tokens,
    CAST(SUM(cached_tokens) AS BIGINT) AS cached_tokens,
    CAST(SUM(reasoning_tokens) AS BIGINT) AS reasoning_tokens,
    SUM(cost_usd) AS cost_usd
    FROM usage WHERE ts >= $1 AND ($2 = '' OR session_key = $2)
    GROUP BY day_ms, model ORDER BY day_ms, model";

pub const APPLIED_SEQ: &str = "SELECT last_seq FROM sessions WHERE session_key = $1";

/// A transcript row as a [`clawbus_wire::HistoryEntry`].
macro_rules! history_entry {
    ($r:expr) => {{
        use sqlx::Row;
        let r = $r;
        Ok::<_, sqlx::Error>(clawbus_wire::HistoryEntry {
            entry_id: r.try_get("entry_id")?,
            run_id: r.try_get("run_id")?,
            role: clawbus_wire::Role::parse(r.try_get::<&str, _>("role")?),
            content: r.try_get("content")?,
            seq: r.try_get::<i64, _>("seq")? as u64,
            ts: r.try_get("ts")?,
            // Written by this store from valid values; unreadable JSON (a hand-edited
            // row) reads as none rather than failing history.
            tool_calls: r
                .try_get::<Option<&str>, _>("tool_calls")?
                .and_then(|j| serde_json::from_str(j).ok())
                .unwrap_or_default(),
            tool_call_id: r.try_get("tool_call_id")?,
            name: r.try_get("tool_name")?,
            summary: r
                .try_get::<Option<&str>, _>("summary")?
                .and_then(|j| serde_json::from_str(j).ok()),
            usage: r
                .try_get::<Option<&str>, _>("usage")?
                .and_then(|j| serde_json::from_str(j).ok()),
        })
    }};
}
pub(crate) use history_entry;

/// Implements [`crate::TranscriptStore`] for a store with a `pool` (queries) and a
/// `writer` (the group-committing [`crate::batch::Writer`]).
macro_rules! store_methods {
    () => {
        async fn apply_transcript(
            &self,
            ev: &clawbus_wire::TranscriptEvent,
            seq: u64,
            ts: i64,
        ) -> Result<(), StoreError> {
            self.writer
                .write($crate::batch::WriteOp::Transcript(ev.clone(), seq, ts))
                .await
        }

        async fn apply_run(
            &self,
            ev: &clawbus_wire::RunEvent,
            seq: u64,
            ts: i64,
        ) -> Result<(), StoreError> {
            self.writer
                .write($crate::batch::WriteOp::Run(ev.clone(), seq, ts))
                .await
        }

        async fn history(
            &self,
            session_key: &str,
            limit: u32,
        ) -> Result<Vec<clawbus_wire::HistoryEntry>, StoreError> {
            let rows = sqlx::query($crate::sql::HISTORY)
                .bind(session_key)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?;
            let mut entries = rows
                .iter()
                .map(|r| $crate::sql::history_entry!(r))
                .collect::<Result<Vec<_>, sqlx::Error>>()?;
            // The latest summary stands for what the window leaves out: it comes along
            // when older than the window.
            if limit > 0 && !entries.iter().any(|e| e.summary.is_some()) {
                let summary = sqlx::query($crate::sql::LATEST_SUMMARY)
                    .bind(session_key)
                    .fetch_optional(&self.pool)
                    .await?;
                if let Some(r) = summary {
                    entries.insert(0, $crate::sql::history_entry!(&r)?);
                }
            }
            Ok(entries)
        }

        async fn runs(&self, session_key: &str) -> Result<Vec<$crate::RunRecord>, StoreError> {
            use sqlx::Row;
            let rows = sqlx::query($crate::sql::RUNS)
                .bind(session_key)
                .fetch_all(&self.pool)
                .await?;
            rows.iter()
                .map(|r| {
                    Ok($crate::RunRecord {
                        run_id: r.try_get("run_id")?,
                        agent_id: r.try_get("agent_id")?,
                        status: r.try_get("status")?,
                        model: r.try_get("model")?,
                        error_code: r.try_get("error_code")?,
                        error_message: r.try_get("error_message")?,
                        attempt: r.try_get::<i64, _>("attempt")? as u32,
                        duration_ms: r.try_get::<i64, _>("duration_ms")? as u64,
                        seq: r.try_get::<i64, _>("seq")? as u64,
                        ts: r.try_get("ts")?,
                    })
                })
                .collect()
        }

        async fn usage_by_day(
            &self,
            session_key: Option<&str>,
            since_ms: i64,
        ) -> Result<Vec<$crate::DailyUsage>, StoreError> {
            use sqlx::Row;
            let rows = sqlx::query($crate::sql::USAGE_BY_DAY)
                .bind(since_ms)
                .bind(session_key.unwrap_or(""))
                .fetch_all(&self.pool)
                .await?;
            let n = |r: &_, c| -> Result<u64, sqlx::Error> {
                Ok(sqlx::Row::try_get::<i64, _>(r, c)?.max(0) as u64)
            };
            rows.iter()
                .map(|r| {
                    Ok($crate::DailyUsage {
                        day_ms: r.try_get("day_ms")?,
                        model: r.try_get("model")?,
                        runs: n(r, "runs")?,
                        prompt_tokens: n(r, "prompt_tokens")?,
                        completion_tokens: n(r, "completion_tokens")?,
                        total_tokens: n(r, "total_tokens")?,
                        cached_tokens: n(r, "cached_tokens")?,
                        reasoning_tokens: n(r, "reasoning_tokens")?,
                        cost_usd: r.try_get("cost_usd")?,
                    })
                })
                .collect()
        }

        async fn usage(&self, session_key: &str) -> Result<Vec<$crate::UsageRecord>, StoreError> {
            use sqlx::Row;
            let rows = sqlx::query($crate::sql::USAGE)
                .bind(session_key)
                .fetch_all(&self.pool)
                .await?;
            rows.iter()
                .map(|r| {
                    Ok($crate::UsageRecord {
                        run_id: r.try_get("run_id")?,
                        model: r.try_get("model")?,
                        prompt_tokens: r.try_get::<i64, _>("prompt_tokens")? as u64,
                        completion_tokens: r.try_get::<i64, _>("completion_tokens")? as u64,
                        total_tokens: r.try_get::<i64, _>("total_tokens")? as u64,
                        cached_tokens: r.try_get::<i64, _>("cached_tokens")? as u64,
                        reasoning_tokens: r.try_get::<i64, _>("reasoning_tokens")? as u64,
                        cost_usd: r.try_get("cost_usd")?,
                        ts: r.try_get("ts")?,
                    })
                })
                .collect()
        }

        async fn sessions(
            &self,
            prefix: &str,
            since_ms: i64,
            limit: u32,
        ) -> Result<Vec<clawbus_wire::SessionInfo>, StoreError> {
            use sqlx::Row;
            let rows = sqlx::query($crate::sql::SESSIONS)
                .bind(prefix)
                .bind(since_ms)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?;
            rows.iter()
                .map(|r| {
                    Ok(clawbus_wire::SessionInfo {
                        session_key: r.try_get("session_key")?,
                        messages: r.try_get::<i64, _>("messages")?.max(0) as u64,
                        last_ts: r.try_get("last_ts")?,
                    })
                })
                .collect()
        }

        async fn applied_seq(&self, session_key: &str) -> Result<u64, StoreError> {
            let v: Option<i64> = sqlx::query_scalar($crate::sql::APPLIED_SEQ)
                .bind(session_key)
                .fetch_optional(&self.pool)
                .await?;
            Ok(v.unwrap_or(0) as u64)
        }

        async fn ping(&self) -> Result<(), StoreError> {
            sqlx::query("SELECT 1").execute(&self.pool).await?;
            Ok(())
        }
    };
}
pub(crate) use store_methods;

/// Writes a batch's rows (`&Rows`) inside transaction `$tx`, one multi-row statement
/// per table; `$text` maps each bound string (Postgres cannot store NUL characters).
macro_rules! write_rows {
    ($db:ty, $tx:expr, $rows:expr, $max:literal, $text:path) => {{
        use $crate::batch::ROWS_PER_STATEMENT;
        let rows: &$crate::batch::Rows<'_> = $rows;
        let t = $text;
        for chunk in rows.runs.chunks(ROWS_PER_STATEMENT) {
            let mut q = sqlx::QueryBuilder::<$db>::new(
                "INSERT INTO runs (run_id, session_key, agent_id, status, model, error_code, \
                 error_message, attempt, duration_ms, seq, ts) ",
            );
            q.push_values(chunk, |mut b, r| {
                let ev = r.ev;
                b.push_bind(t(&ev.run_id))
                    .push_bind(t(&ev.session_key))
                    .push_bind(t(&ev.agent_id))
                    .push_bind(ev.status.as_str())
                    .push_bind(ev.model.as_deref().map(t))
                    .push_bind(ev.error.as_ref().map(|e| t(&e.code)))
                    .push_bind(ev.error.as_ref().map(|e| t(&e.message)))
                    .push_bind(i64::from(ev.attempt))
                    .push_bind(ev.duration_ms as i64)
                    .push_bind(r.seq as i64)
                    .push_bind(r.ts);
            });
            // An older state never overwrites a newer one.
            q.push(
                " ON CONFLICT (run_id) DO UPDATE SET status = excluded.status, \
                 model = excluded.model, error_code = excluded.error_code, \
                 error_message = excluded.error_message, attempt = excluded.attempt, \
                 duration_ms = excluded.duration_ms, seq = excluded.seq, ts = excluded.ts \
                 WHERE excluded.seq > runs.seq",
            );
            q.build().execute(&mut *$tx).await?;
        }
        for chunk in rows.usage.chunks(ROWS_PER_STATEMENT) {
            let mut q = sqlx::QueryBuilder::<$db>::new(
                "INSERT INTO usage (run_id, session_key, model, prompt_tokens, \
                 completion_tokens, total_tokens, cached_tokens, reasoning_tokens, cost_usd, ts) ",
            );
            q.push_values(chunk, |mut b, r| {
                let u = r.ev.usage.unwrap_or_default();
                b.push_bind(t(&r.ev.run_id))
                    .push_bind(t(&r.ev.session_key))
                    .push_bind(r.ev.model.as_deref().map(t))
                    .push_bind(u.prompt_tokens as i64)
                    .push_bind(u.completion_tokens as i64)
                    .push_bind(u.total_tokens as i64)
                    .push_bind(u.cached_tokens as i64)
                    .push_bind(u.reasoning_tokens as i64)
                    .push_bind(r.ev.cost_usd.filter(|c| c.is_finite()))
                    .push_bind(r.ts);
            });
            q.push(" ON CONFLICT (run_id) DO NOTHING");
            q.build().execute(&mut *$tx).await?;
        }
        for chunk in rows.entries.chunks(ROWS_PER_STATEMENT) {
            let mut q = sqlx::QueryBuilder::<$db>::new(
                "INSERT INTO transcript (entry_id, session_key, run_id, role, content, seq, \
                 idx, ts, tool_calls, tool_call_id, tool_name, summary, usage) ",
            );
            q.push_values(chunk, |mut b, e| {
                b.push_bind(t(e.entry_id))
                    .push_bind(t(e.session_key))
                    .push_bind(t(e.run_id))
                    .push_bind(e.role.as_str())
                    .push_bind(t(e.content))
                    .push_bind(e.seq as i64)
                    .push_bind(e.idx as i64)
                    .push_bind(e.ts)
                    .push_bind(e.tool_calls.as_deref().map(t))
                    .push_bind(e.tool_call_id.map(t))
                    .push_bind(e.tool_name.map(t))
                    .push_bind(e.summary.as_deref().map(t))
                    .push_bind(e.usage.as_deref().map(t));
            });
            q.push(" ON CONFLICT (entry_id) DO NOTHING");
            q.build().execute(&mut *$tx).await?;
        }
        for chunk in rows.sessions.chunks(ROWS_PER_STATEMENT) {
            let mut q = sqlx::QueryBuilder::<$db>::new(
                "INSERT INTO sessions (session_key, agent_id, created_at, updated_at, last_seq) ",
            );
            q.push_values(chunk, |mut b, s| {
                b.push_bind(t(s.session_key))
                    .push_bind(t(s.agent_id))
                    .push_bind(s.first_ts)
                    .push_bind(s.last_ts)
                    .push_bind(s.seq as i64);
            });
            // The applied sequence only moves forward.
            q.push(concat!(
                " ON CONFLICT (session_key) DO UPDATE SET updated_at = ",
                $max,
                "(sessions.updated_at, excluded.updated_at), last_seq = ",
                $max,
                "(sessions.last_seq, excluded.last_seq)"
            ));
            q.build().execute(&mut *$tx).await?;
        }
    }};
}
pub(crate) use write_rows;
