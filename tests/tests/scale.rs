//! Scale-out (DESIGN.md "Scale-out: lanes and ownership"): several replicas of every
//! service share the work; kill -9 or a frozen replica loses, doubles and reorders
//! nothing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clawbus_bus::{ownership, subjects, topology};
use clawbus_testkit::{wait_for, Service, Suite, SuiteOpts};
use clawbus_tests::{outbound_messages, stream_messages, transcript};
use serde_json::Value;

/// The value of an unlabelled metric in a Prometheus text page (0 when absent).
fn metric(page: &str, name: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Partitions a replica of the agent (turn partitions) or the store (event
/// partitions) owns now.
async fn partitions_owned(s: &Suite, svc: Service, i: usize) -> f64 {
    let url = format!("{}/metrics", s.replica_admin_url((svc, i)));
    let name = format!("clawbus_{}_partitions_owned", svc.name());
    metric(&s.get_text(&url).await, &name)
}

/// Waits until each replica listed of `svc` owns exactly its rendezvous share of the
/// partitions (not merely all of them between them: right after start one may still
/// hold, and be handing over, partitions that belong to another).
async fn wait_balanced(s: &Suite, svc: Service, replicas: &[usize]) -> bool {
    let members: Vec<String> = replicas
        .iter()
        .map(|i| format!("{}-{i}", svc.name()))
        .collect();
    let partitions = if svc == Service::Router {
        topology::ROUTER_PARTITIONS
    } else {
        topology::PARTITIONS
    };
    wait_for(Duration::from_secs(30), || async {
        for (i, m) in replicas.iter().zip(&members) {
            let share = (0..partitions)
                .filter(|p| ownership::owner(&members, *p) == Some(m.as_str()))
                .count();
            if partitions_owned(s, svc, *i).await != share as f64 {
                return false;
            }
        }
        true
    })
    .await
}

/// The user messages of each provider call, grouped by the session of the last one.
fn provider_calls(s: &Suite) -> HashMap<String, Vec<Vec<String>>> {
    let mut by_session: HashMap<String, Vec<Vec<String>>> = HashMap::new();
    for r in s.emu().requests() {
        let users: Vec<String> = r["messages"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["role"] == "user")
            .map(|m| m["content"].as_str().unwrap().to_owned())
            .collect();
        let session = users
            .last()
            .and_then(|u| u.split(' ').next())
            .unwrap_or_default()
            .to_owned();
        by_session.entry(session).or_default().push(users);
    }
    by_session
}

fn turn_text(session: usize, turn: usize) -> String {
    format!("s{session} turn {turn}")
}

/// Sessions each sending their turns one after another, in parallel.
struct Load {
    sessions: usize,
    turns: usize,
    answered: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<Result<Duration, String>>>,
}

impl Load {
    fn start(s: &Suite, sessions: usize, turns: usize) -> Load {
        let answered = Arc::new(AtomicUsize::new(0));
        let tasks = (0..sessions)
            .map(|i| {
                let (http, url, token, answered) = (
                    s.http.clone(),
                    format!("{}/v1/chat/completions", s.gateway_url),
                    s.token.clone(),
                    answered.clone(),
                );
                tokio::spawn(async move {
                    let mut slowest = Duration::ZERO;
                    for k in 0..turns {
                        let text = turn_text(i, k);
                        let started = Instant::now();
                        let body = serde_json::json!({"model": "clawbus", "messages": [{"role": "user", "content": text}]});
                        let r = http
                            .post(&url)
                            .bearer_auth(&token)
                            .header("x-clawbus-session-key", format!("agent:main:s{i}"))
                            .json(&body)
                            .send()
                            .await
                            .unwrap();
                        if r.status() != 200 {
                            // Reported with a diagnosis in `verify`.
                            return Err(format!("{text}: HTTP {}", r.status()));
                        }
                        let v: Value = r.json().await.unwrap();
                        assert_eq!(
                            v["choices"][0]["message"]["content"],
                            format!("Echo: {text}")
                        );
                        slowest = slowest.max(started.elapsed());
                        answered.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(slowest)
                })
            })
            .collect();
        Load {
            sessions,
            turns,
            answered,
            tasks,
        }
    }

    /// Waits until this fraction of all turns has been answered.
    async fn reached(&self, fraction: f64) -> bool {
        let n = ((self.sessions * self.turns) as f64 * fraction) as usize;
        wait_for(Duration::from_secs(120), || async {
            self.answered.load(Ordering::SeqCst) >= n
        })
        .await
    }

    /// Waits for every session, then checks that nothing was lost, doubled or
    /// reordered: every turn answered (checked as it ran), the provider saw each turn
    /// with exactly the earlier turns of its session, one reply per turn on the bus,
    /// one transcript entry per message.
    async fn verify(self, s: &Suite) {
        let mut slowest = Duration::ZERO;
        let mut failed = Vec::new();
        for t in self.tasks {
            match t.await.unwrap() {
                Ok(d) => slowest = slowest.max(d),
                Err(e) => failed.push(e),
            }
        }
        if !failed.is_empty() {
            panic!("unanswered turns: {}", diagnose(s, &failed).await);
        }
        assert!(
            slowest < Duration::from_secs(30),
            "a turn waited {slowest:?}"
        );
        let calls = provider_calls(s);
        for i in 0..self.sessions {
            let expected: Vec<String> = (0..self.turns).map(|k| turn_text(i, k)).collect();
            let seen = &calls[&format!("s{i}")];
            for users in seen {
                assert_eq!(
                    users.as_slice(),
                    &expected[..users.len()],
                    "session {i}: a call saw a gap, a duplicate or a reordering"
                );
            }
            for k in 0..self.turns {
                assert!(
                    seen.iter().any(|u| u.len() == k + 1),
                    "session {i} turn {k} never reached the provider"
                );
            }
        }
        let outs = outbound_messages(&s.nats.url, "claw.v1.out.http.default")
            .await
            .unwrap();
        assert_eq!(outs.len(), self.sessions * self.turns, "one reply per turn");
        let db = clawbus_tests::storage(s).await;
        for i in [0, self.sessions / 2, self.sessions - 1] {
            let key = format!("agent:main:s{i}");
            let n = 2 * self.turns;
            assert!(
                wait_for(Duration::from_secs(20), || async {
                    transcript(&db, &key).await.is_ok_and(|t| t.len() == n)
                })
                .await,
                "session {i} transcript complete"
            );
            let t = transcript(&db, &key).await.unwrap();
            for k in 0..self.turns {
                assert_eq!(t[2 * k].1, turn_text(i, k), "session {i} order");
            }
        }
    }
}

/// Where each unanswered turn (`"<text>: HTTP <status>"`) stopped on its way: the
/// inbound stream, the turn queue, the provider, the reply stream, the dead letters,
/// and what the services logged about it.
async fn diagnose(s: &Suite, failed: &[String]) -> String {
    let read = |stream: &'static str, filter: &'static str| async move {
        stream_messages(&s.nats.url, stream, filter)
            .await
            .map_err(|e| format!("reading {stream}: {e}"))
    };
    let inbound: HashMap<String, String> = match read(topology::STREAM_INBOUND, "claw.v1.in.>")
        .await
    {
        Ok(ms) => ms
            .iter()
            .filter_map(|m| clawbus_wire::decode::<clawbus_wire::InboundMessage>(&m.payload).ok())
            .map(|e| (e.body.text, e.id))
            .collect(),
        Err(e) => return e,
    };
    let outs = match outbound_messages(&s.nats.url, "claw.v1.out.http.default").await {
        Ok(o) => o,
        Err(e) => return format!("reading the replies: {e}"),
    };
    let queued: Vec<String> = match read(topology::STREAM_TURNS, "claw.v1.turn.>").await {
        Ok(ms) => ms
            .iter()
            .filter_map(|m| clawbus_wire::decode::<clawbus_wire::TurnRequest>(&m.payload).ok())
            .map(|e| e.body.inbound_id)
            .collect(),
        Err(e) => return e,
    };
    let dead = read(topology::STREAM_DEAD_LETTERS, "claw.v1.dlq.>")
        .await
        .unwrap_or_default();
    let seen: Vec<String> = s
        .emu()
        .requests()
        .iter()
        .filter_map(|r| {
            r["messages"].as_array()?.last()?["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    let logs: Vec<(String, String)> = std::fs::read_dir(s.state.path().join("logs"))
        .map(|d| {
            d.flatten()
                .map(|e| {
                    let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                    (e.file_name().to_string_lossy().into_owned(), text)
                })
                .collect()
        })
        .unwrap_or_default();
    failed
        .iter()
        .map(|f| {
            let text = f.rsplit_once(": HTTP").map_or(f.as_str(), |(t, _)| t);
            let id = inbound.get(text);
            let calls = seen.iter().filter(|c| *c == text).count();
            let replies = outs.iter().filter(|o| Some(&o.inbound_id) == id).count();
            let waiting = queued.iter().filter(|q| Some(*q) == id).count();
            let letters = id.map_or(0, |id| {
                dead.iter()
                    .filter(|m| String::from_utf8_lossy(&m.payload).contains(id.as_str()))
                    .count()
            });
            let said: Vec<String> = id
                .into_iter()
                .flat_map(|id| {
                    logs.iter().flat_map(move |(file, text)| {
                        text.lines()
                            .filter(move |l| l.contains(id.as_str()))
                            .map(move |l| format!("{file}: {l}"))
                    })
                })
                .take(20)
                .collect();
            format!(
                "[{f}: inbound {id:?}, turns still queued {waiting}, provider calls {calls}, \
                 replies on the bus {replies}, dead letters {letters}, logged:\n{}]",
                said.join("\n")
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A suite with two replicas of router, agent and store (on a `cluster`-node NATS
/// cluster, or one server for 0), once the agents hold their shares of the partitions.
async fn two_replicas_of_everything(cluster: usize) -> Suite {
    let s = Suite::start(SuiteOpts {
        replicas: 2,
        cluster,
        ..Default::default()
    })
    .await
    .unwrap();
    for svc in [Service::Agent, Service::Store, Service::Router] {
        assert!(
            wait_balanced(&s, svc, &[0, 1]).await,
            "{svc:?} replicas share the partitions"
        );
    }
    s
}

#[tokio::test]
async fn replicas_killed_mid_load_lose_double_and_reorder_nothing() {
    let mut s = two_replicas_of_everything(0).await;
    let load = Load::start(&s, 200, 10);
    // kill -9 one replica of agent, router and store in turn, mid-load.
    for (step, victim) in [
        (Service::Agent, 1),
        (Service::Router, 0),
        (Service::Store, 0),
    ]
    .into_iter()
    .enumerate()
    {
        assert!(
            load.reached((step + 1) as f64 / 4.0).await,
            "load progresses"
        );
        s.kill9_replica(victim).await.unwrap();
        s.restart_replica(victim).await.unwrap();
    }
    load.verify(&s).await;
}

#[tokio::test]
async fn a_nats_node_killed_mid_load_loses_and_doubles_nothing() {
    let mut s = two_replicas_of_everything(3).await;
    let load = Load::start(&s, 100, 10);
    assert!(load.reached(0.3).await);
    s.nats.kill_node(1);
    assert!(load.reached(0.6).await, "the suite goes on with two nodes");
    s.nats.restart_node(1).await.unwrap();
    load.verify(&s).await;
}

#[tokio::test]
async fn a_frozen_agent_whose_lease_expired_is_fenced_off() {
    let mut s = two_replicas_of_everything(0).await;
    let page = s
        .get_text(&format!(
            "{}/metrics",
            s.replica_admin_url((Service::Agent, 1))
        ))
        .await;
    assert!(
        page.contains(r#"clawbus_replica_info{replica="agent-1",service="agent"} 1"#),
        "each replica names itself in its metrics"
    );
    // A session whose partition agent-1 owns.
    let members = vec!["agent-0".to_owned(), "agent-1".to_owned()];
    let key = (0..)
        .map(|n| format!("agent:main:frozen-{n}"))
        .find(|k| {
            ownership::owner(&members, subjects::partition(k, topology::PARTITIONS))
                == Some("agent-1")
        })
        .unwrap();
    s.emu().hold();
    let req = s.chat_in(&key, "who answers?");
    let call = tokio::spawn(async move { req.send().await.unwrap().json::<Value>().await });
    assert!(
        wait_for(Duration::from_secs(10), || async { s.emu().held() == 1 }).await,
        "agent-1 is in the model call"
    );
    // Freeze agent-1 mid-call: its lease expires and agent-0 takes every partition.
    s.pause_replica((Service::Agent, 1), true).unwrap();
    assert!(
        wait_for(Duration::from_secs(20), || async {
            partitions_owned(&s, Service::Agent, 0).await == f64::from(topology::PARTITIONS)
        })
        .await,
        "agent-0 took over within the lease TTL"
    );
    assert!(
        wait_for(Duration::from_secs(20), || async { s.emu().held() == 2 }).await,
        "agent-0 runs the orphaned turn"
    );
    s.emu().release();
    let v = tokio::time::timeout(Duration::from_secs(30), call)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "Echo: who answers?");
    // Thaw agent-1: it finishes its model call and finds its lease gone.
    s.pause_replica((Service::Agent, 1), false).unwrap();
    let agent1 = format!("{}/metrics", s.replica_admin_url((Service::Agent, 1)));
    assert!(
        wait_for(Duration::from_secs(20), || async {
            metric(
                &s.get_text(&agent1).await,
                "clawbus_agent_fenced_turns_total",
            ) == 1.0
        })
        .await,
        "the stale owner's results were fenced off"
    );
    let outs = outbound_messages(&s.nats.url, "claw.v1.out.http.default")
        .await
        .unwrap();
    assert_eq!(
        outs.iter().filter(|o| o.session_key == key).count(),
        1,
        "one reply"
    );
    let db = clawbus_tests::storage(&s).await;
    assert!(
        wait_for(Duration::from_secs(10), || async {
            transcript(&db, &key).await.is_ok_and(|t| t.len() == 2)
        })
        .await
    );
    // And the partitions come back to agent-1 once it is alive again.
    assert!(
        wait_balanced(&s, Service::Agent, &[0, 1]).await,
        "rebalanced after the thaw"
    );
    s.kill9_replica((Service::Agent, 1)).await.unwrap();
}
