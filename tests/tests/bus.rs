//! The bus layer against a real nats-server: topology provisioning and drift, and the
//! consumer runner's ordering, backpressure, retries, dead letters, progress acks and
//! shutdown.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use clawbus_bus::consumer::{run, Delivery, Handler, Outcome, RunnerOpts};
use clawbus_bus::topology::{self, ConsumerDecl};
use clawbus_bus::{Bus, BusError, BusMetrics, ConnectOpts};
use clawbus_testkit::{wait_for, NatsServer};
use clawbus_tests::stream_messages;
use tokio_util::sync::CancellationToken;

async fn bus(nats: &NatsServer) -> Bus {
    let opts = ConnectOpts {
        url: nats.url.clone(),
        name: "test".into(),
        user: None,
        password: None,
    };
    Bus::connect(
        &opts,
        BusMetrics::new(&prometheus_registry()),
        &CancellationToken::new(),
    )
    .await
    .unwrap()
}

fn prometheus_registry() -> clawbus_bus::metrics_registry::Registry {
    clawbus_bus::metrics_registry::Registry::new()
}

#[tokio::test]
async fn provisioning_is_idempotent() {
    let nats = NatsServer::start().unwrap();
    let b = bus(&nats).await;
    topology::provision(&b.js, 1).await.unwrap();
    topology::provision(&b.js, 1).await.unwrap();
    for decl in topology::streams(1) {
        let mut s = b.js.get_stream(&decl.name).await.unwrap();
        let live = s.info().await.unwrap().config.clone();
        assert!(topology::stream_diff(&decl, &live).is_empty());
    }
    assert!(b.js.get_key_value(topology::KV_RUNS).await.is_ok());
}

#[tokio::test]
async fn a_drifted_stream_fails_loudly() {
    let nats = NatsServer::start().unwrap();
    let b = bus(&nats).await;
    b.js.create_stream(stream::Config {
        name: topology::STREAM_INBOUND.into(),
        subjects: vec!["claw.v1.in.>".into()],
        max_age: Duration::from_secs(60),
        ..Default::default()
    })
    .await
    .unwrap();
    let err = topology::provision(&b.js, 1).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, BusError::Drift { .. }), "{msg}");
    assert!(
        msg.contains("CLAW_IN") && msg.contains("max_age") && msg.contains("duplicate_window"),
        "{msg}"
    );
}

#[tokio::test]
async fn a_drifted_consumer_fails_loudly_and_tunables_follow_config() {
    let nats = NatsServer::start().unwrap();
    let b = bus(&nats).await;
    topology::provision(&b.js, 1).await.unwrap();
    let decl = ConsumerDecl::router(0, 8);
    topology::bind_consumer(&b.js, &decl).await.unwrap();
    // Changing a tunable updates the consumer in place.
    let mut c = topology::bind_consumer(&b.js, &ConsumerDecl::router(0, 16))
        .await
        .unwrap();
    assert_eq!(
        c.info().await.unwrap().config.max_ack_pending,
        16 + topology::LANE_CAPACITY
    );
    // An immutable field changed behind our back is drift.
    let s =
        b.js.get_stream(topology::STREAM_DEAD_LETTERS)
            .await
            .unwrap();
    s.create_consumer(consumer::pull::Config {
        durable_name: Some(ConsumerDecl::store(0, 4).durable),
        deliver_policy: consumer::DeliverPolicy::New,
        ..Default::default()
    })
    .await
    .unwrap();
    let odd = ConsumerDecl {
        stream: topology::STREAM_DEAD_LETTERS,
        filter_subjects: vec!["claw.v1.dlq.>".into()],
        ..ConsumerDecl::store(0, 4)
    };
    let err = topology::bind_consumer(&b.js, &odd).await.unwrap_err();
    assert!(matches!(err, BusError::Drift { .. }), "{err}");
    assert!(err.to_string().contains("deliver policy"), "{err}");
}

/// Records what it handled; behaviour scripted per test.
#[derive(Default)]
struct Recorder {
    seen: Mutex<Vec<(String, u32, i64)>>,
    running: AtomicUsize,
    max_running: AtomicUsize,
    /// Handlers running per key now, and the most ever seen for one key.
    running_per_key: Mutex<HashMap<String, usize>>,
    max_per_key: AtomicUsize,
    calls: AtomicUsize,
    mode: Mode,
    /// Held handlers wait until the test opens this.
    gate: Gate,
    /// When the first handler started.
    first_start: Mutex<Option<std::time::Instant>>,
}

/// A gate held handlers (and responders) wait at until the test opens it.
#[derive(Clone)]
struct Gate(tokio::sync::watch::Sender<bool>);

impl Default for Gate {
    fn default() -> Self {
        Gate(tokio::sync::watch::channel(false).0)
    }
}

impl Gate {
    async fn pass(&self) {
        let _ = self.0.subscribe().wait_for(|open| *open).await;
    }

    fn open(&self) {
        self.0.send_replace(true);
    }
}

#[derive(Default, Clone, Copy, PartialEq)]
enum Mode {
    #[default]
    Ack,
    AlwaysRetry,
    /// Handlers of subjects ending with this (any subject: `""`) wait at the gate.
    Held(&'static str),
    PanicOnce,
    /// The message with payload 1 fails its first N deliveries.
    FirstFails(i64),
}

impl Handler for Recorder {
    type Msg = u32;

    fn decode(&self, d: &Delivery) -> Result<u32, String> {
        std::str::from_utf8(&d.payload)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| "payload is not a number".to_owned())
    }

    fn key(&self, d: &Delivery, _m: &u32) -> Option<String> {
        Some(d.subject.clone())
    }

    async fn handle(&self, d: Delivery, seq: u32) -> Outcome {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        self.first_start
            .lock()
            .unwrap()
            .get_or_insert_with(std::time::Instant::now);
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_running.fetch_max(now, Ordering::SeqCst);
        {
            let mut per_key = self.running_per_key.lock().unwrap();
            let k = per_key.entry(d.subject.clone()).or_default();
            *k += 1;
            self.max_per_key.fetch_max(*k, Ordering::SeqCst);
        }
        let out = match self.mode {
            Mode::FirstFails(n) if seq == 1 && d.delivered <= n => {
                Outcome::retry(Duration::from_millis(300), "provider 503")
            }
            Mode::FirstFails(_) => Outcome::Ack,
            Mode::Ack => {
                // Vary scheduling so that out-of-order completion would show.
                for _ in 0..(seq * 7) % 5 {
                    tokio::task::yield_now().await;
                }
                Outcome::Ack
            }
            Mode::AlwaysRetry => Outcome::retry(Duration::from_millis(50), "still failing"),
            Mode::Held(suffix) => {
                if d.subject.ends_with(suffix) {
                    self.gate.pass().await;
                }
                Outcome::Ack
            }
            Mode::PanicOnce => {
                if n == 0 {
                    self.running.fetch_sub(1, Ordering::SeqCst);
                    *self
                        .running_per_key
                        .lock()
                        .unwrap()
                        .get_mut(&d.subject)
                        .unwrap() -= 1;
                    panic!("handler bug");
                }
                Outcome::Ack
            }
        };
        self.seen
            .lock()
            .unwrap()
            .push((d.subject.clone(), seq, d.delivered));
        *self
            .running_per_key
            .lock()
            .unwrap()
            .get_mut(&d.subject)
            .unwrap() -= 1;
        self.running.fetch_sub(1, Ordering::SeqCst);
        out
    }
}

struct Harness {
    _nats: NatsServer,
    bus: Bus,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    rec: Arc<Recorder>,
}

async fn harness(mode: Mode, concurrency: usize, ack_wait: Duration, max_deliver: i64) -> Harness {
    let nats = NatsServer::start().unwrap();
    let b = bus(&nats).await;
    topology::provision(&b.js, 1).await.unwrap();
    let decl = ConsumerDecl {
        stream: topology::STREAM_INBOUND,
        durable: "runner-test".into(),
        group: "runner-test",
        filter_subjects: vec!["claw.v1.in.t.>".into()],
        ack_wait,
        max_deliver,
        max_ack_pending: concurrency as i64 + topology::LANE_CAPACITY,
    };
    let c = topology::bind_consumer(&b.consumer_js, &decl)
        .await
        .unwrap();
    let rec = Arc::new(Recorder {
        mode,
        ..Default::default()
    });
    let shutdown = CancellationToken::new();
    let opts = RunnerOpts {
        name: "runner-test",
        concurrency,
        ack_wait,
        max_deliver,
        drain_deadline: Duration::from_secs(10),
        fence: None,
        permits: None,
        readiness: None,
        rebind: None,
        orphans: None,
    };
    let task = tokio::spawn(run(b.clone(), c, opts, rec.clone(), shutdown.clone()));
    Harness {
        _nats: nats,
        bus: b,
        shutdown,
        task,
        rec,
    }
}

async fn publish_n(js: &jetstream::Context, subject: &str, from: u32, n: u32) {
    let mut acks = Vec::new();
    for i in from..from + n {
        acks.push(
            js.publish(subject.to_owned(), i.to_string().into())
                .await
                .unwrap(),
        );
    }
    for a in acks {
        a.await.unwrap();
    }
}

async fn pending(js: &jetstream::Context) -> (u64, usize) {
    let s = js.get_stream(topology::STREAM_INBOUND).await.unwrap();
    let mut c: consumer::PullConsumer = s.get_consumer("runner-test").await.unwrap();
    let i = c.info().await.unwrap();
    (i.num_pending, i.num_ack_pending)
}

#[tokio::test]
async fn keys_run_in_order_and_in_parallel_within_the_bound() {
    // More keys (6) than the concurrency bound (4), so the bound is what limits.
    let h = harness(Mode::Ack, 4, Duration::from_secs(5), 5).await;
    for k in 0..6 {
        publish_n(&h.bus.js, &format!("claw.v1.in.t.k{k}"), 0, 30).await;
    }
    assert!(
        wait_for(Duration::from_secs(30), || async {
            h.rec.seen.lock().unwrap().len() == 180
        })
        .await
    );
    let seen = h.rec.seen.lock().unwrap().clone();
    let mut by_key: HashMap<String, Vec<u32>> = HashMap::new();
    for (k, s, _) in seen {
        by_key.entry(k).or_default().push(s);
    }
    for (k, seqs) in by_key {
        assert_eq!(seqs, (0..30).collect::<Vec<_>>(), "key {k} out of order");
    }
    let max = h.rec.max_running.load(Ordering::SeqCst);
    assert!(max > 1, "different keys ran in parallel");
    assert!(max <= 4, "never above the bound: {max}");
    assert_eq!(
        h.rec.max_per_key.load(Ordering::SeqCst),
        1,
        "at most one message per key at a time"
    );
    assert!(
        wait_for(Duration::from_secs(5), || async {
            pending(&h.bus.js).await == (0, 0)
        })
        .await
    );
    h.shutdown.cancel();
    h.task.await.unwrap();
}

#[tokio::test]
async fn failing_messages_are_retried_then_dead_lettered() {
    let h = harness(Mode::AlwaysRetry, 4, Duration::from_secs(5), 3).await;
    publish_n(&h.bus.js, "claw.v1.in.t.x", 7, 1).await;
    let url = h._nats.url.clone();
    assert!(
        wait_for(Duration::from_secs(20), || async {
            stream_messages(&url, "CLAW_DLQ", ">")
                .await
                .is_ok_and(|m| m.len() == 1)
        })
        .await
    );
    let dlq = stream_messages(&url, "CLAW_DLQ", ">").await.unwrap();
    assert_eq!(dlq[0].subject, "claw.v1.dlq.runner-test");
    assert_eq!(&dlq[0].payload[..], b"7");
    assert!(dlq[0]
        .header("Clawbus-Dlq-Reason")
        .unwrap()
        .contains("gave up after 3 deliveries: still failing"));
    assert_eq!(
        dlq[0].header("Clawbus-Dlq-Subject").as_deref(),
        Some("claw.v1.in.t.x")
    );
    let deliveries: Vec<i64> = h.rec.seen.lock().unwrap().iter().map(|s| s.2).collect();
    assert_eq!(deliveries, vec![1, 2, 3]);
    assert!(
        wait_for(Duration::from_secs(5), || async {
            pending(&h.bus.js).await == (0, 0)
        })
        .await
    );
}

#[tokio::test]
async fn progress_acks_keep_a_slow_handler_from_being_redelivered() {
    // The handler runs for 3.5x the ack wait before the test lets it finish.
    let h = harness(Mode::Held(""), 2, Duration::from_secs(1), 5).await;
    publish_n(&h.bus.js, "claw.v1.in.t.slow", 1, 1).await;
    assert!(
        wait_for(Duration::from_secs(15), || async {
            h.rec
                .first_start
                .lock()
                .unwrap()
                .is_some_and(|t| t.elapsed() >= Duration::from_millis(3500))
        })
        .await
    );
    h.rec.gate.open();
    assert!(
        wait_for(Duration::from_secs(15), || async {
            !h.rec.seen.lock().unwrap().is_empty()
        })
        .await
    );
    // Once acked, nothing is pending: any redelivery would have come while it ran.
    assert!(
        wait_for(Duration::from_secs(10), || async {
            pending(&h.bus.js).await == (0, 0)
        })
        .await
    );
    assert_eq!(
        h.bus
            .metrics
            .redeliveries
            .with_label_values(&["runner-test"])
            .get(),
        0,
        "never redelivered while in progress"
    );
    assert_eq!(h.rec.calls.load(Ordering::SeqCst), 1);
    assert_eq!(h.rec.seen.lock().unwrap()[0].2, 1);
}

#[tokio::test]
async fn shutdown_finishes_in_flight_work_before_returning() {
    let h = harness(Mode::Held(""), 4, Duration::from_secs(5), 5).await;
    publish_n(&h.bus.js, "claw.v1.in.t.a", 1, 1).await;
    publish_n(&h.bus.js, "claw.v1.in.t.b", 2, 1).await;
    assert!(
        wait_for(Duration::from_secs(10), || async {
            h.rec.running.load(Ordering::SeqCst) == 2
        })
        .await
    );
    h.shutdown.cancel();
    // Stopping waits for the two held handlers ...
    assert!(
        !wait_for(Duration::from_millis(500), || async {
            h.task.is_finished()
        })
        .await,
        "the runner returned with work in flight"
    );
    // ... and returns once they finish.
    h.rec.gate.open();
    h.task.await.unwrap();
    assert_eq!(h.rec.seen.lock().unwrap().len(), 2, "both finished");
    h.bus.consumer_client.flush().await.unwrap();
    assert!(
        wait_for(Duration::from_secs(5), || async {
            pending(&h.bus.js).await == (0, 0)
        })
        .await,
        "and were acked"
    );
}

#[tokio::test]
async fn a_panicking_handler_is_retried_not_fatal() {
    let h = harness(Mode::PanicOnce, 2, Duration::from_secs(5), 5).await;
    publish_n(&h.bus.js, "claw.v1.in.t.p", 1, 1).await;
    assert!(
        wait_for(Duration::from_secs(15), || async {
            h.rec.seen.lock().unwrap().len() == 1
        })
        .await
    );
    assert_eq!(
        h.rec.seen.lock().unwrap()[0].2,
        2,
        "handled on the second delivery"
    );
    assert!(!h.task.is_finished());
}

#[tokio::test]
async fn a_retried_message_keeps_its_lane_and_later_ones_wait() {
    let h = harness(Mode::FirstFails(2), 4, Duration::from_secs(5), 5).await;
    publish_n(&h.bus.js, "claw.v1.in.t.s", 1, 1).await;
    // Wait until the first attempt failed, then send the session's next message.
    assert!(
        wait_for(Duration::from_secs(10), || async {
            !h.rec.seen.lock().unwrap().is_empty()
        })
        .await
    );
    publish_n(&h.bus.js, "claw.v1.in.t.s", 2, 2).await;
    assert!(
        wait_for(Duration::from_secs(20), || async {
            h.rec.seen.lock().unwrap().len() == 5
        })
        .await
    );
    let order: Vec<(u32, i64)> = h
        .rec
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|(_, s, d)| (*s, *d))
        .collect();
    assert_eq!(
        order,
        vec![(1, 1), (1, 2), (1, 3), (2, 1), (3, 1)],
        "later messages wait for the retried one"
    );
}

#[tokio::test]
async fn a_burst_in_one_session_does_not_delay_another() {
    // The burst's first message is held: its session is stuck until the test lets go.
    let h = harness(Mode::Held("burst"), 4, Duration::from_secs(5), 5).await;
    publish_n(&h.bus.js, "claw.v1.in.t.burst", 0, 200).await;
    assert!(
        wait_for(Duration::from_secs(10), || async {
            h.rec.running.load(Ordering::SeqCst) == 1
        })
        .await
    );
    publish_n(&h.bus.js, "claw.v1.in.t.single", 1000, 1).await;
    assert!(
        wait_for(Duration::from_secs(20), || async {
            h.rec.seen.lock().unwrap().iter().any(|s| s.1 == 1000)
        })
        .await
    );
    let seen = h.rec.seen.lock().unwrap().clone();
    let pos = seen.iter().position(|s| s.1 == 1000).unwrap();
    // The burst runs one at a time; the single message overtakes all but a few of it.
    assert!(
        pos <= 5,
        "the other session waited behind {pos} burst messages"
    );
    let waiting = h
        .bus
        .metrics
        .lane_waiting
        .with_label_values(&["runner-test"])
        .get();
    assert!(
        waiting > 100,
        "the rest of the burst waits in its lane: {waiting}"
    );
    h.rec.gate.open();
    h.shutdown.cancel();
    h.task.await.unwrap();
}

#[tokio::test]
async fn an_undecodable_message_is_dead_lettered_without_retry() {
    let h = harness(Mode::Ack, 2, Duration::from_secs(5), 5).await;
    h.bus
        .js
        .publish("claw.v1.in.t.bad", "not a number".into())
        .await
        .unwrap()
        .await
        .unwrap();
    publish_n(&h.bus.js, "claw.v1.in.t.bad", 5, 1).await;
    let url = h._nats.url.clone();
    assert!(
        wait_for(Duration::from_secs(10), || async {
            stream_messages(&url, "CLAW_DLQ", ">")
                .await
                .is_ok_and(|m| m.len() == 1)
                && h.rec.seen.lock().unwrap().len() == 1
        })
        .await
    );
    let dlq = stream_messages(&url, "CLAW_DLQ", ">").await.unwrap();
    assert!(dlq[0]
        .header("Clawbus-Dlq-Reason")
        .unwrap()
        .contains("not a number"));
    assert_eq!(h.rec.calls.load(Ordering::SeqCst), 1, "never handled");
}

/// Answers a history request with one entry per requested item; for session `slow`
/// only once its gate is open.
struct Echo(Gate);

impl clawbus_bus::request::Responder for Echo {
    type Req = clawbus_wire::HistoryRequest;
    type Resp = clawbus_wire::HistoryResponse;

    async fn respond(&self, req: Result<clawbus_wire::Envelope<Self::Req>, String>) -> Self::Resp {
        let (entries, error) = match req {
            Ok(env) => {
                if env.body.session_key == "slow" {
                    self.0.pass().await;
                }
                (env.body.limit as usize, None)
            }
            Err(e) => (
                0,
                Some(clawbus_wire::ErrorInfo {
                    code: "malformed_request".into(),
                    message: e,
                }),
            ),
        };
        clawbus_wire::HistoryResponse {
            entries: (0..entries)
                .map(|i| clawbus_wire::HistoryEntry {
                    entry_id: i.to_string(),
                    run_id: String::new(),
                    role: clawbus_wire::Role::User,
                    content: String::new(),
                    seq: i as u64,
                    ..Default::default()
                })
                .collect(),
            error,
        }
    }
}

#[tokio::test]
async fn typed_requests_get_typed_answers_errors_and_deadlines() {
    use clawbus_bus::request::{serve, ResponderOpts};
    use clawbus_wire::{Envelope, HistoryRequest, HistoryResponse};
    let nats = NatsServer::start().unwrap();
    let b = bus(&nats).await;
    let readiness = clawbus_telemetry::Readiness::new();
    readiness.register("echo");
    let stop = CancellationToken::new();
    let opts = ResponderOpts {
        subject: "claw.v1.test.echo".into(),
        queue: "echo",
        concurrency: 4,
        drain_deadline: Duration::from_secs(5),
        readiness: Some((readiness.clone(), "echo")),
    };
    let gate = Gate::default();
    let server = tokio::spawn(serve(
        b.clone(),
        opts,
        Arc::new(Echo(gate.clone())),
        stop.clone(),
    ));
    assert!(wait_for(Duration::from_secs(5), || async { readiness.is_ready() }).await);
    let req = |key: &str, limit| {
        Envelope::new(
            format!("req-{key}"),
            0,
            HistoryRequest {
                session_key: key.into(),
                limit,
                min_seq: None,
            },
        )
    };
    let trace = clawbus_bus::TraceContext::root();
    let ok: Envelope<HistoryResponse> = b
        .request(
            "claw.v1.test.echo".into(),
            &req("a", 3),
            &trace,
            Duration::from_secs(2),
        )
        .await
        .unwrap();
    assert_eq!(ok.body.entries.len(), 3);
    assert_eq!(ok.id, "req-a:reply");
    // A deadline shorter than the work: the caller gets a clear error.
    let late = b
        .request::<HistoryRequest, HistoryResponse>(
            "claw.v1.test.echo".into(),
            &req("slow", 1),
            &trace,
            Duration::from_millis(100),
        )
        .await
        .unwrap_err();
    assert!(late.to_string().contains("claw.v1.test.echo"), "{late}");
    gate.open();
    // Garbage gets an error answer, not silence.
    let raw = b
        .client
        .request("claw.v1.test.echo", "not msgpack".into())
        .await
        .unwrap();
    let v = clawbus_wire::decode::<HistoryResponse>(&raw.payload).unwrap();
    assert_eq!(v.body.error.unwrap().code, "malformed_request");
    // Stopping drains and leaves readiness false.
    stop.cancel();
    server.await.unwrap();
    assert!(!readiness.is_ready());
}

/// Hands each fence it is given to the test.
struct FenceGrabber(tokio::sync::mpsc::UnboundedSender<clawbus_bus::ownership::Fence>);

impl clawbus_bus::ownership::PartitionWork for FenceGrabber {
    async fn run(
        &self,
        _partition: u32,
        _epoch: u64,
        fence: clawbus_bus::ownership::Fence,
        stop: CancellationToken,
    ) {
        let _ = self.0.send(fence);
        stop.cancelled().await;
    }
}

/// Takes part, as the only replica of group `fencetest`, in the ownership of one
/// partition until `shutdown`; the fence of each acquisition comes out of the receiver.
fn grab_fences(
    b: &Bus,
    shutdown: CancellationToken,
) -> (
    tokio::task::JoinHandle<Result<(), BusError>>,
    tokio::sync::mpsc::UnboundedReceiver<clawbus_bus::ownership::Fence>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let me = clawbus_bus::ownership::Member {
        group: "fencetest",
        replica: "solo".into(),
        partitions: 1,
    };
    let b = b.clone();
    let task = tokio::spawn(async move {
        let work = Arc::new(FenceGrabber(tx));
        clawbus_bus::ownership::run(&b, me, work, shutdown, |_| {}).await
    });
    (task, rx)
}

#[tokio::test]
async fn a_fresh_lease_is_checked_locally_and_a_stale_one_at_the_server() {
    use clawbus_bus::ownership::{self, Fenced};
    let mut nats = NatsServer::start().unwrap();
    let b = bus(&nats).await;
    topology::provision(&b.js, 1).await.unwrap();
    let (task, mut rx) = grab_fences(&b, CancellationToken::new());
    let fence = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("the partition is acquired")
        .unwrap();
    assert!(fence.check().await.is_ok());
    // With the server gone, a lease renewed moments ago still holds: the check needs no
    // round trip. Once the last renewal is older than the TTL minus the margin, the
    // check must ask the server, and cannot.
    nats.kill_node(0);
    let stopped = std::time::Instant::now();
    assert!(fence.check().await.is_ok(), "checked without I/O");
    let outcome = Mutex::new(Ok(()));
    assert!(
        wait_for(Duration::from_secs(30), || async {
            let r = fence.check().await;
            let failed = r.is_err();
            *outcome.lock().unwrap() = r;
            failed
        })
        .await,
        "a stale lease is not trusted"
    );
    assert!(
        stopped.elapsed()
            >= ownership::LEASE_TTL - ownership::FENCE_MARGIN - Duration::from_secs(1),
        "trusted for the renewal's validity, {:?}",
        stopped.elapsed()
    );
    // Unreadable while the server is down (or lost, had renewals given up first).
    assert!(matches!(
        outcome.into_inner().unwrap(),
        Err(Fenced::Unknown(_) | Fenced::Lost(_))
    ));
    // Nothing to hand back to a server that is gone.
    task.abort();
}

/// The cluster stall's cause: a fence check answered by a replica that was behind
/// found the lease "lost" and stopped the partition's work, while the ownership loop
/// kept renewing the lease, so the partition was held and worked by nobody.
#[tokio::test]
async fn a_partition_whose_work_found_its_lease_lost_is_taken_again() {
    let nats = NatsServer::start().unwrap();
    let b = bus(&nats).await;
    topology::provision(&b.js, 1).await.unwrap();
    let shutdown = CancellationToken::new();
    let (task, mut rx) = grab_fences(&b, shutdown.clone());
    assert!(wait_for(Duration::from_secs(10), || async { !rx.is_empty() }).await);
    let first = rx.try_recv().unwrap();
    // The work learns that its lease is lost, as a fence check does, and stops.
    first.lost().cancel();
    assert!(
        wait_for(Duration::from_secs(10), || async { !rx.is_empty() }).await,
        "the partition is acquired and worked again"
    );
    let second = rx.try_recv().unwrap();
    assert!(first.is_lost());
    assert!(
        second.check().await.is_ok(),
        "the new acquisition holds the lease"
    );
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn the_event_stream_stores_each_session_under_the_partition_we_compute() {
    use clawbus_bus::subjects;
    let nats = NatsServer::start().unwrap();
    let b = bus(&nats).await;
    topology::provision(&b.js, 1).await.unwrap();
    let mut seen = std::collections::HashSet::new();
    for i in 0..64 {
        let key = format!("agent:main:s{i}");
        b.js.publish(subjects::run(&key), "x".into())
            .await
            .unwrap()
            .await
            .unwrap();
        let stored = subjects::stored_run(&key, topology::PARTITIONS);
        let found = b
            .last_sequence(topology::STREAM_EVENTS, &stored)
            .await
            .unwrap();
        assert!(found.is_some(), "{key} not stored as {stored}");
        seen.insert(subjects::event_partition(&key, topology::PARTITIONS));
    }
    assert!(
        seen.len() > 8,
        "sessions spread over the partitions: {seen:?}"
    );
}

#[tokio::test]
async fn the_inbound_stream_stores_each_chat_under_the_router_partition_we_check() {
    use clawbus_bus::subjects;
    use futures::StreamExt;
    let nats = NatsServer::start().unwrap();
    let b = bus(&nats).await;
    topology::provision(&b.js, 1).await.unwrap();
    let chats: Vec<String> = (0..32).map(|i| format!("chat-{i}")).collect();
    for chat in &chats {
        let subject = subjects::inbound_chat("telegram", "bot", chat).unwrap();
        b.js.publish(subject, chat.clone().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    // Each router partition's consumer gets exactly the chats the router accepts there.
    let mut seen = 0;
    let mut partitions = std::collections::HashSet::new();
    for p in 0..topology::ROUTER_CHAT_PARTITIONS {
        let decl = ConsumerDecl::router(p, 8);
        let c = topology::bind_consumer(&b.js, &decl).await.unwrap();
        let mut batch = c.fetch().max_messages(64).messages().await.unwrap();
        while let Some(Ok(m)) = batch.next().await {
            let chat = String::from_utf8(m.payload.to_vec()).unwrap();
            assert!(
                subjects::inbound_matches(
                    &m.subject,
                    "telegram",
                    "bot",
                    &chat,
                    topology::ROUTER_CHAT_PARTITIONS
                ),
                "{chat} stored as {}",
                m.subject
            );
            assert!(m
                .subject
                .starts_with(&format!("claw.v1.in.telegram.bot.{p}.")));
            partitions.insert(p);
            seen += 1;
        }
    }
    assert_eq!(seen, chats.len());
    assert_eq!(partitions.len() as u32, topology::ROUTER_CHAT_PARTITIONS);
}

/// Hangs on the message `poison` as a crashing handler would leave it (never settled),
/// acknowledges the others.
#[derive(Default)]
struct Crasher {
    poison_seen: AtomicUsize,
    fine: Mutex<Vec<String>>,
}

impl Handler for Crasher {
    type Msg = String;

    fn decode(&self, d: &Delivery) -> Result<String, String> {
        Ok(String::from_utf8_lossy(&d.payload).into_owned())
    }

    async fn handle(&self, _d: Delivery, m: String) -> Outcome {
        if m == "poison" {
            self.poison_seen.fetch_add(1, Ordering::SeqCst);
            std::future::pending::<()>().await;
        }
        self.fine.lock().unwrap().push(m);
        Outcome::Ack
    }
}

#[tokio::test]
async fn a_message_that_kills_every_owner_is_dead_lettered_after_a_few_handovers() {
    use clawbus_bus::handovers::MAX_HANDOVERS;
    use clawbus_bus::ownership::{self, Member, SharedConsumers};
    let nats = NatsServer::start().unwrap();
    let b = bus(&nats).await;
    topology::provision(&b.js, 1).await.unwrap();
    b.js.create_stream(stream::Config {
        name: "HANDOVER_TEST".into(),
        subjects: vec!["handover.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let decl = ConsumerDecl {
        stream: "HANDOVER_TEST",
        durable: "handover-p0".into(),
        group: "handovertest",
        filter_subjects: vec!["handover.>".into()],
        ack_wait: Duration::from_secs(30),
        // Far more than the handovers allowed: JetStream's own count never gets there,
        // since each new owner rewinds the consumer.
        max_deliver: 10,
        max_ack_pending: 16,
    };
    topology::bind_consumer(&b.consumer_js, &decl)
        .await
        .unwrap();
    b.js.publish("handover.a", "poison".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let crasher = Arc::new(Crasher::default());
    let dead_letters =
        || async { stream_messages(&nats.url, "CLAW_DLQ", "claw.v1.dlq.handovertest").await };
    // Each owner takes the partition, gets the message, "crashes" on it (its handler
    // never returns and the drain gives up on it) and hands the partition over.
    let mut owners: i64 = 0;
    let last = loop {
        assert!(owners <= MAX_HANDOVERS + 2, "never dead-lettered");
        let shutdown = CancellationToken::new();
        let work = Arc::new(SharedConsumers {
            bus: b.clone(),
            decls: vec![decl.clone()],
            readiness: None,
            permits: None,
            handler: crasher.clone(),
            concurrency: 4,
            drain_deadline: Duration::from_millis(100),
        });
        let me = Member {
            group: "handovertest",
            replica: format!("owner-{owners}"),
            partitions: 1,
        };
        let task = {
            let (b, shutdown) = (b.clone(), shutdown.clone());
            tokio::spawn(async move { ownership::run(&b, me, work, shutdown, |_| {}).await })
        };
        let seen = crasher.poison_seen.load(Ordering::SeqCst);
        let outcome = wait_for(Duration::from_secs(20), || async {
            crasher.poison_seen.load(Ordering::SeqCst) > seen
                || dead_letters().await.is_ok_and(|m| !m.is_empty())
        })
        .await;
        assert!(
            outcome,
            "owner {owners} neither handled nor dead-lettered it"
        );
        owners += 1;
        if dead_letters().await.is_ok_and(|m| !m.is_empty()) {
            break (shutdown, task);
        }
        shutdown.cancel();
        task.await.unwrap().unwrap();
    };
    // The first owner, then one per handover allowed; the next dead-letters it.
    assert_eq!(
        crasher.poison_seen.load(Ordering::SeqCst),
        1 + MAX_HANDOVERS as usize
    );
    assert_eq!(owners, 2 + MAX_HANDOVERS);
    let dlq = dead_letters().await.unwrap();
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0].payload.as_ref(), b"poison");
    let reason = dlq[0].header("Clawbus-Dlq-Reason").unwrap_or_default();
    assert!(reason.contains("partition handovers"), "{reason}");
    // The partition works on: the next message is handled by the last owner.
    b.js.publish("handover.b", "fine".into())
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(
        wait_for(Duration::from_secs(10), || async {
            crasher.fine.lock().unwrap().as_slice() == ["fine"]
        })
        .await
    );
    let (shutdown, task) = last;
    shutdown.cancel();
    task.await.unwrap().unwrap();
}
