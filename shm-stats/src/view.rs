//! Bounds-checked access to the bytes of a mapped region.
//!
//! The region is shared with other processes that write it while we read, so it is never seen as
//! a Rust slice: mutable fields are read with atomic loads through raw pointers, and immutable
//! ones (an entry's strings, published before its index) are copied out. Every access checks its
//! offset and alignment against the mapping's length first, so a foreign or truncated file can
//! only produce `None`, never a read out of bounds.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// A mapped region's address and length.
#[derive(Clone, Copy)]
pub(crate) struct View {
    ptr: *const u8,
    len: u64,
}

impl View {
    /// # Safety
    /// `ptr` is the page-aligned start of a mapping of `len` readable bytes that stays mapped for
    /// as long as this view (and its copies) is used.
    #[allow(unsafe_code)] // Its caller vouches for the mapping.
    pub(crate) unsafe fn new(ptr: *const u8, len: usize) -> View {
        View {
            ptr,
            len: len as u64,
        }
    }

    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    fn in_bounds(&self, offset: u64, size: u64) -> bool {
        offset.checked_add(size).is_some_and(|end| end <= self.len)
            && offset % size.clamp(1, 8) == 0
    }

    #[allow(unsafe_code)] // Reads the mapping through a raw pointer.
    pub(crate) fn atomic_u32(&self, offset: u64) -> Option<&AtomicU32> {
        if !self.in_bounds(offset, 4) {
            return None;
        }
        // SAFETY: in bounds and 4-aligned (the mapping is page-aligned); the memory is live for
        // the view's lifetime (see `new`). Only loads happen through this reference on a reader's
        // read-only mapping, which Rust allows for native-width atomics.
        Some(unsafe { &*(self.ptr.add(offset as usize) as *const AtomicU32) })
    }

    #[allow(unsafe_code)] // Reads the mapping through a raw pointer.
    pub(crate) fn atomic_u64(&self, offset: u64) -> Option<&AtomicU64> {
        if !self.in_bounds(offset, 8) {
            return None;
        }
        // SAFETY: as in `atomic_u32`, with 8-byte alignment checked.
        Some(unsafe { &*(self.ptr.add(offset as usize) as *const AtomicU64) })
    }

    /// `len` consecutive 8-byte cells from `offset`, checked once for the whole run.
    #[allow(unsafe_code)] // Reads the mapping through a raw pointer.
    pub(crate) fn atomic_u64s(&self, offset: u64, len: usize) -> Option<&[AtomicU64]> {
        let bytes = (len as u64).checked_mul(8)?;
        if !self.in_bounds(offset, 8) || offset.checked_add(bytes)? > self.len {
            return None;
        }
        // SAFETY: the whole run is in bounds and 8-aligned (checked above) and lives as long as
        // the view; atomics tolerate the concurrent writes of other processes.
        Some(unsafe {
            std::slice::from_raw_parts(self.ptr.add(offset as usize) as *const AtomicU64, len)
        })
    }

    /// Copies `N` bytes into an array, without allocating.
    #[allow(unsafe_code)] // Reads the mapping through a raw pointer.
    pub(crate) fn copy_array<const N: usize>(&self, offset: u64) -> Option<[u8; N]> {
        if offset.checked_add(N as u64)? > self.len {
            return None;
        }
        let mut out = [0u8; N];
        // SAFETY: the source range is in bounds (checked above); the destination is a local
        // array of N bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr.add(offset as usize), out.as_mut_ptr(), N);
        }
        Some(out)
    }

    pub(crate) fn load_u32(&self, offset: u64, order: Ordering) -> Option<u32> {
        self.atomic_u32(offset).map(|a| a.load(order))
    }

    pub(crate) fn load_u64(&self, offset: u64, order: Ordering) -> Option<u64> {
        self.atomic_u64(offset).map(|a| a.load(order))
    }

    /// Copies `len` bytes that nobody writes any more (published entries, the header's fixed part).
    #[allow(unsafe_code)] // Reads the mapping through a raw pointer.
    pub(crate) fn copy(&self, offset: u64, len: usize) -> Option<Vec<u8>> {
        if !self.in_bounds(offset, 1) || offset + len as u64 > self.len {
            return None;
        }
        let mut out = vec![0u8; len];
        // SAFETY: the source range is in bounds (checked above) and the destination is a fresh
        // buffer of `len` bytes; the ranges cannot overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr.add(offset as usize), out.as_mut_ptr(), len);
        }
        Some(out)
    }
}
