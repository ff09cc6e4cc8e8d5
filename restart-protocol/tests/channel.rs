//! The channel over a real socketpair: round trips, fd passing, and everything a broken or
//! hostile peer can send.

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use proptest::prelude::*;
use restart_protocol::{
    Channel, ChannelError, DrainStrategy, Load, MAX_MESSAGE, PROTOCOL_VERSIONS, SocketKey,
    ToGeneration, ToSupervisor,
};

fn key() -> SocketKey {
    SocketKey::tcp("127.0.0.1:8080".parse().unwrap())
}

fn all_to_supervisor() -> Vec<ToSupervisor> {
    vec![
        ToSupervisor::Hello {
            versions: PROTOCOL_VERSIONS,
            features: 0,
            epoch: 7,
            pid: 1234,
            build: "0.1.0-release-abc".into(),
        },
        ToSupervisor::GetSocket { id: 1, key: key() },
        ToSupervisor::DepositSocket { id: 2, key: key() },
        ToSupervisor::GetStatsRegion { id: 3 },
        ToSupervisor::Ready {
            sockets: vec![
                key(),
                SocketKey {
                    worker: Some(2),
                    ..key()
                },
            ],
        },
        ToSupervisor::Failed {
            reason: "baton.toml:3:1: unknown field `adress`".into(),
        },
        ToSupervisor::Load(Load {
            connections: 10,
            requests: 2,
        }),
        ToSupervisor::Draining,
        ToSupervisor::GetNamedSocket {
            id: 4,
            name: "public".into(),
        },
        ToSupervisor::Exiting {
            connections_left: 0,
        },
        ToSupervisor::DrainRequested,
        ToSupervisor::BindSocket {
            id: 5,
            key: key(),
            backlog: 511,
        },
        ToSupervisor::HeldSocket { key: key() },
        ToSupervisor::HeldConfig,
    ]
}

fn all_to_generation() -> Vec<ToGeneration> {
    vec![
        ToGeneration::Welcome {
            version: 1,
            features: 0,
            supervisor_pid: 1,
        },
        ToGeneration::Refused {
            reason: "no common version".into(),
        },
        ToGeneration::Socket { id: 1, key: key() },
        ToGeneration::NotFound { id: 1, key: key() },
        ToGeneration::Deposited { id: 2 },
        ToGeneration::StatsRegion {
            id: 3,
            path: "/dev/shm/baton.x".into(),
        },
        ToGeneration::Drain {
            timeout_ms: 30_000,
            strategy: DrainStrategy::Gradual,
        },
        ToGeneration::Stop,
        ToGeneration::ReopenLogs,
        ToGeneration::Error {
            id: 9,
            message: "no".into(),
        },
        ToGeneration::Rendezvous,
    ]
}

#[test]
fn every_message_makes_the_round_trip() {
    let (supervisor, generation) = Channel::pair().unwrap();
    for msg in all_to_supervisor() {
        generation.send(&msg, &[]).unwrap();
        let got = supervisor
            .recv::<ToSupervisor>()
            .unwrap()
            .expect("a message");
        assert_eq!(got.msg, msg);
        assert!(got.fds.is_empty());
    }
    for msg in all_to_generation() {
        supervisor.send(&msg, &[]).unwrap();
        assert_eq!(generation.recv::<ToGeneration>().unwrap().unwrap().msg, msg);
    }
    assert!(
        generation.recv::<ToGeneration>().unwrap().is_none(),
        "nothing waiting: None"
    );
}

#[test]
fn file_descriptors_travel_beside_messages() {
    let (a, b) = Channel::pair().unwrap();
    let (read_end, write_end) = nix::unistd::pipe().unwrap();
    a.send(
        &ToGeneration::Socket { id: 1, key: key() },
        &[write_end.as_fd()],
    )
    .unwrap();
    drop(write_end);
    let got = b.recv::<ToGeneration>().unwrap().unwrap();
    assert_eq!(got.fds.len(), 1);
    let mut received = std::fs::File::from(got.fds.into_iter().next().unwrap());
    received.write_all(b"through the socket").unwrap();
    drop(received);
    let mut text = String::new();
    std::fs::File::from(read_end)
        .read_to_string(&mut text)
        .unwrap();
    assert_eq!(text, "through the socket");
}

fn raw_send(channel: &Channel, bytes: &[u8], fds: &[i32]) {
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
    sendmsg::<()>(
        channel.as_raw_fd(),
        &[std::io::IoSlice::new(bytes)],
        cmsgs,
        MsgFlags::empty(),
        None,
    )
    .unwrap();
}

#[test]
fn malformed_datagrams_are_errors_not_panics() {
    let (a, b) = Channel::pair().unwrap();
    // An unknown variant index.
    raw_send(&a, &[200, 1, 2, 3], &[]);
    assert!(matches!(
        b.recv::<ToSupervisor>(),
        Err(ChannelError::Malformed(_))
    ));
    // A valid message followed by garbage.
    let mut bytes = postcard::to_stdvec(&ToGeneration::Stop).unwrap();
    bytes.extend_from_slice(b"extra");
    raw_send(&a, &bytes, &[]);
    let err = b.recv::<ToGeneration>().unwrap_err();
    assert!(err.to_string().contains("5 bytes after the end"), "{err}");
    // A message cut short.
    let full = postcard::to_stdvec(&ToSupervisor::Failed {
        reason: "x".repeat(100),
    })
    .unwrap();
    raw_send(&a, &full[..20], &[]);
    assert!(matches!(
        b.recv::<ToSupervisor>(),
        Err(ChannelError::Malformed(_))
    ));
    // Too large.
    raw_send(&a, &vec![0u8; MAX_MESSAGE + 100], &[]);
    assert!(matches!(
        b.recv::<ToSupervisor>(),
        Err(ChannelError::Oversize(_))
    ));
    // The channel still works afterwards.
    a.send(&ToGeneration::Stop, &[]).unwrap();
    assert_eq!(
        b.recv::<ToGeneration>().unwrap().unwrap().msg,
        ToGeneration::Stop
    );
}

#[test]
fn a_closed_peer_is_an_event() {
    let (a, b) = Channel::pair().unwrap();
    a.send(
        &ToSupervisor::Exiting {
            connections_left: 0,
        },
        &[],
    )
    .unwrap();
    drop(a);
    // What was sent before the close is still delivered, then the close.
    assert!(b.recv::<ToSupervisor>().unwrap().is_some());
    assert!(matches!(
        b.recv::<ToSupervisor>(),
        Err(ChannelError::Closed)
    ));
    assert!(matches!(
        b.send(&ToGeneration::Stop, &[]),
        Err(ChannelError::Closed)
    ));
}

#[test]
fn only_a_seqpacket_socket_is_a_channel() {
    let (r, _w) = nix::unistd::pipe().unwrap();
    assert!(matches!(
        Channel::from_fd(r),
        Err(ChannelError::Io(_)) | Err(ChannelError::NotSeqPacket)
    ));
    let (a, b) = Channel::pair().unwrap();
    let b = Channel::from_fd(OwnedFd::from(b)).unwrap();
    a.send(&ToGeneration::ReopenLogs, &[]).unwrap();
    assert_eq!(
        b.recv::<ToGeneration>().unwrap().unwrap().msg,
        ToGeneration::ReopenLogs
    );
}

proptest! {
    #[test]
    fn arbitrary_messages_round_trip(reason in ".{0,2000}", build in "[ -~]{0,100}", epoch: u64, pid: u32, id: u32, port: u16, worker: Option<u32>) {
        let (a, b) = Channel::pair().unwrap();
        let key = SocketKey { worker, ..SocketKey::tcp(([127, 0, 0, 1], port).into()) };
        let messages = [
            ToSupervisor::Failed { reason: reason.clone() },
            ToSupervisor::Hello { versions: PROTOCOL_VERSIONS, features: u64::from(id), epoch, pid, build },
            ToSupervisor::GetSocket { id, key },
        ];
        for msg in messages {
            a.send(&msg, &[]).unwrap();
            prop_assert_eq!(b.recv::<ToSupervisor>().unwrap().unwrap().msg, msg);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_decoder(bytes in prop::collection::vec(any::<u8>(), 1..300)) {
        let (a, b) = Channel::pair().unwrap();
        raw_send(&a, &bytes, &[]);
        let _ = b.recv::<ToSupervisor>();
        raw_send(&a, &bytes, &[]);
        let _ = b.recv::<ToGeneration>();
    }
}
