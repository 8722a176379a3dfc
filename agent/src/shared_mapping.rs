//! Part of a `BPF_F_MMAPABLE` array map mapped into the agent, as 64-bit
//! words: memory the kernel programs read and write at the same time, so
//! the agent writes it word by word (`store`) or adds to it atomically
//! (`add`), never through references to whole values.
use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd},
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

/// Bytes `offset..offset + len` of an mmapable array map, mapped shared.
pub struct SharedMapping {
    base: NonNull<u64>,
    len: usize,
}

// SAFETY: the mapping is memory owned by this value; the kernel is the
// only other party, and every access is a single aligned word.
unsafe impl Send for SharedMapping {}
unsafe impl Sync for SharedMapping {}

impl SharedMapping {
    /// Maps `len` bytes from `offset` (a multiple of the page size) of the
    /// map behind `fd`.
    pub fn new(fd: BorrowedFd<'_>, offset: usize, len: usize) -> io::Result<SharedMapping> {
        // SAFETY: a new shared mapping of the map's fd, checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base =
            NonNull::new(ptr.cast::<u64>()).ok_or_else(|| io::Error::other("null mapping"))?;
        Ok(SharedMapping { base, len })
    }

    /// Words in the mapping.
    pub fn words(&self) -> usize {
        self.len / 8
    }

    fn word(&self, index: usize) -> &AtomicU64 {
        assert!(index < self.words(), "word {index} out of the mapping");
        // SAFETY: in bounds (checked) and 8-aligned (the mapping starts on
        // a page); the kernel accesses these words atomically or whole.
        unsafe { &*self.base.as_ptr().add(index).cast::<AtomicU64>() }
    }

    pub fn load(&self, index: usize) -> u64 {
        self.word(index).load(Ordering::Relaxed)
    }

    /// A plain store of one word (ordering between words is the caller's,
    /// with fences).
    pub fn store(&self, index: usize, value: u64) {
        self.word(index).store(value, Ordering::Relaxed);
    }

    /// Adds `n` atomically (wrapping), as the kernel's own atomic adds do.
    pub fn add(&self, index: usize, n: u64) {
        self.word(index).fetch_add(n, Ordering::Relaxed);
    }
}

impl Drop for SharedMapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}
