//! Slow and idle clients cannot hold the server: a half-sent request line is
//! cut at the header timeout, a trickled body at the body timeout, idle
//! connections at the idle timeout, and past the connection cap newcomers
//! wait until one closes. Each test measures and prints how long the cut took.

use std::time::{Duration, Instant};

use crate::support::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Far past every timeout these tests set (1 s): a cut that has not come by
/// then is not coming. Generous, as the machine is shared.
const CUT_WITHIN: Duration = Duration::from_secs(20);

fn short_timeouts(plugins: &PluginDir) -> stateset_hooks::Config {
    let mut config = config(plugins);
    config.connections.header_timeout = Duration::from_secs(1);
    config.connections.idle_timeout = Duration::from_secs(1);
    config.body_timeout = Duration::from_secs(1);
    config
}

/// Read until the server closes the connection; what it sent, and when.
async fn read_to_close(stream: &mut TcpStream) -> (String, Instant) {
    let mut received = Vec::new();
    let read = tokio::time::timeout(CUT_WITHIN, stream.read_to_end(&mut received)).await;
    let closed = Instant::now();
    let text = String::from_utf8_lossy(&received).into_owned();
    match read {
        Ok(_) => (text, closed),
        Err(_) => panic!("connection still open after {CUT_WITHIN:?}; got {text:?}"),
    }
}

fn request(body: &[u8], keep_alive: bool) -> Vec<u8> {
    let mut head = format!(
        "POST /webhooks/stateset HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
         x-stateset-signature: {}\r\ncontent-length: {}\r\n",
        sign(body),
        body.len()
    );
    if !keep_alive {
        head.push_str("connection: close\r\n");
    }
    head.push_str("\r\n");
    [head.as_bytes(), body].concat()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_half_sent_request_line_is_cut_at_the_header_timeout() {
    let plugins = PluginDir::new();
    let server = TestServer::start(short_timeouts(&plugins)).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let started = Instant::now();
    stream.write_all(b"POST /webhooks/sta").await.unwrap();
    let (_, closed) = read_to_close(&mut stream).await;
    println!(
        "half-sent request line dropped after {:?} (header timeout 1 s)",
        closed - started
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_trickled_body_is_cut_at_the_body_timeout_with_408() {
    let plugins = PluginDir::new();
    let server = TestServer::start(short_timeouts(&plugins)).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let body = event(
        "evt_trickle",
        "order.created",
        json!({ "pad": "x".repeat(200) }),
    );
    let whole = request(&body, true);
    let head_len = whole.len() - body.len();
    stream.write_all(&whole[..head_len]).await.unwrap();
    let started = Instant::now();
    let (mut reader, mut writer) = stream.into_split();
    // One byte every 100 ms: the whole body would take over 20 s.
    let trickle = tokio::spawn(async move {
        for byte in body {
            if writer.write_all(&[byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let mut received = Vec::new();
    let read = tokio::time::timeout(CUT_WITHIN, reader.read_to_end(&mut received)).await;
    let elapsed = started.elapsed();
    trickle.abort();
    let text = String::from_utf8_lossy(&received);
    assert!(read.is_ok(), "still open after {CUT_WITHIN:?}: {text:?}");
    assert!(text.starts_with("HTTP/1.1 408"), "{text:?}");
    assert!(text.contains("did not arrive within"), "{text:?}");
    println!("trickled body answered 408 and closed after {elapsed:?} (body timeout 1 s)");
    assert!(server.hooks.store().event("evt_trickle").unwrap().is_none());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_connections_are_closed_and_past_the_cap_newcomers_wait() {
    let plugins = PluginDir::new();
    let mut config = short_timeouts(&plugins);
    config.connections.max_connections = 2;
    let server = TestServer::start(config).await;

    // Two idle connections fill the cap.
    let mut idle = Vec::new();
    for _ in 0..2 {
        idle.push(TcpStream::connect(server.addr).await.unwrap());
    }
    let opened = Instant::now();
    // A third, with a whole request: it waits to be accepted, then is served.
    let mut third = TcpStream::connect(server.addr).await.unwrap();
    third
        .write_all(&request(
            &event("evt_third", "order.created", json!({})),
            false,
        ))
        .await
        .unwrap();
    let mut first_bytes = [0u8; 1];
    let early =
        tokio::time::timeout(Duration::from_millis(300), third.read(&mut first_bytes)).await;
    assert!(early.is_err(), "answered past the cap of 2 connections");
    let (response, answered) = read_to_close(&mut third).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response:?}");
    for stream in &mut idle {
        read_to_close(stream).await;
    }
    println!(
        "past the cap: answered after {:?}, once the idle connections were closed (idle timeout 1 s)",
        answered - opened
    );

    // A kept-alive connection is closed once idle after its response.
    let mut kept = TcpStream::connect(server.addr).await.unwrap();
    kept.write_all(&request(
        &event("evt_kept", "order.created", json!({})),
        true,
    ))
    .await
    .unwrap();
    let mut response = Vec::new();
    while !response.ends_with(b"}") {
        let mut chunk = [0u8; 512];
        let n = kept.read(&mut chunk).await.unwrap();
        assert!(n > 0, "closed before the response");
        response.extend_from_slice(&chunk[..n]);
    }
    let responded = Instant::now();
    assert!(response.starts_with(b"HTTP/1.1 200"));
    let (rest, closed) = read_to_close(&mut kept).await;
    assert_eq!(rest, "");
    println!(
        "kept-alive connection closed {:?} after its response (idle timeout 1 s)",
        closed - responded
    );
    server.stop().await;
}

/// A connection that never sends a byte owes its first request within the
/// header timeout, not the longer idle timeout: silent clients cannot hold
/// the connection slots.
#[tokio::test(flavor = "multi_thread")]
async fn a_silent_connection_is_cut_at_the_header_timeout() {
    let plugins = PluginDir::new();
    let mut config = short_timeouts(&plugins);
    config.connections.idle_timeout = Duration::from_secs(60);
    let server = TestServer::start(config).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let opened = Instant::now();
    let (sent, closed) = read_to_close(&mut stream).await;
    assert_eq!(sent, "");
    let took = closed - opened;
    assert!(took < Duration::from_secs(30), "held for {took:?}");
    println!("silent connection dropped after {took:?} (header timeout 1 s, idle 60 s)");
    server.stop().await;
}
