//! A small authoritative DNS server on 127.0.0.1 over UDP, for tests of DNS resolution: the
//! answers, and whether the server answers at all, can be changed while it runs.
//!
//! It answers A and AAAA questions from a table of names, NXDOMAIN for a name not in the table,
//! and an empty NOERROR answer for a known name without addresses of the asked family or for any
//! other record type. Messages are parsed and built with `hickory-proto`, so what goes over the
//! socket is real DNS.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{RData, Record, RecordType};
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

/// The TTL of every answer, in seconds: short, but not zero, so that a resolver that caches
/// answers by their TTL would still serve the previous answer right after [`DnsServer::set`]
/// and a test of "no caching" can fail.
const TTL: u32 = 1;

/// How the server treats the queries it receives, set with [`DnsServer::fail`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Answer from the table (the default).
    None,
    /// Answer every query with SERVFAIL and no records.
    ServFail,
    /// Read every query and answer none, as a server that is down behind a firewall would: the
    /// client waits for its timeout.
    Silent,
}

/// A running DNS server on a free UDP port of 127.0.0.1. Stops when dropped.
#[derive(Debug)]
pub struct DnsServer {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: JoinHandle<()>,
}

#[derive(Debug)]
struct State {
    /// Addresses by name, the name in lowercase without the trailing dot.
    names: HashMap<String, Vec<IpAddr>>,
    failure: Failure,
    /// Queries received, answered or not.
    queries: usize,
}

impl DnsServer {
    /// Binds a free port of 127.0.0.1 (the kernel chooses it) and serves on it from a task of
    /// the current tokio runtime, with an empty table: every name is NXDOMAIN until
    /// [`set`](Self::set).
    pub async fn start() -> DnsServer {
        let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind the test DNS server's UDP socket");
        let addr = socket.local_addr().expect("the test DNS server's address");
        let state = Arc::new(Mutex::new(State {
            names: HashMap::new(),
            failure: Failure::None,
            queries: 0,
        }));
        let task = tokio::spawn(serve(socket, Arc::clone(&state)));
        DnsServer { addr, state, task }
    }

    /// The address to send queries to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Makes `name` answer with `addrs` from now on: its IPv4 addresses to A questions and its
    /// IPv6 addresses to AAAA questions. An empty list leaves the name existing without
    /// addresses (NOERROR with no records).
    pub fn set(&self, name: &str, addrs: Vec<IpAddr>) {
        self.state().names.insert(normalise(name), addrs);
    }

    /// Makes the server fail from now on as `failure` says, or answer again with
    /// [`Failure::None`].
    pub fn fail(&self, failure: Failure) {
        self.state().failure = failure;
    }

    /// How many queries the server has received so far, answered or not.
    pub fn queries(&self) -> usize {
        self.state().queries
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the table half-changed: carry on.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Lowercase, without the trailing dot of a fully qualified name: DNS names compare
/// case-insensitively.
fn normalise(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

async fn serve(socket: UdpSocket, state: Arc<Mutex<State>>) {
    // Large enough for any query (a client without EDNS sends at most 512 bytes).
    let mut buf = vec![0; 4096];
    loop {
        let Ok((len, peer)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        // Not DNS: ignore it, as a real server would.
        let Ok(query) = Message::from_vec(&buf[..len]) else {
            continue;
        };
        let response = {
            let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
            state.queries += 1;
            respond(&state, &query)
        };
        if let Some(response) = response {
            let bytes = response
                .to_vec()
                .expect("encode the test DNS server's answer");
            // A send error (the client gave up and closed its socket) is the client's problem.
            let _ = socket.send_to(&bytes, peer).await;
        }
    }
}

/// The answer to `query`, or `None` to answer nothing.
fn respond(state: &State, query: &Message) -> Option<Message> {
    let mut response = Message::new();
    response
        .set_id(query.id())
        .set_message_type(MessageType::Response)
        .set_op_code(query.op_code())
        .set_authoritative(true)
        .set_recursion_desired(query.recursion_desired())
        .set_recursion_available(false)
        .add_queries(query.queries().iter().cloned());
    match state.failure {
        Failure::Silent => return None,
        Failure::ServFail => {
            response.set_response_code(ResponseCode::ServFail);
            return Some(response);
        }
        Failure::None => {}
    }
    for question in query.queries() {
        let Some(addrs) = state.names.get(&normalise(&question.name().to_ascii())) else {
            response.set_response_code(ResponseCode::NXDomain);
            continue;
        };
        for addr in addrs {
            let rdata = match (question.query_type(), addr) {
                (RecordType::A, IpAddr::V4(v4)) => RData::A(A(*v4)),
                (RecordType::AAAA, IpAddr::V6(v6)) => RData::AAAA(AAAA(*v6)),
                _ => continue,
            };
            // The name as asked, so that a client that randomises the case of its questions
            // finds its own spelling in the answer.
            response.add_answer(Record::from_rdata(question.name().clone(), TTL, rdata));
        }
    }
    Some(response)
}
