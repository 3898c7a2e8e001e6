//! The sandbox service: an agent's coding turn through the real sandbox, and the escape
//! suite — hostile tool calls straight on the bus, each ending in a clear error for the
//! model and nothing read or touched outside the workspace.

use std::path::Path;
use std::time::Duration;

use clawbus_testkit::{wait_for, SuiteOpts};
use clawbus_tests::toolbox::{refused, text, ToolBox};
use clawbus_wire::{decode, encode, Envelope};
use serde_json::{json, Value};

#[tokio::test]
async fn a_coding_turn_writes_runs_edits_and_reruns_code_in_the_sandbox() {
    let b = ToolBox::start(&[]).await;
    let turn = format!(
        "tools: {}",
        json!([
            [{"name": "write", "arguments": {"path": "app/run.sh", "content": "echo hello from $(pwd)\n"}}],
            [{"name": "exec", "arguments": {"command": "sh run.sh", "workdir": "app"}}],
            [{"name": "edit", "arguments": {"path": "app/run.sh", "oldText": "hello", "newText": "goodbye"}}],
            [{"name": "exec", "arguments": {"command": "sh app/run.sh && ls app"}}],
        ])
    );
    let r = b.s.chat_in("agent:main:code", &turn).send().await.unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v["choices"][0]["message"]["content"], "Done: goodbye from /workspace\nrun.sh\n",
        "{v}"
    );
    // The second model call saw the first run's output.
    let seen = b.s.emu().requests()[2].to_string();
    assert!(seen.contains("hello from /workspace/app"), "{seen}");
    assert_eq!(
        std::fs::read_to_string(b.workspace().join("app/run.sh")).unwrap(),
        "echo goodbye from $(pwd)\n"
    );
}

#[tokio::test]
async fn links_a_model_makes_to_host_secrets_never_reach_the_provider() {
    let b = ToolBox::start(&[("CLAWBUS_TEST_SENTINEL", "env-sentinel-7f3a")]).await;
    let state = b.s.state.path();
    std::fs::write(state.join("host-secret.txt"), "host-secret-91c2").unwrap();
    // The model links its context files to a host file next to the workspace, to the
    // agent's own environment, and a skill folder to the state directory.
    let turn = format!(
        "tools: {}",
        json!([[{"name": "exec", "arguments": {"command":
            "ln -sf ../host-secret.txt AGENTS.md && ln -sf /proc/self/environ USER.md \
             && mkdir -p skills && ln -sfn .. skills/up && echo linked"}}]])
    );
    let r = b.s.chat_in("agent:main:links", &turn).send().await.unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v["choices"][0]["message"]["content"], "Done: linked\n",
        "{v}"
    );
    assert!(b.workspace().join("AGENTS.md").is_symlink());
    // The agent rereads its workspace within a second: turns go on until it has.
    let reread = wait_for(Duration::from_secs(15), || async {
        let r =
            b.s.chat_in("agent:main:links", "and now?")
                .send()
                .await
                .unwrap();
        assert_eq!(r.status(), 200);
        let sent = b.s.emu().requests().last().unwrap().to_string();
        sent.contains("[refused: AGENTS.md: it leads outside the workspace")
    })
    .await;
    let all = Value::Array(b.s.emu().requests()).to_string();
    assert!(!all.contains("host-secret-91c2"), "the host file leaked");
    assert!(!all.contains("env-sentinel-7f3a"), "the environment leaked");
    let sent = b.s.emu().requests().last().unwrap().to_string();
    assert!(reread, "{sent}");
    assert!(
        sent.contains("[refused: USER.md: it leads outside the workspace"),
        "{sent}"
    );
    let log = std::fs::read_to_string(b.s.log_path(clawbus_testkit::Service::Agent)).unwrap();
    assert!(log.contains("Workspace file refused"), "logged");
}

#[tokio::test]
async fn file_tools_stay_inside_the_workspace() {
    let b = ToolBox::start(&[("CLAWBUS__SANDBOX__WRITE_MAX_BYTES", "100000")]).await;
    let ws = b.workspace();
    std::fs::create_dir_all(&ws).unwrap();
    let outside = b.s.state.path().join("outside.txt");
    std::fs::write(&outside, "secret").unwrap();
    std::os::unix::fs::symlink("/etc/passwd", ws.join("passwd-link")).unwrap();
    std::os::unix::fs::symlink("/", ws.join("root-link")).unwrap();
    std::os::unix::fs::symlink(b.s.state.path(), ws.join("state-link")).unwrap();
    std::fs::hard_link(&outside, ws.join("hard-link")).unwrap();
    nix::unistd::mkfifo(&ws.join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
    let other = b.s.state.path().join("workspace-other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("private.md"), "other agent's").unwrap();
    let cases: Vec<(&str, Value, &str)> = vec![
        ("read", json!({"path": "../outside.txt"}), "denied"),
        ("read", json!({"path": "../../../../etc/passwd"}), "denied"),
        ("read", json!({"path": "/etc/passwd"}), "denied"),
        (
            "read",
            json!({"path": "/workspace/../outside.txt"}),
            "denied",
        ),
        ("read", json!({"path": "a/../../outside.txt"}), "denied"),
        ("read", json!({"path": "passwd-link"}), "denied"),
        ("read", json!({"path": "root-link/etc/passwd"}), "denied"),
        ("read", json!({"path": "state-link/outside.txt"}), "denied"),
        ("read", json!({"path": "hard-link"}), "denied"),
        ("read", json!({"path": "fifo"}), "denied"),
        ("read", json!({"path": "/proc/self/environ"}), "denied"),
        (
            "read",
            json!({"path": "../workspace-other/private.md"}),
            "denied",
        ),
        ("read", json!({"path": "../gateway.token"}), "denied"),
        (
            "read",
            json!({"path": "../credentials/agent.password"}),
            "denied",
        ),
        ("ls", json!({"path": ".."}), "denied"),
        ("ls", json!({"path": "root-link"}), "denied"),
        (
            "write",
            json!({"path": "root-link/tmp/pwned", "content": "x"}),
            "denied",
        ),
        (
            "write",
            json!({"path": "state-link/pwned", "content": "x"}),
            "denied",
        ),
        (
            "write",
            json!({"path": "/proc/self/root/tmp/pwned", "content": "x"}),
            "denied",
        ),
        (
            "write",
            json!({"path": "../pwned", "content": "x"}),
            "denied",
        ),
        (
            "edit",
            json!({"path": "hard-link", "oldText": "secret", "newText": "pwned"}),
            "denied",
        ),
        (
            "edit",
            json!({"path": "passwd-link", "oldText": "root", "newText": "toor"}),
            "denied",
        ),
        ("read", json!({"path": "a\u{0}b"}), "invalid_arguments"),
        ("read", json!({"path": 5}), "invalid_arguments"),
        (
            "read",
            json!({"path": "x", "sneaky": true}),
            "invalid_arguments",
        ),
        ("read", json!("{not json"), "invalid_arguments"),
        (
            "write",
            json!({"path": "big", "content": "x".repeat(200_000)}),
            "invalid_arguments",
        ),
        ("read", json!({"path": "nope.txt"}), "invalid_arguments"),
    ];
    for (tool, args, code) in cases {
        let r = b.call(tool, args.clone()).await;
        assert!(refused(&r, code), "{tool} {args}: {}", text(&r));
        assert!(!text(&r).contains("root:x:0:0"), "{tool} {args} leaked");
    }
    assert_eq!(
        std::fs::read_to_string(&outside).unwrap(),
        "secret",
        "untouched"
    );
    assert!(!Path::new("/tmp/pwned").exists());
    assert!(!b.s.state.path().join("pwned").exists());
    assert!(!ws.join("big").exists());
    // Another agent's workspace is its own: `main` cannot name it, and an agent id
    // that is a path is refused.
    let r = b
        .call_as(
            "../workspace-other",
            "c-x",
            "read",
            r#"{"path":"private.md"}"#,
        )
        .await;
    assert!(refused(&r, "invalid_arguments"), "{}", text(&r));
}

#[tokio::test]
async fn file_tools_read_write_and_edit_exactly() {
    let b = ToolBox::start(&[]).await;
    let r = b
        .call(
            "write",
            json!({"path": "notes/a.txt", "content": "one\ntwo\nthree\ntwo\n"}),
        )
        .await;
    assert!(r.ok, "{}", text(&r));
    let r = b
        .call(
            "read",
            json!({"path": "notes/a.txt", "offset": 2, "limit": 2}),
        )
        .await;
    assert_eq!(text(&r), "two\nthree\n");
    let r = b
        .call(
            "edit",
            json!({"path": "notes/a.txt", "oldText": "two", "newText": "2"}),
        )
        .await;
    assert!(text(&r).contains("occurs 2 times"), "{}", text(&r));
    let r = b
        .call(
            "edit",
            json!({"path": "notes/a.txt", "oldText": "four", "newText": "4"}),
        )
        .await;
    assert!(text(&r).contains("not found"), "{}", text(&r));
    let r = b
        .call(
            "edit",
            json!({"path": "notes/a.txt", "oldText": "three\ntwo", "newText": "3\n2"}),
        )
        .await;
    assert!(r.ok, "{}", text(&r));
    let r = b
        .call("read", json!({"path": "/workspace/notes/a.txt"}))
        .await;
    assert_eq!(text(&r), "one\ntwo\n3\n2\n");
    let r = b.call("ls", json!({"path": "notes"})).await;
    assert_eq!(text(&r), "a.txt\t12 bytes\n");
    // No temporary files are left behind by the atomic writes.
    let names: Vec<String> = std::fs::read_dir(b.workspace().join("notes"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["a.txt"]);
}

#[tokio::test]
async fn exec_is_isolated_bounded_and_clean() {
    let b = ToolBox::start(&[]).await;
    let nats_port = b.s.nats.url.rsplit(':').next().unwrap().to_owned();
    let state = b.s.state.path().display().to_string();
    // The environment is cleared: no provider keys, no NATS credentials, no tokens.
    let r = b.call("exec", json!({"command": "env"})).await;
    let env = text(&r);
    assert!(
        !env.contains("test-key") && !env.contains("CLAWBUS") && !env.contains("NATS"),
        "{env}"
    );
    assert!(env.contains("HOME=/workspace"), "{env}");
    // The state directory is not there; only the workspace is.
    let r = b
        .call(
            "exec",
            json!({"command": format!("ls {state}; cat {state}/clawbus.db")}),
        )
        .await;
    assert!(
        text(&r).contains("No such file") && text(&r).contains("[exit code"),
        "{}",
        text(&r)
    );
    let r = b
        .call("exec", json!({"command": "touch /usr/x; echo hi > /etc/x"}))
        .await;
    assert!(text(&r).contains("Read-only file system"), "{}", text(&r));
    // No network: not the NATS port on loopback, not the cloud metadata address.
    for target in [
        format!("127.0.0.1/{nats_port}"),
        "169.254.169.254/80".into(),
    ] {
        let r = b
            .call(
                "exec",
                json!({"command": format!("bash -c 'echo > /dev/tcp/{target}' && echo CONNECTED")}),
            )
            .await;
        assert!(!text(&r).contains("CONNECTED"), "{target}: {}", text(&r));
    }
    // Its own pid namespace: it sees only itself.
    let r = b
        .call("exec", json!({"command": "ls /proc | grep -c '^[0-9]'"}))
        .await;
    assert!(text(&r).trim().parse::<u32>().unwrap() < 10, "{}", text(&r));
    // A command past its timeout is killed with everything it started.
    let started = std::time::Instant::now();
    let r = b
        .call(
            "exec",
            json!({"command": "sleep 300 & sleep 300", "timeout": 1}),
        )
        .await;
    assert!(text(&r).contains("killed after 1 s"), "{}", text(&r));
    assert!(started.elapsed() < Duration::from_secs(20));
    let r = b
        .call("exec", json!({"command": "(sleep 301 &) ; echo left"}))
        .await;
    assert!(text(&r).starts_with("left"), "{}", text(&r));
    // The pid namespace goes with the command: its processes are killed as it ends
    // (the kernel takes a moment to reap them).
    let gone = clawbus_testkit::wait_for(Duration::from_secs(5), || async {
        let ps = std::process::Command::new("pgrep")
            .args(["-f", "sleep 30[01]"])
            .output()
            .unwrap();
        ps.stdout.is_empty()
    })
    .await;
    assert!(gone, "a sandboxed process outlived its command");
    // Output is capped; the command still finishes.
    let r = b
        .call("exec", json!({"command": "yes | head -c 1000000"}))
        .await;
    assert!(text(&r).contains("[output cut:") && text(&r).len() < 70_000);
    // Files are capped (file size limit): the disk does not fill.
    let r = b
        .call(
            "exec",
            json!({"command": "head -c 100000000 /dev/zero > big; ls -l big"}),
        )
        .await;
    let size = std::fs::metadata(b.workspace().join("big"))
        .map(|m| m.len())
        .unwrap_or(0);
    assert!(size <= 64 * 1024 * 1024, "{size}: {}", text(&r));
    // Memory is capped: a hog fails, the sandbox goes on.
    let r = b
        .call(
            "exec",
            json!({"command": "x=$(head -c 2000000000 /dev/zero | tr '\\0' a); echo ${#x}"}),
        )
        .await;
    assert!(!text(&r).starts_with("2000000000"), "{}", text(&r));
    let r = b.call("exec", json!({"command": "echo still here"})).await;
    assert_eq!(text(&r), "still here\n");
    // Hostile arguments get clear errors.
    for (args, code) in [
        (json!({"command": ""}), "invalid_arguments"),
        (
            json!({"command": "true", "env": {"LD_PRELOAD": "/x.so"}}),
            "invalid_arguments",
        ),
        (
            json!({"command": "true", "env": {"A=B": "c"}}),
            "invalid_arguments",
        ),
        (json!({"command": "true", "workdir": "../.."}), "denied"),
        (json!({"command": "x".repeat(70_000)}), "invalid_arguments"),
        (json!({"cmd": "true"}), "invalid_arguments"),
    ] {
        let r = b.call("exec", args.clone()).await;
        assert!(refused(&r, code), "{args}: {}", text(&r));
    }
}

#[tokio::test]
async fn a_call_runs_once_whatever_the_retries() {
    let b = ToolBox::start(&[]).await;
    let args = r#"{"command": "echo once >> count.txt; wc -l < count.txt"}"#;
    let first = b.call_as("main", "run:r1:tool:1", "exec", args).await;
    let again = b.call_as("main", "run:r1:tool:1", "exec", args).await;
    assert_eq!(text(&first), "1\n");
    assert_eq!(again, first, "the recorded result, not a second run");
    assert_eq!(
        std::fs::read_to_string(b.workspace().join("count.txt")).unwrap(),
        "once\n"
    );
    let metrics =
        b.s.admin_get(clawbus_testkit::Service::Sandbox, "/metrics")
            .await;
    assert!(
        metrics.contains("clawbus_sandbox_tool_calls_total{outcome=\"replayed\",tool=\"exec\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn policy_decides_which_tools_exist_and_what_exec_may_run() {
    let b = ToolBox::start(&[
        ("CLAWBUS__SANDBOX__DENY", "[\"write\"]"),
        ("CLAWBUS__SANDBOX__EXEC_SECURITY", "allowlist"),
        ("CLAWBUS__SANDBOX__EXEC_ALLOWLIST", "[\"echo\"]"),
    ])
    .await;
    let r = b.call("write", json!({"path": "x", "content": "y"})).await;
    assert!(
        refused(&r, "denied") && text(&r).contains("profile"),
        "{}",
        text(&r)
    );
    assert!(b.call("exec", json!({"command": "echo ok"})).await.ok);
    let r = b.call("exec", json!({"command": "cat /etc/passwd"})).await;
    assert!(refused(&r, "denied"), "{}", text(&r));
    let r = b
        .call("exec", json!({"command": "echo ok; cat /etc/passwd"}))
        .await;
    assert!(refused(&r, "denied"), "{}", text(&r));
    // The registry the agent gets says the same.
    let req = Envelope::new(
        "t",
        1,
        clawbus_wire::ToolListRequest {
            agent_id: "main".into(),
            sender: None,
        },
    );
    let reply = b
        .nats
        .request("claw.v1.tools.list", encode(&req).unwrap().into())
        .await
        .unwrap();
    let tools = decode::<clawbus_wire::ToolListResponse>(&reply.payload)
        .unwrap()
        .body
        .tools;
    let names: Vec<&str> = tools.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "read",
            "edit",
            "apply_patch",
            "memory_search",
            "memory_get",
            "ls",
            "exec",
            "process",
            "sessions_list",
            "sessions_history",
            "web_fetch"
        ]
    );
}

#[tokio::test]
async fn without_bubblewrap_exec_refuses_unless_explicitly_unsandboxed() {
    let b = ToolBox::start(&[("CLAWBUS__SANDBOX__BWRAP", "/nonexistent/bwrap")]).await;
    let r = b.call("exec", json!({"command": "echo hi"})).await;
    assert!(
        refused(&r, "unavailable") && text(&r).contains("sandbox.mode"),
        "{}",
        text(&r)
    );
    let off = ToolBox::start(&[
        ("CLAWBUS__SANDBOX__BWRAP", "/nonexistent/bwrap"),
        ("CLAWBUS__SANDBOX__MODE", "off"),
    ])
    .await;
    let r = off.call("exec", json!({"command": "echo hi; pwd"})).await;
    assert_eq!(text(&r), format!("hi\n{}\n", off.workspace().display()));
}

/// A web server on loopback for `web_fetch`: a page, redirects to forbidden places,
/// a redirect loop, a huge page and an image.
async fn web_server() -> (u16, tokio::task::JoinHandle<()>) {
    use axum::http::{header, StatusCode};
    use axum::response::IntoResponse;
    use axum::routing::get;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let redirect = |to: String| {
        move || async move { (StatusCode::FOUND, [(header::LOCATION, to)]).into_response() }
    };
    let app = axum::Router::new()
        .route(
            "/page",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
                    "<html><head><title>T</title><script>var secret=1</script></head><body><h1>Hello</h1><p>from the <b>web</b></p></body></html>",
                )
            }),
        )
        .route("/meta", get(redirect("http://169.254.169.254/latest/meta-data/".into())))
        .route("/mapped", get(redirect(format!("http://[::ffff:127.0.0.1]:{port}/page"))))
        .route("/loop", get(redirect("/loop".into())))
        .route("/big", get(|| async { "x".repeat(5_000_000) }))
        .route(
            "/image",
            get(|| async { ([(header::CONTENT_TYPE, "image/png")], vec![0x89u8, 0x50, 0x4e, 0x47]) }),
        );
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (port, task)
}

#[tokio::test]
async fn web_fetch_reaches_public_addresses_only() {
    let (port, _server) = web_server().await;
    let b = ToolBox::start(&[]).await;
    let cases = [
        format!("http://127.0.0.1:{port}/page"),
        format!("http://localhost:{port}/page"),
        format!("http://2130706433:{port}/page"),
        format!("http://0x7f.1:{port}/page"),
        format!("http://0177.0.0.1:{port}/page"),
        format!("http://[::1]:{port}/page"),
        format!("http://[::ffff:127.0.0.1]:{port}/page"),
        "http://169.254.169.254/latest/meta-data/".into(),
        "http://[fd00:ec2::254]/latest/meta-data/".into(),
        "http://10.0.0.1/".into(),
        "http://100.64.0.1/".into(),
        "http://0.0.0.0/".into(),
        "file:///etc/passwd".into(),
        "gopher://example.com/".into(),
        "http://user:pw@example.com/".into(),
    ];
    for url in cases {
        let r = b.call("web_fetch", json!({"url": url})).await;
        assert!(refused(&r, "denied"), "{url}: {}", text(&r));
    }
    let r = b.call("web_fetch", json!({"url": "not a url"})).await;
    assert!(refused(&r, "invalid_arguments"), "{}", text(&r));
    let r = b
        .call("web_fetch", json!({"url": "http://x", "headers": {}}))
        .await;
    assert!(refused(&r, "invalid_arguments"), "{}", text(&r));
}

#[tokio::test]
async fn web_fetch_rechecks_redirects_and_caps_what_it_reads() {
    let (port, _server) = web_server().await;
    // The test server is on loopback: allowed by name for this sandbox only.
    let b = ToolBox::start(&[("CLAWBUS__SANDBOX__WEB_ALLOW_HOSTS", "[\"127.0.0.1\"]")]).await;
    let base = format!("http://127.0.0.1:{port}");
    let r = b
        .call("web_fetch", json!({"url": format!("{base}/page")}))
        .await;
    let page = text(&r);
    assert!(
        r.ok && page.contains("# Hello") && page.contains("from the **web**"),
        "{page}"
    );
    assert!(
        !page.contains("<h1>") && !page.contains("var secret"),
        "readable text: {page}"
    );
    for path in ["/meta", "/mapped"] {
        let r = b
            .call("web_fetch", json!({"url": format!("{base}{path}")}))
            .await;
        assert!(refused(&r, "denied"), "{path}: {}", text(&r));
    }
    let r = b
        .call("web_fetch", json!({"url": format!("{base}/loop")}))
        .await;
    assert!(text(&r).contains("more than 5 redirects"), "{}", text(&r));
    let r = b
        .call(
            "web_fetch",
            json!({"url": format!("{base}/big"), "maxChars": 1000}),
        )
        .await;
    assert!(
        r.ok && text(&r).contains("[cut: 1000 of") && text(&r).len() < 2000,
        "{}",
        &text(&r)[..200]
    );
    let r = b
        .call("web_fetch", json!({"url": format!("{base}/image")}))
        .await;
    assert!(
        refused(&r, "invalid_arguments") && text(&r).contains("image/png"),
        "{}",
        text(&r)
    );
}

#[tokio::test]
async fn apply_patch_changes_every_file_or_none() {
    let b = ToolBox::start(&[]).await;
    b.call(
        "write",
        json!({"path": "src/a.txt", "content": "one\ntwo\nthree\n"}),
    )
    .await;
    b.call("write", json!({"path": "old.txt", "content": "bye\n"}))
        .await;
    let patch = "diff --git a/src/a.txt b/src/a.txt\n--- a/src/a.txt\n+++ b/src/a.txt\n@@ -1,3 +1,3 @@\n one\n-two\n+2\n three\n--- /dev/null\n+++ b/src/new.txt\n@@ -0,0 +1,2 @@\n+fresh\n+file\n--- a/old.txt\n+++ /dev/null\n@@ -1 +0,0 @@\n-bye\n";
    let r = b.call("apply_patch", json!({"patch": patch})).await;
    assert!(r.ok, "{}", text(&r));
    let ws = b.workspace();
    assert_eq!(
        std::fs::read_to_string(ws.join("src/a.txt")).unwrap(),
        "one\n2\nthree\n"
    );
    assert_eq!(
        std::fs::read_to_string(ws.join("src/new.txt")).unwrap(),
        "fresh\nfile\n"
    );
    assert!(!ws.join("old.txt").exists());
    // A hunk that does not apply changes nothing, not even the files before it.
    let bad = "--- a/src/new.txt\n+++ b/src/new.txt\n@@ -1,2 +1,2 @@\n-fresh\n+FRESH\n file\n--- a/src/a.txt\n+++ b/src/a.txt\n@@ -1,3 +1,3 @@\n one\n-two\n+zwei\n three\n";
    let r = b.call("apply_patch", json!({"patch": bad})).await;
    assert!(
        refused(&r, "invalid_arguments") && text(&r).contains("nothing was changed"),
        "{}",
        text(&r)
    );
    assert_eq!(
        std::fs::read_to_string(ws.join("src/new.txt")).unwrap(),
        "fresh\nfile\n"
    );
    for hostile in [
        "--- /dev/null\n+++ b/../escape.txt\n@@ -0,0 +1 @@\n+x\n",
        "--- /dev/null\n+++ /etc/cron.d/x\n@@ -0,0 +1 @@\n+x\n",
        "--- a/../../etc/passwd\n+++ /dev/null\n@@ -1 +0,0 @@\n-root\n",
        "just some text",
    ] {
        let r = b.call("apply_patch", json!({"patch": hostile})).await;
        assert!(!r.ok, "{hostile}: {}", text(&r));
    }
    assert!(!b.s.state.path().join("escape.txt").exists());
}

#[tokio::test]
async fn memory_tools_search_and_read_the_memory_files_only() {
    let b = ToolBox::start(&[]).await;
    b.call("write", json!({"path": "MEMORY.md", "content": "# Memory\nAda likes otters.\nThe build uses make.\n"})).await;
    b.call("write", json!({"path": "memory/2026-11-25.md", "content": "Met Ada at the otter sanctuary.\nAda's otter is named Pip.\n"})).await;
    b.call(
        "write",
        json!({"path": "notes.txt", "content": "otters everywhere\n"}),
    )
    .await;
    let r = b.call("memory_search", json!({"query": "Ada otter"})).await;
    let hits = text(&r);
    let lines: Vec<&str> = hits.lines().collect();
    assert_eq!(lines.len(), 3, "{hits}");
    assert!(lines.iter().all(|l| l.contains("Ada")), "{hits}");
    assert!(
        !hits.contains("notes.txt"),
        "only memory files are searched"
    );
    assert!(hits.starts_with("MEMORY.md:2: Ada likes otters."), "{hits}");
    let r = b
        .call(
            "memory_get",
            json!({"path": "memory/2026-11-25.md", "from": 2, "lines": 1}),
        )
        .await;
    assert_eq!(text(&r), "Ada's otter is named Pip.\n");
    for (args, code) in [
        (json!({"path": "notes.txt"}), "denied"),
        (json!({"path": "../MEMORY.md"}), "denied"),
        (json!({"path": "memory/../../x.md"}), "denied"),
        (json!({"path": "memory/none.md"}), "invalid_arguments"),
    ] {
        let r = b.call("memory_get", args.clone()).await;
        assert!(refused(&r, code), "{args}: {}", text(&r));
    }
    let r = b.call("memory_search", json!({"query": "?!"})).await;
    assert!(refused(&r, "invalid_arguments"), "{}", text(&r));
}

/// `clawbus approvals ...` against the box's NATS, as its owner would run it.
async fn approvals_cli(b: &ToolBox, args: &[&str]) -> (bool, String) {
    let args: Vec<&str> = std::iter::once("approvals")
        .chain(args.iter().copied())
        .collect();
    clawbus_tests::cli(&b.s, &args).await
}

/// Waits for the approval of `command` to be listed; its id.
async fn pending_id(b: &ToolBox, command: &str) -> String {
    let found = std::sync::Mutex::new(String::new());
    let listed = clawbus_testkit::wait_for(Duration::from_secs(20), || async {
        let (_, out) = approvals_cli(b, &["list"]).await;
        match out.lines().find(|l| l.ends_with(command)) {
            Some(l) => {
                *found.lock().unwrap() = l.split_whitespace().next().unwrap_or_default().to_owned();
                true
            }
            None => false,
        }
    })
    .await;
    assert!(listed, "`{command}` never waited for approval");
    found.into_inner().unwrap()
}

#[tokio::test]
async fn approvals_let_the_owner_decide_through_the_bus() {
    let b = ToolBox::start(&[("CLAWBUS__SANDBOX__ASK", "always")]).await;
    let ws = b.workspace();
    let (r, _) = tokio::join!(
        b.call("exec", json!({"command": "touch denied.txt"})),
        async {
            let id = pending_id(&b, "touch denied.txt").await;
            let (ok, out) = approvals_cli(&b, &["deny", &id]).await;
            assert!(ok && out.contains("denied"), "{out}");
            let (ok, out) = approvals_cli(&b, &["allow", &id]).await;
            assert!(!ok && out.contains("already decided"), "{out}");
        }
    );
    assert!(
        refused(&r, "denied") && text(&r).contains("owner denied"),
        "{}",
        text(&r)
    );
    assert!(!ws.join("denied.txt").exists());
    let (r, _) = tokio::join!(
        b.call("exec", json!({"command": "touch once.txt"})),
        async {
            let id = pending_id(&b, "touch once.txt").await;
            assert!(approvals_cli(&b, &["allow", &id]).await.0);
        }
    );
    assert!(r.ok, "{}", text(&r));
    assert!(ws.join("once.txt").exists());
    let (ok, out) = approvals_cli(&b, &["list"]).await;
    assert!(ok && out.contains("no approvals pending"), "{out}");
    for bad in [
        &["allow", "nothex"][..],
        &["deny", "000000000000"],
        &["maybe"],
        &["allow"],
    ] {
        let (ok, out) = approvals_cli(&b, bad).await;
        assert!(!ok && !out.is_empty(), "{bad:?}: {out}");
    }
}

#[tokio::test]
async fn allowed_always_asks_no_more_and_no_answer_denies() {
    let b = ToolBox::start(&[
        ("CLAWBUS__SANDBOX__ASK", "on-miss"),
        ("CLAWBUS__SANDBOX__EXEC_ALLOWLIST", "[\"true\"]"),
        ("CLAWBUS__SANDBOX__APPROVAL_TIMEOUT_SECS", "1"),
    ])
    .await;
    // On the allowlist: runs without asking.
    assert!(b.call("exec", json!({"command": "true"})).await.ok);
    // Nobody answers: denied once the time is up.
    let r = b.call("exec", json!({"command": "date"})).await;
    assert!(
        refused(&r, "denied") && text(&r).contains("no approval within 1 s"),
        "{}",
        text(&r)
    );
    let slow = ToolBox::start(&[("CLAWBUS__SANDBOX__ASK", "on-miss")]).await;
    let (r, _) = tokio::join!(slow.call("exec", json!({"command": "echo first"})), async {
        let id = pending_id(&slow, "echo first").await;
        assert!(approvals_cli(&slow, &["allow", &id, "--always"]).await.0);
    });
    assert_eq!(text(&r), "first\n");
    // The same program again: allowed always, no question.
    let r = slow.call("exec", json!({"command": "echo second"})).await;
    assert_eq!(text(&r), "second\n");
}

#[tokio::test]
async fn sandbox_replicas_share_the_calls() {
    let b = ToolBox::with(SuiteOpts {
        replicas: 2,
        ..Default::default()
    })
    .await;
    // Calls made at once spread over the queue group's members.
    let calls: Vec<_> = (0..40)
        .map(|i| b.call("exec", json!({"command": format!("echo {i}")})))
        .collect();
    for (i, r) in futures::future::join_all(calls).await.iter().enumerate() {
        assert_eq!(text(r), format!("{i}\n"));
    }
    for replica in 0..2 {
        let m =
            b.s.get_text(&format!(
                "{}/metrics",
                b.s.replica_admin_url((clawbus_testkit::Service::Sandbox, replica))
            ))
            .await;
        assert!(
            m.contains("clawbus_sandbox_tool_calls_total{outcome=\"ok\",tool=\"exec\"}"),
            "sandbox-{replica} ran none: {m}"
        );
    }
}

#[tokio::test]
async fn each_agent_gets_its_own_policy_and_workspace() {
    let b = ToolBox::start(&[
        ("CLAWBUS__ROUTER__AGENTS", "[\"main\",\"public\"]"),
        ("CLAWBUS__SANDBOX__AGENTS__public__PROFILE", "minimal"),
        (
            "CLAWBUS__SANDBOX__AGENTS__public__ALLOW",
            "[\"read\",\"write\"]",
        ),
    ])
    .await;
    let r = b
        .call_as("public", "p-1", "exec", r#"{"command":"true"}"#)
        .await;
    assert!(refused(&r, "denied"), "{}", text(&r));
    let r = b
        .call_as(
            "public",
            "p-2",
            "write",
            r#"{"path":"mine.txt","content":"public's"}"#,
        )
        .await;
    assert!(r.ok, "{}", text(&r));
    assert!(b.s.state.path().join("workspace-public/mine.txt").exists());
    assert!(
        !b.workspace().join("mine.txt").exists(),
        "not main's workspace"
    );
    assert!(
        b.call_as("main", "m-1", "exec", r#"{"command":"true"}"#)
            .await
            .ok
    );
    let r = b.call_as("ghost", "g-1", "read", r#"{"path":"x"}"#).await;
    assert!(
        refused(&r, "denied") && text(&r).contains("no agent"),
        "{}",
        text(&r)
    );
    let req = Envelope::new(
        "t",
        1,
        clawbus_wire::ToolListRequest {
            agent_id: "public".into(),
            sender: None,
        },
    );
    let reply = b
        .nats
        .request("claw.v1.tools.list", encode(&req).unwrap().into())
        .await
        .unwrap();
    let tools = decode::<clawbus_wire::ToolListResponse>(&reply.payload)
        .unwrap()
        .body
        .tools;
    let names: Vec<&str> = tools.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["read", "write"]);
}

#[tokio::test]
async fn sessions_history_reads_the_agents_own_sessions_only() {
    let b = ToolBox::start(&[("CLAWBUS__ROUTER__AGENTS", "[\"main\",\"other\"]")]).await;
    b.s.chat_in("agent:main:earlier", "remember the blue door")
        .send()
        .await
        .unwrap();
    let db = clawbus_tests::storage(&b.s).await;
    assert!(
        clawbus_testkit::wait_for(Duration::from_secs(10), || async {
            clawbus_tests::transcript(&db, "agent:main:earlier")
                .await
                .is_ok_and(|t| t.len() == 2)
        })
        .await
    );
    let r = b
        .call(
            "sessions_history",
            json!({"sessionKey": "agent:main:earlier"}),
        )
        .await;
    assert_eq!(
        text(&r),
        "[user] remember the blue door\n[assistant] Echo: remember the blue door\n"
    );
    let r = b
        .call(
            "sessions_history",
            json!({"sessionKey": "agent:main:never"}),
        )
        .await;
    assert!(r.ok && text(&r).contains("no messages"), "{}", text(&r));
    for key in ["agent:other:main", "agent:mainx:y", "anything", ""] {
        let r = b.call("sessions_history", json!({"sessionKey": key})).await;
        assert!(refused(&r, "denied"), "{key}: {}", text(&r));
    }
    // sessions_list: the agent's own sessions only, the most recent first.
    b.s.chat(&json!({"model": "clawbus:other", "messages": [{"role": "user", "content": "x"}]}))
        .header("x-clawbus-session-key", "agent:other:secret")
        .send()
        .await
        .unwrap();
    b.s.chat_in("agent:main:later", "and a second session")
        .send()
        .await
        .unwrap();
    let listed = clawbus_testkit::wait_for(Duration::from_secs(10), || async {
        let t = text(&b.call("sessions_list", json!({})).await);
        t.starts_with("agent:main:later  2 messages")
            && t.contains("agent:main:earlier  2 messages")
    })
    .await;
    assert!(
        listed,
        "{}",
        text(&b.call("sessions_list", json!({})).await)
    );
    let t = text(&b.call("sessions_list", json!({"limit": 1})).await);
    assert_eq!(t.lines().count(), 1, "{t}");
    assert!(!text(&b.call("sessions_list", json!({})).await).contains("other"));
    let r = b.call_as("other", "o-list", "sessions_list", "{}").await;
    assert!(
        text(&r).contains("agent:other:secret") && !text(&r).contains("agent:main"),
        "{}",
        text(&r)
    );
    for bad in [
        json!({"limit": -1}),
        json!({"limit": "ten"}),
        json!({"since": 5}),
    ] {
        let r = b.call("sessions_list", bad.clone()).await;
        assert!(refused(&r, "invalid_arguments"), "{bad}: {}", text(&r));
    }
}

#[tokio::test]
async fn the_message_tool_sends_to_a_chat_once_and_only_when_allowed() {
    let b = ToolBox::start(&[
        ("CLAWBUS__ROUTER__AGENTS", "[\"main\",\"coder\"]"),
        ("CLAWBUS__SANDBOX__PROFILE", "full"),
        ("CLAWBUS__SANDBOX__AGENTS__coder__PROFILE", "coding"),
    ])
    .await;
    let ch = clawbus_tests::channel::FakeChannel::new(&b.s, "test", "bot1").await;
    let args = r#"{"channel":"test","account":"bot1","to":"alice","text":"the oven is on"}"#;
    let r = b.call_as("main", "msg-1", "message", args).await;
    assert!(r.ok, "{}", text(&r));
    // The same call again (a retry) sends nothing more.
    let r = b.call_as("main", "msg-1", "message", args).await;
    assert!(r.ok, "{}", text(&r));
    let sent = clawbus_testkit::wait_for(Duration::from_secs(10), || async {
        !ch.replies_in("alice").is_empty()
    })
    .await;
    assert!(sent);
    let url = b.s.nats.url.clone();
    let outs = clawbus_tests::outbound_messages(&url, "claw.v1.out.test.bot1")
        .await
        .unwrap();
    assert_eq!(outs.len(), 1, "{outs:?}");
    assert_eq!(outs[0].text, "the oven is on");
    for (args, code) in [
        (
            json!({"channel": "http", "to": "x", "text": "hi"}),
            "invalid_arguments",
        ),
        (
            json!({"channel": "bad.chan", "to": "x", "text": "hi"}),
            "invalid_arguments",
        ),
        (
            json!({"channel": "test", "to": "", "text": "hi"}),
            "invalid_arguments",
        ),
        (
            json!({"channel": "test", "to": "x", "text": "  "}),
            "invalid_arguments",
        ),
        (
            json!({"channel": "test", "to": "x", "text": "x".repeat(20_000)}),
            "invalid_arguments",
        ),
        (
            json!({"channel": "test", "to": "x", "text": "hi", "cc": "y"}),
            "invalid_arguments",
        ),
    ] {
        let r = b.call("message", args.clone()).await;
        assert!(refused(&r, code), "{args}: {}", text(&r));
    }
    // A coding agent has no messaging tools.
    let r = b.call_as("coder", "msg-2", "message", args).await;
    assert!(refused(&r, "denied"), "{}", text(&r));
}

#[tokio::test]
async fn a_fork_bomb_stops_at_the_process_limit() {
    let b = ToolBox::start(&[("CLAWBUS__SANDBOX__PROCESSES", "64")]).await;
    // Processes started one by one: the limit stops them well before 500.
    let r = b
        .call(
            "exec",
            json!({"command": "python3 -c 'import os, time\nn = 0\nwhile n < 500:\n    try:\n        pid = os.fork()\n    except OSError:\n        break\n    if pid == 0:\n        time.sleep(30)\n        os._exit(0)\n    n += 1\nprint(\"started\", n)'", "timeout": 20}),
        )
        .await;
    let t = text(&r);
    let started: u32 = t
        .lines()
        .find_map(|l| l.strip_prefix("started "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("{t}"));
    assert!(
        started < 64,
        "{started} processes started under a limit of 64"
    );
    // The classic bomb ends (at the limit, or killed at its timeout).
    let r = b
        .call(
            "exec",
            json!({"command": "fz9() { fz9 | fz9 & }; fz9; wait; echo ended", "timeout": 5}),
        )
        .await;
    assert!(r.ok, "{}", text(&r));
    // The sandbox and the host go on; nothing of the bomb is left.
    let r = b.call("exec", json!({"command": "echo fine"})).await;
    assert_eq!(text(&r), "fine\n");
    let gone = clawbus_testkit::wait_for(Duration::from_secs(10), || async {
        let ps = std::process::Command::new("pgrep")
            .args(["-f", "fz9"])
            .output()
            .unwrap();
        ps.stdout.is_empty()
    })
    .await;
    assert!(gone, "the fork bomb outlived its command");
}

#[tokio::test]
async fn a_sender_may_have_a_policy_of_their_own() {
    let b = ToolBox::start(&[
        (
            "CLAWBUS__SANDBOX__SENDERS__telegram:stranger__PROFILE",
            "minimal",
        ),
        (
            "CLAWBUS__SANDBOX__SENDERS__telegram:stranger__ALLOW",
            "[\"read\"]",
        ),
    ])
    .await;
    let r = b
        .call_from("telegram:stranger", "s-1", "exec", r#"{"command":"true"}"#)
        .await;
    assert!(refused(&r, "denied"), "{}", text(&r));
    let r = b
        .call_from(
            "telegram:owner",
            "s-2",
            "exec",
            r#"{"command":"echo mine"}"#,
        )
        .await;
    assert_eq!(text(&r), "mine\n");
    // The registry offers a sender what their policy allows.
    let ask = |sender: &str| {
        let req = Envelope::new(
            "t",
            1,
            clawbus_wire::ToolListRequest {
                agent_id: "main".into(),
                sender: Some(sender.into()),
            },
        );
        let nats = b.nats.clone();
        async move {
            let reply = nats
                .request("claw.v1.tools.list", encode(&req).unwrap().into())
                .await
                .unwrap();
            decode::<clawbus_wire::ToolListResponse>(&reply.payload)
                .unwrap()
                .body
                .tools
                .into_iter()
                .map(|t| t.name)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(ask("telegram:stranger").await, ["read"]);
    assert!(ask("telegram:owner").await.contains(&"exec".to_owned()));
}
