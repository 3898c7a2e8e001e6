//! Every HTTP entry point of the suite against hostile clients: tokens that would let
//! anyone in, slow and greedy clients, signatures checked from the headers. Real
//! processes; raw sockets where a client must misbehave in ways no HTTP library will.

use std::time::{Duration, Instant};

use clawbus_testkit::slack::SlackEmulator;
use clawbus_testkit::telegram::TelegramEmulator;
use clawbus_testkit::{bin_dir, wait_for, Service, Suite, SuiteOpts};
use clawbus_tests::unix_now;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Short timeouts and a small cap, so the tests see them act.
const LIMITS: [(&str, &str); 4] = [
    ("CLAWBUS__HTTP__HEADER_TIMEOUT_SECS", "2"),
    ("CLAWBUS__HTTP__BODY_TIMEOUT_SECS", "2"),
    ("CLAWBUS__HTTP__IDLE_TIMEOUT_SECS", "2"),
    ("CLAWBUS__HTTP__MAX_CONNECTIONS", "16"),
];

async fn suite(extra: &[(&str, &str)]) -> Suite {
    let env = LIMITS
        .iter()
        .chain(extra)
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Suite::start(SuiteOpts {
        env,
        ..Default::default()
    })
    .await
    .unwrap()
}

fn addr_of(url: &str) -> String {
    url.trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned()
}

/// Reads what the server sends until it closes (or resets) the connection, at most
/// 30 s; what it sent and how long that took.
async fn answer(s: &mut TcpStream) -> (String, Duration) {
    let started = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let read = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .expect("the server answers or closes within 30 s");
    (
        String::from_utf8_lossy(&out).into_owned(),
        started.elapsed(),
    )
}

/// Sends `head` and then nothing more; the answer.
async fn send_head(addr: &str, head: &str) -> (String, Duration) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    answer(&mut s).await
}

/// The value of a metric line of a Prometheus page (`name{labels}`), 0 without one.
fn metric(page: &str, series: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Runs a service binary with only `env`, until it exits (30 s at most).
async fn run_alone(bin: &str, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let out = tokio::process::Command::new(bin_dir().join(bin))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(env.iter().copied())
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(30), out)
        .await
        .expect("exits within 30 s")
        .unwrap()
}

#[tokio::test]
async fn a_gateway_with_an_empty_blank_or_short_token_refuses_to_start() {
    let home = tempfile::tempdir().unwrap();
    let home_s = home.path().display().to_string();
    let token = home.path().join("gateway.token");
    // No NATS on this port: the gateway must refuse before it would wait for one.
    let env = [
        ("CLAWBUS_HOME", home_s.as_str()),
        ("NATS_URL", "nats://127.0.0.1:1"),
    ];
    for (content, why) in [("", "empty"), ("  \n", "blank"), ("abc123", "6 characters")] {
        std::fs::write(&token, content).unwrap();
        for (bin, args) in [("clawbus-gateway", &[][..]), ("clawbus", &["token"][..])] {
            let out = run_alone(bin, args, &env).await;
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{bin} with {content:?} started");
            assert!(err.contains(why), "{bin}: {err}");
            assert!(err.contains("gateway.token"), "{err}");
            assert!(err.contains("delete the file"), "{err}");
        }
    }
    // A configured token alike.
    let out = run_alone(
        "clawbus-gateway",
        &[],
        &[
            ("CLAWBUS_HOME", home_s.as_str()),
            ("NATS_URL", "nats://127.0.0.1:1"),
            ("CLAWBUS_GATEWAY_TOKEN", "   "),
        ],
    )
    .await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("CLAWBUS_GATEWAY_TOKEN"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // As the message says: deleted, a new one is generated.
    std::fs::remove_file(&token).unwrap();
    let out = run_alone("clawbus", &["token"], &env).await;
    assert!(out.status.success());
    let t = String::from_utf8(out.stdout).unwrap();
    assert_eq!(t.trim(), std::fs::read_to_string(&token).unwrap());
    assert_eq!(t.trim().len(), 64);
}

#[tokio::test]
async fn an_empty_bearer_is_refused_over_http2_and_the_scheme_is_case_insensitive() {
    let s = suite(&[]).await;
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let models = format!("{}/v1/models", s.gateway_url);
    let status = |r: reqwest::Response| {
        assert_eq!(r.version(), reqwest::Version::HTTP_2);
        r.status().as_u16()
    };
    for bad in ["Bearer ", "Bearer  ", "Bearer", "bearer", "Basic x"] {
        let r = h2
            .get(&models)
            .header("authorization", bad)
            .send()
            .await
            .unwrap();
        assert_eq!(status(r), 401, "{bad:?}");
    }
    let padded = format!("Bearer {} ", s.token);
    let r = h2
        .get(&models)
        .header("authorization", padded)
        .send()
        .await
        .unwrap();
    assert_eq!(
        status(r),
        401,
        "a token with a space after it is another token"
    );
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let v = format!("{scheme} {}", s.token);
        let r = h2
            .get(&models)
            .header("authorization", &v)
            .send()
            .await
            .unwrap();
        assert_eq!(status(r), 200, "{scheme}");
        let r = s
            .http
            .get(&models)
            .header("authorization", &v)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "{scheme} over HTTP/1.1");
    }
}

#[tokio::test]
async fn slow_clients_are_cut_and_a_full_gateway_refuses_without_hanging() {
    let s = suite(&[]).await;
    let gw = addr_of(&s.gateway_url);
    // A header trickled a byte every 100 ms: cut at the header timeout (2 s).
    let mut conn = TcpStream::connect(&gw).await.unwrap();
    conn.write_all(b"GET /v1/models HTTP/1.1\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        if conn.write_all(b"x").await.is_err() {
            break;
        }
        // Still open after 10 s: the header timeout did not act.
        assert!(started.elapsed() < Duration::from_secs(10), "never cut");
        let mut buf = [0u8; 64];
        if let Ok(Ok(0) | Err(_)) =
            tokio::time::timeout(Duration::from_millis(1), conn.read(&mut buf)).await
        {
            break;
        }
    }
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(1500), "cut after {took:?}");
    assert!(took < Duration::from_secs(5), "cut after {took:?}");

    // A body that never comes: 408 at the body timeout.
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{{\"model\"",
        s.token
    );
    let (text, took) = send_head(&gw, &head).await;
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(took < Duration::from_secs(5), "{took:?}");

    // Bad chunked encoding: 400 saying so; too large: 413, as its length says or as
    // its chunks show.
    let chunked = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\ntransfer-encoding: chunked\r\n\r\n",
        s.token
    );
    let (text, _) = send_head(&gw, &format!("{chunked}zz\r\n{{}}\r\n0\r\n\r\n")).await;
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(text.contains("malformed request body"), "{text}");
    let (text, took) = send_head(
        &gw,
        &format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\ncontent-length: 2000000\r\n\r\n",
            s.token
        ),
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(text.contains("exceeds 1048576 bytes"), "{text}");
    assert!(
        took < Duration::from_secs(1),
        "refused from its length: {took:?}"
    );
    let mut big = TcpStream::connect(&gw).await.unwrap();
    big.write_all(chunked.as_bytes()).await.unwrap();
    let chunk = format!("{:x}\r\n{}\r\n", 64 * 1024, "x".repeat(64 * 1024));
    for _ in 0..17 {
        if big.write_all(chunk.as_bytes()).await.is_err() {
            break;
        }
    }
    let (text, _) = answer(&mut big).await;
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");

    // The cap (16): sixteen half-open requests hold it; more are refused at once,
    // never queued, while the admin port (a listener of its own) answers the probes.
    let mut held = Vec::new();
    for _ in 0..16 {
        let mut c = TcpStream::connect(&gw).await.unwrap();
        c.write_all(b"GET /v1/models HTTP/1.1\r\nhost: x\r\n")
            .await
            .unwrap();
        held.push(c);
    }
    let full = wait_for(Duration::from_secs(10), || async {
        let page = s.admin_get(Service::Gateway, "/metrics").await;
        metric(&page, "clawbus_http_connections_open{listener=\"gateway\"}") == 16.0
    })
    .await;
    assert!(full, "16 connections open");
    for _ in 0..40 {
        let mut c = TcpStream::connect(&gw).await.unwrap();
        let (text, took) = answer(&mut c).await;
        assert!(text.starts_with("HTTP/1.1 503"), "{text}");
        assert!(took < Duration::from_secs(1), "{took:?}");
    }
    assert_eq!(s.admin_get(Service::Gateway, "/livez").await, "ok\n");
    // The held ones are cut at the header timeout: the gateway serves again.
    let served = wait_for(Duration::from_secs(15), || async {
        let r = s
            .http
            .get(format!("{}/v1/models", s.gateway_url))
            .bearer_auth(&s.token)
            .send()
            .await;
        r.is_ok_and(|r| r.status() == 200)
    })
    .await;
    assert!(served, "served again once the held connections were cut");
    let r = s
        .chat_in("agent:main:after-flood", "still there?")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let page = s.admin_get(Service::Gateway, "/metrics").await;
    assert!(
        metric(
            &page,
            "clawbus_http_connections_refused_total{listener=\"gateway\"}"
        ) >= 40.0
    );
    assert!(
        metric(
            &page,
            "clawbus_http_timeouts_total{kind=\"header\",listener=\"gateway\"}"
        ) >= 17.0,
        "{page}"
    );
    assert!(
        metric(
            &page,
            "clawbus_http_timeouts_total{kind=\"body\",listener=\"gateway\"}"
        ) >= 1.0
    );
    drop(held);
}

#[tokio::test]
async fn a_quiet_stream_outlives_the_idle_timeout() {
    let s = suite(&[]).await;
    s.emu().hold();
    let body = serde_json::json!({"model": "clawbus", "stream": true,
        "messages": [{"role": "user", "content": "take your time"}]});
    let request = s.chat(&body);
    let streamed = tokio::spawn(async move {
        let mut r = request.send().await.unwrap();
        assert_eq!(r.status(), 200);
        let mut sse = String::new();
        while let Some(c) = r.chunk().await.unwrap() {
            sse.push_str(&String::from_utf8_lossy(&c));
        }
        sse
    });
    let asked = wait_for(Duration::from_secs(30), || async {
        !s.emu().requests().is_empty()
    })
    .await;
    assert!(asked, "the turn reached the model");
    // Longer than the idle timeout passes: an idle connection beside it is closed.
    let (text, took) = send_head(
        &addr_of(&s.gateway_url),
        "GET /livez HTTP/1.1\r\nhost: x\r\n\r\n",
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(took >= Duration::from_millis(1500), "{took:?}");
    s.emu().release();
    let sse = streamed.await.unwrap();
    assert!(sse.trim_end().ends_with("data: [DONE]"), "{sse}");
    let text: String = sse
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(text, "Echo: take your time", "{sse}");
}

const SLACK_SECRET: &str = "8f742231b10e8888abcd99yyyzzz85a5";

#[tokio::test]
async fn slack_calls_are_refused_from_their_headers_before_the_body() {
    let slack = SlackEmulator::start("xoxb-test-token").await.unwrap();
    let root = slack.api_root();
    let s = suite(&[
        ("CLAWBUS__CHANNELS__SLACK__BOT_TOKEN", "xoxb-test-token"),
        ("CLAWBUS__CHANNELS__SLACK__SIGNING_SECRET", SLACK_SECRET),
        ("CLAWBUS__CHANNELS__SLACK__API_ROOT", root.as_str()),
    ])
    .await;
    let gw = addr_of(&s.gateway_url);
    let head = |ts: i64, sig: &str, len: usize| {
        format!(
            "POST /slack/events HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nx-slack-request-timestamp: {ts}\r\nx-slack-signature: {sig}\r\ncontent-length: {len}\r\n\r\n"
        )
    };
    let good_shape = format!("v0={}", "ab".repeat(32));
    // A megabyte announced, never sent: what the headers show is refused at once.
    for (ts, sig, len, want) in [
        (unix_now(), "v0=bad", 1_000_000, "HTTP/1.1 401"),
        (unix_now(), "", 1_000_000, "HTTP/1.1 401"),
        (
            unix_now() - 600,
            good_shape.as_str(),
            1_000_000,
            "HTTP/1.1 401",
        ),
        (unix_now(), good_shape.as_str(), 2_000_000, "HTTP/1.1 413"),
    ] {
        let (text, took) = send_head(&gw, &head(ts, sig, len)).await;
        assert!(text.starts_with(want), "{sig:?} {len}: {text}");
        assert!(took < Duration::from_secs(1), "{sig:?}: {took:?}");
    }
    // A well-formed signature can only be checked against the body: that one waits
    // for it, within the body timeout.
    let (text, took) = send_head(&gw, &head(unix_now(), &good_shape, 1_000_000)).await;
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    // Signed calls still get in.
    let hs = serde_json::json!({"type": "url_verification", "challenge": "c-1"});
    let r = clawbus_tests::post_slack_event(&s, &hs, SLACK_SECRET, unix_now()).await;
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn the_telegram_webhook_checks_its_secret_before_the_body() {
    const SECRET: &str = "hook-secret-0123_1";
    let tg = TelegramEmulator::start("123456:test-token").await.unwrap();
    let port = clawbus_testkit::free_port();
    let url = format!("http://127.0.0.1:{port}/tg/hook");
    let listen = format!("127.0.0.1:{port}");
    let _s = suite(&[
        ("TELEGRAM_BOT_TOKEN", "123456:test-token"),
        (
            "CLAWBUS__CHANNELS__TELEGRAM__API_ROOT",
            tg.api_root().as_str(),
        ),
        ("CLAWBUS__CHANNELS__TELEGRAM__WEBHOOK_URL", url.as_str()),
        ("CLAWBUS__CHANNELS__TELEGRAM__WEBHOOK_SECRET", SECRET),
        (
            "CLAWBUS__CHANNELS__TELEGRAM__WEBHOOK_LISTEN",
            listen.as_str(),
        ),
    ])
    .await;
    let listening = wait_for(Duration::from_secs(20), || async {
        TcpStream::connect(&listen).await.is_ok()
    })
    .await;
    assert!(listening);
    let head = |secret: &str, len: usize| {
        format!(
            "POST /tg/hook HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nx-telegram-bot-api-secret-token: {secret}\r\ncontent-length: {len}\r\n\r\n"
        )
    };
    for (secret, len, want) in [
        ("", 1_000_000, "HTTP/1.1 401"),
        ("hook-secret-0123_2", 1_000_000, "HTTP/1.1 401"),
        (SECRET, 2_000_000, "HTTP/1.1 413"),
    ] {
        let (text, took) = send_head(&listen, &head(secret, len)).await;
        assert!(text.starts_with(want), "{secret:?}: {text}");
        assert!(took < Duration::from_secs(1), "{secret:?}: {took:?}");
    }
    let (text, took) = send_head(&listen, &head(SECRET, 1000)).await;
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    // A trickled header is cut on this listener too.
    let (_, took) = send_head(&listen, "POST /tg/hook HTTP/1.1\r\nhost: x\r\n").await;
    assert!(took < Duration::from_secs(5), "{took:?}");
}
