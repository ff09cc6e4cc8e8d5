//! A load generator that counts every failure: HTTP/1.1 keep-alive or one connection per
//! request, a fixed number of concurrent clients, running until told to stop (or a time limit).
//!
//! A failure is a request that was sent and did not get a 2xx answer in full: refused, reset,
//! closed before the answer, a short body, a non-2xx status, or a timeout. A keep-alive
//! connection the server closed after an answer saying `Connection: close` is no failure: the
//! client reconnects, as every HTTP client does.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::watch;

/// How clients use connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Requests back to back on one connection, reconnecting when the server asks.
    KeepAlive,
    /// A new connection for every request (`Connection: close`).
    PerRequest,
}

/// What the load saw.
#[derive(Debug, Default, Clone)]
pub struct Report {
    pub ok: u64,
    pub refused: u64,
    pub reset: u64,
    /// The connection closed before the answer (or in the middle of it).
    pub closed: u64,
    pub non_2xx: u64,
    pub timeout: u64,
    /// Answers per `x-baton-epoch`.
    pub epochs: BTreeMap<String, u64>,
    /// Other errors, with their text, for the assertion message.
    pub other: Vec<String>,
}

impl Report {
    pub fn failures(&self) -> u64 {
        self.refused
            + self.reset
            + self.closed
            + self.non_2xx
            + self.timeout
            + self.other.len() as u64
    }
}

/// A running load; [`Load::stop`] ends it and returns what it saw.
pub struct Load {
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    report: Arc<Mutex<Report>>,
}

/// Longest a single request may take before it counts as a timeout.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

impl Load {
    /// Starts `clients` clients sending `GET path` to `addr`; they stop by themselves after
    /// `limit` at the latest.
    pub fn start(
        addr: SocketAddr,
        path: &str,
        mode: Mode,
        clients: usize,
        limit: Duration,
    ) -> Load {
        let (stop, stopped) = watch::channel(false);
        let report = Arc::new(Mutex::new(Report::default()));
        let deadline = Instant::now() + limit;
        let tasks = (0..clients)
            .map(|_| {
                let (report, mut stopped, path) =
                    (report.clone(), stopped.clone(), path.to_owned());
                tokio::spawn(async move {
                    let client = async {
                        match mode {
                            Mode::KeepAlive => keep_alive(addr, &path, &report, deadline).await,
                            Mode::PerRequest => per_request(addr, &path, &report, deadline).await,
                        }
                    };
                    tokio::select! {
                        _ = client => {}
                        _ = stopped.wait_for(|s| *s) => {}
                    }
                })
            })
            .collect();
        Load {
            stop,
            tasks,
            report,
        }
    }

    /// What was seen so far.
    /// Waits until the load has had `more` more answers: the system is serving between steps.
    pub async fn answered(&self, more: u64, within: Duration) -> bool {
        let start = self.snapshot().ok;
        crate::wait_until_async(within, || {
            let now = self.snapshot().ok;
            async move { now >= start + more }
        })
        .await
    }

    pub fn snapshot(&self) -> Report {
        self.report.lock().unwrap().clone()
    }

    pub async fn stop(self) -> Report {
        let _ = self.stop.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
        self.report.lock().unwrap().clone()
    }
}

fn record(report: &Mutex<Report>, f: impl FnOnce(&mut Report)) {
    f(&mut report.lock().unwrap());
}

fn classify(report: &Mutex<Report>, e: &(dyn std::error::Error + 'static)) {
    // Walk to the innermost cause: hyper wraps the io error.
    let mut cause: &(dyn std::error::Error + 'static) = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    let kind = cause.downcast_ref::<std::io::Error>().map(|io| io.kind());
    record(report, |r| match kind {
        Some(std::io::ErrorKind::ConnectionRefused) => r.refused += 1,
        Some(std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe) => r.reset += 1,
        Some(std::io::ErrorKind::UnexpectedEof) => r.closed += 1,
        _ => {
            let text = format!("{e}: {cause}");
            if text.contains("closed") || text.contains("incomplete") {
                r.closed += 1;
            } else {
                r.other.push(text);
            }
        }
    });
}

/// Sends one request on `sender`; returns whether the connection may carry another.
async fn one(
    sender: &mut http1::SendRequest<Full<Bytes>>,
    path: &str,
    close: bool,
    report: &Mutex<Report>,
) -> bool {
    let mut request = Request::get(path).header("host", "load.test");
    if close {
        request = request.header("connection", "close");
    }
    let request = request
        .body(Full::new(Bytes::new()))
        .expect("a valid request");
    let exchange = async {
        let response = sender.send_request(request).await?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await?;
        Ok::<_, hyper::Error>((parts, body))
    };
    match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
        Err(_) => {
            record(report, |r| r.timeout += 1);
            false
        }
        Ok(Err(e)) => {
            classify(report, &e);
            false
        }
        Ok(Ok((parts, _))) => {
            let epoch = parts
                .headers
                .get("x-baton-epoch")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_owned();
            record(report, |r| {
                if parts.status.is_success() {
                    r.ok += 1;
                } else {
                    r.non_2xx += 1;
                }
                *r.epochs.entry(epoch).or_default() += 1;
            });
            let closing = parts
                .headers
                .get("connection")
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
            !closing
        }
    }
}

async fn connect(
    addr: SocketAddr,
    report: &Mutex<Report>,
) -> Option<http1::SendRequest<Full<Bytes>>> {
    let stream = match TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(e) => {
            classify(report, &e);
            // Do not spin on a refusing port.
            tokio::time::sleep(Duration::from_millis(10)).await;
            return None;
        }
    };
    let _ = stream.set_nodelay(true);
    match http1::handshake(TokioIo::new(stream)).await {
        Ok((sender, connection)) => {
            tokio::spawn(connection);
            Some(sender)
        }
        Err(e) => {
            classify(report, &e);
            None
        }
    }
}

async fn keep_alive(addr: SocketAddr, path: &str, report: &Mutex<Report>, deadline: Instant) {
    while Instant::now() < deadline {
        let Some(mut sender) = connect(addr, report).await else {
            continue;
        };
        while Instant::now() < deadline {
            // The last answer did not say `Connection: close`, so the connection must still
            // carry requests: a server that closed it anyway would lose a real client's request.
            if let Err(e) = sender.ready().await {
                classify(report, &e);
                break;
            }
            if !one(&mut sender, path, false, report).await {
                break;
            }
        }
    }
}

async fn per_request(addr: SocketAddr, path: &str, report: &Mutex<Report>, deadline: Instant) {
    while Instant::now() < deadline {
        let Some(mut sender) = connect(addr, report).await else {
            continue;
        };
        one(&mut sender, path, true, report).await;
    }
}
