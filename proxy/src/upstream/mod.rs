//! The upstream side of a worker: connecting (`connect`), the request body on its way
//! (`request`), HTTP/1.1 spoken on the request's task (`h1`) with its idle pool (`pool`),
//! HTTP/2 streams on shared connections (`h2`), sending one try on either (`send`), the
//! response as the downstream side holds it (`response`), and the worker's share of it all
//! (`state`).
//!
//! These take narrow contexts: the thread's stats and context, the cluster's config and its
//! handle, the pool. They never import the downstream side or the worker.

pub mod connect;
pub mod h1;
pub mod h2;
pub mod pool;
pub mod request;
pub mod response;
pub mod send;
pub mod state;
