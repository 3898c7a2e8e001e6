//! The store's database layer on both backends: SQLite (a file in a temporary
//! directory) and Postgres (a throw-away cluster from Debian's binaries). Every test
//! runs against each, through the store's own interface.

use std::sync::Arc;

use clawbus_store::{Database, TranscriptStore};
use clawbus_testkit::PostgresServer;
use clawbus_wire::{ErrorInfo, Role, RunEntry, RunEvent, RunStatus, TranscriptEvent, Usage};

/// A database and what keeps it alive.
struct Db {
    db: Database,
    url: String,
    _sqlite: Option<tempfile::TempDir>,
    _pg: Option<PostgresServer>,
}

async fn sqlite() -> Db {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("clawbus.db").display());
    Db {
        db: Database::open(&url).await.unwrap(),
        url,
        _sqlite: Some(dir),
        _pg: None,
    }
}

async fn postgres() -> Db {
    let pg = PostgresServer::start().await.unwrap();
    let url = pg.url.clone();
    Db {
        db: Database::open(&url).await.unwrap(),
        url,
        _sqlite: None,
        _pg: Some(pg),
    }
}

/// One test per backend for each scenario.
macro_rules! on_both {
    ($($name:ident),* $(,)?) => {
        mod on_sqlite {
            $(#[tokio::test] async fn $name() { super::$name(super::sqlite().await).await })*
        }
        mod on_postgres {
            $(#[tokio::test] async fn $name() { super::$name(super::postgres().await).await })*
        }
    };
}

on_both!(
    a_turn_is_stored_once_in_order,
    an_older_run_state_never_overwrites_a_newer,
    history_returns_the_newest_entries_oldest_first,
    hostile_text_round_trips,
    two_replicas_writing_the_same_events_store_each_once,
    migrations_run_again_harmlessly,
    usage_sums_per_day_and_model,
    tool_steps_round_trip_in_order,
    a_summary_older_than_the_window_comes_along,
);

async fn a_summary_older_than_the_window_comes_along(d: Db) {
    let s = "agent:main:compacted";
    for i in 0..3u64 {
        let t = turn(&format!("r{i}"), s, &format!("q{i}"), &format!("a{i}"));
        d.db.apply_run(&t, 10 + i, 0).await.unwrap();
    }
    let mut t = turn("r3", s, "q3", "a3");
    t.entries.insert(
        0,
        RunEntry {
            entry_id: "r3:summary".into(),
            role: Role::System,
            content: "they asked q0 and q1".into(),
            summary: Some(clawbus_wire::Summary { first_kept_seq: 12 }),
            ..Default::default()
        },
    );
    d.db.apply_run(&t, 13, 0).await.unwrap();
    for i in 4..10u64 {
        let t = turn(&format!("r{i}"), s, &format!("q{i}"), &format!("a{i}"));
        d.db.apply_run(&t, 10 + i, 0).await.unwrap();
    }
    let h = d.db.history(s, 4).await.unwrap();
    let ids: Vec<&str> = h.iter().map(|e| e.entry_id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "r3:summary",
            "r8:user",
            "r8:assistant",
            "r9:user",
            "r9:assistant"
        ]
    );
    assert_eq!(
        h[0].summary,
        Some(clawbus_wire::Summary { first_kept_seq: 12 })
    );
    // Inside the window it is not repeated.
    let h = d.db.history(s, 100).await.unwrap();
    assert_eq!(h.iter().filter(|e| e.summary.is_some()).count(), 1);
    assert_eq!(h.len(), 21);
}

async fn tool_steps_round_trip_in_order(d: Db) {
    let s = "agent:main:tools";
    let call = clawbus_wire::FunctionCall {
        id: "call_1".into(),
        name: "write".into(),
        arguments: r#"{"path":"a.txt","content":"it's \"quoted\" 🦀"}"#.into(),
        signature: Some("c2ln".into()),
    };
    let mut t = turn("t1", s, "write a.txt", "Done.");
    let answer = t.entries.pop().unwrap();
    t.entries.push(RunEntry {
        entry_id: "t1:step:0".into(),
        role: Role::Assistant,
        content: "Writing.".into(),
        tool_calls: vec![call.clone()],
        usage: Some(Usage {
            prompt_tokens: 7,
            completion_tokens: 3,
            total_tokens: 10,
            ..Default::default()
        }),
        ..Default::default()
    });
    t.entries.push(RunEntry {
        entry_id: "t1:step:1".into(),
        role: Role::Tool,
        content: "wrote 12 bytes".into(),
        tool_call_id: Some("call_1".into()),
        name: Some("write".into()),
        ..Default::default()
    });
    t.entries.push(answer);
    d.db.apply_run(&t, 7, 1).await.unwrap();
    let h = d.db.history(s, 10).await.unwrap();
    let ids: Vec<&str> = h.iter().map(|e| e.entry_id.as_str()).collect();
    assert_eq!(ids, ["t1:user", "t1:step:0", "t1:step:1", "t1:assistant"]);
    assert_eq!(h[1].tool_calls, vec![call]);
    assert_eq!(h[2].role, Role::Tool);
    assert_eq!(h[2].tool_call_id.as_deref(), Some("call_1"));
    assert_eq!(h[2].name.as_deref(), Some("write"));
    assert!(h[0].tool_calls.is_empty() && h[3].tool_call_id.is_none());
    assert_eq!(h[1].usage.map(|u| u.total_tokens), Some(10));
    assert_eq!(h[2].usage, None);
}

fn run(id: &str, session: &str, status: RunStatus, entries: &[(Role, &str)]) -> RunEvent {
    RunEvent {
        run_id: id.into(),
        session_key: session.into(),
        agent_id: "main".into(),
        status,
        model: Some("gpt-4o-mini".into()),
        usage: Some(Usage {
            prompt_tokens: 10,
            completion_tokens: 5,
            total_tokens: 15,
            cached_tokens: 4,
            reasoning_tokens: 2,
        }),
        cost_usd: Some(0.001),
        error: (status == RunStatus::Failed).then(|| ErrorInfo {
            code: "provider_unavailable".into(),
            message: "503".into(),
        }),
        attempt: 1,
        duration_ms: 12,
        entries: entries
            .iter()
            .map(|(role, text)| RunEntry {
                entry_id: format!("{id}:{}", role.as_str()),
                role: *role,
                content: text.to_string(),
                ..Default::default()
            })
            .collect(),
    }
}

fn turn(id: &str, session: &str, user: &str, answer: &str) -> RunEvent {
    run(
        id,
        session,
        RunStatus::Completed,
        &[(Role::User, user), (Role::Assistant, answer)],
    )
}

async fn texts(db: &Database, session: &str) -> Vec<(Role, String)> {
    db.history(session, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.role, e.content))
        .collect()
}

async fn a_turn_is_stored_once_in_order(d: Db) {
    let s = "agent:main:main";
    let t1 = turn("r1", s, "hello", "hi there");
    d.db.apply_run(&t1, 5, 1_000).await.unwrap();
    // Redelivered: nothing changes.
    d.db.apply_run(&t1, 5, 1_000).await.unwrap();
    // A single transcript event from another writer, after it.
    let note = TranscriptEvent {
        session_key: s.into(),
        entry_id: "note:1".into(),
        run_id: "note".into(),
        agent_id: "main".into(),
        role: Role::User,
        content: "a note".into(),
    };
    d.db.apply_transcript(&note, 6, 1_001).await.unwrap();
    d.db.apply_transcript(&note, 6, 1_001).await.unwrap();
    d.db.apply_run(&turn("r2", s, "again", "and again"), 8, 1_002)
        .await
        .unwrap();
    assert_eq!(
        texts(&d.db, s).await,
        vec![
            (Role::User, "hello".into()),
            (Role::Assistant, "hi there".into()),
            (Role::User, "a note".into()),
            (Role::User, "again".into()),
            (Role::Assistant, "and again".into()),
        ]
    );
    let h = d.db.history(s, 100).await.unwrap();
    assert_eq!(h[0].entry_id, "r1:user");
    assert_eq!(
        (h[0].seq, h[1].seq),
        (5, 5),
        "entries of one event share its sequence"
    );
    assert_eq!(d.db.applied_seq(s).await.unwrap(), 8);
    assert_eq!(d.db.applied_seq("agent:main:nobody").await.unwrap(), 0);
    let runs = d.db.runs(s).await.unwrap();
    let ids: Vec<&str> = runs.iter().map(|r| r.run_id.as_str()).collect();
    assert_eq!(ids, ["r1", "r2"]);
    assert_eq!(runs[0].status, "completed");
    assert_eq!(runs[0].model.as_deref(), Some("gpt-4o-mini"));
    assert_eq!(
        (runs[0].attempt, runs[0].duration_ms, runs[0].seq),
        (1, 12, 5)
    );
    let usage = d.db.usage(s).await.unwrap();
    assert_eq!(usage.len(), 2, "one usage row per run");
    assert_eq!(
        (
            usage[0].prompt_tokens,
            usage[0].completion_tokens,
            usage[0].total_tokens,
            usage[0].cached_tokens,
            usage[0].reasoning_tokens
        ),
        (10, 5, 15, 4, 2)
    );
    // A reader opened by URL (what tests and operators use) sees the same.
    let reader = Database::open_reader(&d.url).await.unwrap();
    assert_eq!(reader.runs(s).await.unwrap(), runs);
    assert!(
        reader.apply_run(&t1, 5, 1_000).await.is_err(),
        "a reader refuses writes"
    );
}

async fn an_older_run_state_never_overwrites_a_newer(d: Db) {
    let s = "agent:main:order";
    let failed = run("r1", s, RunStatus::Failed, &[(Role::User, "q")]);
    d.db.apply_run(&failed, 20, 2_000).await.unwrap();
    let started = run("r1", s, RunStatus::Started, &[]);
    d.db.apply_run(&started, 10, 1_000).await.unwrap();
    let runs = d.db.runs(s).await.unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].status, "failed");
    assert_eq!(runs[0].error_code.as_deref(), Some("provider_unavailable"));
    assert_eq!(runs[0].seq, 20);
    // Concurrent writes of both states (one group commit or two) end the same.
    let (done, started) = (
        run("r2", s, RunStatus::Completed, &[]),
        run("r2", s, RunStatus::Started, &[]),
    );
    let (a, b) = tokio::join!(
        d.db.apply_run(&done, 40, 4_000),
        d.db.apply_run(&started, 30, 3_000),
    );
    a.unwrap();
    b.unwrap();
    let runs = d.db.runs(s).await.unwrap();
    assert_eq!(runs[1].run_id, "r2");
    assert_eq!(runs[1].status, "completed");
}

async fn usage_sums_per_day_and_model(d: Db) {
    const DAY: i64 = 86_400_000;
    let day1 = 20_000 * DAY;
    let mut other = turn("o1", "agent:main:other", "a", "b");
    other.model = Some("anthropic/claude".into());
    other.cost_usd = None;
    for (ev, seq, ts) in [
        (turn("u1", "agent:main:u", "a", "b"), 1, day1 + 5),
        (turn("u2", "agent:main:u", "c", "d"), 2, day1 + DAY - 1),
        (turn("u3", "agent:main:u", "e", "f"), 3, day1 + DAY),
        (other, 4, day1 + 10),
    ] {
        d.db.apply_run(&ev, seq, ts).await.unwrap();
    }
    let all = d.db.usage_by_day(None, day1).await.unwrap();
    let rows: Vec<_> = all
        .iter()
        .map(|u| (u.day_ms, u.model.as_deref(), u.runs, u.total_tokens))
        .collect();
    assert_eq!(
        rows,
        vec![
            (day1, Some("anthropic/claude"), 1, 15),
            (day1, Some("gpt-4o-mini"), 2, 30),
            (day1 + DAY, Some("gpt-4o-mini"), 1, 15),
        ]
    );
    assert_eq!(all[1].prompt_tokens, 20);
    assert_eq!((all[1].cached_tokens, all[1].reasoning_tokens), (8, 4));
    // Costs as the runs recorded them; none for runs without prices.
    assert!(
        (all[1].cost_usd.unwrap() - 0.002).abs() < 1e-12,
        "{:?}",
        all[1]
    );
    assert_eq!(all[0].cost_usd, None);
    let one =
        d.db.usage_by_day(Some("agent:main:other"), 0)
            .await
            .unwrap();
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].completion_tokens, 5);
    let later = d.db.usage_by_day(None, day1 + DAY).await.unwrap();
    assert_eq!(later.len(), 1);
    // Hostile session keys are values, not SQL.
    let none = d.db.usage_by_day(Some("' OR '1'='1"), 0).await.unwrap();
    assert!(none.is_empty());
}

async fn history_returns_the_newest_entries_oldest_first(d: Db) {
    let s = "agent:main:long";
    for i in 0..30u64 {
        let t = turn(&format!("r{i:02}"), s, &format!("q{i}"), &format!("a{i}"));
        d.db.apply_run(&t, 100 + i, i as i64).await.unwrap();
    }
    let h = d.db.history(s, 5).await.unwrap();
    let got: Vec<&str> = h.iter().map(|e| e.content.as_str()).collect();
    assert_eq!(got, ["a27", "q28", "a28", "q29", "a29"]);
    assert!(d.db.history(s, 0).await.unwrap().is_empty());
    assert!(d
        .db
        .history("agent:main:other", 10)
        .await
        .unwrap()
        .is_empty());
}

async fn hostile_text_round_trips(d: Db) {
    let s = "agent:main:'; DROP TABLE transcript; --";
    let nasty = [
        "Robert'); DROP TABLE runs;--",
        "emoji 🦀 and RTL \u{202e}txet",
        "$1 ?2 :name @x",
        &"x".repeat(200_000),
        "nul\0inside",
    ];
    for (i, text) in nasty.iter().enumerate() {
        let t = turn(&format!("h{i}"), s, text, "ok");
        d.db.apply_run(&t, 10 + i as u64, 0).await.unwrap();
    }
    let got = texts(&d.db, s).await;
    assert_eq!(got.len(), 2 * nasty.len());
    for (i, text) in nasty.iter().enumerate() {
        let stored = &got[2 * i].1;
        if text.contains('\0') && d.db.backend() == "postgres" {
            // PostgreSQL text cannot hold NUL: it is kept as U+FFFD.
            assert_eq!(stored, &text.replace('\0', "\u{FFFD}"));
        } else {
            assert_eq!(stored, text);
        }
    }
    assert_eq!(
        d.db.runs(s).await.unwrap().len(),
        nasty.len(),
        "tables intact"
    );
}

async fn two_replicas_writing_the_same_events_store_each_once(d: Db) {
    // Two store processes on one database during a handover: both apply the same
    // events, in different orders, at once.
    let second = Arc::new(Database::open(&d.url).await.unwrap());
    let first = Arc::new(d.db.clone());
    let events: Vec<(RunEvent, u64)> = (0..200u64)
        .map(|i| {
            let s = format!("agent:main:s{}", i % 7);
            (
                turn(&format!("r{i}"), &s, &format!("q{i}"), &format!("a{i}")),
                1 + i,
            )
        })
        .collect();
    let events = Arc::new(events);
    let mut tasks = Vec::new();
    for (db, reverse) in [(first, false), (second, true)] {
        for part in 0..4 {
            let (db, events) = (db.clone(), events.clone());
            tasks.push(tokio::spawn(async move {
                let n = events.len();
                for k in (part..n).step_by(4) {
                    let (ev, seq) = &events[if reverse { n - 1 - k } else { k }];
                    db.apply_run(ev, *seq, 0).await.unwrap();
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut total = 0;
    for i in 0..7 {
        let s = format!("agent:main:s{i}");
        let h = d.db.history(&s, 1000).await.unwrap();
        let mut ids: Vec<&str> = h.iter().map(|e| e.entry_id.as_str()).collect();
        let n = ids.len();
        ids.dedup();
        assert_eq!(ids.len(), n, "each entry once");
        assert!(h.windows(2).all(|w| w[0].seq <= w[1].seq), "in order");
        total += n;
        let last = h.last().unwrap().seq;
        assert_eq!(d.db.applied_seq(&s).await.unwrap(), last);
    }
    assert_eq!(total, 400);
}

async fn migrations_run_again_harmlessly(d: Db) {
    d.db.apply_run(&turn("r1", "agent:main:m", "q", "a"), 1, 0)
        .await
        .unwrap();
    // A replica starting later migrates the same database again.
    let again = Database::open(&d.url).await.unwrap();
    assert_eq!(texts(&again, "agent:main:m").await.len(), 2);
    assert!(again.ping().await.is_ok());
}

#[tokio::test]
async fn an_unknown_database_url_is_refused_clearly() {
    let e = Database::open("mysql://db/clawbus")
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(e.contains("sqlite://") && e.contains("postgres://"), "{e}");
}
