//! `clawbus cron add|list|rm`: scheduled turns (KV `claw_cron`), as the `admin`
//! user; the router fires them.
//!
//! ```text
//! clawbus cron add --name NAME (--at TIME | --every DURATION | --cron EXPR [--tz ZONE])
//!                  --message TEXT [--agent ID] [--session main|isolated|session:KEY]
//!                  [--announce --channel CH [--account ACC] --to CHAT] [--keep-after-run]
//! clawbus cron list
//! clawbus cron rm ID
//! ```
//! `--at` takes an RFC 3339 time (`2026-12-01T07:30:00+01:00`), a local time
//! (`2026-12-01 07:30`, UTC unless `--tz`), or a delay from now (`20m`).

use std::collections::HashMap;

use clawbus_bus::cron::{self, Delivery, Job, Schedule};
use clawbus_bus::{rights, topology};
use clawbus_config::Config;

pub const USAGE: &str = "usage: clawbus cron add --name NAME (--at TIME | --every DURATION | --cron EXPR [--tz ZONE]) --message TEXT [--agent ID] [--session main|isolated|session:KEY] [--announce --channel CH [--account ACC] --to CHAT] [--keep-after-run] | cron list | cron rm ID";

/// Flags that take no value.
const SWITCHES: &[&str] = &["--announce", "--keep-after-run", "--no-deliver"];
const VALUED: &[&str] = &[
    "--name",
    "--at",
    "--every",
    "--cron",
    "--tz",
    "--message",
    "--agent",
    "--session",
    "--channel",
    "--account",
    "--to",
];

pub async fn run(cfg: &Config, args: &[String]) -> anyhow::Result<()> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // Checked before connecting: a bad job never needs the bus.
    let job = match args.as_slice() {
        ["add", rest @ ..] => Some(job_from(cfg, rest, clawbus_wire::now_ms())?),
        ["list"] | ["rm", _] => None,
        _ => anyhow::bail!("{USAGE}"),
    };
    let client = crate::auth::connect(cfg, rights::ADMIN).await?;
    let js = async_nats::jetstream::new(client);
    let kv = js.get_key_value(topology::KV_CRON).await?;
    match (args.as_slice(), job) {
        (_, Some(job)) => {
            cron::put(&kv, &job).await.map_err(|e| anyhow::anyhow!(e))?;
            let next =
                cron::next(&job, clawbus_wire::now_ms() - 1).map_or("never".into(), fmt_time);
            println!("added {} ({}), next run {next}", job.id, job.name);
            Ok(())
        }
        (["list"], None) => list(&kv).await,
        (["rm", id], None) => match cron::remove(&kv, id)
            .await
            .map_err(|e| anyhow::anyhow!(e))?
        {
            true => {
                println!("removed {id}");
                Ok(())
            }
            false => anyhow::bail!("no cron job {id}"),
        },
        _ => anyhow::bail!("{USAGE}"),
    }
}

/// The job `cron add` describes, checked.
pub fn job_from(cfg: &Config, args: &[&str], now: i64) -> anyhow::Result<Job> {
    let mut flags: HashMap<&str, &str> = HashMap::new();
    let mut switches = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if SWITCHES.contains(a) {
            switches.push(*a);
        } else if VALUED.contains(a) {
            let v = it
                .next()
                .ok_or_else(|| anyhow::anyhow!("{a} needs a value"))?;
            if flags.insert(a, v).is_some() {
                anyhow::bail!("{a} given twice");
            }
        } else {
            anyhow::bail!("unknown argument `{a}`\n{USAGE}");
        }
    }
    let tz = flags.get("--tz").copied().unwrap_or("UTC");
    let schedule = match (flags.get("--at"), flags.get("--every"), flags.get("--cron")) {
        (Some(at), None, None) => Schedule::At {
            at_ms: parse_at(at, tz, now)?,
        },
        (None, Some(every), None) => Schedule::Every {
            every_ms: cron::parse_duration(every).map_err(|e| anyhow::anyhow!(e))?,
            anchor_ms: now,
        },
        (None, None, Some(expr)) => Schedule::Cron {
            expr: expr.to_string(),
            tz: tz.to_owned(),
        },
        _ => anyhow::bail!("give one of --at, --every or --cron"),
    };
    let deliver = if switches.contains(&"--announce") && !switches.contains(&"--no-deliver") {
        let (Some(channel), Some(to)) = (flags.get("--channel"), flags.get("--to")) else {
            anyhow::bail!("--announce needs --channel and --to");
        };
        Some(Delivery {
            channel: channel.to_string(),
            account: flags.get("--account").unwrap_or(&"default").to_string(),
            to: to.to_string(),
        })
    } else {
        None
    };
    let job = Job {
        id: format!("{:08x}", rand::random::<u32>()),
        name: flags
            .get("--name")
            .ok_or_else(|| anyhow::anyhow!("--name is required"))?
            .to_string(),
        schedule,
        agent_id: flags
            .get("--agent")
            .map_or_else(|| cfg.router.default_agent.clone(), |a| a.to_string()),
        session: flags.get("--session").unwrap_or(&"main").to_string(),
        message: flags
            .get("--message")
            .ok_or_else(|| anyhow::anyhow!("--message is required"))?
            .to_string(),
        deliver,
        keep_after_run: switches.contains(&"--keep-after-run"),
        created_ms: now,
    };
    cron::check(&job, &cfg.router.agents).map_err(|e| anyhow::anyhow!(e))?;
    Ok(job)
}

/// `--at`: RFC 3339, a local `YYYY-MM-DD HH:MM[:SS]` in `tz`, or a delay from now.
fn parse_at(s: &str, tz: &str, now: i64) -> anyhow::Result<i64> {
    use chrono::TimeZone;
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.timestamp_millis());
    }
    if let Ok(d) = cron::parse_duration(s) {
        return Ok(now + d);
    }
    let zone = cron::parse_tz(tz).map_err(|e| anyhow::anyhow!(e))?;
    for f in [
        "%Y-%m-%d %H:%M:%S",
        "%Y-%m-%d %H:%M",
        "%Y-%m-%dT%H:%M:%S",
        "%Y-%m-%dT%H:%M",
    ] {
        if let Ok(naive) = chrono::NaiveDateTime::parse_from_str(s, f) {
            return zone
                .from_local_datetime(&naive)
                .earliest()
                .map(|t| t.timestamp_millis())
                .ok_or_else(|| anyhow::anyhow!("`{s}` does not exist in {tz}"));
        }
    }
    anyhow::bail!(
        "`{s}` is not a time (2026-12-01T07:30:00Z, `2026-12-01 07:30`, or a delay such as 20m)"
    )
}

fn fmt_time(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).map_or_else(
        || ms.to_string(),
        |t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
    )
}

async fn list(kv: &async_nats::jetstream::kv::Store) -> anyhow::Result<()> {
    let jobs = cron::jobs(kv).await.map_err(|e| anyhow::anyhow!(e))?;
    if jobs.is_empty() {
        println!("no cron jobs");
        return Ok(());
    }
    let now = clawbus_wire::now_ms();
    println!(
        "{:<8}  {:<20}  {:<28}  {:<8}  {:<22}  next run",
        "id", "name", "schedule", "agent", "session"
    );
    for j in jobs {
        let schedule = match &j.schedule {
            Schedule::At { at_ms } => format!("at {}", fmt_time(*at_ms)),
            Schedule::Every { every_ms, .. } => format!("every {}s", every_ms / 1000),
            Schedule::Cron { expr, tz } => format!("cron {expr} ({tz})"),
        };
        let next = cron::next(&j, now).map_or("never".into(), fmt_time);
        println!(
            "{:<8}  {:<20}  {:<28}  {:<8}  {:<22}  {next}",
            j.id, j.name, schedule, j.agent_id, j.session
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_is_described_by_its_flags_and_bad_ones_are_refused() {
        let cfg = Config::default();
        let j = job_from(
            &cfg,
            &[
                "--name",
                "standup",
                "--cron",
                "30 9 * * 1-5",
                "--tz",
                "Europe/Paris",
                "--message",
                "plan the day",
            ],
            0,
        )
        .unwrap();
        assert_eq!(j.session, "main");
        assert!(matches!(j.schedule, Schedule::Cron { .. }));
        let j = job_from(
            &cfg,
            &["--name", "n", "--at", "20m", "--message", "m"],
            1000,
        )
        .unwrap();
        assert_eq!(
            j.schedule,
            Schedule::At {
                at_ms: 1000 + 1_200_000
            }
        );
        let j = job_from(
            &cfg,
            &[
                "--name",
                "n",
                "--at",
                "2026-12-01 07:30",
                "--tz",
                "Europe/Paris",
                "--message",
                "m",
            ],
            0,
        )
        .unwrap();
        assert_eq!(
            j.schedule,
            Schedule::At {
                at_ms: 1_796_106_600_000
            }
        );
        for bad in [
            &["--name", "n", "--message", "m"][..],
            &[
                "--name",
                "n",
                "--every",
                "5m",
                "--cron",
                "* * * * *",
                "--message",
                "m",
            ],
            &["--name", "n", "--every", "soon", "--message", "m"],
            &["--name", "n", "--cron", "99 * * * *", "--message", "m"],
            &[
                "--name",
                "n",
                "--cron",
                "* * * * *",
                "--tz",
                "Atlantis/City",
                "--message",
                "m",
            ],
            &["--name", "n", "--at", "tomorrow", "--message", "m"],
            &["--name", "n", "--every", "5m"],
            &[
                "--name",
                "n",
                "--every",
                "5m",
                "--message",
                "m",
                "--agent",
                "ghost",
            ],
            &[
                "--name",
                "n",
                "--every",
                "5m",
                "--message",
                "m",
                "--announce",
            ],
            &["--name", "n", "--every", "5m", "--message", "m", "--bogus"],
            &["--name", "n", "--every", "5m", "--message"],
            &[
                "--name",
                "n",
                "--every",
                "5m",
                "--message",
                "m",
                "--session",
                "session:agent:x:y",
            ],
        ] {
            assert!(job_from(&cfg, bad, 0).is_err(), "{bad:?}");
        }
    }
}
