use super::*;

fn members(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("agent-{i}")).collect()
}

#[test]
fn every_partition_has_one_owner_and_shares_are_fair() {
    let m = members(3);
    let mut counts = HashMap::new();
    for p in 0..300 {
        *counts.entry(owner(&m, p).unwrap()).or_insert(0) += 1;
    }
    assert_eq!(counts.len(), 3);
    assert!(
        counts.values().all(|c| (60..=140).contains(c)),
        "{counts:?}"
    );
}

#[test]
fn a_joining_replica_moves_only_its_share() {
    let (before, after) = (members(2), members(3));
    for p in 0..256 {
        let (a, b) = (owner(&before, p).unwrap(), owner(&after, p).unwrap());
        assert!(
            a == b || b == "agent-2",
            "partition {p} moved from {a} to {b}"
        );
    }
}

#[test]
fn no_members_no_owner() {
    assert_eq!(owner(&[], 3), None);
}

fn plan(replica: &str, names: Option<&[&str]>) -> Plan {
    Plan {
        group: "channels",
        replica: replica.into(),
        partitions: names.map_or(4, |n| n.len() as u32),
        names: names.map(|n| n.iter().map(|s| s.to_string()).collect()),
    }
}

fn live(p: &Plan) -> Live {
    Live {
        replica: p.replica.clone(),
        names: p.names.iter().flatten().cloned().collect(),
    }
}

#[test]
fn numbered_groups_keep_their_keys_and_owners() {
    let p = plan("agent-1", None);
    assert_eq!(p.key(3), "channels.p.3");
    assert_eq!(&p.membership().unwrap()[..], b"agent-1");
    // The same hash input as before named partitions existed.
    assert_eq!(score("agent-1", "7"), {
        let mut z = crate::subjects::session_hash("agent-1/7");
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
        z ^ (z >> 31)
    });
    let m = members(3);
    let lives: Vec<Live> = m
        .iter()
        .map(|r| Live {
            replica: r.clone(),
            names: HashSet::new(),
        })
        .collect();
    for r in &m {
        let mine = Plan {
            replica: r.clone(),
            ..plan("", None)
        }
        .wanted(&lives);
        for p in 0..4 {
            assert_eq!(mine.contains(&p), owner(&m, p) == Some(r.as_str()));
        }
    }
}

#[test]
fn named_partitions_run_once_among_the_replicas_that_know_them() {
    // A rolling change: a reordered list, one account added on `a`, one removed on `b`.
    let a = plan(
        "a",
        Some(&[
            "telegram.new",
            "telegram.default",
            "discord.default",
            "slack.x",
        ]),
    );
    let b = plan(
        "b",
        Some(&[
            "discord.default",
            "slack.x",
            "telegram.default",
            "telegram.gone",
        ]),
    );
    let members = vec![live(&a), live(&b)];
    let (wa, wb) = (a.wanted(&members), b.wanted(&members));
    let names = |p: &Plan, w: &HashSet<u32>| -> HashSet<String> {
        w.iter()
            .map(|i| p.names.as_ref().unwrap()[*i as usize].clone())
            .collect()
    };
    let (na, nb) = (names(&a, &wa), names(&b, &wb));
    assert!(na.is_disjoint(&nb), "{na:?} {nb:?}");
    let all: HashSet<String> = na.union(&nb).cloned().collect();
    for n in [
        "telegram.new",
        "telegram.default",
        "discord.default",
        "slack.x",
        "telegram.gone",
    ] {
        assert!(all.contains(n), "{n} runs nowhere: {na:?} {nb:?}");
    }
    assert!(na.contains("telegram.new") && nb.contains("telegram.gone"));
    assert_eq!(a.key(1), "channels.p.telegram.default");
    let m: Membership = serde_json::from_slice(&a.membership().unwrap()).unwrap();
    assert_eq!(m.partitions.len(), 4);
}

#[test]
fn partition_names_are_lease_key_tokens() {
    assert!(valid_partition_name("telegram.default"));
    assert!(valid_partition_name("irc.my_bot-2"));
    for bad in ["", ".a", "a.", "a..b", "a b", "a*", "a>", "a/b", "é"] {
        assert!(!valid_partition_name(bad), "{bad}");
    }
}
