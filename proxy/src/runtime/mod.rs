//! What runs on a generation's threads without knowing HTTP or upstreams: the worker thread's
//! shared context, its drain state, the connection limits, the access log's flusher, and the
//! executor for hyper's tasks. The upstream and downstream sides build on these; nothing here
//! imports them.

pub mod access_log;
pub mod context;
pub mod drain;
pub mod limits;

use std::future::Future;

/// Runs HTTP/2 stream and connection tasks on the worker's own thread (for the server, for
/// upstream HTTP/2 connections and for the health checks of HTTP/2 clusters).
#[derive(Clone, Copy)]
pub struct LocalExec;

impl<F> hyper::rt::Executor<F> for LocalExec
where
    F: Future + 'static,
{
    fn execute(&self, future: F) {
        tokio::task::spawn_local(future);
    }
}
