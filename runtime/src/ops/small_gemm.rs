//! Small matrix products on AVX-512 without gemm's per-call set-up.
//!
//! A task-batched MAML step makes thousands of gemm calls on matrices of a few dozen rows
//! (one per task per product), and gemm's packing and buffer set-up cost more than the
//! arithmetic at that size. This kernel reads the right operand's rows in place (it must
//! have unit column stride) and keeps a block of up to 8 rows by 2 vectors of the
//! product in registers. Each element of the product is the same sequence of fused multiply-adds over
//! `k` that gemm's kernels compute, so the results equal gemm's bit for bit (tested against
//! candle's matmul); products it does not take (right operand transposed, one row, narrow,
//! shallow, deep, large, or no AVX-512) go to gemm.

use candle_core::WithDType;

use super::cpu_gemm::Strided;

/// The depths taken: gemm splits deeper products into blocks, and computes depths of 1
/// and 2 as outer products (`gevv`); both round differently from one in-order pass.
const DEPTHS: std::ops::RangeInclusive<usize> = 3..=128;
/// The largest product taken, in multiply-adds (gemm's own single-thread threshold).
const MAX_SIZE: usize = 48 * 48 * 256;

/// `dst = lhs * rhs` (or `dst += ..` when `accumulate`) through the AVX-512 kernel when
/// it applies; `false` (nothing written) when it does not.
///
/// # Safety
/// `lhs` and `rhs` hold their `m x k` and `k x n` views, and `dst` points at `m * n`
/// writable row-major elements, initialised when `accumulate`.
pub(crate) unsafe fn try_small_product<T: WithDType>(
    (m, n, k): (usize, usize, usize),
    lhs: Strided<'_, T>,
    rhs: Strided<'_, T>,
    dst: *mut T,
    accumulate: bool,
) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let lanes = 64 / std::mem::size_of::<T>();
        // gemm's matrix-vector paths (one row or one column) sum in another order, and a
        // product must round the same whichever kernel takes it: a task-batched layer and
        // its loop over tasks form some products in transposed orientations.
        let applies = rhs.col_stride == 1
            && m >= 2
            && n >= lanes / 2
            && DEPTHS.contains(&k)
            && m * n * k <= MAX_SIZE
            && std::arch::is_x86_feature_detected!("avx512f");
        if !applies {
            return false;
        }
        let (a, b) = (lhs.data.as_ptr(), rhs.data.as_ptr());
        let (rsa, csa, rsb) = (lhs.row_stride, lhs.col_stride, rhs.row_stride);
        match T::DTYPE {
            candle_core::DType::F32 => {
                avx512::product_f32(
                    (m, n, k),
                    a.cast(),
                    rsa,
                    csa,
                    b.cast(),
                    rsb,
                    dst.cast(),
                    accumulate,
                );
                true
            }
            candle_core::DType::F64 => {
                avx512::product_f64(
                    (m, n, k),
                    a.cast(),
                    rsa,
                    csa,
                    b.cast(),
                    rsb,
                    dst.cast(),
                    accumulate,
                );
                true
            }
            _ => false,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = ((m, n, k), lhs, rhs, dst, accumulate);
        false
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// One kernel per element type: `$lanes` elements per vector, `$mask` the lane mask.
    macro_rules! kernel {
        ($product:ident, $block:ident, $t:ty, $mask:ty, $lanes:expr,
         $zero:ident, $load:ident, $store:ident, $set1:ident, $fmadd:ident, $add:ident) => {
            /// `c = a b` (`+= ` when `accumulate`): `a` `m x k` at `(i, k) -> i * rsa + k * csa`,
            /// `b` `k x n` with row stride `rsb` and unit column stride, `c` row-major `m x n`.
            ///
            /// # Safety
            /// The pointers cover those views; the CPU has AVX-512F.
            #[target_feature(enable = "avx512f")]
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
                        masks,
                        accumulate,
                    };
                    // Row blocks of equal height, at most 8: 8 to 16 independent
                    // accumulator chains hide the fused multiply-add latency.
                    let height = m.div_ceil(m.div_ceil(8));
                    let mut i = 0;
                    while i < m {
                        match height.min(m - i) {
                            1 => $block::<1>(&at, i),
                            2 => $block::<2>(&at, i),
                            3 => $block::<3>(&at, i),
                            4 => $block::<4>(&at, i),
                            5 => $block::<5>(&at, i),
                            6 => $block::<6>(&at, i),
                            7 => $block::<7>(&at, i),
                            _ => $block::<8>(&at, i),
                        }
                        i += height;
                    }
                    j += 2 * $lanes;
                }
            }

            /// Rows `i..i + R` of columns `at.j..at.j + 2 * lanes` (masked at the edge).
            #[target_feature(enable = "avx512f")]
            #[inline]
            unsafe fn $block<const R: usize>(at: &Block<$t, $mask>, i: usize) {
                let (m0, m1) = at.masks;
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

    /// The operands of one column block.
    struct Block<T, M> {
        j: usize,
        k: usize,
        a: *const T,
        rsa: usize,
        csa: usize,
        b: *const T,
        rsb: usize,
        c: *mut T,
        ldc: usize,
        masks: (M, M),
        accumulate: bool,
    }

    kernel!(
        product_f32,
        block_f32,
        f32,
        __mmask16,
        16,
        _mm512_setzero_ps,
        _mm512_maskz_loadu_ps,
        _mm512_mask_storeu_ps,
        _mm512_set1_ps,
        _mm512_fmadd_ps,
        _mm512_add_ps
    );
    kernel!(
        product_f64,
        block_f64,
        f64,
        __mmask8,
        8,
        _mm512_setzero_pd,
        _mm512_maskz_loadu_pd,
        _mm512_mask_storeu_pd,
        _mm512_set1_pd,
        _mm512_fmadd_pd,
        _mm512_add_pd
    );
}

#[cfg(test)]
mod tests {
    use super::{try_small_product, Strided};

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
                    acc = x.mul_add(b.data[kk * b.row_stride + j], acc);
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
        ] {
            // `a` row-major or transposed in memory; `b` with padded rows.
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
                let b: Vec<T> = (0..k * (n + 3)).map(|_| next()).collect();
                let b_view = Strided {
                    data: &b,
                    row_stride: n + 3,
                    col_stride: 1,
                };
                for accumulate in [false, true] {
                    let start: Vec<T> = (0..m * n).map(|_| next()).collect();
                    let (mut fast, mut slow) = (start.clone(), start);
                    // SAFETY: the views cover `m x k` and `k x n`; `fast` holds `m * n`.
                    let took = unsafe {
                        try_small_product((m, n, k), a_view, b_view, fast.as_mut_ptr(), accumulate)
                    };
                    reference((m, n, k), a_view, b_view, &mut slow, accumulate);
                    if took {
                        taken += 1;
                        let same = fast
                            .iter()
                            .zip(&slow)
                            .all(|(x, y)| x.to_f64().to_bits() == y.to_f64().to_bits());
                        assert!(same, "{:?} {m}x{k}x{n} accumulate {accumulate}", T::DTYPE);
                    }
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            assert!(
                taken > 0,
                "the kernel took no product on an AVX-512 machine"
            );
        }
        let _ = taken;
    }

    /// The kernel equals the in-order fused multiply-add definition bit for bit, in f32
    /// and f64, with strided left operands, padded right rows and accumulation.
    #[test]
    fn small_products_equal_the_in_order_definition() {
        check::<f32>();
        check::<f64>();
    }
}
