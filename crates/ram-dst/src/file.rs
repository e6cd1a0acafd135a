//! Guest memory in sparse image files written with `pwrite`: consecutive page
//! writes are combined into large writes, which is faster than faulting pages
//! into a mapping when a stream is replayed from a file. Pages that lie in a
//! mapped input ([`FileMemory::refer_to_input`]) are not copied at all: the
//! run is written with one `pwritev` whose iovecs point into the mapping.

use std::fs::File;
use std::io::{self, IoSlice};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::memory::{check_range, GuestMemory};
use crate::mmap::{copy_run, create_image, preallocate, punch_hole};
use crate::{ImageFile, MappedInput};

/// Largest run of consecutive page writes buffered before it is written
/// (small enough to stay in L2, so the copy in and the copy out hit cache).
const MAX_PENDING: usize = 256 << 10;

/// Most pieces in one pending run: `IOV_MAX` on Linux (one `pwritev`).
const MAX_SEGS: usize = 1024;

/// Largest run, in bytes, when its pages are referred to in the mapped input
/// (nothing is copied, so only the iovec count bounds it).
const MAX_PENDING_MAPPED: usize = 8 << 20;

/// Smallest pending run whose blocks are allocated with `fallocate` before
/// it is written (one system call saves about a third of the kernel's work
/// per written page on ext4; measured on runs of 1024 pages).
const MIN_PREALLOCATE: usize = 64 << 10;

/// One piece of the pending run: bytes of the mapped input, or of `buf`.
#[derive(Debug, Clone, Copy)]
enum Seg {
    /// `start..end` of the mapped input.
    Input(usize, usize),
    /// `start..end` of `FileMemory::buf`.
    Buf(usize, usize),
}

#[derive(Debug)]
struct Image {
    name: String,
    file_name: String,
    file: File,
    len: u64,
}

/// Guest memory in sparse image files `DIR/<name>.img`, written with `pwrite`.
///
/// Writes are buffered: a run of consecutive [`GuestMemory::write`]s goes to
/// the file as one `pwrite`, and a range handed out by
/// [`GuestMemory::bytes_mut`] is written back at the next call. Call
/// [`GuestMemory::flush`] at the end (dropping flushes too, ignoring errors).
#[derive(Debug)]
pub struct FileMemory {
    dir: PathBuf,
    blocks: Vec<Image>,
    /// Buffered consecutive writes: block, start offset, length in bytes;
    /// the bytes are the pieces in `segs`.
    pending: Option<(usize, u64, usize)>,
    segs: Vec<Seg>,
    buf: Vec<u8>,
    /// A mapped input whose bytes `write` may refer to instead of copying
    /// (kept alive here as long as a pending run may point into it).
    input: Option<Arc<MappedInput>>,
    /// The range last handed out by `bytes_mut`, to be written back.
    slot: Option<(usize, u64)>,
    slot_buf: Vec<u8>,
    /// Blocks of a pending run are allocated (`fallocate`) before it is
    /// written; cleared at the first refusal (filesystems without it).
    preallocate: bool,
}

impl FileMemory {
    /// Memory whose block images will be created in `dir` (created if missing).
    ///
    /// # Errors
    /// The directory cannot be created.
    pub fn create(dir: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(FileMemory {
            dir: dir.to_path_buf(),
            blocks: Vec::new(),
            pending: None,
            segs: Vec::new(),
            buf: Vec::new(),
            input: None,
            slot: None,
            slot_buf: Vec::new(),
            preallocate: true,
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

    /// Writes what is pending, then fsyncs every image (`fsync(2)`), so that
    /// their contents survive a crash.
    ///
    /// # Errors
    /// The pending write or an fsync fails (the error names the image).
    pub fn sync_all(&mut self) -> io::Result<()> {
        self.settle()?;
        for b in &self.blocks {
            b.file.sync_all().map_err(|e| {
                let path = self.dir.join(&b.file_name);
                io::Error::new(e.kind(), format!("{}: fsync: {e}", path.display()))
            })?;
        }
        Ok(())
    }

    /// From now on, page data passed to [`GuestMemory::write`] that lies
    /// inside `input`'s mapping is not copied: runs of such pages contiguous
    /// in an image are written with `pwritev` straight from the mapping (up to
    /// `IOV_MAX` pages per call), at the next call that is not a consecutive
    /// write (so stream order is kept: a ZERO, XBZRLE, fill or discard of a
    /// page, or a later write of it, comes after it in the image) or at
    /// [`GuestMemory::flush`]. The mapping stays alive while this memory
    /// holds it (until dropped or replaced); flush before releasing its
    /// pages ([`MappedInput::release_prefix`]) so that the write does not
    /// fault them in again.
    ///
    /// # Errors
    /// Writing what is pending (into the previous input) fails.
    pub fn refer_to_input(&mut self, input: Option<Arc<MappedInput>>) -> io::Result<()> {
        self.settle()?;
        self.input = input;
        Ok(())
    }

    /// Where `data` lies in the mapped input, if it does.
    fn in_input(&self, data: &[u8]) -> Option<usize> {
        let base = self.input.as_ref()?.as_slice();
        let start = (data.as_ptr() as usize).checked_sub(base.as_ptr() as usize)?;
        (start.checked_add(data.len())? <= base.len()).then_some(start)
    }

    fn image(&self, index: usize) -> io::Result<&Image> {
        self.blocks
            .get(index)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("no block {index}")))
    }

    /// Writes back the `bytes_mut` range and the pending run.
    fn settle(&mut self) -> io::Result<()> {
        if let Some((i, off)) = self.slot.take() {
            let r = self.blocks[i].file.write_all_at(&self.slot_buf, off);
            r.map_err(|e| self.write_error(i, off, self.slot_buf.len(), e))?;
        }
        if let Some((i, off, len)) = self.pending.take() {
            // Runs below a few pages are not worth the extra system call.
            if self.preallocate && len >= MIN_PREALLOCATE {
                // Only a speed-up: a refusal just turns it off, and the
                // write below reports any real error (e.g. ENOSPC).
                let file = &self.blocks[i].file;
                let ok = match (libc::off_t::try_from(off), libc::off_t::try_from(len)) {
                    (Ok(o), Ok(l)) => preallocate(file, o, l).is_ok(),
                    _ => false,
                };
                self.preallocate = ok;
            }
            let r = match self.segs.as_slice() {
                [Seg::Buf(..)] => self.blocks[i].file.write_all_at(&self.buf, off),
                _ => {
                    let input = self.input.as_ref().map_or(&[][..], |m| m.as_slice());
                    let mut iov: Vec<IoSlice<'_>> = self
                        .segs
                        .iter()
                        .map(|s| match *s {
                            Seg::Input(a, b) => IoSlice::new(&input[a..b]),
                            Seg::Buf(a, b) => IoSlice::new(&self.buf[a..b]),
                        })
                        .collect();
                    pwritev_all(&self.blocks[i].file, &mut iov, off)
                }
            };
            self.segs.clear();
            self.buf.clear();
            r.map_err(|e| self.write_error(i, off, len, e))?;
        }
        Ok(())
    }

    /// A write error naming the image path and the byte range (same kind).
    fn write_error(&self, index: usize, offset: u64, len: usize, e: io::Error) -> io::Error {
        let path = self.dir.join(&self.blocks[index].file_name);
        io::Error::new(
            e.kind(),
            format!(
                "{}: write of {len} bytes at image offset {offset:#x}: {e}",
                path.display()
            ),
        )
    }
}

impl GuestMemory for FileMemory {
    fn set_block_len(&mut self, index: usize, name: &str, len: u64) -> io::Result<()> {
        self.settle()?;
        if index == self.blocks.len() {
            let (file_name, file) = create_image(&self.dir, name, |f| {
                self.blocks.iter().any(|b| b.file_name == f)
            })?;
            self.blocks.push(Image {
                name: name.to_string(),
                file_name,
                file,
                len: 0,
            });
        }
        let b = self.blocks.get_mut(index).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("no block {index}"))
        })?;
        let path = self.dir.join(&b.file_name);
        b.file.set_len(len).map_err(|e| {
            io::Error::new(e.kind(), format!("{}: set length: {e}", path.display()))
        })?;
        b.len = len;
        Ok(())
    }

    fn bytes_mut(&mut self, index: usize, offset: u64, len: usize) -> io::Result<&mut [u8]> {
        check_range(index, offset, len, self.image(index)?.len)?;
        self.settle()?;
        self.slot_buf.resize(len, 0);
        self.blocks[index]
            .file
            .read_exact_at(&mut self.slot_buf, offset)?;
        self.slot = Some((index, offset));
        Ok(&mut self.slot_buf)
    }

    #[inline]
    fn write(&mut self, index: usize, offset: u64, data: &[u8]) -> io::Result<()> {
        check_range(index, offset, data.len(), self.image(index)?.len)?;
        if self.slot.is_some() {
            self.settle()?;
        }
        let mapped = self.in_input(data);
        if let Some((i, start, len)) = self.pending {
            let fits = match mapped {
                Some(_) => len < MAX_PENDING_MAPPED,
                None => self.buf.len() < MAX_PENDING,
            };
            if !(i == index && start + len as u64 == offset && fits && self.segs.len() < MAX_SEGS) {
                self.settle()?;
            }
        }
        self.pending.get_or_insert((index, offset, 0)).2 += data.len();
        let seg = match mapped {
            Some(a) => Seg::Input(a, a + data.len()),
            None => {
                if self.buf.capacity() < MAX_PENDING {
                    self.buf.reserve(MAX_PENDING + data.len());
                }
                let a = self.buf.len();
                self.buf.extend_from_slice(data);
                Seg::Buf(a, a + data.len())
            }
        };
        match (self.segs.last_mut(), seg) {
            (Some(Seg::Input(_, e)), Seg::Input(a, b)) if *e == a => *e = b,
            (Some(Seg::Buf(_, e)), Seg::Buf(a, b)) if *e == a => *e = b,
            _ => self.segs.push(seg),
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.settle()
    }

    /// Unbuffered: the run goes straight to the image, copied file to file
    /// from `src` when given (falling back to `pwrite` of `data` where the
    /// kernel refuses, e.g. across filesystems).
    fn write_run(
        &mut self,
        index: usize,
        offset: u64,
        data: &[u8],
        src: Option<(&File, u64)>,
    ) -> io::Result<()> {
        check_range(index, offset, data.len(), self.image(index)?.len)?;
        self.settle()?;
        let out = &self.blocks[index].file;
        let r = match src {
            Some((f, at)) => copy_run(f, at, out, offset, data),
            None => out.write_all_at(data, offset),
        };
        r.map_err(|e| self.write_error(index, offset, data.len(), e))
    }

    fn discard(&mut self, index: usize, offset: u64, len: u64) -> io::Result<()> {
        let have = self.image(index)?.len;
        if offset.checked_add(len).is_none_or(|e| e > have) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "discard range outside block",
            ));
        }
        self.settle()?;
        let (Ok(o), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "discard range too large",
            ));
        };
        if punch_hole(&self.blocks[index].file, o, l).is_ok() {
            return Ok(());
        }
        // Filesystems without hole punching: write zeros.
        let zeros = vec![0u8; (len.min(1 << 20)) as usize];
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(zeros.len() as u64) as usize;
            self.blocks[index].file.write_all_at(&zeros[..n], at)?;
            at += n as u64;
        }
        Ok(())
    }
}

/// Writes all of `iov` at `offset` of `file` (`pwritev`, again after a short write).
fn pwritev_all(file: &File, mut iov: &mut [IoSlice<'_>], mut offset: u64) -> io::Result<()> {
    while !iov.is_empty() {
        let n = iov.len().min(MAX_SEGS) as libc::c_int;
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
        // SAFETY: `IoSlice` is ABI-compatible with `struct iovec` on Unix; the
        // first `n` entries point to live borrowed slices, which pwritev only
        // reads; the descriptor is open for writing.
        let r =
            unsafe { libc::pwritev(file.as_raw_fd(), iov.as_ptr().cast::<libc::iovec>(), n, off) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        offset += r as u64;
        IoSlice::advance_slices(&mut iov, r as usize);
    }
    Ok(())
}

impl Drop for FileMemory {
    fn drop(&mut self) {
        let _ = self.settle();
    }
}
