//! Alone in its own test binary, so that no other test opens or closes fds while it counts them.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use restart_protocol::{Channel, ChannelError, ToGeneration};

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[test]
fn too_many_fds_are_refused_and_none_leak() {
    let (a, b) = Channel::pair().unwrap();
    let pipes: Vec<(OwnedFd, OwnedFd)> = (0..10).map(|_| nix::unistd::pipe().unwrap()).collect();
    let raw: Vec<i32> = pipes.iter().map(|(r, _)| r.as_raw_fd()).collect();
    let before = open_fds();
    raw_send(&a, &postcard::to_stdvec(&ToGeneration::Stop).unwrap(), &raw);
    let got = b.recv::<ToGeneration>();
    assert!(matches!(got, Err(ChannelError::TooManyFds)), "{got:?}");
    assert_eq!(
        open_fds(),
        before,
        "fds that came with a refused message are closed"
    );
    let err = a
        .send(
            &ToGeneration::Stop,
            &pipes.iter().map(|(r, _)| r.as_fd()).collect::<Vec<_>>(),
        )
        .unwrap_err();
    assert!(matches!(err, ChannelError::TooManyFds));
}

fn raw_send(channel: &Channel, bytes: &[u8], fds: &[i32]) {
    let rights = [ControlMessage::ScmRights(fds)];
    sendmsg::<()>(
        channel.as_raw_fd(),
        &[std::io::IoSlice::new(bytes)],
        &rights,
        MsgFlags::empty(),
        None,
    )
    .unwrap();
}
