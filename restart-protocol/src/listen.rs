//! Listen sockets, bound the way production proxies bind them: the one place both sides bind
//! (a generation for itself, the supervisor for an unprivileged generation), so that a socket
//! is the same whoever made it.

#![forbid(unsafe_code)]

use std::io;
use std::net::{SocketAddr, TcpListener};

use socket2::{Domain, Protocol, Socket, Type};

/// Binds a non-blocking, close-on-exec TCP listen socket with `SO_REUSEADDR` (so a restart does
/// not wait out TIME_WAIT) and the given backlog (the kernel caps it at `net.core.somaxconn`).
/// An IPv6 address binds IPv6 only, so that `[::]:80` and `0.0.0.0:80` can be two listeners, as
/// in nginx.
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
