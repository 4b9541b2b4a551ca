//! A per-thread cap on single allocations, for parsers that reserve what a file declares.
//!
//! DICOM parsers reserve an element's declared length (up to 4 GiB) before reading it, and the
//! fuzzer kept finding layouts where the parser's reading and radfm's length walk
//! ([`crate::dicom_lengths`]) part ways. The parser reserves fallibly, so refusing the
//! reservation turns each such file into a parse error instead of gigabytes per decoding thread.
//! Binaries that parse DICOM install [`Capped`] as their global allocator; [`with_cap`] sets the
//! cap around the parse. Without [`Capped`] installed, [`with_cap`] changes nothing.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

thread_local! {
    static CAP: Cell<usize> = const { Cell::new(usize::MAX) };
}

fn cap() -> usize {
    CAP.try_with(Cell::get).unwrap_or(usize::MAX)
}

/// The system allocator, refusing (returning null for) a single allocation larger than the
/// calling thread's cap.
pub struct Capped;

// SAFETY: every call is forwarded to the system allocator unchanged, or refused with null before
// it, which the GlobalAlloc contract allows for alloc, alloc_zeroed and realloc.
unsafe impl GlobalAlloc for Capped {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > cap() {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's layout, forwarded.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > cap() {
            return std::ptr::null_mut();
        }
        // SAFETY: as for alloc.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: ptr came from System through this allocator with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > cap() {
            return std::ptr::null_mut();
        }
        // SAFETY: as for dealloc; the old block stays valid when this returns null.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Runs `f` with single allocations on this thread capped at `bytes`.
pub fn with_cap<T>(bytes: usize, f: impl FnOnce() -> T) -> T {
    struct Restore(usize);
    impl Drop for Restore {
        fn drop(&mut self) {
            let _ = CAP.try_with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(CAP.with(|c| c.replace(bytes)));
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_reservation_is_an_error_and_the_cap_ends_with_the_call() {
        // The test binary does not install Capped, so this checks the allocator directly.
        let big = Layout::from_size_align(1 << 20, 8).unwrap();
        with_cap(1024, || {
            // SAFETY: a valid layout; a null result is not dereferenced.
            let p = unsafe { Capped.alloc(big) };
            assert!(p.is_null());
        });
        // SAFETY: as above; the block is freed with its layout.
        unsafe {
            let p = Capped.alloc(big);
            assert!(!p.is_null());
            Capped.dealloc(p, big);
        }
    }
}
