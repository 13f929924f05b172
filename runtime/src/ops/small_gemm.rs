//! Small matrix products on AVX-512 or AVX2 without gemm's per-call set-up.
//!
//! A task-batched MAML step makes thousands of gemm calls on matrices of a few dozen rows
//! (one per task per product), and gemm's packing and buffer set-up cost more than the
//! arithmetic at that size. This kernel reads the right operand's rows in place when they
//! have unit column stride; a transposed right operand (a linear layer's `x W^T`) is first
//! transposed into a per-thread buffer by register transposes (16 x 16 in f32 on AVX-512).
//! It keeps a block of up to 8 rows (6 on AVX2) by 2 vectors of the product in registers.
//! Each element of the product is the same sequence of fused multiply-adds over `k` that
//! gemm's kernels compute in their usual case, on either instruction set; it takes every
//! small product, of any shape, so that each element is one in-order chain whichever
//! orientation or layout the product comes in (tested against that definition and, within
//! rounding, against candle's matmul). Products it does not take (deep, large, right
//! operand with neither stride the unit one, or a CPU with neither AVX-512 nor AVX2 and
//! FMA) go to gemm.

use candle_core::WithDType;

use super::cpu_gemm::Strided;

/// The depths taken: gemm splits deeper products into blocks.
const MAX_DEPTH: usize = 128;
/// The largest product taken, in multiply-adds (gemm's own single-thread threshold).
const MAX_SIZE: usize = 48 * 48 * 256;

/// The vector instruction set a product runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Isa {
    /// AVX-512F and VL, with FMA: 16 f32 lanes, masked edges.
    Avx512,
    /// AVX2 with FMA: 8 f32 lanes.
    Avx2,
}

/// The widest instruction set this CPU runs the kernels on, if any.
fn best_isa() -> Option<Isa> {
    available_isas().next()
}

/// The instruction sets this CPU runs the kernels on, widest first.
fn available_isas() -> impl Iterator<Item = Isa> {
    #[cfg(target_arch = "x86_64")]
    let found = [
        (std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("fma"))
        .then_some(Isa::Avx512),
        (std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma"))
            .then_some(Isa::Avx2),
    ];
    #[cfg(not(target_arch = "x86_64"))]
    let found: [Option<Isa>; 0] = [];
    found.into_iter().flatten()
}

/// `dst = lhs * rhs` (or `dst += ..` when `accumulate`) through the vector kernel when it
/// applies; `false` (nothing written) when it does not.
///
/// # Safety
/// `lhs` and `rhs` hold their `m x k` and `k x n` views, and `dst` points at `m * n`
/// writable row-major elements, initialised when `accumulate`.
pub(crate) unsafe fn try_small_product<T: WithDType>(
    mnk: (usize, usize, usize),
    lhs: Strided<'_, T>,
    rhs: Strided<'_, T>,
    dst: *mut T,
    accumulate: bool,
) -> bool {
    match best_isa() {
        Some(isa) => small_product(isa, mnk, lhs, rhs, dst, accumulate),
        None => false,
    }
}

/// [`try_small_product`] on the instruction set `isa`, which the CPU has.
///
/// # Safety
/// As [`try_small_product`], and the CPU has `isa`.
unsafe fn small_product<T: WithDType>(
    isa: Isa,
    (m, n, k): (usize, usize, usize),
    lhs: Strided<'_, T>,
    rhs: Strided<'_, T>,
    dst: *mut T,
    accumulate: bool,
) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // Every small product, whatever its shape: a product must round the same in
        // whichever orientation it is formed (a task-batched layer and its loop over tasks
        // form some in transposed orientations), and gemm's own order depends on the shape
        // and layout (outer products for depths 1-2, dot products along `k` for one row,
        // or for some shapes whose operands both run along `k`).
        let applies = m >= 1
            && n >= 1
            && (1..=MAX_DEPTH).contains(&k)
            && m * n * k <= MAX_SIZE
            && (rows_in_place(rhs.col_stride, n) || rhs.row_stride == 1 || k == 1);
        if !applies {
            return false;
        }
        if n == 1 && m > 1 && lhs.row_stride == 1 {
            // A column of a column-major `lhs`: the same chains as one row, `rhs^T lhs^T`,
            // whose right operand then has unit column stride (one vector per 16 rows
            // instead of one masked lane per row).
            let row = Strided {
                data: rhs.data,
                row_stride: 0,
                col_stride: rhs.row_stride,
            };
            let columns = Strided {
                data: lhs.data,
                row_stride: lhs.col_stride,
                col_stride: 1,
            };
            return small_product(isa, (1, m, k), row, columns, dst, accumulate);
        }
        if n == 1 && m > 1 && lhs.col_stride == 1 {
            // A row-major `lhs` times a column (a linear layer's single output): `lhs`
            // transposed into the thread's buffer makes it the case above.
            return match T::DTYPE {
                candle_core::DType::F32 => {
                    column_product::<f32, T>(isa, (m, k), lhs, rhs, dst, accumulate)
                }
                candle_core::DType::F64 => {
                    column_product::<f64, T>(isa, (m, k), lhs, rhs, dst, accumulate)
                }
                _ => false,
            };
        }
        match T::DTYPE {
            candle_core::DType::F32 => product::<f32, T>(isa, (m, n, k), lhs, rhs, dst, accumulate),
            candle_core::DType::F64 => product::<f64, T>(isa, (m, n, k), lhs, rhs, dst, accumulate),
            _ => return false,
        }
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (isa, (m, n, k), lhs, rhs, dst, accumulate);
        false
    }
}

/// Element types with the vector kernels.
#[cfg(target_arch = "x86_64")]
trait Kernels: Copy {
    /// Writes the `k x n` matrix (`nk = (n, k)`) whose element `(kk, j)` is
    /// `src[j * ld + kk]` row-major into `dst` (`k * n` elements).
    ///
    /// # Safety
    /// `src` covers that view, `dst` holds `k * n` elements, the CPU has `isa`.
    unsafe fn transpose_into(
        isa: Isa,
        nk: (usize, usize),
        src: *const Self,
        ld: usize,
        dst: *mut Self,
    );

    /// The product kernel (`avx512::product_f32` and its twins).
    ///
    /// # Safety
    /// As `avx512::product_f32`, on a CPU with `isa`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn product(
        isa: Isa,
        mnk: (usize, usize, usize),
        a: *const Self,
        rsa: usize,
        csa: usize,
        b: *const Self,
        rsb: usize,
        c: *mut Self,
        accumulate: bool,
    );
}

/// [`Kernels`] for one element type, from its two kernels on each instruction set.
#[cfg(target_arch = "x86_64")]
macro_rules! kernels {
    ($t:ty, $transpose:ident, $product:ident) => {
        impl Kernels for $t {
            unsafe fn transpose_into(
                isa: Isa,
                nk: (usize, usize),
                src: *const $t,
                ld: usize,
                dst: *mut $t,
            ) {
                match isa {
                    Isa::Avx512 => avx512::$transpose(nk, src, ld, dst),
                    Isa::Avx2 => avx2::$transpose(nk, src, ld, dst),
                }
            }

            unsafe fn product(
                isa: Isa,
                mnk: (usize, usize, usize),
                a: *const $t,
                rsa: usize,
                csa: usize,
                b: *const $t,
                rsb: usize,
                c: *mut $t,
                accumulate: bool,
            ) {
                match isa {
                    Isa::Avx512 => avx512::$product(mnk, a, rsa, csa, b, rsb, c, accumulate),
                    Isa::Avx2 => avx2::$product(mnk, a, rsa, csa, b, rsb, c, accumulate),
                }
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
kernels!(f32, transpose_f32, product_f32);
#[cfg(target_arch = "x86_64")]
kernels!(f64, transpose_f64, product_f64);

/// The product in element type `K` (the same type as `T`, checked by the caller).
///
/// # Safety
/// As [`try_small_product`], and `K` is `T`; the CPU has `isa`.
#[cfg(target_arch = "x86_64")]
unsafe fn product<K: Kernels, T>(
    isa: Isa,
    (m, n, k): (usize, usize, usize),
    lhs: Strided<'_, T>,
    rhs: Strided<'_, T>,
    dst: *mut T,
    accumulate: bool,
) {
    let a = lhs.data.as_ptr().cast::<K>();
    let strides = (rhs.row_stride, rhs.col_stride);
    with_rows::<K>(isa, (n, k), rhs.data.as_ptr().cast(), strides, |b, rsb| {
        K::product(
            isa,
            (m, n, k),
            a,
            lhs.row_stride,
            lhs.col_stride,
            b,
            rsb,
            dst.cast(),
            accumulate,
        )
    })
}

#[cfg(target_arch = "x86_64")]
thread_local! {
    /// The transposed right operand of the current product (8-byte words, reused).
    static ROWS: std::cell::RefCell<Vec<u64>> = const { std::cell::RefCell::new(Vec::new()) };
    /// The transposed left operand of a [`column_product`] (8-byte words, reused).
    static COLUMNS: std::cell::RefCell<Vec<u64>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `dst (+)= lhs rhs` for a row-major `m x k` `lhs` and a `k x 1` `rhs`, as the one row
/// `rhs^T lhs^T` with `lhs^T` transposed into the thread's buffer: each output is a lane
/// of one vector (one vector per 8 or 16 rows) instead of the only lane of a masked one,
/// and the same in-order chain over `k`.
///
/// # Safety
/// As [`try_small_product`] for an `m x 1` product, `K` is `T`; the CPU has `isa`.
#[cfg(target_arch = "x86_64")]
unsafe fn column_product<K: Kernels, T: WithDType>(
    isa: Isa,
    (m, k): (usize, usize),
    lhs: Strided<'_, T>,
    rhs: Strided<'_, T>,
    dst: *mut T,
    accumulate: bool,
) -> bool {
    let words = (k * m * std::mem::size_of::<T>()).div_ceil(8);
    COLUMNS.with(|buffer| {
        let mut buffer = buffer.borrow_mut();
        if buffer.len() < words {
            buffer.resize(words, 0);
        }
        let packed = buffer.as_mut_ptr().cast::<K>();
        K::transpose_into(
            isa,
            (m, k),
            lhs.data.as_ptr().cast(),
            lhs.row_stride,
            packed,
        );
        let columns = Strided {
            data: std::slice::from_raw_parts(packed.cast::<T>(), k * m),
            row_stride: m,
            col_stride: 1,
        };
        let row = Strided {
            data: rhs.data,
            row_stride: 0,
            col_stride: rhs.row_stride,
        };
        small_product(isa, (1, m, k), row, columns, dst, accumulate)
    })
}

/// Whether the kernel reads the right operand's rows in place: unit column stride, or a
/// single column.
fn rows_in_place(col_stride: usize, n: usize) -> bool {
    col_stride == 1 || n == 1
}

/// Runs `product(b, rsb)` on the right operand as rows with unit column stride: in place,
/// or transposed into the thread's buffer (its row stride is then the unit one, or it
/// has one row).
///
/// # Safety
/// `b` with the strides covers a `k x n` view; the CPU has `isa`.
#[cfg(target_arch = "x86_64")]
unsafe fn with_rows<T: Kernels>(
    isa: Isa,
    (n, k): (usize, usize),
    b: *const T,
    (row_stride, col_stride): (usize, usize),
    product: impl FnOnce(*const T, usize),
) {
    if rows_in_place(col_stride, n) {
        return product(b, row_stride);
    }
    let words = (k * n * std::mem::size_of::<T>()).div_ceil(8);
    ROWS.with(|rows| {
        let mut rows = rows.borrow_mut();
        if rows.len() < words {
            rows.resize(words, 0);
        }
        let packed = rows.as_mut_ptr().cast::<T>();
        T::transpose_into(isa, (n, k), b, col_stride, packed);
        product(packed, n)
    })
}

/// The operands of one column block: `c[i.., j..] (+)= a[i.., ..k] b[..k, j..]`; `edges`
/// describes the block's last columns (two masks on AVX-512; on AVX2 the last vector's lane
/// count and mask).
#[cfg(target_arch = "x86_64")]
struct Block<T, E> {
    j: usize,
    k: usize,
    a: *const T,
    rsa: usize,
    csa: usize,
    b: *const T,
    rsb: usize,
    c: *mut T,
    ldc: usize,
    edges: E,
    accumulate: bool,
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::Block;

    /// One kernel per element type: `$lanes` elements per vector, `$mask` the lane mask.
    macro_rules! kernel {
        ($product:ident, $block:ident, $half:ident, $t:ty, $mask:ty, $lanes:expr,
         $zero:ident, $load:ident, $store:ident, $set1:ident, $fmadd:ident, $add:ident,
         $hmask:ty, $hzero:ident, $hload:ident, $hstore:ident, $hset1:ident, $hfmadd:ident,
         $hadd:ident) => {
            /// `c = a b` (`+= ` when `accumulate`): `a` `m x k` at `(i, k) -> i * rsa + k * csa`,
            /// `b` `k x n` with row stride `rsb` and unit column stride, `c` row-major `m x n`.
            ///
            /// # Safety
            /// The pointers cover those views; the CPU has AVX-512F and VL, and FMA.
            #[target_feature(enable = "avx512f,avx512vl,fma")]
            #[allow(clippy::too_many_arguments)]
            pub(super) unsafe fn $product(
                (m, n, k): (usize, usize, usize),
                a: *const $t,
                rsa: usize,
                csa: usize,
                b: *const $t,
                rsb: usize,
                c: *mut $t,
                accumulate: bool,
            ) {
                let lane_mask = |w: usize| -> $mask {
                    if w >= $lanes {
                        <$mask>::MAX
                    } else {
                        ((1u32 << w) - 1) as $mask
                    }
                };
                let mut j = 0;
                while j < n {
                    let width = (n - j).min(2 * $lanes);
                    let masks = (lane_mask(width), lane_mask(width.saturating_sub($lanes)));
                    let at = Block {
                        j,
                        k,
                        a,
                        rsa,
                        csa,
                        b,
                        rsb,
                        c,
                        ldc: n,
                        edges: masks,
                        accumulate,
                    };
                    // Row blocks of equal height, at most 8: 8 to 16 independent
                    // accumulator chains hide the fused multiply-add latency. A last
                    // block of at most half a vector runs on half-width vectors (the same
                    // operations, at half the cost where a full one splits in two).
                    let height = m.div_ceil(m.div_ceil(8));
                    let half = width <= $lanes / 2;
                    let mut i = 0;
                    while i < m {
                        match (half, height.min(m - i)) {
                            (false, 1) => $block::<1>(&at, i),
                            (false, 2) => $block::<2>(&at, i),
                            (false, 3) => $block::<3>(&at, i),
                            (false, 4) => $block::<4>(&at, i),
                            (false, 5) => $block::<5>(&at, i),
                            (false, 6) => $block::<6>(&at, i),
                            (false, 7) => $block::<7>(&at, i),
                            (false, _) => $block::<8>(&at, i),
                            (true, 1) => $half::<1>(&at, i),
                            (true, 2) => $half::<2>(&at, i),
                            (true, 3) => $half::<3>(&at, i),
                            (true, 4) => $half::<4>(&at, i),
                            (true, 5) => $half::<5>(&at, i),
                            (true, 6) => $half::<6>(&at, i),
                            (true, 7) => $half::<7>(&at, i),
                            (true, _) => $half::<8>(&at, i),
                        }
                        i += height;
                    }
                    j += 2 * $lanes;
                }
            }

            /// Rows `i..i + R` of the at most `lanes / 2` columns from `at.j`, on
            /// half-width vectors.
            #[target_feature(enable = "avx512f,avx512vl,fma")]
            #[inline]
            unsafe fn $half<const R: usize>(at: &Block<$t, ($mask, $mask)>, i: usize) {
                let m0 = at.edges.0 as $hmask;
                let mut acc = [$hzero(); R];
                for kk in 0..at.k {
                    let b0 = $hload(m0, at.b.add(kk * at.rsb + at.j));
                    for r in 0..R {
                        let x = $hset1(*at.a.add((i + r) * at.rsa + kk * at.csa));
                        acc[r] = $hfmadd(x, b0, acc[r]);
                    }
                }
                for r in 0..R {
                    let out = at.c.add((i + r) * at.ldc + at.j);
                    let v = if at.accumulate {
                        $hadd($hload(m0, out), acc[r])
                    } else {
                        acc[r]
                    };
                    $hstore(out, m0, v);
                }
            }

            /// Rows `i..i + R` of columns `at.j..at.j + 2 * lanes` (masked at the edge).
            #[target_feature(enable = "avx512f,avx512vl,fma")]
            #[inline]
            unsafe fn $block<const R: usize>(at: &Block<$t, ($mask, $mask)>, i: usize) {
                let (m0, m1) = at.edges;
                let two = m1 != 0;
                let mut acc0 = [$zero(); R];
                let mut acc1 = [$zero(); R];
                for kk in 0..at.k {
                    let row = at.b.add(kk * at.rsb + at.j);
                    let b0 = $load(m0, row);
                    let b1 = if two {
                        $load(m1, row.add($lanes))
                    } else {
                        $zero()
                    };
                    for r in 0..R {
                        let x = $set1(*at.a.add((i + r) * at.rsa + kk * at.csa));
                        acc0[r] = $fmadd(x, b0, acc0[r]);
                        if two {
                            acc1[r] = $fmadd(x, b1, acc1[r]);
                        }
                    }
                }
                for r in 0..R {
                    let out = at.c.add((i + r) * at.ldc + at.j);
                    let (mut v0, mut v1) = (acc0[r], acc1[r]);
                    if at.accumulate {
                        v0 = $add($load(m0, out), v0);
                        if two {
                            v1 = $add($load(m1, out.add($lanes)), v1);
                        }
                    }
                    $store(out, m0, v0);
                    if two {
                        $store(out.add($lanes), m1, v1);
                    }
                }
            }
        };
    }

    /// One kind of transpose per element type: `$lanes x $lanes` tiles transposed in
    /// registers by `$tile`.
    macro_rules! transpose {
        ($name:ident, $tile:ident, $t:ty, $mask:ty, $lanes:expr,
         $zero:ident, $load:ident, $store:ident) => {
            /// Transposes the `n x k` matrix `src` (row stride `ld`) into `dst` (`k x n`,
            /// rows of `n`), a tile at a time: masked loads of up to `lanes` rows of `src`,
            /// shuffles, masked stores.
            #[target_feature(enable = "avx512f")]
            pub(super) unsafe fn $name(
                (n, k): (usize, usize),
                src: *const $t,
                ld: usize,
                dst: *mut $t,
            ) {
                let mask = |w: usize| -> $mask {
                    if w >= $lanes {
                        <$mask>::MAX
                    } else {
                        ((1u32 << w) - 1) as $mask
                    }
                };
                for j0 in (0..n).step_by($lanes) {
                    let rows_here = (n - j0).min($lanes);
                    for k0 in (0..k).step_by($lanes) {
                        let cols = (k - k0).min($lanes);
                        // Constant trip counts and masks (empty past the edge, where nothing
                        // is read or written) keep every tile in registers.
                        let mut r = [$zero(); $lanes];
                        for (i, v) in r.iter_mut().enumerate() {
                            let m = if i < rows_here { mask(cols) } else { 0 };
                            *v = $load(m, src.wrapping_add((j0 + i) * ld + k0));
                        }
                        for (kk, v) in $tile(&r).iter().enumerate() {
                            let m = if kk < cols { mask(rows_here) } else { 0 };
                            $store(dst.wrapping_add((k0 + kk) * n + j0), m, *v);
                        }
                    }
                }
            }
        };
    }

    /// A 16 x 16 tile of f32 transposed: pairs of 32-bit elements, 64-bit pairs, then
    /// 128-bit lanes twice.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn tile_f32(r: &[__m512; 16]) -> [__m512; 16] {
        let mut t = [_mm512_setzero_ps(); 16];
        for p in 0..8 {
            t[2 * p] = _mm512_unpacklo_ps(r[2 * p], r[2 * p + 1]);
            t[2 * p + 1] = _mm512_unpackhi_ps(r[2 * p], r[2 * p + 1]);
        }
        // u[4g + c] holds, in each 128-bit lane L, column 4L + c of rows 4g..4g + 4.
        let mut u = [_mm512_setzero_ps(); 16];
        for g in 0..4 {
            let (lo, hi) = (_mm512_castps_pd(t[4 * g]), _mm512_castps_pd(t[4 * g + 2]));
            let (lo1, hi1) = (
                _mm512_castps_pd(t[4 * g + 1]),
                _mm512_castps_pd(t[4 * g + 3]),
            );
            u[4 * g] = _mm512_castpd_ps(_mm512_unpacklo_pd(lo, hi));
            u[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(lo, hi));
            u[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(lo1, hi1));
            u[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(lo1, hi1));
        }
        // Column 4L + c gathers lane L of u[c], u[4 + c], u[8 + c], u[12 + c].
        let mut out = [_mm512_setzero_ps(); 16];
        for c in 0..4 {
            let v0 = _mm512_shuffle_f32x4::<0x88>(u[c], u[4 + c]);
            let v1 = _mm512_shuffle_f32x4::<0xdd>(u[c], u[4 + c]);
            let v2 = _mm512_shuffle_f32x4::<0x88>(u[8 + c], u[12 + c]);
            let v3 = _mm512_shuffle_f32x4::<0xdd>(u[8 + c], u[12 + c]);
            out[c] = _mm512_shuffle_f32x4::<0x88>(v0, v2);
            out[8 + c] = _mm512_shuffle_f32x4::<0xdd>(v0, v2);
            out[4 + c] = _mm512_shuffle_f32x4::<0x88>(v1, v3);
            out[12 + c] = _mm512_shuffle_f32x4::<0xdd>(v1, v3);
        }
        out
    }

    /// An 8 x 8 tile of f64 transposed: pairs, then 128-bit lanes twice.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn tile_f64(r: &[__m512d; 8]) -> [__m512d; 8] {
        // t[2g + c] holds, in each 128-bit lane L, column 2L + c of rows 2g, 2g + 1.
        let mut t = [_mm512_setzero_pd(); 8];
        for g in 0..4 {
            t[2 * g] = _mm512_unpacklo_pd(r[2 * g], r[2 * g + 1]);
            t[2 * g + 1] = _mm512_unpackhi_pd(r[2 * g], r[2 * g + 1]);
        }
        let mut out = [_mm512_setzero_pd(); 8];
        for c in 0..2 {
            let v0 = _mm512_shuffle_f64x2::<0x88>(t[c], t[2 + c]);
            let v1 = _mm512_shuffle_f64x2::<0xdd>(t[c], t[2 + c]);
            let v2 = _mm512_shuffle_f64x2::<0x88>(t[4 + c], t[6 + c]);
            let v3 = _mm512_shuffle_f64x2::<0xdd>(t[4 + c], t[6 + c]);
            out[c] = _mm512_shuffle_f64x2::<0x88>(v0, v2);
            out[4 + c] = _mm512_shuffle_f64x2::<0xdd>(v0, v2);
            out[2 + c] = _mm512_shuffle_f64x2::<0x88>(v1, v3);
            out[6 + c] = _mm512_shuffle_f64x2::<0xdd>(v1, v3);
        }
        out
    }

    transpose!(
        transpose_f32,
        tile_f32,
        f32,
        __mmask16,
        16,
        _mm512_setzero_ps,
        _mm512_maskz_loadu_ps,
        _mm512_mask_storeu_ps
    );
    transpose!(
        transpose_f64,
        tile_f64,
        f64,
        __mmask8,
        8,
        _mm512_setzero_pd,
        _mm512_maskz_loadu_pd,
        _mm512_mask_storeu_pd
    );

    kernel!(
        product_f32,
        block_f32,
        half_f32,
        f32,
        __mmask16,
        16,
        _mm512_setzero_ps,
        _mm512_maskz_loadu_ps,
        _mm512_mask_storeu_ps,
        _mm512_set1_ps,
        _mm512_fmadd_ps,
        _mm512_add_ps,
        __mmask8,
        _mm256_setzero_ps,
        _mm256_maskz_loadu_ps,
        _mm256_mask_storeu_ps,
        _mm256_set1_ps,
        _mm256_fmadd_ps,
        _mm256_add_ps
    );
    kernel!(
        product_f64,
        block_f64,
        half_f64,
        f64,
        __mmask8,
        8,
        _mm512_setzero_pd,
        _mm512_maskz_loadu_pd,
        _mm512_mask_storeu_pd,
        _mm512_set1_pd,
        _mm512_fmadd_pd,
        _mm512_add_pd,
        __mmask8,
        _mm256_setzero_pd,
        _mm256_maskz_loadu_pd,
        _mm256_mask_storeu_pd,
        _mm256_set1_pd,
        _mm256_fmadd_pd,
        _mm256_add_pd
    );
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::super::kernels::{lane_mask32, lane_mask64};
    use super::Block;

    /// One kernel per element type on 256-bit vectors of `$lanes` elements; a block's
    /// edge columns are loaded with lane masks and stored through a stack buffer (AMD's
    /// masked stores are slow).
    macro_rules! kernel {
        ($product:ident, $rows:ident, $block:ident, $part:ident, $store:ident, $t:ty, $v:ty, $lanes:expr,
         $zero:ident, $loadu:ident, $storeu:ident, $maskload:ident, $mask:ident,
         $set1:ident, $fmadd:ident, $add:ident) => {
            /// `c = a b` (`+= ` when `accumulate`): `a` `m x k` at `(i, k) -> i * rsa + k * csa`,
            /// `b` `k x n` with row stride `rsb` and unit column stride, `c` row-major `m x n`.
            ///
            /// # Safety
            /// The pointers cover those views; the CPU has AVX2 and FMA.
            #[target_feature(enable = "avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            pub(super) unsafe fn $product(
                (m, n, k): (usize, usize, usize),
                a: *const $t,
                rsa: usize,
                csa: usize,
                b: *const $t,
                rsb: usize,
                c: *mut $t,
                accumulate: bool,
            ) {
                let mut j = 0;
                while j < n {
                    let width = (n - j).min(2 * $lanes);
                    let at = Block {
                        j,
                        k,
                        a,
                        rsa,
                        csa,
                        b,
                        rsb,
                        c,
                        ldc: n,
                        edges: ((width - 1) % $lanes + 1, $mask((width - 1) % $lanes + 1)),
                        accumulate,
                    };
                    let two = width > $lanes;
                    let edge = width % $lanes != 0;
                    // Row blocks of equal height: 6 rows of two vectors are 12 accumulators,
                    // and with the two rows of `b` and the broadcast they fill the 16
                    // registers; a masked edge needs one more, so 5 rows there.
                    let rows = if two && edge { 5 } else { 6 };
                    let height = m.div_ceil(m.div_ceil(rows));
                    let mut i = 0;
                    while i < m {
                        let r = height.min(m - i);
                        match (two, edge) {
                            (true, false) => $rows::<true, false>(r, &at, i),
                            (true, true) => $rows::<true, true>(r, &at, i),
                            (false, false) => $rows::<false, false>(r, &at, i),
                            (false, true) => $rows::<false, true>(r, &at, i),
                        }
                        i += height;
                    }
                    j += 2 * $lanes;
                }
            }

            /// `$block` for `r` (at most 6) rows.
            #[target_feature(enable = "avx2,fma")]
            #[inline]
            unsafe fn $rows<const TWO: bool, const EDGE: bool>(
                r: usize,
                at: &Block<$t, (usize, __m256i)>,
                i: usize,
            ) {
                match r {
                    1 => $block::<1, TWO, EDGE>(at, i),
                    2 => $block::<2, TWO, EDGE>(at, i),
                    3 => $block::<3, TWO, EDGE>(at, i),
                    4 => $block::<4, TWO, EDGE>(at, i),
                    5 => $block::<5, TWO, EDGE>(at, i),
                    _ => $block::<6, TWO, EDGE>(at, i),
                }
            }

            /// A vector at `p`: all lanes, or with `EDGE` the first `w` (`mask` selects
            /// them) and zeros.
            #[target_feature(enable = "avx2,fma")]
            #[inline]
            unsafe fn $part<const EDGE: bool>(p: *const $t, mask: __m256i) -> $v {
                if EDGE {
                    $maskload(p, mask)
                } else {
                    $loadu(p)
                }
            }

            /// Stores `v` at `p`: all lanes, or with `EDGE` the first `w`, through a stack
            /// buffer.
            #[target_feature(enable = "avx2,fma")]
            #[inline]
            unsafe fn $store<const EDGE: bool>(p: *mut $t, w: usize, v: $v) {
                if EDGE {
                    let mut lanes = [<$t>::default(); $lanes];
                    $storeu(lanes.as_mut_ptr(), v);
                    std::ptr::copy_nonoverlapping(lanes.as_ptr(), p, w);
                } else {
                    $storeu(p, v);
                }
            }

            /// Rows `i..i + R` of the one or (`TWO`) two vectors of columns from `at.j`,
            /// the last of them partial with `EDGE`.
            #[target_feature(enable = "avx2,fma")]
            #[inline]
            unsafe fn $block<const R: usize, const TWO: bool, const EDGE: bool>(
                at: &Block<$t, (usize, __m256i)>,
                i: usize,
            ) {
                let (w, mask) = at.edges;
                let mut acc0 = [$zero(); R];
                let mut acc1 = [$zero(); R];
                for kk in 0..at.k {
                    let row = at.b.add(kk * at.rsb + at.j);
                    let (b0, b1) = if TWO {
                        ($loadu(row), $part::<EDGE>(row.add($lanes), mask))
                    } else {
                        ($part::<EDGE>(row, mask), $zero())
                    };
                    for r in 0..R {
                        let x = $set1(*at.a.add((i + r) * at.rsa + kk * at.csa));
                        acc0[r] = $fmadd(x, b0, acc0[r]);
                        if TWO {
                            acc1[r] = $fmadd(x, b1, acc1[r]);
                        }
                    }
                }
                for r in 0..R {
                    let out = at.c.add((i + r) * at.ldc + at.j);
                    if TWO {
                        let (o0, o1) = (out, out.add($lanes));
                        let (mut v0, mut v1) = (acc0[r], acc1[r]);
                        if at.accumulate {
                            v0 = $add($loadu(o0), v0);
                            v1 = $add($part::<EDGE>(o1, mask), v1);
                        }
                        $storeu(o0, v0);
                        $store::<EDGE>(o1, w, v1);
                    } else {
                        let mut v0 = acc0[r];
                        if at.accumulate {
                            v0 = $add($part::<EDGE>(out, mask), v0);
                        }
                        $store::<EDGE>(out, w, v0);
                    }
                }
            }
        };
    }

    kernel!(
        product_f32,
        rows_f32,
        block_f32,
        part_f32,
        store_f32,
        f32,
        __m256,
        8,
        _mm256_setzero_ps,
        _mm256_loadu_ps,
        _mm256_storeu_ps,
        _mm256_maskload_ps,
        lane_mask32,
        _mm256_set1_ps,
        _mm256_fmadd_ps,
        _mm256_add_ps
    );
    kernel!(
        product_f64,
        rows_f64,
        block_f64,
        part_f64,
        store_f64,
        f64,
        __m256d,
        4,
        _mm256_setzero_pd,
        _mm256_loadu_pd,
        _mm256_storeu_pd,
        _mm256_maskload_pd,
        lane_mask64,
        _mm256_set1_pd,
        _mm256_fmadd_pd,
        _mm256_add_pd
    );

    /// One kind of transpose per element type: whole `$lanes x $lanes` tiles in registers
    /// by `$tile`, the ragged edges element by element.
    macro_rules! transpose {
        ($name:ident, $tile:ident, $t:ty, $v:ty, $lanes:expr, $zero:ident, $loadu:ident,
         $storeu:ident) => {
            /// Transposes the `n x k` matrix `src` (row stride `ld`) into `dst` (`k x n`,
            /// rows of `n`).
            #[target_feature(enable = "avx2")]
            pub(super) unsafe fn $name(
                (n, k): (usize, usize),
                src: *const $t,
                ld: usize,
                dst: *mut $t,
            ) {
                let (n_tiled, k_tiled) = (n - n % $lanes, k - k % $lanes);
                for j0 in (0..n_tiled).step_by($lanes) {
                    for k0 in (0..k_tiled).step_by($lanes) {
                        let mut r = [$zero(); $lanes];
                        for (i, v) in r.iter_mut().enumerate() {
                            *v = $loadu(src.add((j0 + i) * ld + k0));
                        }
                        for (kk, v) in $tile(&r).iter().enumerate() {
                            $storeu(dst.add((k0 + kk) * n + j0), *v);
                        }
                    }
                }
                for j in 0..n {
                    let from = if j < n_tiled { k_tiled } else { 0 };
                    for kk in from..k {
                        *dst.add(kk * n + j) = *src.add(j * ld + kk);
                    }
                }
            }
        };
    }

    /// An 8 x 8 tile of f32 transposed: pairs of elements, pairs of pairs, then the
    /// 128-bit halves.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn tile_f32(r: &[__m256; 8]) -> [__m256; 8] {
        let mut t = [_mm256_setzero_ps(); 8];
        for p in 0..4 {
            t[2 * p] = _mm256_unpacklo_ps(r[2 * p], r[2 * p + 1]);
            t[2 * p + 1] = _mm256_unpackhi_ps(r[2 * p], r[2 * p + 1]);
        }
        // u[4g + c] holds, in each 128-bit half H, column 4H + c of rows 4g..4g + 4.
        let mut u = [_mm256_setzero_ps(); 8];
        for g in 0..2 {
            let (lo, hi) = (t[4 * g], t[4 * g + 2]);
            let (lo1, hi1) = (t[4 * g + 1], t[4 * g + 3]);
            u[4 * g] = _mm256_shuffle_ps::<0x44>(lo, hi);
            u[4 * g + 1] = _mm256_shuffle_ps::<0xee>(lo, hi);
            u[4 * g + 2] = _mm256_shuffle_ps::<0x44>(lo1, hi1);
            u[4 * g + 3] = _mm256_shuffle_ps::<0xee>(lo1, hi1);
        }
        let mut out = [_mm256_setzero_ps(); 8];
        for c in 0..4 {
            out[c] = _mm256_permute2f128_ps::<0x20>(u[c], u[4 + c]);
            out[4 + c] = _mm256_permute2f128_ps::<0x31>(u[c], u[4 + c]);
        }
        out
    }

    /// A 4 x 4 tile of f64 transposed: pairs, then the 128-bit halves.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn tile_f64(r: &[__m256d; 4]) -> [__m256d; 4] {
        let t = [
            _mm256_unpacklo_pd(r[0], r[1]),
            _mm256_unpackhi_pd(r[0], r[1]),
            _mm256_unpacklo_pd(r[2], r[3]),
            _mm256_unpackhi_pd(r[2], r[3]),
        ];
        [
            _mm256_permute2f128_pd::<0x20>(t[0], t[2]),
            _mm256_permute2f128_pd::<0x20>(t[1], t[3]),
            _mm256_permute2f128_pd::<0x31>(t[0], t[2]),
            _mm256_permute2f128_pd::<0x31>(t[1], t[3]),
        ]
    }

    transpose!(
        transpose_f32,
        tile_f32,
        f32,
        __m256,
        8,
        _mm256_setzero_ps,
        _mm256_loadu_ps,
        _mm256_storeu_ps
    );
    transpose!(
        transpose_f64,
        tile_f64,
        f64,
        __m256d,
        4,
        _mm256_setzero_pd,
        _mm256_loadu_pd,
        _mm256_storeu_pd
    );
}

#[cfg(test)]
mod tests {
    use super::{available_isas, small_product, Strided};

    /// Each product element as the kernel defines it: fused multiply-adds over `k` in
    /// order from zero, then added to the old value when accumulating.
    fn reference<T: candle_core::WithDType + FusedMulAdd>(
        (m, n, k): (usize, usize, usize),
        a: Strided<'_, T>,
        b: Strided<'_, T>,
        dst: &mut [T],
        accumulate: bool,
    ) {
        for i in 0..m {
            for j in 0..n {
                let mut acc = T::from_f64(0.0);
                for kk in 0..k {
                    let x = a.data[i * a.row_stride + kk * a.col_stride];
                    acc = x.mul_add(b.data[kk * b.row_stride + j * b.col_stride], acc);
                }
                dst[i * n + j] = if accumulate {
                    dst[i * n + j] + acc
                } else {
                    acc
                };
            }
        }
    }

    trait FusedMulAdd {
        fn mul_add(self, b: Self, c: Self) -> Self;
    }
    impl FusedMulAdd for f32 {
        fn mul_add(self, b: f32, c: f32) -> f32 {
            f32::mul_add(self, b, c)
        }
    }
    impl FusedMulAdd for f64 {
        fn mul_add(self, b: f64, c: f64) -> f64 {
            f64::mul_add(self, b, c)
        }
    }

    fn check<T: candle_core::WithDType + FusedMulAdd>() {
        let mut seed = 7u64;
        let mut next = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            T::from_f64((seed >> 11) as f64 / (1u64 << 53) as f64 - 0.5)
        };
        let mut taken = 0;
        for (m, n, k) in [
            (10, 40, 40),
            (1, 8, 1),
            (7, 33, 5),
            (4, 16, 128),
            (9, 47, 64),
            (3, 17, 33),
            (12, 100, 20),
            (6, 8, 3),
            (13, 24, 9),
            (5, 4, 17),
            (2, 3, 1),
            (10, 1, 40),
            (33, 1, 7),
            (2, 1, 1),
        ] {
            // `a` row-major or transposed in memory.
            for a_transposed in [false, true] {
                let a: Vec<T> = (0..m * k).map(|_| next()).collect();
                let a_view = if a_transposed {
                    Strided {
                        data: &a,
                        row_stride: 1,
                        col_stride: m,
                    }
                } else {
                    Strided::rows(&a, k)
                };
                // `b` with padded rows, or transposed in memory with padded columns.
                let b: Vec<T> = (0..(k + 3) * (n + 3)).map(|_| next()).collect();
                for b_view in [
                    Strided {
                        data: &b,
                        row_stride: n + 3,
                        col_stride: 1,
                    },
                    Strided {
                        data: &b,
                        row_stride: 1,
                        col_stride: k + 3,
                    },
                ] {
                    for (isa, accumulate) in available_isas().flat_map(|i| [(i, false), (i, true)])
                    {
                        let start: Vec<T> = (0..m * n).map(|_| next()).collect();
                        let (mut fast, mut slow) = (start.clone(), start);
                        // SAFETY: the views cover `m x k` and `k x n`; `fast` holds `m * n`;
                        // the CPU has `isa`.
                        let took = unsafe {
                            small_product(
                                isa,
                                (m, n, k),
                                a_view,
                                b_view,
                                fast.as_mut_ptr(),
                                accumulate,
                            )
                        };
                        reference((m, n, k), a_view, b_view, &mut slow, accumulate);
                        if took {
                            taken += 1;
                            let same = fast
                                .iter()
                                .zip(&slow)
                                .all(|(x, y)| x.to_f64().to_bits() == y.to_f64().to_bits());
                            assert!(
                                same,
                                "{isa:?} {:?} {m}x{k}x{n} accumulate {accumulate}",
                                T::DTYPE
                            );
                        }
                    }
                }
            }
        }
        if available_isas().next().is_some() {
            assert!(taken > 0, "the kernel took no product on a CPU it runs on");
        }
    }

    /// The kernel equals the in-order fused multiply-add definition bit for bit, in f32
    /// and f64, on every instruction set the CPU has, with strided left operands, padded
    /// right rows and accumulation.
    #[test]
    fn small_products_equal_the_in_order_definition() {
        check::<f32>();
        check::<f64>();
    }
}
