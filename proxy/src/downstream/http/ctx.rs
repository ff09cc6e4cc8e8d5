//! What a request handler knows about its connection: the worker's context and upstreams, the
//! listener, the client, and where an upgrade leaves its tunnel.

use std::net::SocketAddr;
use std::rc::Rc;

use http::HeaderValue;

use crate::runtime::context::WorkerContext;
use crate::upstream::state::Upstreams;

use super::io::Activity;
use super::tunnel::Handoff;

/// What a request handler knows about its connection.
pub struct ConnCtx {
    pub worker: Rc<WorkerContext>,
    pub upstreams: Rc<Upstreams>,
    pub listener: usize,
    pub peer: SocketAddr,
    /// `peer`'s address as it goes into `x-forwarded-for`.
    pub peer_value: HeaderValue,
    pub tls: bool,
    pub h2: bool,
    pub activity: Rc<Activity>,
    /// Where an upgraded request leaves its tunnel for the connection.
    pub handoff: Handoff,
}
