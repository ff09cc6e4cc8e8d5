//! The parts of `baton-proxy` that need no running proxy: the configuration (parsed and
//! validated, which the fuzz targets in `fuzz/` use) and the load-balancing tables. The proxy
//! itself is the `baton-proxy` binary.

#![deny(unsafe_code)]

pub mod config;
pub mod lb;
