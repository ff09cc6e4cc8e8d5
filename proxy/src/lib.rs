//! The parts of `baton-proxy` that other crates use: the configuration (parsed and validated),
//! for the fuzz targets in `fuzz/`. The proxy itself is the `baton-proxy` binary.

#![deny(unsafe_code)]

pub mod config;
