//! Guest memory backed by sparse files, one per block, mapped shared into the
//! process: pages written land in the page cache of the image file, pages
//! never written stay holes.
//!
//! This is the only module of the crate with `unsafe` code.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use crate::memory::{check_range, GuestMemory};

/// One mapped block image.
#[derive(Debug)]
struct Mapped {
    name: String,
    file_name: String,
    file: File,
    /// Start of a shared read-write mapping of `len` bytes of `file`, or
    /// `None` when `len` is 0.
    map: Option<NonNull<u8>>,
    len: u64,
}

impl Mapped {
    fn unmap(&mut self) {
        if let Some(p) = self.map.take() {
            // SAFETY: `p` and `len` are exactly the address and length returned by
            // / passed to the successful mmap in `map()`; the mapping is dropped
            // from `self` first, so no slice into it can outlive this call (slices
            // borrow `self` mutably).
            let r = unsafe { libc::munmap(p.as_ptr().cast(), self.len as usize) };
            debug_assert_eq!(r, 0);
        }
    }

    fn map(&mut self) -> io::Result<()> {
        self.unmap();
        if self.len == 0 {
            return Ok(());
        }
        let len = usize::try_from(self.len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "block too large"))?;
        // SAFETY: a fresh mapping chosen by the kernel (null hint), of a file
        // descriptor we own and keep open for the mapping's lifetime; the file was
        // extended to `len` bytes before, so every mapped byte is backed.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                self.file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        self.map = NonNull::new(p.cast());
        Ok(())
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        self.unmap();
    }
}

/// Guest memory in sparse image files `DIR/<name>.img`, mapped with `mmap`.
///
/// Bytes written are visible in the files right away (shared mapping); holes
/// stay holes until a page is written. Discards punch holes.
#[derive(Debug)]
pub struct MmapMemory {
    dir: PathBuf,
    blocks: Vec<Mapped>,
    /// Bytes handed out by `bytes_mut` since the mappings' pages were last
    /// released (see [`RELEASE_EVERY`]).
    touched: u64,
}

/// Bytes accessed through an [`MmapMemory`] after which its mapped pages are
/// released from the process (`MADV_DONTNEED`): the data stays in the image
/// files' page cache and is faulted back in on the next access, but the
/// process's resident set stays bounded (about this much plus its own heap)
/// however large the guest, as for a memory that writes with `pwrite`.
pub(crate) const RELEASE_EVERY: u64 = 16 << 20;

/// What [`MmapMemory::files`] lists per block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageFile {
    /// RAM block name.
    pub name: String,
    /// File name inside the directory.
    pub file_name: String,
    /// Length in bytes.
    pub length: u64,
}

impl MmapMemory {
    /// Memory whose block images will be created in `dir` (created if missing).
    ///
    /// # Errors
    /// The directory cannot be created.
    pub fn create(dir: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(MmapMemory {
            dir: dir.to_path_buf(),
            blocks: Vec::new(),
            touched: 0,
        })
    }

    /// The block images so far.
    pub fn files(&self) -> Vec<ImageFile> {
        self.blocks
            .iter()
            .map(|b| ImageFile {
                name: b.name.clone(),
                file_name: b.file_name.clone(),
                length: b.len,
            })
            .collect()
    }

    /// The directory holding the images.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Releases every mapped page from the process (see [`RELEASE_EVERY`]).
    fn release_all(&mut self) {
        for b in &self.blocks {
            if let Some(p) = b.map {
                // SAFETY: `p` and `len` are the address and length of this block's
                // live shared file mapping. MADV_DONTNEED on a shared file mapping
                // only unmaps its pages from this process: dirty pages stay in the
                // file's page cache, and the next access faults the same bytes back
                // in, so the contents seen through the mapping do not change. No
                // slice into the mapping is live (we hold `&mut self`).
                unsafe { libc::madvise(p.as_ptr().cast(), b.len as usize, libc::MADV_DONTNEED) };
            }
        }
        self.touched = 0;
    }

    fn get(&mut self, index: usize) -> io::Result<&mut Mapped> {
        self.blocks
            .get_mut(index)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("no block {index}")))
    }
}

impl GuestMemory for MmapMemory {
    fn set_block_len(&mut self, index: usize, name: &str, len: u64) -> io::Result<()> {
        if index == self.blocks.len() {
            let (file_name, file) = create_image(&self.dir, name, |f| {
                self.blocks.iter().any(|b| b.file_name == f)
            })?;
            self.blocks.push(Mapped {
                name: name.to_string(),
                file_name,
                file,
                map: None,
                len: 0,
            });
        }
        let b = self.get(index)?;
        b.unmap();
        b.file.set_len(len)?;
        b.len = len;
        b.map()
    }

    #[inline]
    fn bytes_mut(&mut self, index: usize, offset: u64, len: usize) -> io::Result<&mut [u8]> {
        self.touched += len as u64;
        if self.touched > RELEASE_EVERY {
            self.release_all();
        }
        let b = self.get(index)?;
        let r = check_range(index, offset, len, b.len)?;
        let Some(base) = b.map else {
            // Only a 0-byte block has no mapping, and only an empty range fits it.
            return Ok(&mut []);
        };
        // SAFETY: `r.start <= b.len`, the length of the mapping at `base` (checked
        // just above), so the result stays inside the mapping or one past its end.
        let start = unsafe { base.as_ptr().add(r.start) };
        // SAFETY: `start..start + r.len()` lies within the `b.len`-byte mapping
        // (checked above); the mapping lives until `b` is unmapped, which needs
        // `&mut self`, so it outlives the returned borrow of `self`. No other slice
        // of it exists (all are handed out through `&mut self`). Another process
        // may write the file concurrently; like any shared memory that only
        // changes byte values.
        let s = unsafe { std::slice::from_raw_parts_mut(start, r.len()) };
        Ok(s)
    }

    fn discard(&mut self, index: usize, offset: u64, len: u64) -> io::Result<()> {
        let b = self.get(index)?;
        let end = offset.checked_add(len).filter(|&e| e <= b.len);
        if end.is_none() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "discard range outside block",
            ));
        }
        let (Ok(o), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "discard range too large",
            ));
        };
        // The kernel drops the range from the page cache and from our shared
        // mapping, which then reads zeros; no Rust reference into the mapping is
        // live here (we hold `&mut self`).
        let r = punch_hole(&b.file, o, l);
        if r.is_ok() {
            return Ok(());
        }
        // Filesystems without hole punching: write zeros.
        let mut at = offset;
        let end = offset + len;
        while at < end {
            let n = (end - at).min(1 << 20) as usize;
            self.bytes_mut(index, at, n)?.fill(0);
            at += n as u64;
        }
        Ok(())
    }
}

/// A file name for block `name`: unsafe characters replaced, `.img` appended,
/// a `-N` suffix added while `taken` says the name is used (never `manifest`).
pub(crate) fn image_file_name(name: &str, taken: impl Fn(&str) -> bool) -> String {
    let mut s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    while s.starts_with('.') {
        s.replace_range(0..1, "_");
    }
    let base = s.clone();
    let mut n = 1;
    while taken(&format!("{s}.img")) || s == "manifest" {
        n += 1;
        s = format!("{base}-{n}");
    }
    format!("{s}.img")
}

/// Creates the image file of block `name` in `dir` fresh, under a file name
/// that `taken` does not already use: a stale file or a symlink at that name
/// is unlinked first and the open uses `O_EXCL | O_NOFOLLOW`, so an image is
/// never written through a link planted in the directory. Errors name the path.
pub(crate) fn create_image(
    dir: &Path,
    name: &str,
    taken: impl Fn(&str) -> bool,
) -> io::Result<(String, File)> {
    use std::os::unix::fs::OpenOptionsExt;
    let file_name = image_file_name(name, taken);
    let path = dir.join(&file_name);
    let named = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
    match std::fs::symlink_metadata(&path) {
        Ok(m) if !m.is_dir() => std::fs::remove_file(&path).map_err(named)?,
        _ => {}
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
        .map_err(named)?;
    Ok((file_name, file))
}

/// Punches a hole `offset..offset + len` into `file` (keeping its size).
///
/// # Errors
/// The filesystem does not support it, or the range is invalid.
pub(crate) fn punch_hole(file: &File, offset: libc::off_t, len: libc::off_t) -> io::Result<()> {
    // SAFETY: fallocate only reads its integer arguments; `file` is an open
    // descriptor we borrow for the duration of the call.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `MADV_POPULATE_READ` (Linux 5.14, `include/uapi/asm-generic/mman-common.h`).
const MADV_POPULATE_READ: libc::c_int = 22;

/// Allocates blocks for `offset..offset + len` of `file` (`fallocate` mode 0:
/// unwritten extents, read as zeros, size unchanged inside the file), so that
/// a following buffered write of the range skips the filesystem's delayed
/// allocation bookkeeping (on ext4 a third of a page-cache write's CPU time).
///
/// # Errors
/// The OS error (e.g. `EOPNOTSUPP` where the filesystem has no `fallocate`).
pub(crate) fn preallocate(file: &File, offset: libc::off_t, len: libc::off_t) -> io::Result<()> {
    // SAFETY: fallocate only reads its integer arguments; `file` is an open
    // descriptor we borrow for the duration of the call.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), 0, offset, len) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Copies `data.len()` bytes from file offset `src_at` of `src` to offset
/// `dst_at` of `dst` with `copy_file_range` (in the kernel: no copy through
/// user space); `data` must be those same bytes (a mapping of `src`). Where
/// the kernel refuses (across filesystems on old kernels, filesystems
/// without support) or `src` ends early, the rest is written from `data`.
///
/// # Errors
/// The write error of the fallback `pwrite`.
pub(crate) fn copy_run(
    src: &File,
    src_at: u64,
    dst: &File,
    dst_at: u64,
    data: &[u8],
) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut done = 0usize;
    while done < data.len() {
        let (Ok(mut off_in), Ok(mut off_out)) = (
            libc::loff_t::try_from(src_at.saturating_add(done as u64)),
            libc::loff_t::try_from(dst_at.saturating_add(done as u64)),
        ) else {
            break;
        };
        // SAFETY: both descriptors are open files we borrow for the call;
        // the offsets are our own locals, which the kernel updates; no
        // memory of ours is read or written otherwise.
        let n = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut off_in,
                dst.as_raw_fd(),
                &mut off_out,
                data.len() - done,
                0,
            )
        };
        if n > 0 {
            done += n as usize;
            continue;
        }
        if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        // 0 (source shorter than expected) or refused: write the rest.
        break;
    }
    if done < data.len() {
        dst.write_all_at(&data[done..], dst_at.saturating_add(done as u64))?;
    }
    Ok(())
}

/// A whole file mapped read-only, for replaying a captured stream without
/// copying it through `read()` first.
///
/// The mapping is private and read-only. If another process truncates the
/// file while it is mapped, reading past the new end raises `SIGBUS`: map
/// only captures that are not being written.
#[derive(Debug)]
pub struct MappedInput {
    ptr: Option<NonNull<u8>>,
    len: usize,
    _file: File,
    /// The thread started by [`MappedInput::release_periodically`].
    releaser: Option<Releaser>,
}

/// A thread that drops a mapping's resident pages at a fixed period, until
/// it is told to stop (always before the mapping goes).
#[derive(Debug)]
struct Releaser {
    stop: std::sync::Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Releaser {
    fn stop(&mut self) {
        let (lock, cv) = &*self.stop;
        if let Ok(mut g) = lock.lock() {
            *g = true;
        }
        cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// SAFETY: the mapping is read-only and owned by this value; sharing `&[u8]`
// views of it between threads is as safe as sharing any immutable slice.
unsafe impl Send for MappedInput {}
// SAFETY: as above: only immutable access is ever given out.
unsafe impl Sync for MappedInput {}

impl MappedInput {
    /// Maps `file` (its current length) read-only.
    ///
    /// # Errors
    /// The file's size cannot be read or `mmap` fails.
    pub fn new(file: File) -> io::Result<Self> {
        let len = usize::try_from(file.metadata()?.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file too large to map"))?;
        if len == 0 {
            return Ok(MappedInput {
                ptr: None,
                len,
                _file: file,
                releaser: None,
            });
        }
        // SAFETY: a fresh private read-only mapping chosen by the kernel (null
        // hint) of `len` bytes of a descriptor we own and keep open as long as
        // the mapping lives.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the hint only affects readahead; the range is the mapping above.
        unsafe { libc::madvise(p, len, libc::MADV_SEQUENTIAL) };
        Ok(MappedInput {
            ptr: NonNull::new(p.cast()),
            len,
            _file: file,
            releaser: None,
        })
    }

    /// Drops the pages of `0..upto` from this process's resident set (they
    /// stay in the page cache). Reading them again faults the same file
    /// content back in, so slices handed out before stay valid; this only
    /// keeps a sequential reader's memory use bounded.
    pub fn release_prefix(&self, upto: usize) {
        let upto = upto.min(self.len) & !4095;
        if let (Some(p), true) = (self.ptr, upto > 0) {
            // SAFETY: the range is page-aligned and inside the private read-only
            // mapping made in `new`; MADV_DONTNEED on it only discards this
            // process's page-table entries for unmodified file pages.
            unsafe { libc::madvise(p.as_ptr().cast(), upto, libc::MADV_DONTNEED) };
        }
    }

    /// Maps `start..end` (clamped to the file) into the page tables now, in
    /// one call (`MADV_POPULATE_READ`, Linux 5.14), instead of one page fault
    /// per few pages as a sequential reader touches them. Only a hint:
    /// ignored where the kernel lacks it.
    pub fn populate(&self, start: usize, end: usize) {
        let start = start.min(self.len) & !4095;
        let end = end.min(self.len);
        if let (Some(p), true) = (self.ptr, end > start) {
            let at = p.as_ptr().wrapping_add(start);
            // SAFETY: `start..end` lies inside the private read-only mapping
            // made in `new` (start page-aligned); MADV_POPULATE_READ only
            // faults its file pages in for reading.
            unsafe { libc::madvise(at.cast(), end - start, MADV_POPULATE_READ) };
        }
    }

    /// Starts a thread that drops this mapping's resident pages every
    /// `period` (as [`release_prefix`](Self::release_prefix) of the whole
    /// file) until the value drops: for a reader that walks the mapping in
    /// an order this type cannot see (`qmig send` reading RAM images), so
    /// that its resident set stays near what it reads in one period instead
    /// of growing to the file's size. Readers are unaffected but for
    /// faulting pages in again from the page cache. A second call does nothing.
    ///
    /// # Errors
    /// The thread cannot be started.
    pub fn release_periodically(&mut self, period: std::time::Duration) -> io::Result<()> {
        let Some(p) = self.ptr else {
            return Ok(());
        };
        if self.releaser.is_some() {
            return Ok(());
        }
        let stop = std::sync::Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
        let (addr, len) = (p.as_ptr() as usize, self.len & !4095);
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("qmig-release".into())
            .spawn(move || {
                let (lock, cv) = &*flag;
                let Ok(mut stopped) = lock.lock() else { return };
                while !*stopped {
                    if len > 0 {
                        // SAFETY: `addr..addr + len` is the page-aligned part of
                        // the private read-only file mapping made in `new`; it
                        // stays mapped while this thread runs, because `drop`
                        // stops and joins this thread before `munmap`.
                        // MADV_DONTNEED there only drops this process's
                        // page-table entries of unmodified file pages.
                        unsafe {
                            libc::madvise(addr as *mut libc::c_void, len, libc::MADV_DONTNEED)
                        };
                    }
                    match cv.wait_timeout(stopped, period) {
                        Ok((g, _)) => stopped = g,
                        Err(_) => return,
                    }
                }
            })?;
        self.releaser = Some(Releaser {
            stop,
            thread: Some(thread),
        });
        Ok(())
    }

    /// The file's bytes.
    pub fn as_slice(&self) -> &[u8] {
        match self.ptr {
            // SAFETY: `p` points to a live read-only mapping of `len` bytes that
            // is unmapped only in `drop`, after every borrow of `self` has ended.
            Some(p) => unsafe { std::slice::from_raw_parts(p.as_ptr(), self.len) },
            None => &[],
        }
    }
}

impl Drop for MappedInput {
    fn drop(&mut self) {
        // The releaser thread must be gone before the range is unmapped (it
        // could otherwise advise a later, unrelated mapping at that address).
        if let Some(mut r) = self.releaser.take() {
            r.stop();
        }
        if let Some(p) = self.ptr.take() {
            // SAFETY: address and length of the mapping made in `new`; no slice
            // into it can outlive `self`.
            unsafe { libc::munmap(p.as_ptr().cast(), self.len) };
        }
    }
}
