//! `--routing N`: the router alone. The agent is stopped, so every turn stays queued in
//! the turn stream; N direct messages from `--sessions` senders (`dmScope per-peer`:
//! one session each) go through a chat channel. Prints the routing decision's p50 and
//! p99 from the router's own histogram (`clawbus_router_decision_duration_seconds`,
//! linear within a bucket, as Prometheus' `histogram_quantile`), its mean, and the
//! router's RSS before the messages and with all of them queued.

use std::time::{Duration, Instant};

use clawbus_testkit::{Service, Suite, SuiteOpts};

const METRIC: &str = "clawbus_router_decision_duration_seconds";

pub async fn run(n: usize, sessions: usize) -> anyhow::Result<()> {
    let mut suite = Suite::start(SuiteOpts {
        env: vec![
            ("RUST_LOG".into(), "warn".into()),
            ("CLAWBUS__CHANNELS__BENCH__DM_POLICY".into(), "open".into()),
            ("CLAWBUS__SESSION__DM_SCOPE".into(), "per-peer".into()),
        ],
        ..Default::default()
    })
    .await?;
    // Nothing runs the turns: they stay queued.
    suite.kill9_replica((Service::Agent, 0)).await?;
    let router = suite
        .replica_pid((Service::Router, 0))
        .ok_or_else(|| anyhow::anyhow!("no router process"))?;
    let ch = clawbus_tests::channel::FakeChannel::new(&suite, "bench", "bot1").await;
    let metrics = format!("{}/metrics", suite.replica_admin_url((Service::Router, 0)));
    // A few messages first so the router has done its one-off set-up.
    for i in 0..10 {
        ch.send(ch.dm(&format!("warm{i}"), "hello")).await;
    }
    wait_turns(&suite, &metrics, 10.0).await?;
    let rss0 = clawbus_testkit::rss_of(router);
    let (before_counts, sum0, count0) = buckets(&suite.get_text(&metrics).await);
    let t = Instant::now();
    for i in 0..n {
        let who = format!("user{}", i % sessions.max(1));
        ch.send(ch.dm(&who, &format!("message {i} from {who}: what is on today?")))
            .await;
    }
    wait_turns(&suite, &metrics, (n + 10) as f64).await?;
    let elapsed = t.elapsed();
    let page = suite.get_text(&metrics).await;
    let (counts, sum, count) = buckets(&page);
    // Only this run's observations: subtract the warm-up's.
    let run: Vec<(f64, f64)> = counts
        .iter()
        .zip(&before_counts)
        .map(|((le, c), (_, c0))| (*le, c - c0))
        .collect();
    let rss1 = clawbus_testkit::rss_of(router);
    let mean_us = (sum - sum0) / (count - count0).max(1.0) * 1e6;
    println!(
        "routing: messages={n} sessions={sessions} elapsed_s={:.2} routed_per_s={:.0}",
        elapsed.as_secs_f64(),
        n as f64 / elapsed.as_secs_f64()
    );
    println!(
        "routing decision: p50_ms={:.3} p99_ms={:.3} mean_ms={:.3}",
        quantile(&run, 0.5) * 1e3,
        quantile(&run, 0.99) * 1e3,
        mean_us / 1e3
    );
    println!(
        "router rss: before_mb={:.1} with_{n}_queued_mb={:.1} growth_mb={:.1}",
        rss0 as f64 / 1e6,
        rss1 as f64 / 1e6,
        (rss1 as f64 - rss0 as f64) / 1e6
    );
    Ok(())
}

/// Waits until the router has made `n` turns.
async fn wait_turns(suite: &Suite, url: &str, n: f64) -> anyhow::Result<()> {
    let ok = clawbus_testkit::wait_for(Duration::from_secs(300), || async {
        suite
            .get_text(url)
            .await
            .lines()
            .find_map(|l| {
                l.strip_prefix("clawbus_router_messages_total{outcome=\"turn\"} ")?
                    .trim()
                    .parse::<f64>()
                    .ok()
            })
            .is_some_and(|v| v >= n)
    })
    .await;
    anyhow::ensure!(ok, "the router did not route {n} messages in 300 s");
    Ok(())
}

/// The histogram's cumulative buckets (upper bound, count), its sum and count.
fn buckets(page: &str) -> (Vec<(f64, f64)>, f64, f64) {
    let mut out = Vec::new();
    let (mut sum, mut count) = (0.0, 0.0);
    for l in page.lines() {
        let Some(rest) = l.strip_prefix(METRIC) else {
            continue;
        };
        let value = |s: &str| s.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
        if let Some(b) = rest.strip_prefix("_bucket{le=\"") {
            let (le, tail) = b.split_once('"').unwrap_or(("", ""));
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap_or(f64::NAN)
            };
            if let Some(v) = value(tail) {
                out.push((le, v));
            }
        } else if rest.starts_with("_sum") {
            sum = value(rest).unwrap_or(0.0);
        } else if rest.starts_with("_count") {
            count = value(rest).unwrap_or(0.0);
        }
    }
    (out, sum, count)
}

/// The q-quantile of cumulative buckets, linear within the bucket it falls in.
fn quantile(b: &[(f64, f64)], q: f64) -> f64 {
    let total = b.last().map(|(_, c)| *c).unwrap_or(0.0);
    if total <= 0.0 {
        return f64::NAN;
    }
    let rank = q * total;
    let (mut lo, mut below) = (0.0, 0.0);
    for (le, c) in b {
        if *c >= rank {
            if le.is_infinite() {
                return lo;
            }
            let within = (rank - below) / (c - below).max(f64::MIN_POSITIVE);
            return lo + (le - lo) * within;
        }
        lo = *le;
        below = *c;
    }
    lo
}
