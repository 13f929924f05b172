//! Per-channel ops for batch normalisation, fused so that a full-size tensor is read once
//! per reduction and written once per result.
//!
//! A full tensor is viewed as `[G, N, C, S]`: `G` task groups (the leading task axis of a
//! task-batched input, else 1), a batch of `N`, `C` channels and `S` positions (the product
//! of the trailing dims). A per-channel tensor holds `G * C` values, one per group and
//! channel, in the layer's statistics shape (`[T, C]` or `[C]`). The ops:
//! - `channel_sum(u)`: `sum over n, s of u`, per channel;
//! - `channel_dot(u, mu, v, mv)`: `sum over n, s of (u - mu) (v - mv)`, per channel (the
//!   centers optional);
//! - `channel_affine([(x1, m1, a1), (x2, m2, a2)], b)`: `(x1 - m1) a1 + (x2 - m2) a2 + b`
//!   elementwise with per-channel `m`, `a`, `b` (one or two terms; `m` and `b` optional);
//! - `channel_expand(v)`: a per-channel tensor broadcast to the full shape (a view).
//!
//! Each one's VJP is made of the same ops (the family is closed: the adjoint of a sum is
//! an expand and back, of an affine a dot and an affine, of a dot two affines), so every
//! order of derivative is exact. [`batch_norm_train`] is batch normalisation with the
//! batch's statistics as one recorded op whose VJP is written with these ops: its first-order
//! backward writes one full-size tensor (the textbook `dx` in one fused pass) where the
//! composition of elementwise ops wrote a dozen.
//!
//! On the CPU fast paths (f32, f64) the ops are direct loops: reductions accumulate in f64
//! in 32 lanes per row (AVX-512 where the CPU has it, the same operations), in an order fixed by `N` and `S` alone, so a task's statistics are
//! the same bits whether it is normalised alone or with other tasks. Elsewhere (other devices
//! and dtypes, or `CANDLE_HIGHER_KERNELS=candle`) they are candle ops, the trailing
//! positions summed first, also per group alone.

use std::sync::Arc;

use candle_core::{DType, Tensor as Value, WithDType};

use super::kernels::{cpu_fast_paths, with_cpu_slice};
use crate::autograd::{Backward, VjpCtx};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// How a full tensor splits into `[G, N, C, S]`, and the shape of its per-channel tensors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Channels {
    /// Dims of the full tensor.
    full: Vec<usize>,
    /// Shape of the per-channel tensors (`G * C` elements).
    stat: Vec<usize>,
    /// The full tensor's dims with 1 everywhere but the group and channel dims.
    keep: Vec<usize>,
    g: usize,
    n: usize,
    c: usize,
    s: usize,
}

impl Channels {
    /// The layout of `full` (`[T, N, C, ..]` when `tasks`, else `[N, C, ..]`) with
    /// per-channel tensors of shape `stat`; an error when the shapes do not fit.
    pub(crate) fn new(full: &[usize], tasks: bool, stat: &[usize]) -> Result<Arc<Channels>> {
        let lead = usize::from(tasks);
        if full.len() < lead + 2 {
            return Err(Error::ShapeMismatch {
                op: "channel op",
                expected: format!("rank at least {}", lead + 2),
                got: full.to_vec(),
            });
        }
        let g = if tasks { full[0] } else { 1 };
        let (n, c) = (full[lead], full[lead + 1]);
        let s = full[lead + 2..].iter().product();
        if stat.iter().product::<usize>() != g * c {
            return Err(Error::ShapeMismatch {
                op: "channel op",
                expected: format!("per-channel statistics of {} elements", g * c),
                got: stat.to_vec(),
            });
        }
        let mut keep = vec![1; full.len()];
        keep[lead + 1] = c;
        if tasks {
            keep[0] = g;
        }
        Ok(Arc::new(Channels {
            full: full.to_vec(),
            stat: stat.to_vec(),
            keep,
            g,
            n,
            c,
            s,
        }))
    }

    /// Values summed per channel: `N * S`.
    pub(crate) fn count(&self) -> usize {
        self.n * self.s
    }

    fn grouped(&self) -> (usize, usize, usize, usize) {
        (self.g, self.n, self.c, self.s)
    }

    /// A per-channel value as `[G, 1, C, 1]`, to broadcast against the grouped view.
    fn per_channel_4d(&self, v: &Value) -> Result<Value> {
        Ok(v.reshape((self.g, 1, self.c, 1))?)
    }
}

/// Whether the direct loops run for these values.
fn fast(values: &[&Value]) -> bool {
    cpu_fast_paths()
        && values
            .iter()
            .all(|v| v.device().is_cpu() && matches!(v.dtype(), DType::F32 | DType::F64))
}

/// The elements of a small per-channel tensor.
fn per_channel<T: WithDType>(v: &Value) -> Result<Vec<T>> {
    Ok(v.flatten_all()?.to_vec1::<T>()?)
}

fn cpu_tensor<T: WithDType>(data: Vec<T>, shape: &[usize]) -> Result<Value> {
    Ok(Value::from_vec(data, shape, &candle_core::Device::Cpu)?)
}

/// Lanes of a reduction: independent partial sums, combined at the end (four vectors of
/// f64, so that no add waits for the one before).
const LANES: usize = 32;

/// `lanes[i] += (u[j] - mu)` as f64 for each `j` with `j % LANES == i`, in order of `j`; with
/// `v`, `+= (u[j] - mu) (v[j] - mv)`, the factors rounded to f64 before the product.
/// AVX-512 for f32 and f64 (the same operations, so the same bits; a tenth of an Omniglot
/// meta-iteration was BatchNorm's sums when the compiler left this loop scalar).
#[inline(always)]
fn accumulate_row<T: WithDType>(lanes: &mut [f64; LANES], u: &[T], mu: T, v: Option<(&[T], T)>) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") && v.is_none_or(|(v, _)| v.len() == u.len()) {
        // SAFETY: the dtype check makes the casts exact; the CPU has AVX-512F; the slices
        // have equal lengths.
        unsafe {
            match T::DTYPE {
                DType::F32 => {
                    let cast =
                        |x: &[T]| std::slice::from_raw_parts(x.as_ptr().cast::<f32>(), x.len());
                    let v = v.map(|(v, mv)| (cast(v), mv.to_f64() as f32));
                    return lanes_avx512::row_f32(lanes, cast(u), mu.to_f64() as f32, v);
                }
                DType::F64 => {
                    let cast =
                        |x: &[T]| std::slice::from_raw_parts(x.as_ptr().cast::<f64>(), x.len());
                    let v = v.map(|(v, mv)| (cast(v), mv.to_f64()));
                    return lanes_avx512::row_f64(lanes, cast(u), mu.to_f64(), v);
                }
                _ => {}
            }
        }
    }
    accumulate_row_scalar(lanes, u, mu, v)
}

/// [`accumulate_row`] as its definition reads, for any element type.
#[inline(always)]
fn accumulate_row_scalar<T: WithDType>(
    lanes: &mut [f64; LANES],
    u: &[T],
    mu: T,
    v: Option<(&[T], T)>,
) {
    let (chunks, tail) = u.as_chunks::<LANES>();
    match v {
        None => {
            for chunk in chunks {
                for i in 0..LANES {
                    lanes[i] += (chunk[i] - mu).to_f64();
                }
            }
            for (l, &x) in lanes.iter_mut().zip(tail) {
                *l += (x - mu).to_f64();
            }
        }
        Some((v, mv)) => {
            let (vchunks, vtail) = v.as_chunks::<LANES>();
            let term = |a: T, b: T| (a - mu).to_f64() * (b - mv).to_f64();
            for (cu, cv) in chunks.iter().zip(vchunks) {
                for i in 0..LANES {
                    lanes[i] += term(cu[i], cv[i]);
                }
            }
            for ((l, &a), &b) in lanes.iter_mut().zip(tail).zip(vtail) {
                *l += term(a, b);
            }
        }
    }
}

/// [`accumulate_row`] on AVX-512, the tail with masked loads and additions.
#[cfg(target_arch = "x86_64")]
mod lanes_avx512 {
    use std::arch::x86_64::*;

    use super::LANES;

    /// Four f64 vectors of `(x - m)` from 32 f32 at `p`, the subtraction in f32.
    #[target_feature(enable = "avx512f")]
    unsafe fn centered_f32(p: *const f32, m: __m512) -> [__m512d; 4] {
        widened(
            _mm512_sub_ps(_mm512_loadu_ps(p), m),
            _mm512_sub_ps(_mm512_loadu_ps(p.add(16)), m),
        )
    }

    /// Two vectors of 16 f32 as four of 8 f64, in order.
    #[target_feature(enable = "avx512f")]
    unsafe fn widened(x0: __m512, x1: __m512) -> [__m512d; 4] {
        let halves = |x: __m512| {
            (
                _mm512_cvtps_pd(_mm512_castps512_ps256(x)),
                _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(
                    _mm512_castps_pd(x),
                ))),
            )
        };
        let ((a, b), (c, d)) = (halves(x0), halves(x1));
        [a, b, c, d]
    }

    /// Four f64 vectors of `(x - m)` from 32 f64 at `p`.
    #[target_feature(enable = "avx512f")]
    unsafe fn centered_f64(p: *const f64, m: __m512d) -> [__m512d; 4] {
        [0, 8, 16, 24].map(|o| _mm512_sub_pd(_mm512_loadu_pd(p.add(o)), m))
    }

    /// [`centered_f32`] of the first `len < 32` values at `p` (the lanes past them are
    /// not read, and hold values the caller's masks leave out).
    #[target_feature(enable = "avx512f")]
    unsafe fn centered_f32_tail(p: *const f32, m: __m512, len: usize) -> [__m512d; 4] {
        let bits = (1u32 << len) - 1;
        widened(
            _mm512_sub_ps(_mm512_maskz_loadu_ps(bits as u16, p), m),
            _mm512_sub_ps(_mm512_maskz_loadu_ps((bits >> 16) as u16, p.add(16)), m),
        )
    }

    /// [`centered_f64`] of the first `len < 32` values at `p`.
    #[target_feature(enable = "avx512f")]
    unsafe fn centered_f64_tail(p: *const f64, m: __m512d, len: usize) -> [__m512d; 4] {
        let bits = (1u32 << len) - 1;
        [0, 8, 16, 24].map(|o| _mm512_sub_pd(_mm512_maskz_loadu_pd((bits >> o) as u8, p.add(o)), m))
    }

    macro_rules! row {
        ($name:ident, $t:ty, $set1:ident, $centered:ident, $tail:ident) => {
            /// # Safety
            /// The CPU has AVX-512F; `v`, when given, is as long as `u`.
            #[target_feature(enable = "avx512f")]
            pub(super) unsafe fn $name(
                lanes: &mut [f64; LANES],
                u: &[$t],
                mu: $t,
                v: Option<(&[$t], $t)>,
            ) {
                let lane = |i: usize| _mm512_loadu_pd(lanes.as_ptr().add(8 * i));
                let mut acc = [lane(0), lane(1), lane(2), lane(3)];
                let full = u.len() / LANES * LANES;
                let (m, mv) = ($set1(mu), $set1(v.map_or(0.0, |(_, mv)| mv)));
                for j in (0..full).step_by(LANES) {
                    let x = $centered(u.as_ptr().add(j), m);
                    match v {
                        None => {
                            for i in 0..4 {
                                acc[i] = _mm512_add_pd(acc[i], x[i]);
                            }
                        }
                        Some((v, _)) => {
                            let y = $centered(v.as_ptr().add(j), mv);
                            for i in 0..4 {
                                acc[i] = _mm512_add_pd(acc[i], _mm512_mul_pd(x[i], y[i]));
                            }
                        }
                    }
                }
                // The tail adds its `j`-th value to lane `j` alone, as the scalar loop
                // does: the other lanes are masked out of the additions.
                let len = u.len() - full;
                if len > 0 {
                    let bits = (1u32 << len) - 1;
                    let x = $tail(u.as_ptr().add(full), m, len);
                    let terms = match v {
                        None => x,
                        Some((v, _)) => {
                            let y = $tail(v.as_ptr().add(full), mv, len);
                            [0, 1, 2, 3].map(|i| _mm512_mul_pd(x[i], y[i]))
                        }
                    };
                    for i in 0..4 {
                        let k = (bits >> (8 * i)) as u8;
                        acc[i] = _mm512_mask_add_pd(acc[i], k, acc[i], terms[i]);
                    }
                }
                for (i, a) in acc.iter().enumerate() {
                    _mm512_storeu_pd(lanes.as_mut_ptr().add(8 * i), *a);
                }
            }
        };
    }

    row!(
        row_f32,
        f32,
        _mm512_set1_ps,
        centered_f32,
        centered_f32_tail
    );
    row!(
        row_f64,
        f64,
        _mm512_set1_pd,
        centered_f64,
        centered_f64_tail
    );
}

/// `sum over n, s of (u - mu)`, or of `(u - mu) (v - mv)` with `v`, per channel, for full
/// `[G, N, C, S]` slices and per-channel centers (`+0.0` where absent, which changes no
/// value), accumulated in f64 lanes.
fn reduce_cpu<T: WithDType>(
    ch: &Channels,
    (u, mu): (&[T], Option<&[T]>),
    v: Option<(&[T], Option<&[T]>)>,
) -> Vec<T> {
    let (g, n, c, s) = ch.grouped();
    let mut acc = vec![[0f64; LANES]; g * c];
    let center = |m: Option<&[T]>, pc: usize| m.map_or(T::zero(), |m| m[pc]);
    super::kernels::vectorized(|| {
        for gi in 0..g {
            for ni in 0..n {
                for ci in 0..c {
                    let pc = gi * c + ci;
                    let base = ((gi * n + ni) * c + ci) * s;
                    let mu = center(mu, pc);
                    let v = v.map(|(v, mv)| (&v[base..base + s], center(mv, pc)));
                    accumulate_row(&mut acc[pc], &u[base..base + s], mu, v);
                }
            }
        }
    });
    acc.iter()
        .map(|lanes| T::from_f64(lanes.iter().sum()))
        .collect()
}

/// One term `(x - m) a` of an affine: a full slice and per-channel values.
struct Term<'a, T> {
    x: &'a [T],
    m: Option<Vec<T>>,
    a: Vec<T>,
}

/// `sum of (x_i - m_i) a_i, + b` elementwise over the full `[G, N, C, S]` layout.
fn affine_cpu<T: WithDType>(ch: &Channels, terms: &[Term<'_, T>], b: Option<&[T]>) -> Vec<T> {
    let (g, n, c, s) = ch.grouped();
    let mut out = Vec::with_capacity(g * n * c * s);
    super::kernels::vectorized(|| affine_rows(ch, terms, b, &mut out));
    out
}

/// [`affine_cpu`]'s loops, appending to `out`.
#[inline(always)]
fn affine_rows<T: WithDType>(
    ch: &Channels,
    terms: &[Term<'_, T>],
    b: Option<&[T]>,
    out: &mut Vec<T>,
) {
    let (g, n, c, s) = ch.grouped();
    // Absent centers are +0.0 and an absent shift -0.0: `x - 0.0` and `y + -0.0` are `x`
    // and `y` for every value, the sign of zero included.
    let zero = T::zero();
    let no_shift = T::from_f64(-0.0);
    for gi in 0..g {
        for ni in 0..n {
            for ci in 0..c {
                let pc = gi * c + ci;
                let base = ((gi * n + ni) * c + ci) * s;
                let coef = |t: &Term<'_, T>| (t.m.as_ref().map_or(zero, |m| m[pc]), t.a[pc]);
                let shift = b.map_or(no_shift, |b| b[pc]);
                match terms {
                    [t] => {
                        let (m, a) = coef(t);
                        let x = &t.x[base..base + s];
                        out.extend(x.iter().map(|&x| (x - m) * a + shift));
                    }
                    [t1, t2] => {
                        let ((m1, a1), (m2, a2)) = (coef(t1), coef(t2));
                        let (x1, x2) = (&t1.x[base..base + s], &t2.x[base..base + s]);
                        let pairs = x1.iter().zip(x2);
                        out.extend(pairs.map(|(&x1, &x2)| (x1 - m1) * a1 + (x2 - m2) * a2 + shift));
                    }
                    _ => unreachable!("affine_value takes one or two terms"),
                }
            }
        }
    }
}

/// The value of `channel_sum`.
fn sum_value(ch: &Channels, u: &Value) -> Result<Value> {
    if fast(&[u]) {
        return match u.dtype() {
            DType::F32 => with_cpu_slice::<f32, _>(u, |u| {
                cpu_tensor(reduce_cpu(ch, (u, None), None), &ch.stat)
            }),
            _ => with_cpu_slice::<f64, _>(u, |u| {
                cpu_tensor(reduce_cpu(ch, (u, None), None), &ch.stat)
            }),
        };
    }
    let grouped = u.reshape(ch.grouped())?;
    Ok(grouped
        .sum_keepdim(3)?
        .sum_keepdim(1)?
        .reshape(ch.stat.as_slice())?)
}

/// The value of `channel_dot`.
fn dot_value(
    ch: &Channels,
    (u, mu): (&Value, Option<&Value>),
    (v, mv): (&Value, Option<&Value>),
) -> Result<Value> {
    if fast(&[u, v]) && u.dtype() == v.dtype() {
        fn run<T: WithDType>(
            ch: &Channels,
            (u, mu): (&Value, Option<&Value>),
            (v, mv): (&Value, Option<&Value>),
        ) -> Result<Value> {
            let mu = mu.map(per_channel::<T>).transpose()?;
            let mv = mv.map(per_channel::<T>).transpose()?;
            with_cpu_slice::<T, _>(u, |us| {
                with_cpu_slice::<T, _>(v, |vs| {
                    let sums = reduce_cpu(ch, (us, mu.as_deref()), Some((vs, mv.as_deref())));
                    cpu_tensor(sums, &ch.stat)
                })
            })
        }
        return match u.dtype() {
            DType::F32 => run::<f32>(ch, (u, mu), (v, mv)),
            _ => run::<f64>(ch, (u, mu), (v, mv)),
        };
    }
    let shape = ch.grouped();
    let centered = |x: &Value, m: Option<&Value>| -> Result<Value> {
        let x = x.reshape(shape)?;
        Ok(match m {
            Some(m) => x.broadcast_sub(&ch.per_channel_4d(m)?)?,
            None => x,
        })
    };
    let product = (centered(u, mu)? * centered(v, mv)?)?;
    Ok(product
        .sum_keepdim(3)?
        .sum_keepdim(1)?
        .reshape(ch.stat.as_slice())?)
}

/// The values of `channel_sum_and_dot`.
fn sum_and_dot_value(
    ch: &Channels,
    g: &Value,
    (x, m): (&Value, Option<&Value>),
) -> Result<(Value, Value)> {
    if fast(&[g, x]) && g.dtype() == x.dtype() {
        fn run<T: WithDType>(
            ch: &Channels,
            g: &Value,
            (x, m): (&Value, Option<&Value>),
        ) -> Result<(Value, Value)> {
            let m = m.map(per_channel::<T>).transpose()?;
            with_cpu_slice::<T, _>(g, |gs| {
                with_cpu_slice::<T, _>(x, |xs| {
                    let (sums, dots) = reduce_pair_cpu(ch, gs, (xs, m.as_deref()));
                    Ok((cpu_tensor(sums, &ch.stat)?, cpu_tensor(dots, &ch.stat)?))
                })
            })
        }
        return match g.dtype() {
            DType::F32 => run::<f32>(ch, g, (x, m)),
            _ => run::<f64>(ch, g, (x, m)),
        };
    }
    Ok((sum_value(ch, g)?, dot_value(ch, (g, None), (x, m))?))
}

/// [`reduce_cpu`]'s `sum g` and `sum g (x - m)` in one pass over the rows: per row, the
/// same two accumulations as two calls would make.
fn reduce_pair_cpu<T: WithDType>(
    ch: &Channels,
    g: &[T],
    (x, m): (&[T], Option<&[T]>),
) -> (Vec<T>, Vec<T>) {
    let (groups, n, c, s) = ch.grouped();
    let mut sums = vec![[0f64; LANES]; groups * c];
    let mut dots = vec![[0f64; LANES]; groups * c];
    super::kernels::vectorized(|| {
        for gi in 0..groups {
            for ni in 0..n {
                for ci in 0..c {
                    let pc = gi * c + ci;
                    let rows = ((gi * n + ni) * c + ci) * s..((gi * n + ni) * c + ci + 1) * s;
                    let center = m.map_or(T::zero(), |m| m[pc]);
                    let row = &g[rows.clone()];
                    accumulate_row(&mut sums[pc], row, T::zero(), None);
                    accumulate_row(&mut dots[pc], row, T::zero(), Some((&x[rows], center)));
                }
            }
        }
    });
    let total = |acc: &[[f64; LANES]]| {
        acc.iter()
            .map(|lanes| T::from_f64(lanes.iter().sum()))
            .collect()
    };
    (total(&sums), total(&dots))
}

/// The value of `channel_affine`: `terms` are `(x, m, a)`, one or two.
fn affine_value(
    ch: &Channels,
    terms: &[(&Value, Option<&Value>, &Value)],
    b: Option<&Value>,
) -> Result<Value> {
    let full: Vec<&Value> = terms.iter().map(|t| t.0).collect();
    let same_dtype = terms.iter().all(|t| t.0.dtype() == terms[0].0.dtype());
    if fast(&full) && same_dtype {
        fn run<T: WithDType>(
            ch: &Channels,
            terms: &[(&Value, Option<&Value>, &Value)],
            b: Option<&Value>,
        ) -> Result<Value> {
            let b = b.map(per_channel::<T>).transpose()?;
            let coefs = terms
                .iter()
                .map(|(_, m, a)| Ok((m.map(per_channel::<T>).transpose()?, per_channel::<T>(a)?)))
                .collect::<Result<Vec<_>>>()?;
            let out = match (terms, coefs.as_slice()) {
                ([(x, ..)], [(m, a)]) => with_cpu_slice::<T, _>(x, |x| {
                    let t = Term {
                        x,
                        m: m.clone(),
                        a: a.clone(),
                    };
                    Ok(affine_cpu(ch, &[t], b.as_deref()))
                })?,
                ([(x1, ..), (x2, ..)], [(m1, a1), (m2, a2)]) => with_cpu_slice::<T, _>(x1, |x1| {
                    with_cpu_slice::<T, _>(x2, |x2| {
                        let t1 = Term {
                            x: x1,
                            m: m1.clone(),
                            a: a1.clone(),
                        };
                        let t2 = Term {
                            x: x2,
                            m: m2.clone(),
                            a: a2.clone(),
                        };
                        Ok(affine_cpu(ch, &[t1, t2], b.as_deref()))
                    })
                })?,
                _ => unreachable!("affine_value takes one or two terms"),
            };
            cpu_tensor(out, &ch.full)
        }
        return match terms[0].0.dtype() {
            DType::F32 => run::<f32>(ch, terms, b),
            _ => run::<f64>(ch, terms, b),
        };
    }
    let shape = ch.grouped();
    let mut out: Option<Value> = None;
    for (x, m, a) in terms {
        let mut t = x.reshape(shape)?;
        if let Some(m) = m {
            t = t.broadcast_sub(&ch.per_channel_4d(m)?)?;
        }
        let t = t.broadcast_mul(&ch.per_channel_4d(a)?)?;
        out = Some(match out {
            None => t,
            Some(o) => (o + t)?,
        });
    }
    let mut out = out.ok_or_else(|| Error::InvalidArgument {
        op: "channel_affine",
        message: "no terms".into(),
    })?;
    if let Some(b) = b {
        out = out.broadcast_add(&ch.per_channel_4d(b)?)?;
    }
    Ok(out.reshape(ch.full.as_slice())?)
}

/// `sum over n, s of u`, per channel (shape `ch.stat`).
pub(crate) fn channel_sum(u: &Tensor, ch: &Arc<Channels>) -> Result<Tensor> {
    check_full(ch, &[u])?;
    let value = sum_value(ch, u.value())?;
    Tensor::from_op(value, &[u], ChannelSum(ch.clone()))
}

/// `sum over n, s of (u - mu) (v - mv)`, per channel; `u` and `v` may be the same tensor.
pub(crate) fn channel_dot(
    (u, mu): (&Tensor, Option<&Tensor>),
    (v, mv): (&Tensor, Option<&Tensor>),
    ch: &Arc<Channels>,
) -> Result<Tensor> {
    check_full(ch, &[u, v])?;
    check_per_channel(ch, u, &[mu, mv])?;
    let value = dot_value(
        ch,
        (u.value(), mu.map(Tensor::value)),
        (v.value(), mv.map(Tensor::value)),
    )?;
    record_dot(value, (u, mu), (v, mv), ch)
}

/// `channel_sum(g)` and `channel_dot((g, None), (x, m))`, with one pass over `g` on the CPU
/// fast path (each row's two sums run back to back while the row is in cache): the same
/// values as the two ops apart.
pub(crate) fn channel_sum_and_dot(
    g: &Tensor,
    (x, m): (&Tensor, Option<&Tensor>),
    ch: &Arc<Channels>,
) -> Result<(Tensor, Tensor)> {
    check_full(ch, &[g, x])?;
    check_per_channel(ch, g, &[m])?;
    let (sum, dot) = sum_and_dot_value(ch, g.value(), (x.value(), m.map(Tensor::value)))?;
    Ok((
        Tensor::from_op(sum, &[g], ChannelSum(ch.clone()))?,
        record_dot(dot, (g, None), (x, m), ch)?,
    ))
}

/// Records the op of `channel_dot` for its `value`.
fn record_dot(
    value: Value,
    (u, mu): (&Tensor, Option<&Tensor>),
    (v, mv): (&Tensor, Option<&Tensor>),
    ch: &Arc<Channels>,
) -> Result<Tensor> {
    let mut inputs = vec![u];
    inputs.extend(mu);
    inputs.push(v);
    inputs.extend(mv);
    Tensor::from_op(
        value,
        &inputs,
        ChannelDot {
            ch: ch.clone(),
            centered: (mu.is_some(), mv.is_some()),
        },
    )
}

/// An error unless every tensor has the layout's full shape (and the dtype and device of
/// the first).
fn check_full(ch: &Channels, ts: &[&Tensor]) -> Result<()> {
    for t in &ts[1..] {
        ts[0].check_same(t, "channel op")?;
    }
    match ts.iter().find(|t| t.dims() != ch.full) {
        Some(t) => Err(Error::ShapeMismatch {
            op: "channel op",
            expected: format!("{:?}", ch.full),
            got: t.dims().to_vec(),
        }),
        None => Ok(()),
    }
}

/// An error unless every given tensor has the per-channel shape (and the dtype and device
/// of `like`).
fn check_per_channel(ch: &Channels, like: &Tensor, ts: &[Option<&Tensor>]) -> Result<()> {
    for t in ts.iter().flatten() {
        like.check_same(t, "channel op")?;
    }
    match ts.iter().flatten().find(|t| t.dims() != ch.stat) {
        Some(t) => Err(Error::ShapeMismatch {
            op: "channel op",
            expected: format!("per-channel values {:?}", ch.stat),
            got: t.dims().to_vec(),
        }),
        None => Ok(()),
    }
}

/// `(x1 - m1) a1 [+ (x2 - m2) a2] [+ b]` elementwise, `x` full, `m`, `a`, `b` per channel.
pub(crate) fn channel_affine(
    terms: &[(&Tensor, Option<&Tensor>, &Tensor)],
    b: Option<&Tensor>,
    ch: &Arc<Channels>,
) -> Result<Tensor> {
    for (x, m, a) in terms {
        check_full(ch, &[x])?;
        check_per_channel(ch, x, &[*m, Some(a)])?;
    }
    if let Some((x, ..)) = terms.first() {
        check_per_channel(ch, x, &[b])?;
    }
    let values: Vec<(&Value, Option<&Value>, &Value)> = terms
        .iter()
        .map(|(x, m, a)| (x.value(), m.map(Tensor::value), a.value()))
        .collect();
    let value = affine_value(ch, &values, b.map(Tensor::value))?;
    let mut inputs: Vec<&Tensor> = Vec::with_capacity(7);
    for (x, m, a) in terms {
        inputs.push(x);
        inputs.extend(*m);
        inputs.push(a);
    }
    inputs.extend(b);
    Tensor::from_op(
        value,
        &inputs,
        ChannelAffine {
            ch: ch.clone(),
            centered: terms.iter().map(|t| t.1.is_some()).collect(),
            shifted: b.is_some(),
        },
    )
}

/// A per-channel tensor broadcast to the full shape (a view, no copy).
pub(crate) fn channel_expand(v: &Tensor, ch: &Arc<Channels>) -> Result<Tensor> {
    check_per_channel(ch, v, &[Some(v)])?;
    let value = v
        .value()
        .reshape(ch.keep.as_slice())?
        .broadcast_as(ch.full.as_slice())?;
    Tensor::from_op(value, &[v], ChannelExpand(ch.clone()))
}

struct ChannelSum(Arc<Channels>);

impl Backward for ChannelSum {
    fn name(&self) -> &'static str {
        "channel_sum"
    }

    /// d/du = G expanded over the summed positions.
    fn vjp(&self, ctx: &VjpCtx<'_>) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(channel_expand(ctx.grad, &self.0)?)])
    }
}

struct ChannelExpand(Arc<Channels>);

impl Backward for ChannelExpand {
    fn name(&self) -> &'static str {
        "channel_expand"
    }

    /// d/dv = G summed per channel.
    fn vjp(&self, ctx: &VjpCtx<'_>) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(channel_sum(ctx.grad, &self.0)?)])
    }
}

struct ChannelDot {
    ch: Arc<Channels>,
    /// Whether `u` and `v` have a center.
    centered: (bool, bool),
}

impl ChannelDot {
    /// `sum(x - m)` per channel: `sum(x) - n m`.
    fn centered_sum(&self, x: &Tensor, m: Option<&Tensor>) -> Result<Tensor> {
        let sum = channel_sum(x, &self.ch)?;
        match m {
            Some(m) => sum.sub(&m.affine(self.ch.count() as f64, 0.0)?),
            None => Ok(sum),
        }
    }
}

impl Backward for ChannelDot {
    fn name(&self) -> &'static str {
        "channel_dot"
    }

    /// For `sum (u - mu) (v - mv)` and per-channel G: d/du = (v - mv) G,
    /// d/dmu = -G sum(v - mv), and the same with u and v exchanged.
    fn vjp(&self, ctx: &VjpCtx<'_>) -> Result<Vec<Option<Tensor>>> {
        let g = ctx.grad;
        // Inputs: u, [mu], v, [mv].
        let u_at = 0;
        let mu_at = self.centered.0.then_some(1);
        let v_at = 1 + usize::from(self.centered.0);
        let mv_at = self.centered.1.then_some(v_at + 1);
        let (u, v) = (&ctx.inputs[u_at], &ctx.inputs[v_at]);
        let (mu, mv) = (mu_at.map(|i| &ctx.inputs[i]), mv_at.map(|i| &ctx.inputs[i]));
        let mut out: Vec<Option<Tensor>> = vec![None; ctx.inputs.len()];
        // A square (a variance): u = v and mu = mv. The two halves of each gradient are
        // equal, so one term of twice the size goes to the first slot (the same values as
        // the sum of the halves, since doubling is exact), with one pass instead of two and
        // no accumulation.
        if u.id() == v.id() && mu.map(Tensor::id) == mv.map(Tensor::id) {
            if ctx.needs[u_at] {
                let twice = g.affine(2.0, 0.0)?;
                out[u_at] = Some(channel_affine(&[(u, mu, &twice)], None, &self.ch)?);
            }
            if let Some(i) = mu_at.filter(|&i| ctx.needs[i]) {
                out[i] = Some(g.mul(&self.centered_sum(u, mu)?)?.affine(-2.0, 0.0)?);
            }
            return Ok(out);
        }
        if ctx.needs[u_at] {
            out[u_at] = Some(channel_affine(&[(v, mv, g)], None, &self.ch)?);
        }
        if ctx.needs[v_at] {
            out[v_at] = Some(channel_affine(&[(u, mu, g)], None, &self.ch)?);
        }
        if let Some(i) = mu_at.filter(|&i| ctx.needs[i]) {
            out[i] = Some(g.mul(&self.centered_sum(v, mv)?)?.neg()?);
        }
        if let Some(i) = mv_at.filter(|&i| ctx.needs[i]) {
            out[i] = Some(g.mul(&self.centered_sum(u, mu)?)?.neg()?);
        }
        Ok(out)
    }
}

struct ChannelAffine {
    ch: Arc<Channels>,
    /// Per term, whether it has a center `m`.
    centered: Vec<bool>,
    shifted: bool,
}

impl ChannelAffine {
    /// Whether the VJP needs `sum(g)`: for a center's gradient or the shift's.
    fn needs_sum(&self, needs: &[bool]) -> bool {
        let mut i = 0;
        for &centered in &self.centered {
            if centered && needs[i + 1] {
                return true;
            }
            i += 2 + usize::from(centered);
        }
        self.shifted && needs[i]
    }
}

impl Backward for ChannelAffine {
    fn name(&self) -> &'static str {
        "channel_affine"
    }

    /// For `sum (x_i - m_i) a_i + b` and a full G: d/dx_i = G a_i, d/dm_i = -a_i sum(G),
    /// d/da_i = sum G (x_i - m_i), d/db = sum(G).
    fn vjp(&self, ctx: &VjpCtx<'_>) -> Result<Vec<Option<Tensor>>> {
        let g = ctx.grad;
        let mut grad_sum: Option<Tensor> = None;
        // Where sum(g) is needed, the first term's `sum g (x - m)` comes from the same pass.
        let mut first_dot: Option<Tensor> = None;
        let first_a = 1 + usize::from(self.centered[0]);
        if ctx.needs[first_a] && self.needs_sum(ctx.needs) {
            let m = self.centered[0].then(|| &ctx.inputs[1]);
            let (sum, dot) = channel_sum_and_dot(g, (&ctx.inputs[0], m), &self.ch)?;
            (grad_sum, first_dot) = (Some(sum), Some(dot));
        }
        let mut sum_of_g = || -> Result<Tensor> {
            if grad_sum.is_none() {
                grad_sum = Some(channel_sum(g, &self.ch)?);
            }
            Ok(grad_sum.clone().expect("just set"))
        };
        let mut out = Vec::with_capacity(ctx.inputs.len());
        let mut i = 0;
        for &centered in &self.centered {
            let x = &ctx.inputs[i];
            let m = centered.then(|| &ctx.inputs[i + 1]);
            let a_at = i + 1 + usize::from(centered);
            let a = &ctx.inputs[a_at];
            out.push(
                ctx.needs[i]
                    .then(|| channel_affine(&[(g, None, a)], None, &self.ch))
                    .transpose()?,
            );
            if centered {
                out.push(if ctx.needs[i + 1] {
                    Some(a.mul(&sum_of_g()?)?.neg()?)
                } else {
                    None
                });
            }
            out.push(match first_dot.take() {
                Some(dot) => Some(dot),
                None => ctx.needs[a_at]
                    .then(|| channel_dot((g, None), (x, m), &self.ch))
                    .transpose()?,
            });
            i = a_at + 1;
        }
        if self.shifted {
            out.push(if ctx.needs[i] {
                Some(sum_of_g()?)
            } else {
                None
            });
        }
        Ok(out)
    }
}

/// Batch normalisation with the batch's statistics, per group and channel: `y = (x - mean)
/// rstd w + b` with `mean` and the biased variance `var` over `n, s`, `rstd = (var +
/// eps)^-1/2` (`w`, `b` per channel, optional). Returns `y`, `mean` and `var` (the last two
/// per channel, differentiable). One recorded op for `y`; see the module docs.
pub(crate) fn batch_norm_train(
    x: &Tensor,
    w: Option<&Tensor>,
    b: Option<&Tensor>,
    eps: f64,
    ch: &Arc<Channels>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let n = ch.count() as f64;
    let mean = channel_sum(x, ch)?.affine(1.0 / n, 0.0)?;
    let centered = (x, Some(&mean));
    let var = channel_dot(centered, centered, ch)?.affine(1.0 / n, 0.0)?;
    let rstd = var.add(eps)?.sqrt()?.powf(-1.0)?;
    let scale = match w {
        Some(w) => (rstd.value() * w.value())?,
        None => rstd.value().clone(),
    };
    let value = affine_value(
        ch,
        &[(x.value(), Some(mean.value()), &scale)],
        b.map(Tensor::value),
    )?;
    let mut inputs = vec![x];
    inputs.extend(w);
    inputs.extend(b);
    let y = Tensor::from_op(
        value,
        &inputs,
        BatchNormTrain {
            ch: ch.clone(),
            mean: mean.clone(),
            rstd,
            weighted: w.is_some(),
            shifted: b.is_some(),
        },
    )?;
    Ok((y, mean, var))
}

struct BatchNormTrain {
    ch: Arc<Channels>,
    /// The batch mean and `(var + eps)^-1/2`, recorded from `x`: the VJP's coefficients are
    /// functions of `x` through them, so its own derivatives are exact.
    mean: Tensor,
    rstd: Tensor,
    weighted: bool,
    shifted: bool,
}

impl Backward for BatchNormTrain {
    fn name(&self) -> &'static str {
        "batch_norm"
    }

    /// With `k = w rstd`, `xhat = (x - mean) rstd` and `D = sum g xhat = rstd sum g (x -
    /// mean)`: `dx = k (g - sum(g)/n) - k rstd D/n (x - mean)` (one fused pass),
    /// `dw = D`, `db = sum(g)`.
    fn vjp(&self, ctx: &VjpCtx<'_>) -> Result<Vec<Option<Tensor>>> {
        let (x, g, ch) = (&ctx.inputs[0], ctx.grad, &self.ch);
        let w = self.weighted.then(|| &ctx.inputs[1]);
        let need_w = self.weighted && ctx.needs[1];
        let need_b = self.shifted && ctx.needs[1 + usize::from(self.weighted)];
        let n = ch.count() as f64;
        let (sum_g, d) = if ctx.needs[0] || need_w {
            let (sum, dot) = channel_sum_and_dot(g, (x, Some(&self.mean)), ch)?;
            (sum, Some(self.rstd.mul(&dot)?))
        } else {
            (channel_sum(g, ch)?, None)
        };
        let mut out = Vec::with_capacity(ctx.inputs.len());
        out.push(match (&d, ctx.needs[0]) {
            (Some(d), true) => {
                let k = match w {
                    Some(w) => self.rstd.mul(w)?,
                    None => self.rstd.clone(),
                };
                let mean_g = sum_g.affine(1.0 / n, 0.0)?;
                let c = k.mul(&self.rstd)?.mul(d)?.affine(-1.0 / n, 0.0)?;
                Some(channel_affine(
                    &[(g, Some(&mean_g), &k), (x, Some(&self.mean), &c)],
                    None,
                    ch,
                )?)
            }
            _ => None,
        });
        if self.weighted {
            out.push(if need_w { d.clone() } else { None });
        }
        if self.shifted {
            out.push(need_b.then_some(sum_g));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::LANES;
    use super::{accumulate_row, accumulate_row_scalar, reduce_cpu, reduce_pair_cpu, Channels};

    /// The fused pass gives the bits of the two reductions apart (f32, with a task axis,
    /// rows around the lane count, with and without a center).
    #[test]
    fn sum_and_dot_in_one_pass_equal_the_two_apart() {
        for s in [1, 33, 121] {
            let full = [2, 3, 4, s];
            let ch = Channels::new(&full, true, &[2, 4]).unwrap();
            let len: usize = full.iter().product();
            let g: Vec<f32> = (0..len)
                .map(|i| ((i * 37) % 101) as f32 / 7.0 - 6.0)
                .collect();
            let x: Vec<f32> = (0..len)
                .map(|i| ((i * 53) % 97) as f32 / 5.0 - 9.0)
                .collect();
            let m: Vec<f32> = (0..8).map(|i| i as f32 * 0.3 - 1.0).collect();
            for center in [None, Some(&m[..])] {
                let (sums, dots) = reduce_pair_cpu(&ch, &g, (&x, center));
                let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
                assert_eq!(bits(sums), bits(reduce_cpu(&ch, (&g, None), None)));
                let apart = reduce_cpu(&ch, (&g, None), Some((&x, center)));
                assert_eq!(bits(dots), bits(apart), "rows of {s}");
            }
        }
    }

    /// The AVX-512 rows equal the scalar definition bit for bit, in f32 and f64, with and
    /// without the second factor, at lengths around the lane count.
    #[test]
    fn vector_rows_equal_the_definition() {
        let mut seed = 3u64;
        let mut next = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 11) as f64 / (1u64 << 53) as f64 * 4.0 - 1.0
        };
        for len in [
            0, 1, 2, 7, 8, 9, 15, 16, 17, 24, 31, 32, 33, 63, 121, 169, 676,
        ] {
            let a: Vec<f64> = (0..len).map(|_| next()).collect();
            let b: Vec<f64> = (0..len).map(|_| next()).collect();
            let start: [f64; LANES] = std::array::from_fn(|_| next());
            let (a32, b32): (Vec<f32>, Vec<f32>) = (
                a.iter().map(|&x| x as f32).collect(),
                b.iter().map(|&x| x as f32).collect(),
            );
            for with_v in [false, true] {
                let (mut fast, mut slow) = (start, start);
                let v = with_v.then_some((&b[..], 0.25));
                accumulate_row(&mut fast, &a, 0.5, v);
                accumulate_row_scalar(&mut slow, &a, 0.5, v);
                assert_eq!(
                    fast.map(f64::to_bits),
                    slow.map(f64::to_bits),
                    "f64 {len} {with_v}"
                );
                let (mut fast, mut slow) = (start, start);
                let v = with_v.then_some((&b32[..], 0.25f32));
                accumulate_row(&mut fast, &a32, 0.5f32, v);
                accumulate_row_scalar(&mut slow, &a32, 0.5f32, v);
                assert_eq!(
                    fast.map(f64::to_bits),
                    slow.map(f64::to_bits),
                    "f32 {len} {with_v}"
                );
            }
        }
    }
}
