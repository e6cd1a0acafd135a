//! Fast encoder: 64-byte blocks turned into a bit mask of differing bytes (SIMD compare
//! on x86_64, SWAR elsewhere), then run boundaries found with `trailing_zeros` on the
//! mask's transitions, one boundary per step with no per-byte loop.

use crate::{uleb128, Overflow};

pub(crate) const BLOCK: usize = 64;
pub(crate) const MAX_RUN: usize = uleb128::MAX as usize;

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
    encode_core(old, new, out, |a, b| diff_mask_swar(a, b), uniform_swar)
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

/// Whether two 128-byte spans are uniform: every byte pair differs (`differ`) or every
/// byte pair is equal (`!differ`). Portable SWAR kernel.
#[inline(always)]
pub(crate) fn uniform_swar(a: &[u8; UNIFORM], b: &[u8; UNIFORM], differ: bool) -> bool {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    let mut acc = 0u64;
    for (wa, wb) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        let x =
            u64::from_le_bytes(wa.try_into().unwrap()) ^ u64::from_le_bytes(wb.try_into().unwrap());
        // `differ`: a zero byte of x (an equal pair) sets its byte's high bit (exact test).
        acc |= if differ {
            x.wrapping_sub(LO) & !x & HI
        } else {
            x
        };
    }
    acc == 0
}

/// Bytes checked per step by the uniform-stretch kernels: two blocks.
pub(crate) const UNIFORM: usize = 2 * BLOCK;

/// The encoder proper, generic over the kernel computing the difference mask of one full
/// 64-byte block and the kernel testing two blocks for uniformity. Always inlined so each
/// kernel gets its own specialised copy (and, for SIMD kernels, the target features of
/// the calling function).
#[inline(always)]
pub(crate) fn encode_core<M, U>(
    old: &[u8],
    new: &[u8],
    out: &mut [u8],
    mask: M,
    uniform: U,
) -> Result<usize, Overflow>
where
    M: Fn(&[u8; BLOCK], &[u8; BLOCK]) -> u64,
    U: Fn(&[u8; UNIFORM], &[u8; UNIFORM], bool) -> bool,
{
    encode_core_wide::<M, U, _, NO_WIDE>(old, new, out, mask, uniform, |_, d, _, _, _| d)
}

/// `WIDE_MIN` that never selects the wide-block writer (a block has at most 64 run
/// starts).
pub(crate) const NO_WIDE: u32 = 65;

/// [`encode_core`] with a writer for blocks with many runs: for a full block with at
/// least `WIDE_MIN` run starts and room for all it can write, the encoder writes the run
/// open since before the block's first run start itself, then calls
/// `wide(out, d, new_block, m, t)`, which must write the runs wholly inside the block
/// (from its first run start in `t` to its last; each below 64 bytes, so with one-byte
/// lengths; changed bytes `m`) exactly as the run-by-run path would, at `out[d..]`, and
/// return the new output length.
#[inline(always)]
pub(crate) fn encode_core_wide<M, U, W, const WIDE_MIN: u32>(
    old: &[u8],
    new: &[u8],
    out: &mut [u8],
    mask: M,
    uniform: U,
    wide: W,
) -> Result<usize, Overflow>
where
    M: Fn(&[u8; BLOCK], &[u8; BLOCK]) -> u64,
    U: Fn(&[u8; UNIFORM], &[u8; UNIFORM], bool) -> bool,
    W: Fn(&mut [u8], usize, &[u8; BLOCK], u64, u64) -> usize,
{
    // Runs can only exceed the 14-bit limit on pages above 16 KiB: a separate copy of the
    // loop keeps those checks out of the common case.
    if new.len() > MAX_RUN {
        encode_loop::<M, U, W, true, WIDE_MIN>(old, new, out, mask, uniform, wide)
    } else {
        encode_loop::<M, U, W, false, WIDE_MIN>(old, new, out, mask, uniform, wide)
    }
}

/// Output window of the fast path: 256 (above the at most 2 * 64 + 64 + 32 bytes one
/// block can produce, plus the next `d + 2` check) + a 32-byte chunk.
const FAST_OUT: usize = 256 + 32;

#[inline(always)]
fn encode_loop<M, U, W, const LONG: bool, const WIDE_MIN: u32>(
    old: &[u8],
    new: &[u8],
    out: &mut [u8],
    mask: M,
    uniform: U,
    wide: W,
) -> Result<usize, Overflow>
where
    M: Fn(&[u8; BLOCK], &[u8; BLOCK]) -> u64,
    U: Fn(&[u8; UNIFORM], &[u8; UNIFORM], bool) -> bool,
    W: Fn(&mut [u8], usize, &[u8; BLOCK], u64, u64) -> usize,
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

    // Mostly changed pages (random content) usually overflow, and finding that out run by
    // run means copying most of the page into `out` first. When the first block is at
    // least 3/4 changed, count instead: every changed byte is sent, and every data run
    // also costs its own length byte and the preceding skip run's, so the encoding is at
    // least `changed + 2 * data_runs` bytes; above the limit, QEMU's encoder overflows
    // (an encoding it completes is never longer than the limit), whatever the order of
    // its checks. Otherwise the count was only a compare pass, and encoding goes on.
    if full > 0 {
        let a: &[u8; BLOCK] = old[..BLOCK].try_into().unwrap();
        let b: &[u8; BLOCK] = new[..BLOCK].try_into().unwrap();
        if mask(a, b).count_ones() >= 48 && lower_bound(old, new, full, &mask) > dlen {
            return Err(Overflow);
        }
    }

    // The page is walked in 64-byte blocks. For each block, `m` has bit k set iff byte
    // base+k changed, and `t` has bit k set iff byte base+k starts a new run (its
    // changed-ness differs from the byte before; byte -1 counts as unchanged). Bits beyond
    // `len` in a short last block are 0, which at most adds a run start exactly at `len`.
    let mut d = 0usize; // output length so far
    let mut start = 0usize; // start of the current run
    let mut in_diff = false; // whether the current run is a changed (data) run
    let mut carry = 0u64; // bit 63 of the previous block's `m`
    let mut base = 0usize;
    while base < len {
        let m = if base < full {
            let a: &[u8; BLOCK] = old[base..base + BLOCK].try_into().unwrap();
            let b: &[u8; BLOCK] = new[base..base + BLOCK].try_into().unwrap();
            mask(a, b)
        } else {
            tail_mask(&old[base..], &new[base..])
        };
        let mut t = m ^ ((m << 1) | carry);
        carry = m >> 63;
        if t == 0 {
            // No run starts in this block: it continues the current run (all bytes equal
            // outside a data run, all different inside one). Skip the blocks that follow
            // of the same kind with the cheaper uniformity test, two at a time; runs are
            // only emitted (and checked) where they end, so skipping changes nothing.
            base += BLOCK;
            while base + UNIFORM <= full {
                let a: &[u8; UNIFORM] = old[base..base + UNIFORM].try_into().unwrap();
                let b: &[u8; UNIFORM] = new[base..base + UNIFORM].try_into().unwrap();
                if !uniform(a, b, carry != 0) {
                    break;
                }
                base += UNIFORM;
            }
            if in_diff {
                // The open data run is at least `k` bytes long: if it alone no longer
                // fits after what is written, QEMU's encoder overflows when it ends
                // (at its `d + n > dlen` check, or at the 14-bit limit), so stop now.
                let k = base.min(len) - start;
                if d + 1 + usize::from(k >= 0x80) + k > dlen || (LONG && k > MAX_RUN) {
                    return Err(Overflow);
                }
            }
            continue;
        }
        if WIDE_MIN < NO_WIDE && base < full && t.count_ones() >= WIDE_MIN {
            // Many runs: the run open since before the block here, the runs inside the
            // block by `wide`. Everything written fits with 2 to spare, so no QEMU
            // check can fire in this block (see `avx512` for the bound).
            let p0 = t.trailing_zeros() as usize;
            let plast = 63 - t.leading_zeros() as usize;
            let pend = base + p0 - start;
            if d + 4 + pend + 2 * (plast - p0) <= dlen && (!LONG || pend <= MAX_RUN) {
                d += put_len(out, d, pend);
                if in_diff {
                    copy_literal(out, d, new, start, pend);
                    d += pend;
                }
                let nb: &[u8; BLOCK] = new[base..base + BLOCK].try_into().unwrap();
                d = wide(out, d, nb, m, t);
                start = base + plast;
                in_diff = (m >> plast) & 1 != 0;
                base += BLOCK;
                continue;
            }
        }
        // Fast path, for blocks where none of QEMU's overflow checks can fire: while all
        // data runs are at most 32 bytes, one block produces at most 64 two-byte lengths
        // plus 64 + 32 literal bytes, within FAST_OUT - 34 bytes. Data bytes are copied
        // as whole 32-byte chunks from a fixed window of `new` into a fixed window of
        // `out`, with indexes masked to the window sizes (the masks never change them, by
        // the bounds just given), so no bounds checks remain. A longer data run ends the
        // fast path; the exact path below takes over for the rest of the block.
        if base >= 32
            && base + BLOCK + 64 <= len
            && d + FAST_OUT <= dlen
            && (!LONG || base + BLOCK - start <= MAX_RUN)
        {
            let nw: &[u8; 160] = new[base - 32..base + 128].try_into().unwrap();
            let ow: &mut [u8; FAST_OUT] = (&mut out[d..d + FAST_OUT]).try_into().unwrap();
            let mut o = 0usize;
            let mut diff = if in_diff { usize::MAX } else { 0 };
            loop {
                // Common case: two runs ending in this block, a skip run shorter than 0x80
                // and a data run of at most 16 bytes (one length byte each, one 16-byte
                // chunk of data). The kind of run
                // alternates, so a pair keeps `diff`: one tight loop for each kind.
                if diff == 0 {
                    while t & t.wrapping_sub(1) != 0 {
                        // Skip run `start..p1`, then data run `p1..p2`.
                        let t1 = t & (t - 1);
                        let p1 = base + t.trailing_zeros() as usize;
                        let p2 = base + t1.trailing_zeros() as usize;
                        let (skip, data) = (p1 - start, p2 - p1);
                        if (skip | ((data - 1) << 3)) >= 0x80 {
                            break;
                        }
                        t = t1 & (t1 - 1);
                        let oo = o & 255;
                        ow[oo..oo + 2].copy_from_slice(&((skip | data << 8) as u16).to_le_bytes());
                        let oo = (o + 2) & 255;
                        let ls = (p1 + 32 - base) & 127;
                        ow[oo..oo + 16].copy_from_slice(&nw[ls..ls + 16]);
                        o += 2 + data;
                        start = p2;
                    }
                } else {
                    while t & t.wrapping_sub(1) != 0 {
                        // Data run `start..p1`, then skip run `p1..p2`.
                        let t1 = t & (t - 1);
                        let p1 = base + t.trailing_zeros() as usize;
                        let p2 = base + t1.trailing_zeros() as usize;
                        let (data, skip) = (p1 - start, p2 - p1);
                        if (skip | ((data - 1) << 3)) >= 0x80 {
                            break;
                        }
                        t = t1 & (t1 - 1);
                        ow[o & 255] = data as u8;
                        let oo = (o + 1) & 255;
                        let ls = (start + 32 - base) & 127;
                        ow[oo..oo + 16].copy_from_slice(&nw[ls..ls + 16]);
                        ow[(o + 1 + data) & 255] = skip as u8;
                        o += 2 + data;
                        start = p2;
                    }
                }
                if t == 0 {
                    break;
                }
                // One run, any length up to 0x3FFF for a skip run, 32 for a data run.
                let p = base + t.trailing_zeros() as usize;
                let r = p - start;
                if diff != 0 && r > 32 {
                    break;
                }
                t &= t - 1;
                // 2-byte ULEB128 as one store (second byte is scratch when r < 0x80).
                let high = r & !0x7F;
                let two = usize::from(high != 0);
                let v = (r + high + (two << 7)) as u16;
                let oo = o & 255;
                ow[oo..oo + 2].copy_from_slice(&v.to_le_bytes());
                o += 1 + two;
                // Literal bytes (scratch, overwritten next step, for a skip run).
                let oo = o & 255;
                let ls = (start + 32).wrapping_sub(base) & 127;
                ow[oo..oo + 32].copy_from_slice(&nw[ls..ls + 32]);
                o += r & diff;
                diff = !diff;
                start = p;
            }
            d += o;
            in_diff = diff != 0;
        }
        {
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

/// `changed + 2 * data_runs` for `old`/`new` (blocks of 64 up to `full`, then the tail):
/// a lower bound on the encoded length, without any output limit.
#[inline(always)]
fn lower_bound<M>(old: &[u8], new: &[u8], full: usize, mask: &M) -> usize
where
    M: Fn(&[u8; BLOCK], &[u8; BLOCK]) -> u64,
{
    let mut changed = 0usize;
    let mut runs = 0usize;
    let mut carry = 0u64;
    let mut base = 0;
    while base < full {
        let a: &[u8; BLOCK] = old[base..base + BLOCK].try_into().unwrap();
        let b: &[u8; BLOCK] = new[base..base + BLOCK].try_into().unwrap();
        let m = mask(a, b);
        changed += m.count_ones() as usize;
        runs += (m & !((m << 1) | carry)).count_ones() as usize;
        carry = m >> 63;
        base += BLOCK;
    }
    if full < new.len() {
        let m = tail_mask(&old[full..], &new[full..]);
        changed += m.count_ones() as usize;
        runs += (m & !((m << 1) | carry)).count_ones() as usize;
    }
    changed + 2 * runs
}

/// Length and literal bytes of the data run `new[start..p]` with QEMU's checks (given
/// `d + 2 <= out.len()`, established by the check after the preceding skip run).
#[inline(always)]
pub(crate) fn emit_data_checked<const LONG: bool>(
    out: &mut [u8],
    d: usize,
    new: &[u8],
    start: usize,
    p: usize,
) -> Result<usize, Overflow> {
    let n = p - start;
    if LONG && n > MAX_RUN {
        return Err(Overflow);
    }
    let d = d + put_len(out, d, n);
    if d + n > out.len() {
        return Err(Overflow);
    }
    copy_literal(out, d, new, start, n);
    Ok(d + n)
}

/// Difference mask of the short last block (pages that are not a multiple of 64 bytes),
/// kept out of line so the main loop's registers are not spent on its constants.
#[inline(never)]
fn tail_mask(old: &[u8], new: &[u8]) -> u64 {
    diff_mask_swar(old, new)
}

/// Writes a run length (`v <= 0x3FFF`) at `out[d..]`, given `d + 2 <= out.len()`; always
/// stores two bytes (the second is scratch for short lengths) to avoid a branch.
#[inline(always)]
pub(crate) fn put_len(out: &mut [u8], d: usize, v: usize) -> usize {
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
        copy_long(&mut out[d..d + n], &src[s..s + n]);
    }
}

/// `memcpy` kept out of line: inlined, LLVM merges it with the fixed-size short copies
/// into one variable-length `memcpy` call, which is much slower for the short ones.
#[inline(never)]
fn copy_long(dst: &mut [u8], src: &[u8]) {
    dst.copy_from_slice(src);
}

#[cfg(target_arch = "x86_64")]
mod simd {
    //! x86_64 block kernels. SSE2 is part of the x86_64 baseline; AVX2 is detected at
    //! run time. The only `unsafe` code of the crate lives here.

    use super::{encode_core, BLOCK, UNIFORM};
    use crate::Overflow;
    use core::arch::x86_64::{
        __m128i, __m256i, _mm256_cmpeq_epi8, _mm256_loadu_si256, _mm256_movemask_epi8,
        _mm256_or_si256, _mm256_setzero_si256, _mm256_testz_si256, _mm256_xor_si256,
        _mm_cmpeq_epi8, _mm_loadu_si128, _mm_movemask_epi8, _mm_or_si128, _mm_setzero_si128,
        _mm_xor_si128,
    };
    use core::sync::atomic::{AtomicU8, Ordering};

    /// Which kernel [`encode_x86`] uses: 0 not yet known, 1 SSE2, 2 AVX2, 3 AVX-512.
    static KERNEL: AtomicU8 = AtomicU8::new(0);

    fn kernel() -> u8 {
        match KERNEL.load(Ordering::Relaxed) {
            0 => {
                let k = if crate::avx512::supported() {
                    3
                } else if avx2_supported() {
                    2
                } else {
                    1
                };
                KERNEL.store(k, Ordering::Relaxed);
                k
            }
            k => k,
        }
    }

    pub(super) fn avx2_supported() -> bool {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("bmi1")
    }

    pub(super) fn encode_x86(old: &[u8], new: &[u8], out: &mut [u8]) -> Result<usize, Overflow> {
        match kernel() {
            // SAFETY: kernel 3 is only chosen when `avx512::supported()` said yes.
            3 => unsafe { crate::avx512::encode_avx512(old, new, out) },
            2 => encode_avx2_checked(old, new, out),
            _ => encode_core(old, new, out, diff_mask_sse2, uniform_sse2),
        }
    }

    /// The AVX2 kernel where the CPU has AVX2, else the SSE2 one.
    pub(crate) fn encode_avx2_checked(
        old: &[u8],
        new: &[u8],
        out: &mut [u8],
    ) -> Result<usize, Overflow> {
        if avx2_supported() {
            // SAFETY: the CPU supports AVX2 and BMI1 (checked just above), the only
            // requirement of `encode_avx2`.
            unsafe { encode_avx2(old, new, out) }
        } else {
            encode_core(old, new, out, diff_mask_sse2, uniform_sse2)
        }
    }

    /// # Safety
    /// The CPU must support AVX2 and BMI1.
    #[target_feature(enable = "avx2,bmi1")]
    unsafe fn encode_avx2(old: &[u8], new: &[u8], out: &mut [u8]) -> Result<usize, Overflow> {
        encode_core(
            old,
            new,
            out,
            |a, b| {
                // SAFETY: this closure only runs inside `encode_avx2`, whose caller has
                // checked that the CPU supports AVX2 (and BMI1).
                unsafe { diff_mask_avx2(a, b) }
            },
            |a, b, differ| {
                // SAFETY: as above.
                unsafe { uniform_avx2(a, b, differ) }
            },
        )
    }

    /// Uniformity of two blocks (see [`super::uniform_swar`]) with 32-byte compares.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn uniform_avx2(a: &[u8; UNIFORM], b: &[u8; UNIFORM], differ: bool) -> bool {
        let mut acc = [_mm256_setzero_si256(); 2];
        for k in 0..4 {
            let off = 32 * k;
            // SAFETY: `off + 32 <= 128`, so 32 bytes are readable from both pointers;
            // `loadu` has no alignment requirement.
            let x = unsafe { _mm256_loadu_si256(a[off..].as_ptr().cast::<__m256i>()) };
            // SAFETY: as above.
            let y = unsafe { _mm256_loadu_si256(b[off..].as_ptr().cast::<__m256i>()) };
            let v = if differ {
                _mm256_cmpeq_epi8(x, y)
            } else {
                _mm256_xor_si256(x, y)
            };
            acc[k & 1] = _mm256_or_si256(acc[k & 1], v);
        }
        let all = _mm256_or_si256(acc[0], acc[1]);
        _mm256_testz_si256(all, all) != 0
    }

    /// Uniformity of two blocks with 16-byte compares (SSE2, always available).
    #[inline(always)]
    fn uniform_sse2(a: &[u8; UNIFORM], b: &[u8; UNIFORM], differ: bool) -> bool {
        // SAFETY: SSE2 is part of the x86_64 baseline.
        let mut acc = unsafe { _mm_setzero_si128() };
        for k in 0..8 {
            let off = 16 * k;
            // SAFETY: `off + 16 <= 128`, so 16 bytes are readable from both pointers;
            // `loadu` has no alignment requirement and SSE2 is baseline on x86_64.
            let x = unsafe { _mm_loadu_si128(a[off..].as_ptr().cast::<__m128i>()) };
            // SAFETY: as above.
            let y = unsafe { _mm_loadu_si128(b[off..].as_ptr().cast::<__m128i>()) };
            let v = if differ {
                // SAFETY: SSE2 is part of the x86_64 baseline.
                unsafe { _mm_cmpeq_epi8(x, y) }
            } else {
                // SAFETY: as above.
                unsafe { _mm_xor_si128(x, y) }
            };
            // SAFETY: as above.
            acc = unsafe { _mm_or_si128(acc, v) };
        }
        // SAFETY: as above.
        let zero = unsafe { _mm_setzero_si128() };
        // SAFETY: as above.
        let eq_zero = unsafe { _mm_cmpeq_epi8(acc, zero) };
        // SAFETY: as above.
        let nonzero = unsafe { _mm_movemask_epi8(eq_zero) };
        nonzero == 0xFFFF
    }

    /// Difference mask of one block with 32-byte compares.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn diff_mask_avx2(a: &[u8; BLOCK], b: &[u8; BLOCK]) -> u64 {
        // SAFETY: each of the four pointers below starts 0 or 32 bytes into a 64-byte
        // array, so 32 bytes are readable; `loadu` has no alignment requirement.
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

    /// A uniformity kernel, as tests call it.
    #[cfg(test)]
    pub(super) type UniformFn = fn(&[u8; UNIFORM], &[u8; UNIFORM], bool) -> bool;

    /// The uniformity kernels available on this CPU, for tests: (name, kernel).
    #[cfg(test)]
    pub(super) fn uniform_kernels() -> Vec<(&'static str, UniformFn)> {
        let mut v: Vec<(&'static str, UniformFn)> = vec![("sse2", uniform_sse2)];
        if std::is_x86_feature_detected!("avx2") {
            fn avx2(a: &[u8; UNIFORM], b: &[u8; UNIFORM], differ: bool) -> bool {
                // SAFETY: only listed after the AVX2 check above.
                unsafe { uniform_avx2(a, b, differ) }
            }
            v.push(("avx2", avx2));
        }
        v
    }

    /// Exposes the SSE2 path to tests and benchmarks.
    pub(crate) fn encode_sse2(old: &[u8], new: &[u8], out: &mut [u8]) -> Result<usize, Overflow> {
        encode_core(old, new, out, diff_mask_sse2, uniform_sse2)
    }
}

/// Encoder variants, for tests and benchmarks comparing kernels. Each returns exactly what
/// [`encode`] returns.
#[doc(hidden)]
pub mod variants {
    use crate::Overflow;

    /// An encoder, as the variants are called.
    pub type Encoder = fn(&[u8], &[u8], &mut [u8]) -> Result<usize, Overflow>;

    /// Every encoder path this CPU can run, by name: `"portable"` (the safe SWAR
    /// fallback, always), and on x86_64 `"sse2"`, `"avx2"` and `"avx512"` where the CPU
    /// has the features. [`encode`](crate::encode) picks the last one listed; tests run
    /// them all to check each against the reference.
    #[must_use]
    pub fn available() -> Vec<(&'static str, Encoder)> {
        let mut v: Vec<(&'static str, Encoder)> = vec![("portable", crate::encode_portable)];
        #[cfg(target_arch = "x86_64")]
        {
            v.push(("sse2", encode_sse2));
            if super::simd::avx2_supported() {
                v.push(("avx2", super::simd::encode_avx2_checked));
            }
            if crate::avx512::supported() {
                fn avx512(old: &[u8], new: &[u8], out: &mut [u8]) -> Result<usize, Overflow> {
                    // SAFETY: only listed after `avx512::supported()` said yes.
                    unsafe { crate::avx512::encode_avx512(old, new, out) }
                }
                v.push(("avx512", avx512));
            }
        }
        v
    }

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

#[cfg(test)]
mod tests {
    use super::{diff_mask_swar, uniform_swar, UNIFORM};

    /// Every uniformity kernel (SWAR, SSE2, AVX2 where the CPU has it) agrees with the
    /// byte-by-byte definition: spans all equal, all different, and each with exactly
    /// one byte pair of the other kind at every position, over several byte values.
    #[test]
    fn uniform_kernels_agree_with_definition() {
        type K = fn(&[u8; UNIFORM], &[u8; UNIFORM], bool) -> bool;
        let mut kernels: Vec<(&str, K)> = vec![("swar", uniform_swar)];
        #[cfg(target_arch = "x86_64")]
        kernels.extend(super::simd::uniform_kernels());
        let naive = |a: &[u8; UNIFORM], b: &[u8; UNIFORM], differ: bool| {
            a.iter().zip(b).all(|(x, y)| (x != y) == differ)
        };
        for (base, delta) in [
            (0u8, 0x80u8),
            (0x7F, 0x01),
            (0xFF, 0xFF),
            (0x01, 0x7F),
            (0x80, 0x01),
        ] {
            let a = [base; UNIFORM];
            let same = a;
            let other = [base ^ delta; UNIFORM];
            let mut cases = vec![(a, same), (a, other)];
            for k in 0..UNIFORM {
                let mut one_diff = same;
                one_diff[k] ^= delta;
                let mut one_same = other;
                one_same[k] = base;
                cases.push((a, one_diff));
                cases.push((a, one_same));
            }
            for (x, y) in &cases {
                for differ in [false, true] {
                    let want = naive(x, y, differ);
                    for (name, k) in &kernels {
                        assert_eq!(
                            k(x, y, differ),
                            want,
                            "{name} differ={differ} base={base:#x}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn swar_mask_every_byte_pattern() {
        for pattern in 0..=255u32 {
            for (base, delta) in [
                (0u8, 0x80u8),
                (0x80, 0x80),
                (0x7F, 0x01),
                (0xFF, 0xFF),
                (0x01, 0x7F),
                (0x00, 0x01),
            ] {
                let a = [base; 64];
                let mut b = a;
                let mut want = 0u64;
                for (k, byte) in b.iter_mut().enumerate() {
                    if pattern >> (k % 8) & 1 == 1 && (k / 8) % 3 != 1 {
                        *byte ^= delta;
                        want |= 1 << k;
                    }
                }
                assert_eq!(diff_mask_swar(&a, &b), want, "pattern {pattern:#x}");
                // Short (tail) lengths: bits at and above the length are 0.
                for len in [0usize, 1, 7, 8, 13, 56, 63] {
                    let w = if len == 64 {
                        want
                    } else {
                        want & ((1u64 << len) - 1)
                    };
                    assert_eq!(diff_mask_swar(&a[..len], &b[..len]), w);
                }
            }
        }
    }
}
