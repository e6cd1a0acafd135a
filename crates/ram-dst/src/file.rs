//! Guest memory in sparse image files written with `pwrite`: consecutive page
//! writes are combined into large writes, which is faster than faulting pages
//! into a mapping when a stream is replayed from a file.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::memory::{check_range, GuestMemory};
use crate::mmap::{copy_run, create_image, punch_hole};
use crate::ImageFile;

/// Largest run of consecutive page writes buffered before it is written
/// (small enough to stay in L2, so the copy in and the copy out hit cache).
const MAX_PENDING: usize = 256 << 10;

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
    /// Buffered consecutive writes: block, start offset (bytes in `buf`).
    pending: Option<(usize, u64)>,
    buf: Vec<u8>,
    /// The range last handed out by `bytes_mut`, to be written back.
    slot: Option<(usize, u64)>,
    slot_buf: Vec<u8>,
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
            buf: Vec::new(),
            slot: None,
            slot_buf: Vec::new(),
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
        if let Some((i, off)) = self.pending.take() {
            let r = self.blocks[i].file.write_all_at(&self.buf, off);
            let len = self.buf.len();
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
        if let Some((i, start)) = self.pending {
            if i == index && start + self.buf.len() as u64 == offset && self.buf.len() < MAX_PENDING
            {
                self.buf.extend_from_slice(data);
                return Ok(());
            }
            self.settle()?;
        }
        if self.buf.capacity() < MAX_PENDING {
            self.buf.reserve(MAX_PENDING + data.len());
        }
        self.buf.extend_from_slice(data);
        self.pending = Some((index, offset));
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

impl Drop for FileMemory {
    fn drop(&mut self) {
        let _ = self.settle();
    }
}
