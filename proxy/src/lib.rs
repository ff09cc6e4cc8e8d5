//! The parts of `baton-proxy` that need no running proxy: the configuration (parsed and
//! validated, which the fuzz targets in `fuzz/` use), HTTP/1.1 responses as bytes (parsed and
//! framed, fuzzed too), the load-balancing tables and least request's picks, and the DNS
//! resolver of `strict_dns` clusters. The proxy itself is the `baton-proxy` binary.

#![forbid(unsafe_code)]

pub mod config;
pub mod dns;
pub mod http1_wire;
pub mod lb;
