//! Moving a TCP session's bytes both ways without copying them through user space: each chunk
//! goes socket → pipe → socket inside the kernel (splice(2)), as HAProxy does with its splice
//! options. Bytes are counted as they are delivered, so the stats of a long session move while
//! it runs.
//!
//! A pipe is needed only while a chunk is in flight: each worker thread keeps a few empty ones in
//! a pool, so an idle session holds none. A session whose receiver is slow holds one per blocked
//! direction (two descriptors and up to a chunk of data in the kernel); past `MAX_IN_FLIGHT`
//! pipes out at once in a worker, or when no pipe can be made (the descriptor limit), chunks are
//! copied through a buffer instead, as HAProxy's `maxpipes` does.
//!
//! Splicing into a socket whose peer is gone raises SIGPIPE, which Rust's runtime ignores in
//! every program (nothing here changes that); the error comes back as EPIPE.

use std::cell::{Cell, RefCell};
use std::io;
use std::net::Shutdown;
use std::os::fd::OwnedFd;

use nix::fcntl::{OFlag, SpliceFFlags, splice};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Largest chunk spliced at once: the default capacity of a Linux pipe.
const CHUNK: usize = 64 * 1024;
/// Largest chunk copied at once, when no pipe is used.
const COPY_CHUNK: usize = 16 * 1024;
/// Empty pipes a worker keeps for the next chunk.
const POOL: usize = 32;
/// Most pipes a worker has out at once.
const MAX_IN_FLIGHT: usize = 1024;

struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

thread_local! {
    static PIPES: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
    static OUT: Cell<usize> = const { Cell::new(0) };
    static LIMIT: Cell<usize> = const { Cell::new(MAX_IN_FLIGHT) };
}

/// A pipe taken for one chunk; counted in `OUT` until given back or dropped.
struct Lease {
    pipe: Pipe,
    _out: Out,
}

struct Out;

impl Drop for Out {
    fn drop(&mut self) {
        OUT.set(OUT.get() - 1);
    }
}

impl Lease {
    fn take() -> Option<Lease> {
        if OUT.get() >= LIMIT.get() {
            return None;
        }
        let pipe = match PIPES.with_borrow_mut(Vec::pop) {
            Some(pipe) => pipe,
            None => {
                let (read, write) =
                    nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC).ok()?;
                Pipe { read, write }
            }
        };
        OUT.set(OUT.get() + 1);
        Some(Lease { pipe, _out: Out })
    }

    /// Back to the pool; only an empty pipe may be given back. One that still holds bytes (an
    /// error, or a session stopped mid-chunk) is dropped, and closed.
    fn give_back(self) {
        let Lease { pipe, _out } = self;
        PIPES.with_borrow_mut(|pipes| {
            if pipes.len() < POOL {
                pipes.push(pipe);
            }
        });
    }
}

/// Relays between `client` and `upstream` until both directions have ended, passing a
/// half-close on to the other side. `from_client` and `to_client` are told of every chunk as it
/// is delivered; an error in either direction ends the session.
pub async fn relay(
    client: &TcpStream,
    upstream: &TcpStream,
    from_client: impl Fn(u64),
    to_client: impl Fn(u64),
) -> io::Result<()> {
    tokio::try_join!(
        one_way(client, upstream, from_client),
        one_way(upstream, client, to_client),
    )?;
    Ok(())
}

/// What one step of a direction did.
enum Step {
    Moved,
    /// Nothing to read after all.
    Nothing,
    End,
}

async fn one_way(from: &TcpStream, to: &TcpStream, delivered: impl Fn(u64)) -> io::Result<()> {
    loop {
        from.readable().await?;
        let step = match Lease::take() {
            Some(lease) => splice_chunk(from, to, lease, &delivered).await?,
            None => copy_ready(from, to, &delivered).await?,
        };
        match step {
            Step::Moved | Step::Nothing => {}
            Step::End => break,
        }
    }
    // The sender is done: so is the receiver's side of the other socket.
    match socket2::SockRef::from(to).shutdown(Shutdown::Write) {
        Err(e) if e.kind() != io::ErrorKind::NotConnected => Err(e),
        _ => Ok(()),
    }
}

async fn splice_chunk(
    from: &TcpStream,
    to: &TcpStream,
    lease: Lease,
    delivered: &impl Fn(u64),
) -> io::Result<Step> {
    let read = from.try_io(Interest::READABLE, || {
        splice(from, None, &lease.pipe.write, None, CHUNK, flags()).map_err(io::Error::from)
    });
    let mut left = match read {
        Ok(n) if n > 0 => n,
        Ok(_) => {
            lease.give_back();
            // splice stops in front of TCP urgent data, and then says 0 if the peer has also
            // finished sending: read() steps over the urgent byte, and tells the real end.
            return copy_ready(from, to, delivered).await;
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            lease.give_back();
            // Either nothing is there (the readiness was stale), or the next byte is TCP urgent
            // data, where splice says EAGAIN for good; read() steps over it.
            return copy_ready(from, to, delivered).await;
        }
        Err(e) => return Err(e),
    };
    while left > 0 {
        to.writable().await?;
        let written = to.try_io(Interest::WRITABLE, || {
            splice(&lease.pipe.read, None, to, None, left, flags()).map_err(io::Error::from)
        });
        match written {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                left -= n;
                delivered(n as u64);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    lease.give_back();
    Ok(Step::Moved)
}

fn flags() -> SpliceFFlags {
    SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK
}

/// Copies what `from` has ready now through a buffer, without waiting for more.
async fn copy_ready(
    from: &TcpStream,
    to: &TcpStream,
    delivered: &impl Fn(u64),
) -> io::Result<Step> {
    let data = {
        // On the stack, and gone before the first await: a waiting session holds no buffer.
        let mut buf = [0u8; COPY_CHUNK];
        match from.try_read(&mut buf) {
            Ok(0) => return Ok(Step::End),
            Ok(n) => buf[..n].to_vec(),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Step::Nothing),
            Err(e) => return Err(e),
        }
    };
    let mut sent = 0;
    while sent < data.len() {
        to.writable().await?;
        match to.try_write(&data[sent..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                sent += n;
                delivered(n as u64);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Step::Moved)
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpSocket};
    use tokio::time::timeout;

    use super::*;

    const WAIT: Duration = Duration::from_secs(10);

    /// Two ends of one loopback TCP connection.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let connect = TcpStream::connect(listener.local_addr().unwrap());
        let (connected, accepted) = tokio::join!(connect, listener.accept());
        (connected.unwrap(), accepted.unwrap().0)
    }

    /// A pair whose connecting end sends and whose accepted end receives through small
    /// buffers, set before the handshake so that the window is sized for them.
    async fn small_pair() -> (TcpStream, TcpStream) {
        let listen = TcpSocket::new_v4().unwrap();
        listen.set_recv_buffer_size(16 * 1024).unwrap();
        listen.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = listen.listen(1).unwrap();
        let connect = TcpSocket::new_v4().unwrap();
        connect.set_send_buffer_size(16 * 1024).unwrap();
        let connect = connect.connect(listener.local_addr().unwrap());
        let (connected, accepted) = tokio::join!(connect, listener.accept());
        (connected.unwrap(), accepted.unwrap().0)
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    /// Sends `up` from a client through the relay to an upstream that answers `down` once the
    /// client's half-close reached it. Returns what each side got and what the relay counted.
    async fn session(up: &[u8], down: &[u8], small_buffers: bool) -> (Vec<u8>, Vec<u8>, u64, u64) {
        let (mut client, proxy_client_side) = pair().await;
        // Small buffers: the relay meets a full send buffer and has to wait to write.
        let (proxy_upstream_side, mut upstream) = if small_buffers {
            small_pair().await
        } else {
            pair().await
        };
        let (counted_up, counted_down) = (Cell::new(0), Cell::new(0));
        let relay = relay(
            &proxy_client_side,
            &proxy_upstream_side,
            |n| counted_up.set(counted_up.get() + n),
            |n| counted_down.set(counted_down.get() + n),
        );
        let client_side = async {
            client.write_all(up).await.unwrap();
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
            upstream.write_all(down).await.unwrap();
            upstream.shutdown().await.unwrap();
            got
        };
        let (relayed, at_client, at_upstream) = timeout(WAIT, async {
            tokio::join!(relay, client_side, upstream_side)
        })
        .await
        .expect("the session ends once both sides closed");
        relayed.unwrap();
        (at_client, at_upstream, counted_up.get(), counted_down.get())
    }

    #[tokio::test]
    async fn relays_both_ways_counts_every_byte_and_passes_half_close_on() {
        for small_buffers in [false, true] {
            let up = pattern((1 << 20) + 17);
            let down = pattern(3 * CHUNK + 5);
            let (at_client, at_upstream, counted_up, counted_down) =
                session(&up, &down, small_buffers).await;
            assert!(at_upstream == up, "the upstream gets every byte in order");
            assert!(at_client == down, "the client gets every byte in order");
            assert_eq!(counted_up, up.len() as u64);
            assert_eq!(counted_down, down.len() as u64);
            let pooled = PIPES.with_borrow(Vec::len);
            assert!(
                (1..=2).contains(&pooled),
                "the pipes went back to the pool: {pooled}"
            );
            assert_eq!(OUT.get(), 0, "no pipe is out once the session ended");
        }
    }

    #[tokio::test]
    async fn without_pipes_the_bytes_are_copied() {
        LIMIT.set(0);
        let up = pattern(200_000);
        let down = pattern(70_000);
        let (at_client, at_upstream, counted_up, counted_down) = session(&up, &down, true).await;
        assert!(at_upstream == up && at_client == down);
        assert_eq!((counted_up, counted_down), (200_000, 70_000));
        assert_eq!(PIPES.with_borrow(Vec::len), 0, "no pipe was made");
    }

    #[tokio::test]
    async fn urgent_data_does_not_stall_the_session() {
        let (client, proxy_client_side) = pair().await;
        let (proxy_upstream_side, mut upstream) = pair().await;
        let sock = socket2::SockRef::from(&client);
        sock.send(b"abc").unwrap();
        // Out of band: read() skips it, splice stops in front of it.
        sock.send_out_of_band(b"!").unwrap();
        sock.send(b"def").unwrap();
        sock.shutdown(Shutdown::Write).unwrap();

        let relay = relay(&proxy_client_side, &proxy_upstream_side, |_| {}, |_| {});
        let upstream_side = async {
            let mut got = Vec::new();
            upstream.read_to_end(&mut got).await.unwrap();
            upstream.shutdown().await.unwrap();
            got
        };
        let (relayed, got) = timeout(WAIT, async { tokio::join!(relay, upstream_side) })
            .await
            .expect("the bytes after the urgent mark are relayed too");
        relayed.unwrap();
        assert_eq!(got, b"abcdef");
    }

    #[tokio::test]
    async fn a_reset_ends_the_relay_with_an_error() {
        let (client, proxy_client_side) = pair().await;
        let (proxy_upstream_side, _upstream) = pair().await;
        // A reset, not an orderly close: linger 0.
        socket2::SockRef::from(&client)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(client);
        let relayed = timeout(
            WAIT,
            relay(&proxy_client_side, &proxy_upstream_side, |_| {}, |_| {}),
        )
        .await
        .expect("a reset ends the session");
        assert!(
            relayed.is_err(),
            "the session reports the reset: {relayed:?}"
        );
    }
}
