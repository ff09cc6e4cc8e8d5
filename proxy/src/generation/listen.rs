//! Listen sockets, bound the way production proxies bind them.

use std::io;

pub use restart_protocol::listen::bind_tcp;

/// Says what to do about a bind error, for the one line an operator reads.
pub fn bind_advice(error: &io::Error) -> &'static str {
    match error.kind() {
        io::ErrorKind::AddrInUse => {
            "another process is listening on this address: stop it or change the address in the config"
        }
        io::ErrorKind::AddrNotAvailable => {
            "no interface of this machine has this address: use one it has, or 0.0.0.0"
        }
        io::ErrorKind::PermissionDenied => {
            "ports below 1024 need root or CAP_NET_BIND_SERVICE: use a higher port or grant the capability"
        }
        _ => "check the address in the config",
    }
}
