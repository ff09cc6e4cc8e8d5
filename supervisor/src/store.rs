//! The socket store: every listen socket by key, kept open across generations and crashes.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use restart_protocol::SocketKey;

#[derive(Default)]
pub struct SocketStore {
    sockets: BTreeMap<SocketKey, OwnedFd>,
}

impl SocketStore {
    pub fn get(&self, key: &SocketKey) -> Option<BorrowedFd<'_>> {
        self.sockets.get(key).map(|fd| fd.as_fd())
    }

    /// Keeps `fd` under `key`; a socket already there stays, and `fd` is closed.
    pub fn insert(&mut self, key: SocketKey, fd: OwnedFd) -> bool {
        match self.sockets.entry(key) {
            std::collections::btree_map::Entry::Occupied(_) => false,
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert(fd);
                true
            }
        }
    }

    /// Closes every socket the active generation does not use; returns their keys.
    pub fn retain(&mut self, used: &[SocketKey]) -> Vec<SocketKey> {
        let unused: Vec<SocketKey> = self
            .sockets
            .keys()
            .filter(|k| !used.contains(k))
            .copied()
            .collect();
        for key in &unused {
            self.sockets.remove(key);
        }
        unused
    }

    /// Closes every socket: on a stop, so that each socket closes with the last generation's
    /// accept loops, and clients that come meanwhile are refused rather than queued for a
    /// generation that will never come (and reset when the supervisor exits).
    pub fn close_all(&mut self) {
        self.sockets.clear();
    }

    /// Every socket with its key (for handing them over to a new supervisor).
    pub fn fds(&self) -> impl Iterator<Item = (SocketKey, BorrowedFd<'_>)> {
        self.sockets.iter().map(|(k, fd)| (*k, fd.as_fd()))
    }

    /// Every key held.
    pub fn keys(&self) -> Vec<SocketKey> {
        self.sockets.keys().copied().collect()
    }

    pub fn len(&self) -> usize {
        self.sockets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_stay_until_the_active_generation_stops_naming_them() {
        let key = |port| SocketKey::tcp(([127, 0, 0, 1], port).into());
        let mut store = SocketStore::default();
        let (a, _) = nix::unistd::pipe().unwrap();
        let (b, _) = nix::unistd::pipe().unwrap();
        assert!(store.insert(key(1), a));
        assert!(store.insert(key(2), b));
        let (c, _) = nix::unistd::pipe().unwrap();
        assert!(
            !store.insert(key(1), c),
            "the first socket under a key stays"
        );
        assert_eq!(store.retain(&[key(2)]), [key(1)]);
        assert!(store.get(&key(1)).is_none());
        assert!(store.get(&key(2)).is_some());
        assert_eq!(store.len(), 1);
    }
}
