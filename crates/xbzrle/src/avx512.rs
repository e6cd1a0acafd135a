//! AVX-512 encoder (x86_64 with AVX-512 F/BW/VBMI/VBMI2 and BMI1/BMI2, detected at run
//! time by [`crate::encode`]).
//!
//! Each 64-byte block is one compare into a 64-bit mask `m` of changed bytes; `t` marks
//! the run starts (bytes whose changed-ness differs from the byte before). A block without
//! a run start only extends the open run and costs a compare. In a block with run starts
//! `p0 < ... < plast`:
//!
//! * the run open since before `p0` (the *pending* run, possibly begun many blocks ago) is
//!   written out: its length, and its literal bytes if it is a data run;
//! * the runs wholly inside the block, `p0..plast`, are written with vector operations and
//!   no per-run loop: the run starts are compressed into a vector of positions, whose
//!   differences are the run lengths (all below 64, one ULEB128 byte each); those are
//!   expanded back to the run-start positions, interleaved with the block's new bytes into
//!   128 "slots" (length slot, data slot per byte) and the slots that are sent (length
//!   slots at run starts, data slots at changed bytes) compressed out;
//! * the run starting at `plast` becomes the pending run.
//!
//! That fast path is taken only when the output limit leaves room for everything the
//! block can write plus 2, so none of QEMU's overflow checks can fire inside it;
//! otherwise the block is walked run by run with QEMU's checks in QEMU's order, exactly as
//! in the portable encoder. While a data run is open, the encoder stops with [`Overflow`]
//! as soon as that run alone cannot fit any more (its length and literal bytes so far,
//! after what is already written, exceed the limit): QEMU's encoder reaches the same
//! overflow once the run ends, whatever the rest of the page holds, so the result is the
//! same, only found earlier.

use crate::encode::{emit_data_checked, put_len, BLOCK, MAX_RUN};
use crate::{uleb128, Overflow};
use core::arch::x86_64::{
    __m512i, _bzhi_u64, _mm512_add_epi8, _mm512_cmpneq_epi8_mask, _mm512_loadu_si512,
    _mm512_mask_storeu_epi8, _mm512_maskz_compress_epi8, _mm512_maskz_expand_epi8,
    _mm512_maskz_loadu_epi8, _mm512_permutex2var_epi8, _mm512_permutexvar_epi8,
    _mm512_set1_epi8, _mm512_storeu_si512, _mm512_sub_epi8, _pdep_u64,
};

/// Whether this CPU has every feature [`encode_avx512`] needs.
pub(crate) fn supported() -> bool {
    std::is_x86_feature_detected!("avx512f")
        && std::is_x86_feature_detected!("avx512bw")
        && std::is_x86_feature_detected!("avx512vbmi")
        && std::is_x86_feature_detected!("avx512vbmi2")
        && std::is_x86_feature_detected!("bmi1")
        && std::is_x86_feature_detected!("bmi2")
        && std::is_x86_feature_detected!("popcnt")
        && std::is_x86_feature_detected!("lzcnt")
}

/// Byte `k` is `k`.
static IOTA: [u8; 64] = {
    let mut a = [0u8; 64];
    let mut k = 0;
    while k < 64 {
        a[k] = k as u8;
        k += 1;
    }
    a
};

/// `_mm512_permutex2var_epi8` indexes interleaving the low (`half` 0) or high (`half` 1)
/// 32 bytes of the first operand (lengths) with those of the second (new bytes):
/// slot `2k` = first[32 * half + k], slot `2k + 1` = second[32 * half + k].
const fn interleave(half: usize) -> [u8; 64] {
    let mut a = [0u8; 64];
    let mut k = 0;
    while k < 32 {
        a[2 * k] = (32 * half + k) as u8;
        a[2 * k + 1] = (64 + 32 * half + k) as u8;
        k += 1;
    }
    a
}
static INTERLEAVE_LO: [u8; 64] = interleave(0);
static INTERLEAVE_HI: [u8; 64] = interleave(1);

const EVEN: u64 = 0x5555_5555_5555_5555;
const ODD: u64 = 0xAAAA_AAAA_AAAA_AAAA;

/// The AVX-512 encoder: same contract as [`crate::encode`].
///
/// # Safety
/// The CPU must support what [`supported`] checks.
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vbmi2,bmi1,bmi2,popcnt,lzcnt")]
pub(crate) unsafe fn encode_avx512(
    old: &[u8],
    new: &[u8],
    out: &mut [u8],
) -> Result<usize, Overflow> {
    assert_eq!(old.len(), new.len(), "old and new pages differ in length");
    // Runs can only exceed the 14-bit limit on pages above 16 KiB.
    if new.len() > MAX_RUN {
        // SAFETY: same features as this function, which the caller guarantees.
        unsafe { encode_loop::<true>(old, new, out) }
    } else {
        // SAFETY: as above.
        unsafe { encode_loop::<false>(old, new, out) }
    }
}

/// Loads 64 bytes of `s` at `at` (`at + 64 <= s.len()`), or the `s.len() - at < 64` bytes
/// left with zeros above.
#[target_feature(enable = "avx512f,avx512bw,bmi1,bmi2")]
#[inline]
unsafe fn load_block(s: &[u8], at: usize) -> __m512i {
    let rest = &s[at..];
    if rest.len() >= BLOCK {
        // SAFETY: `rest` has at least 64 readable bytes; `loadu` needs no alignment.
        unsafe { _mm512_loadu_si512(rest.as_ptr().cast()) }
    } else {
        let k = _bzhi_u64(!0, rest.len() as u32);
        // SAFETY: only the `rest.len()` bytes selected by `k` are read (masked-out
        // bytes are not accessed and do not fault).
        unsafe { _mm512_maskz_loadu_epi8(k, rest.as_ptr().cast()) }
    }
}

/// Writes the first `n <= 64` bytes of `v` to `out[d..d + n]`.
#[target_feature(enable = "avx512f,avx512bw,bmi1,bmi2")]
#[inline]
unsafe fn store_n(out: &mut [u8], d: usize, v: __m512i, n: usize) {
    let dst = &mut out[d..d + n];
    let k = _bzhi_u64(!0, n as u32);
    // SAFETY: the mask selects exactly the `n` bytes of `dst`, which is in bounds; masked
    // stores touch no other byte.
    unsafe { _mm512_mask_storeu_epi8(dst.as_mut_ptr().cast(), k, v) }
}

/// `out[d..d + n] = src[s..s + n]` in 64-byte moves, the last one masked.
#[target_feature(enable = "avx512f,avx512bw,bmi1,bmi2")]
#[inline]
unsafe fn copy_run(out: &mut [u8], d: usize, src: &[u8], s: usize, n: usize) {
    let dst = &mut out[d..d + n];
    let src = &src[s..s + n];
    let mut k = 0;
    while k + BLOCK <= n {
        // SAFETY: `k + 64 <= n = src.len()`; `loadu` needs no alignment.
        let v = unsafe { _mm512_loadu_si512(src[k..].as_ptr().cast()) };
        // SAFETY: `k + 64 <= n = dst.len()`; `storeu` needs no alignment.
        unsafe { _mm512_storeu_si512(dst[k..].as_mut_ptr().cast(), v) };
        k += BLOCK;
    }
    if k < n {
        let m = _bzhi_u64(!0, (n - k) as u32);
        // SAFETY: the mask selects the `n - k` bytes left in `src`; others are not read.
        let v = unsafe { _mm512_maskz_loadu_epi8(m, src[k..].as_ptr().cast()) };
        // SAFETY: the mask selects the `n - k` bytes left in `dst`; others are not written.
        unsafe { _mm512_mask_storeu_epi8(dst[k..].as_mut_ptr().cast(), m, v) };
    }
}

/// Difference mask of the block at `base`: bit `k` set iff `old[base + k] != new[base + k]`
/// (0 beyond the end).
#[target_feature(enable = "avx512f,avx512bw,bmi1,bmi2")]
#[inline]
unsafe fn diff_mask(old: &[u8], new: &[u8], base: usize) -> u64 {
    // SAFETY: same features as this function.
    let a = unsafe { load_block(old, base) };
    // SAFETY: as above.
    let b = unsafe { load_block(new, base) };
    _mm512_cmpneq_epi8_mask(a, b)
}

#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vbmi2,bmi1,bmi2,popcnt,lzcnt")]
#[inline]
unsafe fn encode_loop<const LONG: bool>(
    old: &[u8],
    new: &[u8],
    out: &mut [u8],
) -> Result<usize, Overflow> {
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
    // SAFETY: the statics are 64 bytes long; `loadu` needs no alignment.
    let iota = unsafe { _mm512_loadu_si512(IOTA.as_ptr().cast()) };
    let next_idx = _mm512_add_epi8(iota, _mm512_set1_epi8(1));
    // SAFETY: as above.
    let il_lo = unsafe { _mm512_loadu_si512(INTERLEAVE_LO.as_ptr().cast()) };
    // SAFETY: as above.
    let il_hi = unsafe { _mm512_loadu_si512(INTERLEAVE_HI.as_ptr().cast()) };

    let mut d = 0usize; // output length so far
    let mut start = 0usize; // start of the open (pending) run
    let mut in_diff = false; // whether the open run is a data run
    let mut carry = 0u64; // bit 63 of the previous block's `m`
    let mut base = 0usize;
    while base < len {
        // SAFETY: same features as this function.
        let m = unsafe { diff_mask(old, new, base) };
        let mut t = m ^ ((m << 1) | carry);
        carry = m >> 63;
        if t == 0 {
            // The open run goes on; skip whole blocks of the same kind two at a time.
            base += BLOCK;
            let same = carry.wrapping_neg(); // all ones inside a data run
            while base + 2 * BLOCK <= len {
                // SAFETY: same features as this function.
                let m0 = unsafe { diff_mask(old, new, base) };
                // SAFETY: as above.
                let m1 = unsafe { diff_mask(old, new, base + BLOCK) };
                if (m0 ^ same) | (m1 ^ same) != 0 {
                    break;
                }
                base += 2 * BLOCK;
            }
            if in_diff {
                // Early overflow: the open data run is at least `k` bytes long.
                let k = base.min(len) - start;
                if d + uleb128::encoded_len(k as u32) + k > dlen || (LONG && k > MAX_RUN) {
                    return Err(Overflow);
                }
            }
            continue;
        }
        let p0 = t.trailing_zeros() as usize;
        let plast = 63 - t.leading_zeros() as usize;
        let pend = base + p0 - start;
        // Everything this block writes: the pending run (at most 2 + pend bytes) and, for
        // the inner runs, one length byte per run start and one byte per changed byte in
        // p0..plast (at most 2 * (plast - p0)). With 2 more to spare, no QEMU check can
        // fire before the block's last byte is written.
        if d + 4 + pend + 2 * (plast - p0) <= dlen && (!LONG || pend <= MAX_RUN) {
            d += put_len(out, d, pend);
            if in_diff {
                // SAFETY: same features as this function.
                unsafe { copy_run(out, d, new, start, pend) };
                d += pend;
            }
            let inner = t & !(1u64 << plast);
            if inner != 0 {
                // SAFETY: as above.
                let b = unsafe { load_block(new, base) };
                // Run lengths: differences of consecutive run-start positions.
                let starts = _mm512_maskz_compress_epi8(t, iota);
                let next = _mm512_permutexvar_epi8(next_idx, starts);
                let lens = _mm512_maskz_expand_epi8(inner, _mm512_sub_epi8(next, starts));
                let data = m & ((1u64 << plast) - (1u64 << p0));
                let lo = _mm512_permutex2var_epi8(lens, il_lo, b);
                let hi = _mm512_permutex2var_epi8(lens, il_hi, b);
                let k_lo = _pdep_u64(inner & 0xFFFF_FFFF, EVEN) | _pdep_u64(data & 0xFFFF_FFFF, ODD);
                let k_hi = _pdep_u64(inner >> 32, EVEN) | _pdep_u64(data >> 32, ODD);
                let n_lo = k_lo.count_ones() as usize;
                let n_hi = k_hi.count_ones() as usize;
                // SAFETY: as above; `d + n_lo + n_hi <= dlen` by the room check.
                unsafe { store_n(out, d, _mm512_maskz_compress_epi8(k_lo, lo), n_lo) };
                d += n_lo;
                // SAFETY: as above.
                unsafe { store_n(out, d, _mm512_maskz_compress_epi8(k_hi, hi), n_hi) };
                d += n_hi;
            }
            start = base + plast;
            in_diff = (m >> plast) & 1 != 0;
        } else {
            // Exact checks, in QEMU's order.
            while t != 0 {
                let p = base + t.trailing_zeros() as usize;
                t &= t - 1;
                if in_diff {
                    d = emit_data_checked::<LONG>(out, d, new, start, p)?;
                    if p == len {
                        return Ok(d);
                    }
                    // Checked before the next skip run, even a trailing one.
                    if d + 2 > dlen {
                        return Err(Overflow);
                    }
                } else {
                    // A skip run ends before `len` here (a run start at `len` only
                    // follows a changed byte).
                    let zrun = p - start;
                    if LONG && zrun > MAX_RUN {
                        return Err(Overflow);
                    }
                    d += put_len(out, d, zrun);
                    if d + 2 > dlen {
                        return Err(Overflow);
                    }
                }
                start = p;
                in_diff = !in_diff;
            }
        }
        base += BLOCK;
    }
    if in_diff {
        // The page ends in a data run.
        d = emit_data_checked::<LONG>(out, d, new, start, len)?;
    }
    // Otherwise the trailing skip run is not sent; d == 0 means unchanged.
    Ok(d)
}
