//! The downstream side of a worker: one accepted connection from accept to close, HTTP (`http`)
//! or TCP (`tcp`), each served with the per-connection context the worker builds (`conn`).
//! Builds on the upstream side and the runtime; never imports the worker.

pub mod conn;
pub mod http;
pub mod relay;
pub mod tcp;
