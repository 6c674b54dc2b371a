//! A fake HTTP/1.1 server on loopback for tests that stand in for the head or an application:
//! each request is answered with the JSON that a closure returns for its request line.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;

use serde_json::Value;

/// Reads one request (head and `Content-Length` body) from `s` and returns its request line;
/// `None` when the peer closed before the head was complete.
pub fn read_request(s: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).unwrap_or(0) == 0 {
            return None;
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_string();
    let len = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(str::to_string))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    let _ = s.read_exact(&mut vec![0u8; len]);
    Some(head.lines().next().unwrap_or_default().to_string())
}

/// Answers 200 with `body` as JSON and closes.
pub fn answer(s: &mut TcpStream, body: &Value) {
    let b = body.to_string();
    let _ = write!(
        s,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{b}",
        b.len()
    );
}

/// A loopback server answering every request with `f(request line)`, one thread per request;
/// `None` closes the connection without an answer (an application dying mid-request).
/// Returns its `host:port`.
pub fn serve(f: impl Fn(&str) -> Option<Value> + Send + Sync + 'static) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let f = Arc::new(f);
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let f = f.clone();
            std::thread::spawn(move || {
                let Some(line) = read_request(&mut s) else { return };
                if let Some(v) = f(&line) {
                    answer(&mut s, &v);
                }
            });
        }
    });
    addr
}
