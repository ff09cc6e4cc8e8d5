//! Surviving a region file cut short under a writer.
//!
//! A mapped file that another process truncates (`truncate -s 0 /dev/shm/baton.x`, a cleanup
//! script, a full tmpfs) makes every access past its new end raise SIGBUS, which would kill the
//! supervisor and every generation at their next counter update. A writer's mapping is
//! registered here, and a SIGBUS handler, installed once per process, tells a fault inside one
//! from any other: for ours, it maps private zero pages over the whole mapping (the faulting
//! access then completes, into memory that nobody reads) and marks it lost, so that the process
//! lives on and says so ([`crate::Region::lost`]); any other SIGBUS gets the action that was in
//! place before, as if this module did not exist.
//!
//! Only async-signal-safe work happens in the handler: atomic loads and stores, `mmap`, and
//! `sigaction`.

use std::sync::Once;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Mappings guarded at once; a process maps one region (two for a moment while it replaces it).
const SLOTS: usize = 8;

struct Slot {
    start: AtomicUsize,
    len: AtomicUsize,
    lost: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot {
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    lost: AtomicBool::new(false),
};

static GUARDED: [Slot; SLOTS] = [EMPTY; SLOTS];
static INSTALL: Once = Once::new();
/// The SIGBUS action in place before ours, for faults that are not ours.
static mut PREVIOUS: Option<libc::sigaction> = None;

/// A guarded mapping; unguarded when dropped (before the mapping is unmapped).
pub(crate) struct Guard {
    slot: Option<usize>,
}

impl Guard {
    /// Guards the mapping at `start`, `len` bytes. Without a free slot or a handler the mapping
    /// is unguarded, as before (a fault then kills the process, as it would have).
    pub(crate) fn new(start: *const u8, len: usize) -> Guard {
        install();
        for (i, slot) in GUARDED.iter().enumerate() {
            if slot
                .len
                .compare_exchange(0, usize::MAX, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                slot.lost.store(false, Ordering::Release);
                slot.start.store(start as usize, Ordering::Release);
                slot.len.store(len, Ordering::Release);
                return Guard { slot: Some(i) };
            }
        }
        Guard { slot: None }
    }

    /// Whether the file was cut short under the mapping, which is now private zero pages.
    pub(crate) fn lost(&self) -> bool {
        self.slot
            .is_some_and(|i| GUARDED[i].lost.load(Ordering::Acquire))
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(i) = self.slot {
            GUARDED[i].start.store(0, Ordering::Release);
            GUARDED[i].len.store(0, Ordering::Release);
        }
    }
}

#[allow(unsafe_code)] // sigaction, which std does not wrap.
fn install() {
    INSTALL.call_once(|| {
        // SAFETY: zeroed sigactions are valid starting values. The action in place is read and
        // kept in PREVIOUS before ours is installed, so the handler (which only reads it, after
        // the installing sigaction call) never sees it unwritten; it is written only here, once.
        // The handler does only async-signal-safe work (see the module's documentation).
        unsafe {
            let mut previous: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut previous) != 0 {
                return;
            }
            PREVIOUS = Some(previous);
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_sigbus as *const () as usize;
            // On the alternate stack where there is one (std sets one up for its own SIGBUS
            // and SIGSEGV handler, which reports stack overflows).
            action.sa_flags = libc::SA_SIGINFO | libc::SA_NODEFER | libc::SA_ONSTACK;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut());
        }
    });
}

#[allow(unsafe_code)] // A signal handler: the siginfo pointer, mmap and sigaction.
extern "C" fn on_sigbus(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler; si_addr is the
    // faulting address for SIGBUS.
    let address = unsafe { (*info).si_addr() } as usize;
    for slot in &GUARDED {
        let (start, len) = (
            slot.start.load(Ordering::Acquire),
            slot.len.load(Ordering::Acquire),
        );
        if start == 0 || len == 0 || len == usize::MAX {
            continue;
        }
        if (start..start + len).contains(&address) {
            // SAFETY: the range is a live mapping this process registered (a Guard unregisters
            // it before it is unmapped); replacing it with anonymous pages of the same size
            // keeps every pointer into it valid.
            let mapped = unsafe {
                libc::mmap(
                    start as *mut libc::c_void,
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            if mapped != libc::MAP_FAILED {
                slot.lost.store(true, Ordering::Release);
                // Returning retries the access, which now succeeds.
                return;
            }
        }
    }
    // Not ours: the action in place before (std's, which reports a stack overflow and else
    // restores the default), which the retried access now meets.
    // SAFETY: PREVIOUS was written before this handler was installed and is never written
    // again; sigaction is async-signal-safe.
    unsafe {
        let previous = (*std::ptr::addr_of!(PREVIOUS)).unwrap_or_else(|| {
            let mut default: libc::sigaction = std::mem::zeroed();
            default.sa_sigaction = libc::SIG_DFL;
            default
        });
        libc::sigaction(libc::SIGBUS, &previous, std::ptr::null_mut());
    }
}
