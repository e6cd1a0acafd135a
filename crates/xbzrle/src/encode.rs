//! Fast encoder: 64-byte blocks turned into a bit mask of differing bytes (SIMD compare
//! on x86_64, SWAR elsewhere), then run boundaries found with `trailing_zeros` on the
//! mask's transitions, one boundary per step with no per-byte loop.

use crate::{uleb128, Overflow};

const BLOCK: usize = 64;
const MAX_RUN: usize = uleb128::MAX as usize;

/// Encodes `new` against `old` (the cached previous content of the page) into `out`.
///
/// `out.len()` is the output limit (QEMU passes the page size). Returns the encoded
/// length; `Ok(0)` means the page is unchanged and nothing is to be sent. The bytes
/// `out[..len]` are identical to what QEMU's generic encoder writes, and the
/// [`Overflow`] decision is the same, for every page size and limit: see
/// [`reference::encode`](crate::reference::encode) for the exact rule. Bytes of `out`
/// beyond the returned length are unspecified (scratch).
///
/// Any page length works; QEMU only uses multiples of 8 (4 KiB for x86 guests).
///
/// # Errors
/// [`Overflow`] when the delta does not fit: send the page in full instead.
///
/// # Panics
/// If `old` and `new` differ in length.
pub fn encode(old: &[u8], new: &[u8], out: &mut [u8]) -> Result<usize, Overflow> {
    assert_eq!(old.len(), new.len(), "old and new pages differ in length");
    #[cfg(target_arch = "x86_64")]
    {
        simd::encode_x86(old, new, out)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        encode_portable(old, new, out)
    }
}

/// The fast encoder with the portable (SWAR, no `unsafe`) block kernel. Same results as
/// [`encode`]; exposed for tests and benchmarks of the fallback.
///
/// # Errors
/// As for [`encode`].
///
/// # Panics
/// If `old` and `new` differ in length.
pub fn encode_portable(old: &[u8], new: &[u8], out: &mut [u8]) -> Result<usize, Overflow> {
    assert_eq!(old.len(), new.len(), "old and new pages differ in length");
    encode_core(old, new, out, |a, b| diff_mask_swar(a, b))
}

/// Bit `k` of the result is set iff `a[k] != b[k]` (`a`, `b` at most 64 bytes, same
/// length; bits at and above the length are 0).
#[inline(always)]
pub(crate) fn diff_mask_swar(a: &[u8], b: &[u8]) -> u64 {
    const LO7: u64 = 0x7F7F_7F7F_7F7F_7F7F;
    const HI: u64 = 0x8080_8080_8080_8080;
    // Gathers bit 0 of each byte (after the shift) into the top byte.
    const GATHER: u64 = 0x0102_0408_1020_4080;
    let mut mask = 0u64;
    let mut k = 0;
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (wa, wb) in (&mut ca).zip(&mut cb) {
        let x =
            u64::from_le_bytes(wa.try_into().unwrap()) ^ u64::from_le_bytes(wb.try_into().unwrap());
        // High bit of each byte set iff the byte is non-zero.
        let nz = (((x & LO7) + LO7) | x) & HI;
        mask |= ((nz >> 7).wrapping_mul(GATHER) >> 56) << k;
        k += 8;
    }
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        mask |= u64::from(x != y) << k;
        k += 1;
    }
    mask
}

/// The encoder proper, generic over the kernel computing the difference mask of one full
/// 64-byte block. Always inlined so each kernel gets its own specialised copy (and, for
/// SIMD kernels, the target features of the calling function).
#[inline(always)]
pub(crate) fn encode_core<M>(
    old: &[u8],
    new: &[u8],
    out: &mut [u8],
    mask: M,
) -> Result<usize, Overflow>
where
    M: Fn(&[u8; BLOCK], &[u8; BLOCK]) -> u64,
{
    let len = new.len();
    let dlen = out.len();
    if len == 0 {
        return Ok(0);
    }
    // QEMU checks `d + 2 > dlen` before every skip run, the first included.
    if dlen < 2 {
        return Err(Overflow);
    }
    let old = &old[..len];
    let full = len - len % BLOCK;
    let block_mask = |base: usize| -> u64 {
        if base < full {
            let a: &[u8; BLOCK] = old[base..base + BLOCK].try_into().unwrap();
            let b: &[u8; BLOCK] = new[base..base + BLOCK].try_into().unwrap();
            mask(a, b)
        } else {
            diff_mask_swar(&old[base..], &new[base..])
        }
    };

    // `t` holds the not yet consumed transitions of block `base`: bit k set iff byte
    // base+k differs in "changed-ness" from the byte before it (byte -1 counts as
    // unchanged). Bits beyond `len` in a short last block are 0 ("unchanged"), which at
    // worst adds a transition exactly at `len`.
    let mut base = 0usize;
    let mut m = block_mask(0);
    let mut t = m ^ (m << 1);
    let mut carry = m >> 63;

    macro_rules! next_transition {
        () => {
            loop {
                if t != 0 {
                    let p = base + t.trailing_zeros() as usize;
                    t &= t - 1;
                    break p;
                }
                base += BLOCK;
                if base >= len {
                    break len;
                }
                m = block_mask(base);
                t = m ^ ((m << 1) | carry);
                carry = m >> 63;
            }
        };
    }

    let mut d = 0usize;
    let mut start = 0usize;
    loop {
        // Invariant: a skip run starts at `start` and `d + 2 <= dlen`.
        let p = next_transition!();
        if p >= len {
            // Trailing skip run is not sent; d == 0 means unchanged.
            return Ok(d);
        }
        let zrun = p - start;
        if zrun > MAX_RUN {
            return Err(Overflow);
        }
        d += put_len(out, d, zrun);
        if d + 2 > dlen {
            return Err(Overflow);
        }
        start = p;
        let p = next_transition!();
        let p = if p > len { len } else { p };
        let nzrun = p - start;
        if nzrun > MAX_RUN {
            return Err(Overflow);
        }
        d += put_len(out, d, nzrun);
        if d + nzrun > dlen {
            return Err(Overflow);
        }
        copy_literal(out, d, new, start, nzrun);
        d += nzrun;
        if p == len {
            return Ok(d);
        }
        if d + 2 > dlen {
            return Err(Overflow);
        }
        start = p;
    }
}

/// Writes a run length (`v <= 0x3FFF`) at `out[d..]`, given `d + 2 <= out.len()`; always
/// stores two bytes (the second is scratch for short lengths) to avoid a branch.
#[inline(always)]
fn put_len(out: &mut [u8], d: usize, v: usize) -> usize {
    let two = usize::from(v >= 0x80);
    let o: &mut [u8; 2] = (&mut out[d..d + 2]).try_into().unwrap();
    o[0] = (v as u8 & 0x7F) | ((two as u8) << 7);
    o[1] = (v >> 7) as u8;
    1 + two
}

/// Copies `src[s..s + n]` to `out[d..]` (fits: `d + n <= out.len()`). Short runs are copied
/// as whole 16-byte chunks where both buffers have room, writing scratch past `d + n`.
#[inline(always)]
fn copy_literal(out: &mut [u8], d: usize, src: &[u8], s: usize, n: usize) {
    const C: usize = 16;
    if n <= 2 * C && d + 2 * C <= out.len() && s + 2 * C <= src.len() {
        let o: &mut [u8; 2 * C] = (&mut out[d..d + 2 * C]).try_into().unwrap();
        let i: &[u8; 2 * C] = src[s..s + 2 * C].try_into().unwrap();
        o[..C].copy_from_slice(&i[..C]);
        if n > C {
            o[C..].copy_from_slice(&i[C..]);
        }
    } else {
        out[d..d + n].copy_from_slice(&src[s..s + n]);
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    //! x86_64 block kernels. SSE2 is part of the x86_64 baseline; AVX2 is detected at
    //! run time. The only `unsafe` code of the crate lives here.

    use super::{encode_core, BLOCK};
    use crate::Overflow;
    use core::arch::x86_64::{
        __m128i, __m256i, _mm256_cmpeq_epi8, _mm256_loadu_si256, _mm256_movemask_epi8,
        _mm_cmpeq_epi8, _mm_loadu_si128, _mm_movemask_epi8,
    };

    pub(super) fn encode_x86(old: &[u8], new: &[u8], out: &mut [u8]) -> Result<usize, Overflow> {
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above), the only requirement of
            // `encode_avx2`.
            unsafe { encode_avx2(old, new, out) }
        } else {
            encode_core(old, new, out, diff_mask_sse2)
        }
    }

    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    unsafe fn encode_avx2(old: &[u8], new: &[u8], out: &mut [u8]) -> Result<usize, Overflow> {
        encode_core(old, new, out, |a, b| {
            // SAFETY: this closure only runs inside `encode_avx2`, whose caller has
            // checked that the CPU supports AVX2.
            unsafe { diff_mask_avx2(a, b) }
        })
    }

    /// Difference mask of one block with 32-byte compares.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn diff_mask_avx2(a: &[u8; BLOCK], b: &[u8; BLOCK]) -> u64 {
        // SAFETY (all four loads): each pointer starts 0 or 32 bytes into a 64-byte array,
        // so 32 bytes are readable; `loadu` has no alignment requirement.
        let a0 = unsafe { _mm256_loadu_si256(a.as_ptr().cast::<__m256i>()) };
        // SAFETY: as above.
        let a1 = unsafe { _mm256_loadu_si256(a[32..].as_ptr().cast::<__m256i>()) };
        // SAFETY: as above.
        let b0 = unsafe { _mm256_loadu_si256(b.as_ptr().cast::<__m256i>()) };
        // SAFETY: as above.
        let b1 = unsafe { _mm256_loadu_si256(b[32..].as_ptr().cast::<__m256i>()) };
        let e0 = _mm256_movemask_epi8(_mm256_cmpeq_epi8(a0, b0)) as u32;
        let e1 = _mm256_movemask_epi8(_mm256_cmpeq_epi8(a1, b1)) as u32;
        !(u64::from(e0) | (u64::from(e1) << 32))
    }

    /// Difference mask of one block with 16-byte compares (SSE2, always available).
    #[inline(always)]
    fn diff_mask_sse2(a: &[u8; BLOCK], b: &[u8; BLOCK]) -> u64 {
        let mut eq = 0u64;
        for k in 0..4 {
            let off = 16 * k;
            // SAFETY: `off + 16 <= 64`, so 16 bytes are readable from both pointers;
            // `loadu` has no alignment requirement and SSE2 is baseline on x86_64.
            let x = unsafe { _mm_loadu_si128(a[off..].as_ptr().cast::<__m128i>()) };
            // SAFETY: as above.
            let y = unsafe { _mm_loadu_si128(b[off..].as_ptr().cast::<__m128i>()) };
            // SAFETY: SSE2 is part of the x86_64 baseline, so the CPU supports it.
            let c = unsafe { _mm_cmpeq_epi8(x, y) };
            // SAFETY: as above.
            let e = unsafe { _mm_movemask_epi8(c) } as u32 & 0xFFFF;
            eq |= u64::from(e) << off;
        }
        !eq
    }

    /// Exposes the SSE2 path to tests and benchmarks.
    pub(crate) fn encode_sse2(old: &[u8], new: &[u8], out: &mut [u8]) -> Result<usize, Overflow> {
        encode_core(old, new, out, diff_mask_sse2)
    }
}

/// Encoder variants, for tests and benchmarks comparing kernels. Each returns exactly what
/// [`encode`] returns.
#[doc(hidden)]
pub mod variants {
    use crate::Overflow;

    /// SSE2 kernel (x86_64 only; otherwise the portable kernel).
    ///
    /// # Errors
    /// As for [`encode`](crate::encode).
    pub fn encode_sse2(old: &[u8], new: &[u8], out: &mut [u8]) -> Result<usize, Overflow> {
        assert_eq!(old.len(), new.len(), "old and new pages differ in length");
        #[cfg(target_arch = "x86_64")]
        {
            super::simd::encode_sse2(old, new, out)
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            super::encode_portable(old, new, out)
        }
    }
}
