//! Where received pages go: the [`GuestMemory`] trait and its `Vec`-backed
//! implementation.

use std::io;

/// Guest RAM as the destination state machine sees it: blocks by index, each
/// a byte array that can be resized and addressed a page at a time.
///
/// [`RamDst`](crate::RamDst) checks every offset against the block's used
/// length before calling in; implementations check again and fail rather
/// than touch memory outside a block.
pub trait GuestMemory {
    /// Makes block `index` (called `name`) exactly `len` bytes long. Called
    /// once for each new block, with `index` equal to the number of blocks so
    /// far, before any access; called again with an existing index to resize
    /// (bytes past the old length read as zero).
    ///
    /// # Errors
    /// The backend cannot create or resize the block.
    fn set_block_len(&mut self, index: usize, name: &str, len: u64) -> io::Result<()>;

    /// The bytes `offset..offset + len` of block `index`, for reading and writing.
    ///
    /// # Errors
    /// An unknown block or a range outside it.
    fn bytes_mut(&mut self, index: usize, offset: u64, len: usize) -> io::Result<&mut [u8]>;

    /// The bytes `offset..offset + len` of block `index`, for reading only.
    /// The default is [`GuestMemory::bytes_mut`]; a memory that can hold a
    /// page's content elsewhere (`qmig convert`'s image refers to pages of
    /// its mapped input instead of copying them) returns it from there.
    ///
    /// # Errors
    /// As for [`GuestMemory::bytes_mut`].
    #[inline]
    fn read(&mut self, index: usize, offset: u64, len: usize) -> io::Result<&[u8]> {
        self.bytes_mut(index, offset, len).map(|b| &*b)
    }

    /// Writes `data` at `offset` of block `index` (a whole page or host page).
    /// Backends may buffer it until the next other call or [`GuestMemory::flush`].
    ///
    /// # Errors
    /// As for [`GuestMemory::bytes_mut`].
    #[inline]
    fn write(&mut self, index: usize, offset: u64, data: &[u8]) -> io::Result<()> {
        self.bytes_mut(index, offset, data.len())?
            .copy_from_slice(data);
        Ok(())
    }

    /// Writes a run of whole pages `data` at `offset` of block `index`: a
    /// mapped-ram page run (wire-format §14, QEMU's `read_ramblock_mapped_ram`
    /// reads such runs with one `pread` each). When `src` is given, the same
    /// bytes are at file offset `src.1` of `src.0` (the input file), and a
    /// file-backed memory may copy them file to file (`copy_file_range`)
    /// instead of from `data`. The default writes `data`.
    ///
    /// # Errors
    /// As for [`GuestMemory::write`].
    fn write_run(
        &mut self,
        index: usize,
        offset: u64,
        data: &[u8],
        src: Option<(&std::fs::File, u64)>,
    ) -> io::Result<()> {
        let _ = src;
        self.write(index, offset, data)
    }

    /// Makes everything written so far reach the backing store (files).
    ///
    /// # Errors
    /// The backend's write error.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }

    /// Makes the page `offset..offset + len` of block `index` read as zero
    /// (a ZERO record onto a page that held data). The default writes zeros;
    /// a memory whose pages can be *not present* (anonymous memory that will
    /// be registered with userfaultfd) drops the page instead, so that it
    /// faults, and a postcopy placement of it succeeds, later.
    ///
    /// # Errors
    /// As for [`GuestMemory::bytes_mut`].
    fn zero_page(&mut self, index: usize, offset: u64, len: u64) -> io::Result<()> {
        self.bytes_mut(index, offset, len as usize)?.fill(0);
        Ok(())
    }

    /// Drops `offset..offset + len` of block `index`: afterwards it reads as zero.
    ///
    /// # Errors
    /// As for [`GuestMemory::bytes_mut`].
    fn discard(&mut self, index: usize, offset: u64, len: u64) -> io::Result<()> {
        let mut at = offset;
        let end = offset.checked_add(len).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "discard range overflows")
        })?;
        while at < end {
            let n = (end - at).min(1 << 20) as usize;
            self.bytes_mut(index, at, n)?.fill(0);
            at += n as u64;
        }
        Ok(())
    }
}

fn out_of_range(index: usize, offset: u64, len: u64, have: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("range {offset:#x}+{len:#x} outside block {index} of {have:#x} bytes"),
    )
}

/// Checks `offset..offset + len` against a block of `have` bytes; returns the range as `usize`.
pub(crate) fn check_range(
    index: usize,
    offset: u64,
    len: usize,
    have: u64,
) -> io::Result<std::ops::Range<usize>> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= have => Ok(offset as usize..end as usize),
        _ => Err(out_of_range(index, offset, len as u64, have)),
    }
}

/// Guest memory held in `Vec`s, one per block (for tests, fuzzing, benchmarks).
#[derive(Debug, Clone)]
pub struct VecMemory {
    blocks: Vec<(String, Vec<u8>)>,
    limit: u64,
}

impl Default for VecMemory {
    fn default() -> Self {
        Self::new()
    }
}

impl VecMemory {
    /// Empty memory that accepts blocks of any total size.
    pub fn new() -> Self {
        VecMemory {
            blocks: Vec::new(),
            limit: u64::MAX,
        }
    }

    /// Empty memory that refuses to hold more than `limit` bytes in total.
    pub fn with_limit(limit: u64) -> Self {
        VecMemory {
            blocks: Vec::new(),
            limit,
        }
    }

    /// The blocks: name and content.
    pub fn blocks(&self) -> &[(String, Vec<u8>)] {
        &self.blocks
    }

    /// The content of the block called `name`.
    pub fn block(&self, name: &str) -> Option<&[u8]> {
        self.blocks
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }
}

impl GuestMemory for VecMemory {
    fn set_block_len(&mut self, index: usize, name: &str, len: u64) -> io::Result<()> {
        let others: u64 = self
            .blocks
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != index)
            .map(|(_, (_, v))| v.len() as u64)
            .sum();
        if others.checked_add(len).is_none_or(|t| t > self.limit) || usize::try_from(len).is_err() {
            return Err(io::Error::new(
                io::ErrorKind::OutOfMemory,
                format!("block {name} of {len:#x} bytes exceeds the memory limit"),
            ));
        }
        match index.cmp(&self.blocks.len()) {
            std::cmp::Ordering::Less => self.blocks[index].1.resize(len as usize, 0),
            std::cmp::Ordering::Equal => {
                self.blocks.push((name.to_string(), vec![0; len as usize]))
            }
            std::cmp::Ordering::Greater => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("block index {index} skips ahead"),
                ))
            }
        }
        Ok(())
    }

    fn bytes_mut(&mut self, index: usize, offset: u64, len: usize) -> io::Result<&mut [u8]> {
        let Some((_, v)) = self.blocks.get_mut(index) else {
            return Err(out_of_range(index, offset, len as u64, 0));
        };
        let r = check_range(index, offset, len, v.len() as u64)?;
        Ok(&mut v[r])
    }
}
