//! Process-shared robust mutexes living in the region, so that overlapping generations (and the
//! supervisor) can serialise work on shared things. A holder that dies with the lock held does not
//! wedge the others: the next locker is told (`EOWNERDEAD`), marks the mutex consistent, and goes on.

use std::io;

/// A `pthread_mutex_t` at a fixed place in a mapping that outlives it.
pub(crate) struct RawLock {
    mutex: *mut libc::pthread_mutex_t,
}

/// How a lock was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acquired {
    /// The normal case.
    Clean,
    /// The previous holder died with the lock held; whatever it protected may be half-done.
    OwnerDied,
}

impl RawLock {
    /// # Safety
    /// `mutex` points to `LOCK_SLOT_SIZE` writable, suitably aligned bytes of a shared mapping
    /// that stays mapped as long as this value lives.
    #[allow(unsafe_code)] // Its caller vouches for the pointer.
    pub(crate) unsafe fn at(mutex: *mut u8) -> RawLock {
        RawLock {
            mutex: mutex.cast(),
        }
    }

    /// Initialises the mutex as process-shared and robust. Only on a region nobody else has
    /// mapped yet.
    #[allow(unsafe_code)] // pthread calls on the mutex in the mapping.
    pub(crate) fn init(&self) -> io::Result<()> {
        // SAFETY: the attribute object lives on this stack frame and is destroyed before return;
        // `self.mutex` is valid writable memory (see `at`) that no other process uses yet.
        unsafe {
            let mut attr: libc::pthread_mutexattr_t = std::mem::zeroed();
            check(libc::pthread_mutexattr_init(&mut attr))?;
            let result = check(libc::pthread_mutexattr_setpshared(
                &mut attr,
                libc::PTHREAD_PROCESS_SHARED,
            ))
            .and_then(|()| {
                check(libc::pthread_mutexattr_setrobust(
                    &mut attr,
                    libc::PTHREAD_MUTEX_ROBUST,
                ))
            })
            .and_then(|()| check(libc::pthread_mutex_init(self.mutex, &attr)));
            libc::pthread_mutexattr_destroy(&mut attr);
            result
        }
    }

    /// Takes the lock, recovering it if its holder died.
    #[allow(unsafe_code)] // pthread calls on the mutex in the mapping.
    pub(crate) fn lock(&self) -> io::Result<Acquired> {
        // SAFETY: `self.mutex` is an initialised process-shared mutex in live shared memory.
        let rc = unsafe { libc::pthread_mutex_lock(self.mutex) };
        match rc {
            0 => Ok(Acquired::Clean),
            libc::EOWNERDEAD => {
                // SAFETY: we hold the mutex (EOWNERDEAD means it was acquired).
                check(unsafe { libc::pthread_mutex_consistent(self.mutex) })?;
                Ok(Acquired::OwnerDied)
            }
            e => Err(io::Error::from_raw_os_error(e)),
        }
    }

    #[allow(unsafe_code)] // A pthread call on the mutex in the mapping.
    pub(crate) fn unlock(&self) {
        // SAFETY: only called by a guard of a successful `lock` on this thread.
        unsafe {
            libc::pthread_mutex_unlock(self.mutex);
        }
    }
}

fn check(rc: libc::c_int) -> io::Result<()> {
    match rc {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

/// Holds a region lock until dropped.
pub struct LockGuard<'a> {
    lock: RawLock,
    acquired: Acquired,
    _region: std::marker::PhantomData<&'a ()>,
}

impl LockGuard<'_> {
    pub(crate) fn new(lock: RawLock, acquired: Acquired) -> Self {
        LockGuard {
            lock,
            acquired,
            _region: std::marker::PhantomData,
        }
    }

    /// Whether the previous holder died holding the lock.
    pub fn acquired(&self) -> Acquired {
        self.acquired
    }
}

impl Drop for LockGuard<'_> {
    fn drop(&mut self) {
        self.lock.unlock();
    }
}
