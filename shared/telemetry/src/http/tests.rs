//! The shared server against slow and greedy clients, on loopback.

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Body;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::*;

const SECOND: Duration = Duration::from_secs(1);

fn limits(header: u64, max_connections: usize) -> HttpLimits {
    HttpLimits {
        header_timeout: Duration::from_secs(header),
        body_timeout: SECOND,
        idle_timeout: SECOND,
        max_connections,
    }
}

/// A listener named `name` serving `/`, `/echo` (reads the body) and `/stream` (a
/// first chunk, then the rest once `release` says so).
async fn start(
    name: &'static str,
    limits: HttpLimits,
    release: watch::Receiver<bool>,
) -> (SocketAddr, CancellationToken) {
    let app = Router::new()
        .route("/", get(|| async { "ok" }))
        .route(
            "/echo",
            post(|body: Body| async move {
                match read_body(body, 1000).await {
                    Ok(b) => (StatusCode::OK, b).into_response(),
                    Err(e @ BodyError::TimedOut(_)) => {
                        (StatusCode::REQUEST_TIMEOUT, e.to_string()).into_response()
                    }
                    Err(e @ BodyError::TooLarge(_)) => {
                        (StatusCode::PAYLOAD_TOO_LARGE, e.to_string()).into_response()
                    }
                    Err(e) => (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
                }
            }),
        )
        .route(
            "/stream",
            get(move || {
                let release = release.clone();
                async move {
                    let s = futures::stream::unfold((0, release), |(i, mut r)| async move {
                        match i {
                            0 => Some((Ok::<_, Infallible>("first\n"), (1, r))),
                            1 => {
                                let _ = r.wait_for(|go| *go).await;
                                Some((Ok("last\n"), (2, r)))
                            }
                            _ => None,
                        }
                    });
                    Body::from_stream(s)
                }
            }),
        );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(serve(listener, name, app, limits, stop.clone()));
    (addr, stop)
}

fn timeouts(name: &str, kind: &str) -> u64 {
    METRICS.1.timeouts.with_label_values(&[name, kind]).get()
}

/// Reads until the peer closes (or resets) the connection; what it sent.
async fn read_to_close(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return String::from_utf8_lossy(&out).into_owned(),
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// Writes `bytes` one every 100 ms until the peer closes; how long that took.
async fn trickle(s: TcpStream, bytes: &[u8]) -> Duration {
    let started = Instant::now();
    let (mut r, mut w) = s.into_split();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let write = async {
        for b in bytes.iter().cycle() {
            tick.tick().await;
            if w.write_all(&[*b]).await.is_err() {
                break;
            }
        }
        std::future::pending::<()>().await;
    };
    let mut buf = [0u8; 256];
    let closed = async {
        while let Ok(n) = r.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    };
    tokio::select! {
        () = write => {}
        () = closed => {}
    }
    started.elapsed()
}

async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_trickled_header_is_cut_at_the_header_timeout() {
    let (_tx, rx) = watch::channel(false);
    let (addr, _stop) = start("t-header", limits(1, 8), rx).await;
    let s = TcpStream::connect(addr).await.unwrap();
    let took = trickle(
        s,
        b"GET / HTTP/1.1\r\nx-slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    )
    .await;
    assert!(took >= Duration::from_millis(900), "cut after {took:?}");
    assert!(took < Duration::from_secs(3), "cut after {took:?}");
    assert_eq!(timeouts("t-header", "header"), 1);
    // A connection that never says anything is cut alike (before hyper knows which
    // protocol it speaks).
    let s = TcpStream::connect(addr).await.unwrap();
    let took = trickle(s, b"").await;
    assert!(took < Duration::from_secs(3), "cut after {took:?}");
    until("second header timeout", || {
        timeouts("t-header", "header") == 2
    })
    .await;
}

#[tokio::test]
async fn a_slow_body_is_cut_at_the_body_timeout() {
    let (_tx, rx) = watch::channel(false);
    let (addr, _stop) = start("t-body", limits(5, 8), rx).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 500\r\n\r\nabc")
        .await
        .unwrap();
    let started = Instant::now();
    let answer = read_to_close(&mut s).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(timeouts("t-body", "body"), 1);
    // Bad chunked encoding: 400 saying so; too large while streaming: 413.
    for (req, want) in [
        (
            "POST /echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
            "HTTP/1.1 400",
        ),
        (
            "POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 5000\r\n\r\n",
            "HTTP/1.1 413",
        ),
    ] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(req.as_bytes()).await.unwrap();
        let answer = read_to_close(&mut s).await;
        assert!(answer.starts_with(want), "{answer}");
    }
    let big = format!("{:x}\r\n{}\r\n", 1500, "x".repeat(1500));
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("POST /echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n{big}")
            .as_bytes(),
    )
    .await
    .unwrap();
    let answer = read_to_close(&mut s).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
}

#[tokio::test]
async fn beyond_the_cap_connections_are_refused_at_once_and_service_resumes() {
    let (_tx, rx) = watch::channel(false);
    let (addr, _stop) = start("t-cap", limits(30, 4), rx).await;
    let open = METRICS.1.open.with_label_values(&["t-cap"]);
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        held.push(s);
    }
    until("4 connections open", || open.get() == 4).await;
    for _ in 0..20 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let started = Instant::now();
        let answer = read_to_close(&mut s).await;
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert!(started.elapsed() < SECOND);
    }
    assert_eq!(METRICS.1.refused.with_label_values(&["t-cap"]).get(), 20);
    // One held connection goes: a request is served again.
    drop(held.pop());
    until("3 connections open", || open.get() == 3).await;
    let r = reqwest::get(format!("http://{addr}/")).await.unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn idle_connections_close_but_a_quiet_stream_is_never_cut() {
    let (tx, rx) = watch::channel(false);
    let (addr, _stop) = start("t-idle", limits(1, 8), rx).await;
    // HTTP/2: after its request, an idle connection is closed at the idle timeout.
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let r = h2.get(format!("http://{addr}/")).send().await.unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    until("the HTTP/2 connection idle", || {
        timeouts("t-idle", "idle") == 1
    })
    .await;
    // A response streaming for longer than the idle timeout is not cut: an HTTP/1
    // connection left idle beside it closes first.
    let mut stream = reqwest::get(format!("http://{addr}/stream")).await.unwrap();
    assert_eq!(stream.chunk().await.unwrap().unwrap(), "first\n");
    let mut probe = TcpStream::connect(addr).await.unwrap();
    probe
        .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let answer = read_to_close(&mut probe).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    tx.send_replace(true);
    assert_eq!(stream.chunk().await.unwrap().unwrap(), "last\n");
    assert!(stream.chunk().await.unwrap().is_none());
}

#[tokio::test]
async fn shutdown_waits_for_the_requests_in_progress() {
    let (tx, rx) = watch::channel(false);
    let app_stop = CancellationToken::new();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new().route(
        "/",
        get(move || {
            let mut r = rx.clone();
            async move {
                let _ = r.wait_for(|go| *go).await;
                "done"
            }
        }),
    );
    let server = tokio::spawn(serve(
        listener,
        "t-drain",
        app,
        limits(5, 4),
        app_stop.clone(),
    ));
    let req = tokio::spawn(reqwest::get(format!("http://{addr}/")));
    let open = METRICS.1.open.with_label_values(&["t-drain"]);
    until("the request open", || open.get() == 1).await;
    app_stop.cancel();
    tx.send_replace(true);
    let r = req.await.unwrap().unwrap();
    assert_eq!(r.text().await.unwrap(), "done");
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("serve returns once drained")
        .unwrap();
}
