//! Listen sockets, bound the way production proxies bind them.

use std::io;
use std::net::{SocketAddr, TcpListener};

use socket2::{Domain, Protocol, Socket, Type};

/// Binds a non-blocking, close-on-exec TCP listen socket with `SO_REUSEADDR` (so a restart does
/// not wait out TIME_WAIT) and the given backlog. An IPv6 address binds IPv6 only, so that
/// `[::]:80` and `0.0.0.0:80` can be two listeners, as in nginx.
pub fn bind_tcp(address: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    let socket = Socket::new(
        Domain::for_address(address),
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    if address.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.bind(&address.into())?;
    socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    Ok(socket.into())
}

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
