//! AVX-512 encoder kernels (x86_64 with AVX-512 F/BW/VBMI/VBMI2 and BMI1/BMI2, detected
//! at run time by [`crate::encode`]), plugged into the shared encoder loop
//! (`encode::encode_core_wide`), so the overflow rules and the run-by-run paths are the
//! same code as for every other kernel.
//!
//! * Difference mask: one 64-byte compare into a mask register per block.
//! * Uniform stretches: two blocks per step, two compares.
//! * Blocks with many runs (at least [`WIDE_MIN`] run starts): the runs wholly inside the
//!   block are written with vector operations and no per-run loop. The run starts are
//!   compressed into a vector of positions, whose differences are the run lengths (below
//!   64, one ULEB128 byte each); the lengths are expanded back to the run-start positions
//!   and interleaved with the block's new bytes into 128 slots (a length slot and a data
//!   slot per byte), and the slots that are sent (length slots at run starts, data slots
//!   at changed bytes) are compressed out. On Zen 4, `vpcompressb`/`vpexpandb` take
//!   several cycles each, so this beats the run-by-run path only for many short runs;
//!   below [`WIDE_MIN`] run starts the run-by-run path is used.

use crate::encode::{encode_core_wide, BLOCK, UNIFORM};
use crate::Overflow;
use core::arch::x86_64::{
    __m512i, _bzhi_u64, _mm512_add_epi8, _mm512_cmpeq_epi8_mask, _mm512_cmpneq_epi8_mask,
    _mm512_loadu_si512, _mm512_mask_storeu_epi8, _mm512_maskz_compress_epi8,
    _mm512_maskz_expand_epi8, _mm512_permutex2var_epi8, _mm512_permutexvar_epi8, _mm512_set1_epi8,
    _mm512_storeu_si512, _mm512_sub_epi8, _pdep_u64,
};

/// Run starts per block from which the vector writer is used.
const WIDE_MIN: u32 = 6;

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
    encode_core_wide::<_, _, _, WIDE_MIN>(
        old,
        new,
        out,
        |a, b| {
            // SAFETY: only called inside this function, whose caller guarantees the
            // CPU features.
            unsafe { diff_mask(a, b) }
        },
        |a, b, differ| {
            // SAFETY: as above.
            unsafe { uniform(a, b, differ) }
        },
        |out, d, nb, m, t| {
            // SAFETY: as above.
            unsafe { write_inner_runs(out, d, nb, m, t) }
        },
    )
}

/// 64 bytes of `s` at `at` (`at + 64 <= s.len()`).
///
/// # Safety
/// The CPU must support AVX-512F; inlined into [`encode_avx512`] only.
#[inline(always)]
unsafe fn load(s: &[u8], at: usize) -> __m512i {
    let s = &s[at..at + BLOCK];
    // SAFETY: `s` is 64 bytes long; `loadu` needs no alignment.
    unsafe { _mm512_loadu_si512(s.as_ptr().cast()) }
}

/// Bit `k` set iff `a[k] != b[k]`.
///
/// # Safety
/// As for [`load`], plus AVX-512BW.
#[inline(always)]
unsafe fn diff_mask(a: &[u8; BLOCK], b: &[u8; BLOCK]) -> u64 {
    // SAFETY: features guaranteed by the caller.
    let x = unsafe { load(a, 0) };
    // SAFETY: as above.
    let y = unsafe { load(b, 0) };
    // SAFETY: as above.
    unsafe { _mm512_cmpneq_epi8_mask(x, y) }
}

/// Whether every byte pair of the two blocks differs (`differ`) or every pair is equal.
///
/// # Safety
/// As for [`diff_mask`].
#[inline(always)]
unsafe fn uniform(a: &[u8; UNIFORM], b: &[u8; UNIFORM], differ: bool) -> bool {
    // SAFETY: features guaranteed by the caller (likewise for each block below).
    let a0 = unsafe { load(a, 0) };
    // SAFETY: as above.
    let b0 = unsafe { load(b, 0) };
    // SAFETY: as above.
    let a1 = unsafe { load(a, BLOCK) };
    // SAFETY: as above.
    let b1 = unsafe { load(b, BLOCK) };
    // Masks of the bytes that break uniformity; both empty (one `kortest`) if uniform.
    if differ {
        // SAFETY: as above.
        let m0 = unsafe { _mm512_cmpeq_epi8_mask(a0, b0) };
        // SAFETY: as above.
        let m1 = unsafe { _mm512_cmpeq_epi8_mask(a1, b1) };
        m0 | m1 == 0
    } else {
        // SAFETY: as above.
        let m0 = unsafe { _mm512_cmpneq_epi8_mask(a0, b0) };
        // SAFETY: as above.
        let m1 = unsafe { _mm512_cmpneq_epi8_mask(a1, b1) };
        m0 | m1 == 0
    }
}

/// Writes the first `n <= 64` bytes of `v` at `out[d..d + n]` (a whole-vector store,
/// with scratch past `d + n`, where `out` has 64 bytes from `d`).
///
/// # Safety
/// As for [`diff_mask`], plus BMI2.
#[inline(always)]
unsafe fn store_n(out: &mut [u8], d: usize, v: __m512i, n: usize) {
    if let Some(dst) = out.get_mut(d..d + BLOCK) {
        // SAFETY: `dst` is 64 bytes long; `storeu` needs no alignment.
        unsafe { _mm512_storeu_si512(dst.as_mut_ptr().cast(), v) };
        return;
    }
    let dst = &mut out[d..d + n];
    // SAFETY: features guaranteed by the caller.
    let k = unsafe { _bzhi_u64(!0, n as u32) };
    // SAFETY: the mask selects exactly the `n` bytes of `dst`, which is in bounds; a
    // masked store touches no other byte.
    unsafe { _mm512_mask_storeu_epi8(dst.as_mut_ptr().cast(), k, v) }
}

/// The runs wholly inside a block with run starts `t` (at least 2) and changed bytes `m`,
/// written at `out[d..]` (which has room for them); returns the new output length.
///
/// # Safety
/// The CPU must support what [`supported`] checks; inlined into [`encode_avx512`] only.
#[inline(always)]
unsafe fn write_inner_runs(out: &mut [u8], d: usize, nb: &[u8; BLOCK], m: u64, t: u64) -> usize {
    let p0 = t.trailing_zeros();
    let plast = 63 - t.leading_zeros();
    let inner = t & !(1u64 << plast);
    let data = m & ((1u64 << plast) - (1u64 << p0));
    // SAFETY: the CPU features are guaranteed by the caller (likewise for each block
    // below); `load` reads 64 bytes from 64-byte arrays.
    let iota = unsafe { load(&IOTA, 0) };
    // SAFETY: as above.
    let one = unsafe { _mm512_set1_epi8(1) };
    // SAFETY: as above.
    let next_idx = unsafe { _mm512_add_epi8(iota, one) };
    // SAFETY: as above.
    let b = unsafe { load(nb, 0) };
    // SAFETY: as above.
    let il_lo = unsafe { load(&INTERLEAVE_LO, 0) };
    // SAFETY: as above.
    let il_hi = unsafe { load(&INTERLEAVE_HI, 0) };
    // Run-start positions, then the next start minus this start: the run lengths.
    // SAFETY: as above.
    let starts = unsafe { _mm512_maskz_compress_epi8(t, iota) };
    // SAFETY: as above.
    let next = unsafe { _mm512_permutexvar_epi8(next_idx, starts) };
    // SAFETY: as above.
    let diffs = unsafe { _mm512_sub_epi8(next, starts) };
    // SAFETY: as above.
    let lens = unsafe { _mm512_maskz_expand_epi8(inner, diffs) };
    // SAFETY: as above.
    let lo = unsafe { _mm512_permutex2var_epi8(lens, il_lo, b) };
    // SAFETY: as above.
    let hi = unsafe { _mm512_permutex2var_epi8(lens, il_hi, b) };
    // Slot masks: length slots (even) at inner run starts, data slots (odd) at changed
    // bytes of the inner runs.
    // SAFETY: as above.
    let len_lo = unsafe { _pdep_u64(inner & 0xFFFF_FFFF, EVEN) };
    // SAFETY: as above.
    let dat_lo = unsafe { _pdep_u64(data & 0xFFFF_FFFF, ODD) };
    // SAFETY: as above.
    let len_hi = unsafe { _pdep_u64(inner >> 32, EVEN) };
    // SAFETY: as above.
    let dat_hi = unsafe { _pdep_u64(data >> 32, ODD) };
    let (k_lo, k_hi) = (len_lo | dat_lo, len_hi | dat_hi);
    let n_lo = k_lo.count_ones() as usize;
    let n_hi = k_hi.count_ones() as usize;
    // SAFETY: as above.
    let c_lo = unsafe { _mm512_maskz_compress_epi8(k_lo, lo) };
    // SAFETY: as above.
    let c_hi = unsafe { _mm512_maskz_compress_epi8(k_hi, hi) };
    // SAFETY: as above; `out` has room for `n_lo + n_hi` bytes from `d`.
    unsafe { store_n(out, d, c_lo, n_lo) };
    // SAFETY: as above.
    unsafe { store_n(out, d + n_lo, c_hi, n_hi) };
    d + n_lo + n_hi
}
