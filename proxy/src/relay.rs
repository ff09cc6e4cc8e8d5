//! Moving a TCP session's bytes both ways without copying them through user space: each chunk
//! goes socket → pipe → socket inside the kernel (splice(2)), as HAProxy does with its splice
//! options. Bytes are counted as they pass, so the stats of a long session move while it runs.
//!
//! A pipe is needed only while a chunk is in flight: each worker thread keeps a few in a pool, so
//! an idle session holds no pipe and the proxy needs no more descriptors than the two sockets.
//! When no pipe can be had (the descriptor limit), the chunk is copied through a buffer instead.

use std::cell::RefCell;
use std::io;
use std::net::Shutdown;
use std::os::fd::OwnedFd;

use nix::fcntl::{OFlag, SpliceFFlags, splice};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Largest chunk moved at once: the default capacity of a Linux pipe.
const CHUNK: usize = 64 * 1024;
/// Empty pipes a worker keeps for the next chunk.
const POOL: usize = 32;

struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

thread_local! {
    static PIPES: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

impl Pipe {
    fn take() -> Option<Pipe> {
        if let Some(pipe) = PIPES.with_borrow_mut(Vec::pop) {
            return Some(pipe);
        }
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC).ok()?;
        Some(Pipe { read, write })
    }

    /// Back to the pool; only an empty pipe may be given back.
    fn give_back(self) {
        PIPES.with_borrow_mut(|pipes| {
            if pipes.len() < POOL {
                pipes.push(self);
            }
        });
    }
}

/// Relays between `client` and `upstream` until both directions have ended, passing a
/// half-close on to the other side. Returns the bytes moved from the client and to the client;
/// `from_client` and `to_client` are told of every chunk as it is delivered.
pub async fn relay(
    client: &TcpStream,
    upstream: &TcpStream,
    from_client: impl Fn(u64),
    to_client: impl Fn(u64),
) -> io::Result<(u64, u64)> {
    tokio::try_join!(
        one_way(client, upstream, from_client),
        one_way(upstream, client, to_client),
    )
}

async fn one_way(from: &TcpStream, to: &TcpStream, delivered: impl Fn(u64)) -> io::Result<u64> {
    let mut total = 0u64;
    loop {
        from.readable().await?;
        let Some(pipe) = Pipe::take() else {
            match copy_chunk(from, to).await? {
                0 => break,
                n => {
                    total += n as u64;
                    delivered(n as u64);
                    continue;
                }
            }
        };
        let read = from.try_io(Interest::READABLE, || {
            splice(from, None, &pipe.write, None, CHUNK, flags()).map_err(io::Error::from)
        });
        let mut left = match read {
            Ok(0) => {
                pipe.give_back();
                break;
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                pipe.give_back();
                continue;
            }
            Err(e) => return Err(e),
        };
        while left > 0 {
            to.writable().await?;
            let written = to.try_io(Interest::WRITABLE, || {
                splice(&pipe.read, None, to, None, left, flags()).map_err(io::Error::from)
            });
            match written {
                Ok(n) => {
                    left -= n;
                    total += n as u64;
                    delivered(n as u64);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // The pipe still holds bytes: it is dropped, not given back.
                Err(e) => return Err(e),
            }
        }
        pipe.give_back();
    }
    // The sender is done: so is the receiver's side of the other socket.
    match socket2::SockRef::from(to).shutdown(Shutdown::Write) {
        Err(e) if e.kind() != io::ErrorKind::NotConnected => Err(e),
        _ => Ok(total),
    }
}

fn flags() -> SpliceFFlags {
    SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK
}

/// One chunk through a buffer, for when no pipe is to be had. Returns 0 at the end of input.
async fn copy_chunk(from: &TcpStream, to: &TcpStream) -> io::Result<usize> {
    let mut buf = vec![0u8; CHUNK];
    let n = loop {
        from.readable().await?;
        match from.try_read(&mut buf) {
            Ok(n) => break n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    };
    let mut sent = 0;
    while sent < n {
        to.writable().await?;
        match to.try_write(&buf[sent..n]) {
            Ok(m) => sent += m,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// Two ends of one loopback TCP connection.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let connect = TcpStream::connect(listener.local_addr().unwrap());
        let (connected, accepted) = tokio::join!(connect, listener.accept());
        (connected.unwrap(), accepted.unwrap().0)
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[tokio::test]
    async fn relays_both_ways_counts_every_byte_and_passes_half_close_on() {
        let (mut client, proxy_client_side) = pair().await;
        let (proxy_upstream_side, mut upstream) = pair().await;
        let up = pattern((1 << 20) + 17);
        let down = pattern(3 * CHUNK + 5);
        let (counted_up, counted_down) = (Cell::new(0), Cell::new(0));

        let relay = relay(
            &proxy_client_side,
            &proxy_upstream_side,
            |n| counted_up.set(counted_up.get() + n),
            |n| counted_down.set(counted_down.get() + n),
        );
        let client_side = async {
            client.write_all(&up).await.unwrap();
            // Half-close: done sending, still reading.
            client.shutdown().await.unwrap();
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            got
        };
        let upstream_side = async {
            let mut got = Vec::new();
            // Ends only if the client's half-close was passed on.
            upstream.read_to_end(&mut got).await.unwrap();
            upstream.write_all(&down).await.unwrap();
            upstream.shutdown().await.unwrap();
            got
        };
        let (moved, at_client, at_upstream) = tokio::join!(relay, client_side, upstream_side);
        let (from_client, to_client) = moved.unwrap();

        assert!(at_upstream == up, "the upstream gets every byte in order");
        assert!(at_client == down, "the client gets every byte in order");
        assert_eq!(
            (from_client, to_client),
            (up.len() as u64, down.len() as u64)
        );
        assert_eq!(counted_up.get(), up.len() as u64);
        assert_eq!(counted_down.get(), down.len() as u64);
        let pooled = PIPES.with_borrow(Vec::len);
        assert!(
            (1..=2).contains(&pooled),
            "the pipes went back to the pool: {pooled}"
        );
    }

    #[tokio::test]
    async fn a_reset_ends_the_relay_with_an_error() {
        let (client, proxy_client_side) = pair().await;
        let (proxy_upstream_side, _upstream) = pair().await;
        // A reset, not an orderly close: linger 0.
        socket2::SockRef::from(&client)
            .set_linger(Some(std::time::Duration::ZERO))
            .unwrap();
        drop(client);
        let moved = relay(&proxy_client_side, &proxy_upstream_side, |_| {}, |_| {}).await;
        assert!(moved.is_err(), "the session reports the reset: {moved:?}");
    }

    #[tokio::test]
    async fn without_a_pipe_a_chunk_is_copied() {
        let (mut client, proxy_client_side) = pair().await;
        let (proxy_upstream_side, mut upstream) = pair().await;
        let sent = pattern(1000);
        client.write_all(&sent).await.unwrap();
        client.shutdown().await.unwrap();

        let n = copy_chunk(&proxy_client_side, &proxy_upstream_side)
            .await
            .unwrap();
        assert_eq!(n, sent.len());
        let mut got = vec![0u8; n];
        upstream.read_exact(&mut got).await.unwrap();
        assert_eq!(got, sent);
        assert_eq!(
            copy_chunk(&proxy_client_side, &proxy_upstream_side)
                .await
                .unwrap(),
            0,
            "the end of input"
        );
    }
}
