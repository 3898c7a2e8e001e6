//! The sandbox against a model turned against the host (issue 18, defects 6 and 9): as
//! root the box is an unprivileged host user without nested user namespaces; an
//! agent's workspace has a quota; an agent runs a bounded number of boxes and of
//! processes at once; the box's `/proc` shows no host path on a command line.

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use clawbus_tests::toolbox::{refused, text, ToolBox};
use serde_json::json;

fn root() -> bool {
    nix::unistd::geteuid().is_root()
}

#[tokio::test]
async fn as_root_the_box_is_an_unprivileged_user_without_user_namespaces() {
    let b = ToolBox::start(&[("CLAWBUS__SANDBOX__EXEC_YIELD_MS", "0")]).await;
    let me = nix::unistd::geteuid().as_raw();
    let expected = if root() { 65534 } else { me };
    // Root-only files stay closed.
    let r = b.call("exec", json!({"command": "cat /etc/shadow"})).await;
    let t = text(&r);
    assert!(
        t.contains("Permission denied") && t.contains("[exit code"),
        "{t}"
    );
    assert!(!t.contains("root:"), "{t}");
    // Inside it is uid 1000; on the host, the unprivileged user.
    let r = b
        .call("exec", json!({"command": "id -u; echo made > by-box.txt"}))
        .await;
    assert_eq!(text(&r), "1000\n");
    let owner = std::fs::metadata(b.workspace().join("by-box.txt"))
        .unwrap()
        .uid();
    assert_eq!(
        owner, expected,
        "the box's file belongs to host uid {owner}"
    );
    assert_ne!(owner, 0);
    // No user namespace inside the box: no way back to a mapped root.
    let r = b
        .call(
            "exec",
            json!({"command": "unshare -U true && echo NESTED; unshare -Ur id -u && echo NESTED"}),
        )
        .await;
    assert!(!text(&r).contains("NESTED"), "{}", text(&r));
    // The file tools (the service's own user) and the box share the workspace both ways.
    let r = b
        .call(
            "write",
            json!({"path": "notes/a.txt", "content": "from the tool\n"}),
        )
        .await;
    assert!(r.ok, "{}", text(&r));
    let r = b
        .call(
            "exec",
            json!({"command": "echo from the box >> notes/a.txt && cat notes/a.txt && mkdir -p notes/sub && echo x > notes/sub/b && chmod 000 notes/sub/b"}),
        )
        .await;
    assert_eq!(text(&r), "from the tool\nfrom the box\n");
    let r = b.call("read", json!({"path": "notes/a.txt"})).await;
    assert_eq!(text(&r), "from the tool\nfrom the box\n");
    if root() {
        let r = b.call("read", json!({"path": "notes/sub/b"})).await;
        assert_eq!(text(&r), "x\n");
    }
}

#[tokio::test]
async fn an_exec_writing_past_the_workspace_quota_is_stopped_and_writes_are_refused() {
    let quota: u64 = 16 * 1024 * 1024;
    let b = ToolBox::start(&[
        ("CLAWBUS__SANDBOX__WORKSPACE_MAX_BYTES", &quota.to_string()),
        ("CLAWBUS__SANDBOX__EXEC_YIELD_MS", "0"),
    ])
    .await;
    // 200 files of 1 MB: 200 MB asked, under the file size limit each.
    let r = b
        .call(
            "exec",
            json!({"command": "for i in $(seq 200); do head -c 1000000 /dev/zero > f$i; done; echo wrote all"}),
        )
        .await;
    let t = text(&r);
    assert!(t.contains("went over its quota"), "{t}");
    let on_disk: u64 = std::fs::read_dir(b.workspace())
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().blocks() * 512)
        .sum();
    assert!(
        on_disk < quota + 48 * 1024 * 1024,
        "{on_disk} bytes on disk under a quota of {quota}: {t}"
    );
    // Full: the file tools refuse, and a command may no longer grow any file.
    let r = b
        .call("write", json!({"path": "more.txt", "content": "x"}))
        .await;
    assert!(refused(&r, "denied"), "{}", text(&r));
    assert!(text(&r).contains("workspace is full"), "{}", text(&r));
    let r = b
        .call(
            "exec",
            json!({"command": "sh -c 'echo more > more.txt'; wc -c < more.txt"}),
        )
        .await;
    assert!(text(&r).lines().any(|l| l.trim() == "0"), "{}", text(&r));
    // Deleting is allowed, and makes room again.
    let r = b
        .call("exec", json!({"command": "rm -f f* more.txt; ls"}))
        .await;
    assert!(r.ok && !text(&r).contains("f1"), "{}", text(&r));
    let r = b
        .call("write", json!({"path": "more.txt", "content": "x"}))
        .await;
    assert!(r.ok, "{}", text(&r));
}

#[tokio::test]
async fn an_agent_runs_no_more_boxes_at_once_than_its_cap() {
    let b = ToolBox::start(&[
        ("CLAWBUS__SANDBOX__MAX_CONCURRENT_PER_AGENT", "2"),
        ("CLAWBUS__SANDBOX__EXEC_YIELD_MS", "0"),
    ])
    .await;
    let live = b.workspace().join("live");
    std::fs::create_dir_all(&live).unwrap();
    // Each box says how many boxes it sees alive as it starts, then waits for `go`.
    let cmd = "f=$(mktemp live/XXXXXX); echo seen $(ls live | wc -l); \
               while [ ! -e go ]; do sleep 0.05; done; rm $f";
    let calls: Vec<_> = (0..4)
        .map(|_| b.call("exec", json!({"command": cmd, "timeout": 60})))
        .collect();
    // Two run; the others wait (the most seen at once is kept while waiting).
    let most = std::cell::Cell::new(0);
    let (results, two) = tokio::join!(futures::future::join_all(calls), async {
        let two = clawbus_testkit::wait_for(Duration::from_secs(30), || async {
            let n = std::fs::read_dir(&live).unwrap().count();
            most.set(most.get().max(n));
            n == 2
        })
        .await;
        std::fs::write(b.workspace().join("go"), "").unwrap();
        two
    });
    assert!(two, "two boxes never ran at once");
    assert_eq!(most.get(), 2, "more than two boxes at once");
    for r in &results {
        let seen: u32 = text(r)
            .trim()
            .strip_prefix("seen ")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{}", text(r)));
        assert!(seen <= 2, "a box saw {seen} boxes at once");
    }
}

/// Processes on the host that run `sleep 3017`.
fn sleepers() -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|c| c.is_ascii_digit())
        })
        .filter(|e| {
            std::fs::read(e.path().join("cmdline")).is_ok_and(|c| c == b"sleep\x003017\x00")
        })
        .count()
}

#[tokio::test]
async fn parallel_fork_bombs_of_one_agent_share_its_process_cap() {
    let b = ToolBox::start(&[
        ("CLAWBUS__SANDBOX__PROCESSES", "64"),
        ("CLAWBUS__SANDBOX__MAX_CONCURRENT_PER_AGENT", "4"),
        ("CLAWBUS__SANDBOX__EXEC_YIELD_MS", "0"),
    ])
    .await;
    // Each call starts up to 1000 sleepers, then holds them for a while.
    let bomb = "python3 -c 'import os, time\nn = 0\nfor i in range(1000):\n    try:\n        \
                if os.fork() == 0:\n            os.execvp(\"sleep\", [\"sleep\", \"3017\"])\n        \
                n += 1\n    except OSError:\n        break\nprint(\"started\", n, flush=True)\n\
                time.sleep(3)'";
    let calls: Vec<_> = (0..4)
        .map(|_| b.call("exec", json!({"command": bomb, "timeout": 20})))
        .collect();
    let all = futures::future::join_all(calls);
    tokio::pin!(all);
    let mut peak = 0;
    let results = loop {
        peak = peak.max(sleepers());
        if let Ok(r) = tokio::time::timeout(Duration::from_millis(20), &mut all).await {
            break r;
        }
    };
    assert!(peak > 0, "no sleeper seen");
    assert!(peak <= 64, "{peak} processes under one agent's cap of 64");
    let started: u32 = results
        .iter()
        .filter_map(|r| {
            text(r)
                .lines()
                .find_map(|l| l.strip_prefix("started "))
                .and_then(|n| n.trim().parse::<u32>().ok())
        })
        .sum();
    assert!(
        started <= 64,
        "{started} processes started by the four calls"
    );
    let gone =
        clawbus_testkit::wait_for(Duration::from_secs(10), || async { sleepers() == 0 }).await;
    assert!(gone, "sleepers outlived their boxes");
    let r = b.call("exec", json!({"command": "echo fine"})).await;
    assert_eq!(text(&r), "fine\n");
}

#[tokio::test]
async fn no_command_line_in_the_box_shows_a_host_path() {
    let b = ToolBox::start(&[("CLAWBUS__SANDBOX__EXEC_YIELD_MS", "0")]).await;
    let state = b.s.state.path().display().to_string();
    let r = b
        .call(
            "exec",
            json!({"command": "for f in /proc/[0-9]*/cmdline; do tr '\\0' ' ' < $f; echo; done"}),
        )
        .await;
    let cmdlines = text(&r);
    assert!(cmdlines.contains("bwrap --args 3"), "{cmdlines}");
    assert!(!cmdlines.contains(&state), "{cmdlines}");
    assert!(!cmdlines.contains("--bind"), "{cmdlines}");
    // The workspace is mounted at /workspace (its path within its filesystem shows
    // in mountinfo's root field: see the README).
    let r = b
        .call("exec", json!({"command": "cat /proc/self/mountinfo"}))
        .await;
    assert!(text(&r).contains(" /workspace "), "{}", text(&r));
}
