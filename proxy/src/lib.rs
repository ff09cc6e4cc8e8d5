//! The parts of `baton-proxy` that other crates use: the configuration (parsed and validated),
//! for the fuzz targets in `fuzz/`, and the DNS resolver of host-name endpoints. The proxy itself
//! is the `baton-proxy` binary.

#![deny(unsafe_code)]

pub mod config;
pub mod dns;
