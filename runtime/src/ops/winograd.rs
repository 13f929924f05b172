//! Winograd F(2x2, 3x3) kernels (Lavin and Gray, 2016) for the 3x3, stride-1 convolutions
//! of [`Conv`] with enough channels: each 2x2 block ("tile") of outputs is
//! `A^T [(G w G^T) . (B^T d B)] A` for the tile's 4x4 input patch `d`, so the products
//! over channels become 16 gemms, one per entry of the 4x4 transformed tile, with 16
//! multiplications per tile where the direct convolution has 36 (the MAML-Omniglot CNN's
//! 64 -> 64 layer at 11 x 11 outputs: 576 against 1089 per channel pair).
//!
//! The two gradients are the adjoints of that same bilinear map, exact as the forward is:
//! - input gradient: `B [(G w G^T) . (A gy A^T)] B^T` summed over output channels, added
//!   into the overlapping 4x4 patches;
//! - weight gradient: `G^T [sum over tiles (A gy A^T) . (B^T d B)] G`.
//!
//! The transforms run on channel-last planes (`[y][x][c]`, transposed in and out per
//! image), so that each step of a tile's transform is an elementwise pass over its
//! channels, which the compiler vectorises; the transformed tiles are laid out
//! `[16][tile][c]`, as the gemms take them.
//!
//! Rounding differs from the direct sums (within a few ulps of their magnitude), and an
//! inf would meet its own negative inside a transform, so a result that is not finite
//! everywhere is recomputed by im2col, whose inf and NaN are the direct sums'.

use candle_core::WithDType;

use super::cpu_gemm::{matmul_into, Strided};
use super::im2col::{parallelism, with_scratch, Conv};
use crate::error::Result;

/// Elements of a chunk's two transformed buffers together (2 MiB in f32): the whole
/// support set of a MAML-Omniglot task (5 images; up to 7 fit) in one chunk.
const BUDGET: usize = 1 << 19;

/// The entries of a transformed tile.
const XI: usize = 16;

/// Channels from which the transforms cost less than the multiplications they save (the
/// CNN's first layer, with one input channel, stays on im2col).
const MIN_CHANNELS: usize = 16;

/// The tiling of one convolution's output.
#[derive(Clone, Copy)]
struct Tiles {
    /// Output height and width.
    ho: usize,
    wo: usize,
    /// Tiles down and across: `ho / 2` and `wo / 2` rounded up.
    th: usize,
    tw: usize,
}

impl Tiles {
    fn new(conv: &Conv) -> Tiles {
        let (ho, wo) = (conv.ho(), conv.wo());
        let (th, tw) = (ho.div_ceil(2), wo.div_ceil(2));
        Tiles { ho, wo, th, tw }
    }

    fn per_image(&self) -> usize {
        self.th * self.tw
    }
}

/// Whether the Winograd kernels run this convolution: 3x3, stride and dilation 1, at
/// least [`MIN_CHANNELS`] channels on both sides, at most 60% of the direct
/// multiplications (so not the CNN's last layer, 3 x 3 outputs in 4 tiles: 64 against 81),
/// and one image's transformed tiles within four budgets (8 MiB in f32: a chunk holds at
/// least one image, and 64 channels of 224 x 224 would take 100 MiB).
pub(super) fn applies(conv: &Conv) -> bool {
    if conv.kh != 3 || conv.kw != 3 || conv.stride != 1 || conv.dilation != 1 {
        return false;
    }
    if conv.c_in < MIN_CHANNELS || conv.c_out < MIN_CHANNELS || conv.n == 0 {
        return false;
    }
    let t = Tiles::new(conv);
    let one_image = [conv.c_in + conv.c_out, t.per_image()]
        .into_iter()
        .fold(XI, usize::saturating_mul);
    one_image <= 4 * BUDGET && 10 * XI * t.per_image() <= 6 * 9 * t.ho * t.wo
}

/// Images per chunk so that two transformed buffers of `c_a` and `c_b` channels fit the
/// budget.
fn chunk(conv: &Conv, t: &Tiles, c_a: usize, c_b: usize) -> usize {
    (BUDGET / (XI * (c_a + c_b) * t.per_image())).clamp(1, conv.n)
}

/// The arguments of [`transform_kernels`]: the geometry, one task's kernels, `U` and the
/// work (`21 c_in` values).
type KernelsTransform<'a, T> = (&'a Conv, &'a [T], &'a mut [T], &'a mut [T]);

/// `U = G w G^T` for every kernel `w[co][ci]` (3x3), as `[16][co][ci]`: per output
/// channel, the 9 taps gathered into runs over the input channels, then the transform as
/// elementwise passes over them.
#[inline(always)]
fn transform_kernels_body<T: WithDType>((conv, kernels, u, work): KernelsTransform<'_, T>) {
    let (half, c, c_out) = (T::from_f64(0.5), conv.c_in, conv.c_out);
    let (taps, rows) = work.split_at_mut(9 * c);
    for (co, kernel) in kernels.chunks_exact(9 * c).enumerate() {
        for (ci, g) in kernel.chunks_exact(9).enumerate() {
            for (k, &v) in g.iter().enumerate() {
                taps[k * c + ci] = v;
            }
        }
        let tap = |k: usize| &taps[k * c..][..c];
        // G g (4 x 3), entry (i, j) at (3 i + j) c.
        for j in 0..3 {
            let (g0, g1, g2) = (tap(j), tap(3 + j), tap(6 + j));
            rows[j * c..][..c].copy_from_slice(g0);
            map3(&mut rows[(3 + j) * c..][..c], g0, g1, g2, |a, b, c| {
                half * (a + b + c)
            });
            map3(&mut rows[(6 + j) * c..][..c], g0, g1, g2, |a, b, c| {
                half * (a - b + c)
            });
            rows[(9 + j) * c..][..c].copy_from_slice(g2);
        }
        // (G g) G^T, into U.
        for i in 0..4 {
            let r = |j: usize| &rows[(3 * i + j) * c..][..c];
            let (r0, r1, r2) = (r(0), r(1), r(2));
            let dst = |j: usize| ((4 * i + j) * c_out + co) * c;
            u[dst(0)..][..c].copy_from_slice(r0);
            map3(&mut u[dst(1)..][..c], r0, r1, r2, |a, b, c| {
                half * (a + b + c)
            });
            map3(&mut u[dst(2)..][..c], r0, r1, r2, |a, b, c| {
                half * (a - b + c)
            });
            u[dst(3)..][..c].copy_from_slice(r2);
        }
    }
}

/// The arguments of [`untransform_kernel_grads`]: the geometry, `du`, the work (`21 c_in`
/// values) and the weight gradient the task's `[c_out][c_in][3][3]` is appended to.
type KernelGradsUntransform<'a, T> = (&'a Conv, &'a [T], &'a mut [T], &'a mut Vec<T>);

/// `dw = G^T du G` for every `du[16][co][ci]`, appended as `[co][ci][3][3]`: per output
/// channel, elementwise passes over runs of the input channels, then the 9 taps of each
/// kernel interleaved.
#[inline(always)]
fn untransform_kernel_grads_body<T: WithDType>(
    (conv, du, work, dw): KernelGradsUntransform<'_, T>,
) {
    let (half, c, c_out) = (T::from_f64(0.5), conv.c_in, conv.c_out);
    let (taps, rows) = work.split_at_mut(9 * c);
    for co in 0..c_out {
        let e = |i: usize, j: usize| &du[((4 * i + j) * c_out + co) * c..][..c];
        // G^T du (3 x 4), entry (k, j) at (4 k + j) c.
        for j in 0..4 {
            let (d0, d1, d2, d3) = (e(0, j), e(1, j), e(2, j), e(3, j));
            map3(&mut rows[j * c..][..c], d0, d1, d2, |a, b, c| {
                a + half * (b + c)
            });
            map2(&mut rows[(4 + j) * c..][..c], d1, d2, |b, c| half * (b - c));
            map3(&mut rows[(8 + j) * c..][..c], d1, d2, d3, |b, c, d| {
                half * (b + c) + d
            });
        }
        // (G^T du) G, tap (k, l) at (3 k + l) c.
        for k in 0..3 {
            let r = |j: usize| &rows[(4 * k + j) * c..][..c];
            let (r0, r1, r2, r3) = (r(0), r(1), r(2), r(3));
            let tap = 3 * k * c;
            map3(&mut taps[tap..][..c], r0, r1, r2, |a, b, c| {
                a + half * (b + c)
            });
            map2(&mut taps[tap + c..][..c], r1, r2, |b, c| half * (b - c));
            map3(&mut taps[tap + 2 * c..][..c], r1, r2, r3, |b, c, d| {
                half * (b + c) + d
            });
        }
        for ci in 0..c {
            dw.extend((0..9).map(|k| taps[k * c + ci]));
        }
    }
}

/// `out[k] = f(a[k], b[k])`.
#[inline(always)]
fn map2<T: Copy>(out: &mut [T], a: &[T], b: &[T], f: impl Fn(T, T) -> T) {
    for ((o, &a), &b) in out.iter_mut().zip(a).zip(b) {
        *o = f(a, b);
    }
}

/// `out[k] = f(a[k], b[k], c[k])`.
#[inline(always)]
fn map3<T: Copy>(out: &mut [T], a: &[T], b: &[T], c: &[T], f: impl Fn(T, T, T) -> T) {
    for (((o, &a), &b), &c) in out.iter_mut().zip(a).zip(b).zip(c) {
        *o = f(a, b, c);
    }
}

/// `out[k] += f(a[k], b[k], c[k])`.
#[inline(always)]
fn add3<T: WithDType>(out: &mut [T], a: &[T], b: &[T], c: &[T], f: impl Fn(T, T, T) -> T) {
    for (((o, &a), &b), &c) in out.iter_mut().zip(a).zip(b).zip(c) {
        *o += f(a, b, c);
    }
}

/// `src` (`c` planes of `h x w`) into the channel-last plane `dst` of rows of `width`
/// pixels, at row and column offset `offset`. `src` is read in order (it comes from
/// memory: gathering a pixel's channels from 64 planes, or writing row by row, made the
/// transforms a third slower), the scattered writes land in the plane, which stays in cache.
#[inline(always)]
fn to_channel_last<T: WithDType>(
    src: &[T],
    (c, h, w): (usize, usize, usize),
    dst: &mut [T],
    (width, offset): (usize, usize),
) {
    for (ch, plane) in src.chunks_exact(h * w).enumerate().take(c) {
        for (y, row) in plane.chunks_exact(w).enumerate() {
            let base = ((y + offset) * width + offset) * c + ch;
            for (x, &v) in row.iter().enumerate() {
                dst[base + x * c] = v;
            }
        }
    }
}

/// The inverse of [`to_channel_last`]: the `c` planes of `h x w` from `src`, appended to
/// `dst` in order, each value plus `bias(ch)`.
#[inline(always)]
fn from_channel_last<T: WithDType>(
    src: &[T],
    (c, h, w): (usize, usize, usize),
    (width, offset): (usize, usize),
    bias: impl Fn(usize) -> T,
    dst: &mut Vec<T>,
) {
    for ch in 0..c {
        let b = bias(ch);
        for y in 0..h {
            let base = ((y + offset) * width + offset) * c + ch;
            dst.extend((0..w).map(|x| src[base + x * c] + b));
        }
    }
}

/// The channel run of pixel `(y, x)` of a channel-last plane of rows of `width` pixels.
#[inline(always)]
fn pixel<T>(plane: &[T], c: usize, width: usize, (y, x): (usize, usize)) -> &[T] {
    &plane[(y * width + x) * c..][..c]
}

/// Where one image's transformed tiles go: entry `xi` of tile `tile` at
/// `(xi cols + col0 + tile) c`.
#[derive(Clone, Copy)]
struct Slot {
    col0: usize,
    cols: usize,
    c: usize,
}

impl Slot {
    /// Image `b`'s tiles (`tiles` of them) of a chunk of `cols` tiles, `c` channels each.
    fn image(b: usize, cols: usize, tiles: usize, c: usize) -> Slot {
        Slot {
            col0: b * tiles,
            cols,
            c,
        }
    }

    fn run(&self, xi: usize, tile: usize) -> std::ops::Range<usize> {
        let start = (xi * self.cols + self.col0 + tile) * self.c;
        start..start + self.c
    }
}

/// `B^T d B` for every tile of a padded channel-last input plane (rows of `2 tw + 2`
/// pixels); `work` holds `16 c` values.
#[inline(always)]
fn transform_inputs<T: WithDType>(t: &Tiles, plane: &[T], work: &mut [T], v: &mut [T], at: Slot) {
    let (c, width) = (at.c, 2 * t.tw + 2);
    for ty in 0..t.th {
        for tx in 0..t.tw {
            let d = |i: usize, j: usize| pixel(plane, c, width, (2 * ty + i, 2 * tx + j));
            // r = B^T d, r[i][j] at (4 i + j) c.
            for j in 0..4 {
                let (d0, d1, d2, d3) = (d(0, j), d(1, j), d(2, j), d(3, j));
                map2(&mut work[j * c..][..c], d0, d2, |a, b| a - b);
                map2(&mut work[(4 + j) * c..][..c], d1, d2, |a, b| a + b);
                map2(&mut work[(8 + j) * c..][..c], d2, d1, |a, b| a - b);
                map2(&mut work[(12 + j) * c..][..c], d1, d3, |a, b| a - b);
            }
            // v = r B.
            let tile = ty * t.tw + tx;
            for i in 0..4 {
                let r = |j: usize| &work[(4 * i + j) * c..][..c];
                map2(&mut v[at.run(4 * i, tile)], r(0), r(2), |a, b| a - b);
                map2(&mut v[at.run(4 * i + 1, tile)], r(1), r(2), |a, b| a + b);
                map2(&mut v[at.run(4 * i + 2, tile)], r(2), r(1), |a, b| a - b);
                map2(&mut v[at.run(4 * i + 3, tile)], r(1), r(3), |a, b| a - b);
            }
        }
    }
}

/// `A gy A^T` for every tile of a channel-last output-gradient plane (rows of `2 tw`
/// pixels, zero past the output's edge); `work` holds `8 c` values.
#[inline(always)]
fn transform_output_grads<T: WithDType>(
    t: &Tiles,
    plane: &[T],
    work: &mut [T],
    z: &mut [T],
    at: Slot,
) {
    let (c, width, zero) = (at.c, 2 * t.tw, T::zero());
    for ty in 0..t.th {
        for tx in 0..t.tw {
            let g = |a: usize, b: usize| pixel(plane, c, width, (2 * ty + a, 2 * tx + b));
            // A g (4 x 2), entry (i, b) at (2 i + b) c.
            for b in 0..2 {
                let (g0, g1) = (g(0, b), g(1, b));
                work[b * c..][..c].copy_from_slice(g0);
                map2(&mut work[(2 + b) * c..][..c], g0, g1, |a, b| a + b);
                map2(&mut work[(4 + b) * c..][..c], g0, g1, |a, b| a - b);
                map2(&mut work[(6 + b) * c..][..c], g1, g1, |_, b| zero - b);
            }
            // (A g) A^T.
            let tile = ty * t.tw + tx;
            for i in 0..4 {
                let (c0, c1) = (&work[2 * i * c..][..c], &work[(2 * i + 1) * c..][..c]);
                z[at.run(4 * i, tile)].copy_from_slice(c0);
                map2(&mut z[at.run(4 * i + 1, tile)], c0, c1, |a, b| a + b);
                map2(&mut z[at.run(4 * i + 2, tile)], c0, c1, |a, b| a - b);
                map2(&mut z[at.run(4 * i + 3, tile)], c1, c1, |_, b| zero - b);
            }
        }
    }
}

/// `A^T m A` for every tile from the products `m`, into a channel-last output plane (rows
/// of `2 tw` pixels, the output's `ho x wo` corner written); `work` holds `8 c` values.
#[inline(always)]
fn untransform_outputs<T: WithDType>(
    t: &Tiles,
    m: &[T],
    at: Slot,
    work: &mut [T],
    plane: &mut [T],
) {
    let (c, width) = (at.c, 2 * t.tw);
    for ty in 0..t.th {
        for tx in 0..t.tw {
            let tile = ty * t.tw + tx;
            let e = |i: usize, j: usize| &m[at.run(4 * i + j, tile)];
            // s = A^T m (2 x 4), entry (a, j) at (4 a + j) c.
            for j in 0..4 {
                let (m0, m1, m2, m3) = (e(0, j), e(1, j), e(2, j), e(3, j));
                map3(&mut work[j * c..][..c], m0, m1, m2, |a, b, c| a + b + c);
                map3(&mut work[(4 + j) * c..][..c], m1, m2, m3, |a, b, c| {
                    a - b - c
                });
            }
            // y = s A, the pixels of the tile inside the output.
            for a in (0..2).filter(|a| 2 * ty + a < t.ho) {
                let r = |j: usize| &work[(4 * a + j) * c..][..c];
                let at = |b: usize| ((2 * ty + a) * width + 2 * tx + b) * c;
                map3(&mut plane[at(0)..][..c], r(0), r(1), r(2), |p, q, r| {
                    p + q + r
                });
                if 2 * tx + 1 < t.wo {
                    map3(&mut plane[at(1)..][..c], r(1), r(2), r(3), |p, q, r| {
                        p - q - r
                    });
                }
            }
        }
    }
}

/// `B n B^T` per tile from the products `n`, added into the padded channel-last input
/// plane `plane` (rows of `2 tw + 2` pixels); `work` holds `16 c` values.
#[inline(always)]
fn untransform_input_grads<T: WithDType>(
    t: &Tiles,
    products: &[T],
    at: Slot,
    work: &mut [T],
    plane: &mut [T],
) {
    let (c, width, zero) = (at.c, 2 * t.tw + 2, T::zero());
    for ty in 0..t.th {
        for tx in 0..t.tw {
            let tile = ty * t.tw + tx;
            let e = |i: usize, j: usize| &products[at.run(4 * i + j, tile)];
            // s = B n, entry (i, j) at (4 i + j) c.
            for j in 0..4 {
                let (n0, n1, n2, n3) = (e(0, j), e(1, j), e(2, j), e(3, j));
                work[j * c..][..c].copy_from_slice(n0);
                map3(&mut work[(4 + j) * c..][..c], n1, n2, n3, |a, b, c| {
                    a - b + c
                });
                map3(&mut work[(8 + j) * c..][..c], n1, n2, n0, |a, b, c| {
                    a + b - c
                });
                map2(&mut work[(12 + j) * c..][..c], n3, n3, |_, b| zero - b);
            }
            // s B^T, added into the patch.
            for i in 0..4 {
                let r = |j: usize| &work[(4 * i + j) * c..][..c];
                let (r0, r1, r2, r3) = (r(0), r(1), r(2), r(3));
                let at = |j: usize| ((2 * ty + i) * width + 2 * tx + j) * c;
                add3(&mut plane[at(0)..][..c], r0, r0, r0, |a, _, _| a);
                add3(&mut plane[at(1)..][..c], r1, r2, r3, |a, b, c| a - b + c);
                add3(&mut plane[at(2)..][..c], r1, r2, r0, |a, b, c| a + b - c);
                add3(&mut plane[at(3)..][..c], r3, r3, r3, |a, _, _| zero - a);
            }
        }
    }
}

/// Whether every element is finite.
fn all_finite<T: WithDType>(xs: &[T]) -> bool {
    xs.iter().all(|&x| x.to_f64().is_finite())
}

/// The 16 products `dst[xi] = lhs[xi] rhs(xi)`, `(m, n, k)` each, `lhs[xi]` and `dst[xi]`
/// being consecutive `m x k` and `m x n` row-major blocks.
fn products<'a, T: WithDType>(
    (m, n, k): (usize, usize, usize),
    lhs: &[T],
    rhs: impl Fn(usize) -> Strided<'a, T>,
    dst: &mut [T],
) -> Result<()> {
    let parallelism = parallelism(m * n * k);
    for (xi, dst) in dst.chunks_exact_mut(m * n).take(XI).enumerate() {
        let lhs = Strided::rows(&lhs[xi * m * k..][..m * k], k);
        matmul_into((m, n, k), lhs, rhs(xi), dst, false, parallelism)?;
    }
    Ok(())
}

/// One call's scratch: the transformed kernels (or their gradient), two transformed chunks
/// of `c_a` and `c_b` channels, a padded channel-last input plane, a channel-last output
/// plane and the transforms' work.
fn scratch_sizes(conv: &Conv, t: &Tiles, c_a: usize, c_b: usize) -> [usize; 6] {
    let cols = chunk(conv, t, c_a, c_b) * t.per_image();
    [
        XI * conv.c_out * conv.c_in,
        XI * c_a * cols,
        XI * c_b * cols,
        (2 * t.th + 2) * (2 * t.tw + 2) * conv.c_in,
        4 * t.per_image() * conv.c_out,
        21 * conv.c_in.max(conv.c_out),
    ]
}

/// The arguments of a chunk's transform (one tuple): the
/// geometry, the operand (every image), the chunk's images `(start, count)`, a plane and
/// the work of the transform, and the transformed buffer it fills.
type ChunkTransform<'a, T> = (
    (&'a Conv, &'a Tiles),
    &'a [T],
    (usize, usize),
    (&'a mut [T], &'a mut [T]),
    &'a mut [T],
);

/// `B^T d B` of a chunk's images (each `c_in h w`); the plane is a padded channel-last one
/// whose border is zero.
#[inline(always)]
fn transform_chunk_inputs_body<T: WithDType>(
    ((conv, t), images, (start, count), (plane, work), v): ChunkTransform<'_, T>,
) {
    let (image, tiles) = (conv.c_in * conv.h * conv.w, t.per_image());
    let dims = (conv.c_in, conv.h, conv.w);
    for b in 0..count {
        let image = &images[(start + b) * image..][..image];
        to_channel_last(image, dims, plane, (2 * t.tw + 2, conv.padding));
        let at = Slot::image(b, count * tiles, tiles, conv.c_in);
        transform_inputs(t, plane, work, v, at);
    }
}

/// `A gy A^T` of a chunk's output gradients; the plane is a channel-last output plane
/// whose entries past the output's edge are zero.
#[inline(always)]
fn transform_chunk_output_grads_body<T: WithDType>(
    ((conv, t), gy, (start, count), (plane, work), z): ChunkTransform<'_, T>,
) {
    let (image, tiles) = (conv.c_out * t.ho * t.wo, t.per_image());
    let dims = (conv.c_out, t.ho, t.wo);
    for b in 0..count {
        let gy_b = &gy[(start + b) * image..][..image];
        to_channel_last(gy_b, dims, plane, (2 * t.tw, 0));
        let at = Slot::image(b, count * tiles, tiles, conv.c_out);
        transform_output_grads(t, plane, work, z, at);
    }
}

/// The outputs of a chunk of `count` images from the products `m`, each plus `bias` of its
/// channel, appended to `out`.
#[inline(always)]
fn untransform_chunk_outputs_body<T: WithDType>(
    ((conv, t), m, count, (plane, work), bias, out): OutputsUntransform<'_, T>,
) {
    let tiles = t.per_image();
    for b in 0..count {
        let at = Slot::image(b, count * tiles, tiles, conv.c_out);
        untransform_outputs(t, m, at, work, plane);
        from_channel_last(plane, (conv.c_out, t.ho, t.wo), (2 * t.tw, 0), bias, out);
    }
}

/// The input gradients of a chunk of `count` images from the products `n`, appended to
/// `dx`.
#[inline(always)]
fn untransform_chunk_input_grads_body<T: WithDType>(
    ((conv, t), n, count, (plane, work), dx): InputGradsUntransform<'_, T>,
) {
    let tiles = t.per_image();
    for b in 0..count {
        let at = Slot::image(b, count * tiles, tiles, conv.c_in);
        plane.fill(T::zero());
        untransform_input_grads(t, n, at, work, plane);
        let layout = (2 * t.tw + 2, conv.padding);
        from_channel_last(
            plane,
            (conv.c_in, conv.h, conv.w),
            layout,
            |_| T::zero(),
            dx,
        );
    }
}

/// The arguments of a chunk's output untransform: the geometry, the products, the
/// chunk's image count, a plane and the work, the bias per channel, and the output.
type OutputsUntransform<'a, T> = (
    (&'a Conv, &'a Tiles),
    &'a [T],
    usize,
    (&'a mut [T], &'a mut [T]),
    &'a dyn Fn(usize) -> T,
    &'a mut Vec<T>,
);

/// The arguments of a chunk's input-gradient untransform: as [`OutputsUntransform`],
/// without the bias.
type InputGradsUntransform<'a, T> = (
    (&'a Conv, &'a Tiles),
    &'a [T],
    usize,
    (&'a mut [T], &'a mut [T]),
    &'a mut Vec<T>,
);

/// `fn $name(args)`: `$body(args)` in a copy compiled for AVX-512 where the CPU has it (a
/// pixel's 64 channels are four 16-lane vectors of f32), else for AVX2 and FMA, else as
/// is. `$body` is `#[inline(always)]`, called straight from each copy, so its loops land
/// in the copy (a closure's or a function item's body need not be inlined there).
macro_rules! vectorized_pass {
    ($name:ident, $body:ident, $args:ident) => {
        fn $name<T: WithDType>(args: $args<'_, T>) {
            #[cfg(target_arch = "x86_64")]
            {
                /// # Safety
                /// The CPU has AVX-512F.
                #[target_feature(enable = "avx512f")]
                unsafe fn avx512<T: WithDType>(args: $args<'_, T>) {
                    $body(args)
                }
                /// # Safety
                /// The CPU has AVX2 and FMA.
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2<T: WithDType>(args: $args<'_, T>) {
                    $body(args)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512F.
                    return unsafe { avx512(args) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has AVX2 and FMA.
                    return unsafe { avx2(args) };
                }
            }
            $body(args)
        }
    };
}

vectorized_pass!(transform_kernels, transform_kernels_body, KernelsTransform);
vectorized_pass!(
    untransform_kernel_grads,
    untransform_kernel_grads_body,
    KernelGradsUntransform
);
vectorized_pass!(
    transform_chunk_inputs,
    transform_chunk_inputs_body,
    ChunkTransform
);
vectorized_pass!(
    transform_chunk_output_grads,
    transform_chunk_output_grads_body,
    ChunkTransform
);
vectorized_pass!(
    untransform_chunk_outputs,
    untransform_chunk_outputs_body,
    OutputsUntransform
);
vectorized_pass!(
    untransform_chunk_input_grads,
    untransform_chunk_input_grads_body,
    InputGradsUntransform
);

/// The convolution of every task's images with its kernels, plus `bias` (`c_out` per task),
/// `[tasks][n][c_out][ho][wo]`; `None` where a result is not finite.
pub(super) fn forward<T: WithDType>(
    conv: &Conv,
    images: &[T],
    kernels: &[T],
    bias: Option<&[T]>,
) -> Result<Option<Vec<T>>> {
    let t = Tiles::new(conv);
    let (c_in, c_out) = (conv.c_in, conv.c_out);
    let (image, tiles) = (c_in * conv.h * conv.w, t.per_image());
    let chunk = chunk(conv, &t, c_in, c_out);
    let mut out = Vec::with_capacity(conv.count() * conv.n * c_out * t.ho * t.wo);
    let sizes = scratch_sizes(conv, &t, c_in, c_out);
    with_scratch(sizes.iter().sum(), |scratch: &mut [T]| -> Result<()> {
        let [u, v, m, plane, out_plane, work] = split(scratch, sizes);
        plane.fill(T::zero());
        let per_task = images
            .chunks_exact(conv.n * image)
            .zip(kernels.chunks_exact(c_out * c_in * 9));
        for (task, (images, kernel)) in per_task.enumerate() {
            transform_kernels((conv, kernel, &mut *u, &mut *work));
            // U^T as a view of U: element (ci, co) at co c_in + ci.
            let rhs = |xi: usize| Strided {
                data: &u[xi * c_out * c_in..][..c_out * c_in],
                row_stride: 1,
                col_stride: c_in,
            };
            let bias = |co: usize| bias.map_or(T::zero(), |bias| bias[task * c_out + co]);
            for start in (0..conv.n).step_by(chunk) {
                let count = chunk.min(conv.n - start);
                let cols = count * tiles;
                let (v, m) = (&mut v[..XI * c_in * cols], &mut m[..XI * c_out * cols]);
                let scratch = (&mut *plane, &mut *work);
                let args = ((conv, &t), images, (start, count), scratch, &mut *v);
                transform_chunk_inputs(args);
                // m[xi] = v[xi] U[xi]^T, `[tile][c_out]`.
                products((cols, c_out, c_in), v, rhs, m)?;
                let scratch = (&mut *out_plane, &mut *work);
                let args = ((conv, &t), &*m, count, scratch, &bias as _, &mut out);
                untransform_chunk_outputs(args);
            }
        }
        Ok(())
    })?;
    Ok(all_finite(&out).then_some(out))
}

/// The gradient of `<gy, conv(x, w)>` with respect to `x` for every task,
/// `[tasks][n][c_in][h][w]`; `None` where a result is not finite.
pub(super) fn input_grad<T: WithDType>(
    conv: &Conv,
    gy: &[T],
    kernels: &[T],
) -> Result<Option<Vec<T>>> {
    let t = Tiles::new(conv);
    let (c_in, c_out) = (conv.c_in, conv.c_out);
    let (gy_image, tiles) = (c_out * t.ho * t.wo, t.per_image());
    let chunk = chunk(conv, &t, c_out, c_in);
    let mut dx = Vec::with_capacity(conv.count() * conv.n * c_in * conv.h * conv.w);
    let sizes = scratch_sizes(conv, &t, c_out, c_in);
    with_scratch(sizes.iter().sum(), |scratch: &mut [T]| -> Result<()> {
        let [u, z, nn, plane, gy_plane, work] = split(scratch, sizes);
        gy_plane.fill(T::zero());
        let per_task = gy
            .chunks_exact(conv.n * gy_image)
            .zip(kernels.chunks_exact(c_out * c_in * 9));
        for (gy, kernel) in per_task {
            transform_kernels((conv, kernel, &mut *u, &mut *work));
            let rhs = |xi: usize| Strided::rows(&u[xi * c_out * c_in..][..c_out * c_in], c_in);
            for start in (0..conv.n).step_by(chunk) {
                let count = chunk.min(conv.n - start);
                let cols = count * tiles;
                let (z, nn) = (&mut z[..XI * c_out * cols], &mut nn[..XI * c_in * cols]);
                let scratch = (&mut *gy_plane, &mut *work);
                let args = ((conv, &t), gy, (start, count), scratch, &mut *z);
                transform_chunk_output_grads(args);
                // n[xi] = z[xi] U[xi], `[tile][c_in]`.
                products((cols, c_in, c_out), z, rhs, nn)?;
                let scratch = (&mut *plane, &mut *work);
                untransform_chunk_input_grads(((conv, &t), &*nn, count, scratch, &mut dx));
            }
        }
        Ok(())
    })?;
    Ok(all_finite(&dx).then_some(dx))
}

/// The gradient of `<gy, conv(x, w)>` with respect to `w` for every task,
/// `[tasks][c_out][c_in][3][3]`; `None` where a result is not finite.
pub(super) fn weight_grad<T: WithDType>(
    conv: &Conv,
    images: &[T],
    gy: &[T],
) -> Result<Option<Vec<T>>> {
    let t = Tiles::new(conv);
    let (c_in, c_out) = (conv.c_in, conv.c_out);
    let (image, gy_image, tiles) = (c_in * conv.h * conv.w, c_out * t.ho * t.wo, t.per_image());
    let chunk = chunk(conv, &t, c_in, c_out);
    let mut dw = Vec::with_capacity(conv.count() * c_out * c_in * 9);
    let sizes = scratch_sizes(conv, &t, c_in, c_out);
    with_scratch(sizes.iter().sum(), |scratch: &mut [T]| -> Result<()> {
        let [du, v, z, plane, gy_plane, work] = split(scratch, sizes);
        plane.fill(T::zero());
        gy_plane.fill(T::zero());
        let per_task = images
            .chunks_exact(conv.n * image)
            .zip(gy.chunks_exact(conv.n * gy_image));
        for (images, gy) in per_task {
            for start in (0..conv.n).step_by(chunk) {
                let count = chunk.min(conv.n - start);
                let cols = count * tiles;
                let (v, z) = (&mut v[..XI * c_in * cols], &mut z[..XI * c_out * cols]);
                let scratch = (&mut *plane, &mut *work);
                let args = ((conv, &t), images, (start, count), scratch, &mut *v);
                transform_chunk_inputs(args);
                let scratch = (&mut *gy_plane, &mut *work);
                let args = ((conv, &t), gy, (start, count), scratch, &mut *z);
                transform_chunk_output_grads(args);
                // du[xi] (+)= z[xi]^T v[xi], z[xi]^T as a view: element (co, j) at j c_out + co.
                let parallelism = parallelism(c_out * c_in * cols);
                for xi in 0..XI {
                    let lhs = Strided {
                        data: &z[xi * cols * c_out..][..cols * c_out],
                        row_stride: 1,
                        col_stride: c_out,
                    };
                    let rhs = Strided::rows(&v[xi * cols * c_in..][..cols * c_in], c_in);
                    let dst = &mut du[xi * c_out * c_in..][..c_out * c_in];
                    matmul_into((c_out, c_in, cols), lhs, rhs, dst, start > 0, parallelism)?;
                }
            }
            untransform_kernel_grads((conv, &*du, &mut *work, &mut dw));
        }
        Ok(())
    })?;
    Ok(all_finite(&dw).then_some(dw))
}

/// `buf` cut into consecutive pieces of the given sizes.
fn split<T, const N: usize>(mut buf: &mut [T], sizes: [usize; N]) -> [&mut [T]; N] {
    sizes.map(|len| {
        let (head, tail) = std::mem::take(&mut buf).split_at_mut(len);
        buf = tail;
        head
    })
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var};

    use crate::ops::im2col::{self, Conv};

    fn conv(tasks: Option<usize>, (n, c_in, h, w, c_out, padding): Case) -> Conv {
        Conv {
            tasks,
            n,
            c_in,
            h,
            w,
            c_out,
            kh: 3,
            kw: 3,
            padding,
            stride: 1,
            dilation: 1,
        }
    }

    /// `(n, c_in, h, w, c_out, padding)`.
    type Case = (usize, usize, usize, usize, usize, usize);

    /// Odd and even outputs (a last tile cut in half), padding 0 to 2, channel counts off
    /// the vector width, and a batch of three chunks.
    const CASES: [Case; 5] = [
        (3, 16, 13, 13, 16, 0),
        (2, 16, 12, 9, 20, 1),
        (2, 17, 8, 10, 16, 2),
        (1, 24, 6, 6, 16, 0),
        (60, 16, 13, 13, 16, 0),
    ];

    /// `|a - b|` at its largest over `max(|b|, 1)`, every element.
    fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
        assert_eq!(a.dims(), b.dims());
        let (a, b) = (
            a.to_dtype(DType::F64).unwrap(),
            b.to_dtype(DType::F64).unwrap(),
        );
        let scale = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
        let scale = scale.to_scalar::<f64>().unwrap().max(1.0);
        let d = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap();
        d.to_scalar::<f64>().unwrap() / scale
    }

    /// The CNN's middle layer takes the Winograd kernels; its first (one input channel)
    /// and last (3 x 3 outputs) layers, other kernel sizes, strides, dilations, and images
    /// too large for one chunk do not.
    #[test]
    fn applies_where_it_saves_multiplications() {
        let base = (75, 64, 13, 13, 64, 0);
        assert!(super::applies(&conv(None, base)));
        assert!(super::applies(&conv(Some(16), (5, 64, 13, 13, 64, 0))));
        for case in [
            (75, 1, 28, 28, 64, 0),
            (75, 64, 5, 5, 64, 0),
            (1, 64, 224, 224, 64, 1),
        ] {
            assert!(!super::applies(&conv(None, case)), "{case:?}");
        }
        let strided = Conv {
            stride: 2,
            ..conv(None, base)
        };
        let dilated = Conv {
            dilation: 2,
            ..conv(None, base)
        };
        let wide = Conv {
            kw: 5,
            ..conv(None, base)
        };
        let empty = conv(None, (0, 64, 13, 13, 64, 0));
        for geometry in [strided, dilated, wide, empty] {
            assert!(!super::applies(&geometry), "{geometry:?}");
        }
    }

    /// The three kernels agree with candle's convolution and its backprop (f64 to 1e-13 of
    /// the largest value, f32 to 1e-5), and they are the kernels that ran.
    #[test]
    fn matches_the_direct_convolution() -> crate::Result<()> {
        let dev = Device::Cpu;
        for case in CASES {
            let (n, c_in, h, w, c_out, padding) = case;
            let geometry = conv(None, case);
            assert!(super::applies(&geometry), "{case:?}");
            for (dtype, tol) in [(DType::F64, 1e-13), (DType::F32, 1e-5)] {
                let x = Tensor::randn(0f64, 1.0, (n, c_in, h, w), &dev)?.to_dtype(dtype)?;
                let k = Tensor::randn(0f64, 1.0, (c_out, c_in, 3, 3), &dev)?.to_dtype(dtype)?;
                let b = Tensor::randn(0f64, 1.0, c_out, &dev)?.to_dtype(dtype)?;
                let (xv, kv) = (Var::from_tensor(&x)?, Var::from_tensor(&k)?);
                let theirs = xv
                    .conv2d(&kv, padding, 1, 1, 1)?
                    .broadcast_add(&b.reshape((1, c_out, 1, 1))?)?;
                let gy = Tensor::randn(0f64, 1.0, theirs.dims(), &dev)?.to_dtype(dtype)?;
                let grads = (&theirs * &gy)?.sum_all()?.backward()?;
                let ours = im2col::conv2d(&x, &k, Some(&b), (padding, 1, 1), false)?.unwrap();
                let dx = im2col::input_grad(&geometry, &gy, &k)?.unwrap();
                let dw = im2col::weight_grad(&geometry, &x, &gy)?.unwrap();
                let label = format!("{case:?} {dtype:?}");
                assert!(rel_diff(&ours, &theirs) < tol, "{label} forward");
                assert!(rel_diff(&dx, grads.get(&xv).unwrap()) < tol, "{label} dx");
                assert!(rel_diff(&dw, grads.get(&kv).unwrap()) < tol, "{label} dw");
            }
        }
        Ok(())
    }

    /// With a task axis, each task's results are the plain kernels' on its operands, bit for
    /// bit.
    #[test]
    fn tasks_match_each_task_alone() -> crate::Result<()> {
        let dev = Device::Cpu;
        let tasks = 3;
        for case in [CASES[0], CASES[1]] {
            let (n, c_in, h, w, c_out, padding) = case;
            let x = Tensor::randn(0f64, 1.0, (tasks, n, c_in, h, w), &dev)?;
            let k = Tensor::randn(0f64, 1.0, (tasks, c_out, c_in, 3, 3), &dev)?;
            let b = Tensor::randn(0f64, 1.0, (tasks, c_out), &dev)?;
            let y = im2col::conv2d(&x, &k, Some(&b), (padding, 1, 1), true)?.unwrap();
            let gy = Tensor::randn(0f64, 1.0, y.dims(), &dev)?;
            let dx = im2col::input_grad(&conv(Some(tasks), case), &gy, &k)?.unwrap();
            let dw = im2col::weight_grad(&conv(Some(tasks), case), &x, &gy)?.unwrap();
            for t in 0..tasks {
                let (xt, kt, gyt, bt) = (x.get(t)?, k.get(t)?, gy.get(t)?, b.get(t)?);
                let alone = conv(None, case);
                let y1 = im2col::conv2d(&xt, &kt, Some(&bt), (padding, 1, 1), false)?.unwrap();
                let dx1 = im2col::input_grad(&alone, &gyt, &kt)?.unwrap();
                let dw1 = im2col::weight_grad(&alone, &xt, &gyt)?.unwrap();
                for (what, a, b) in [("y", &y, y1), ("dx", &dx, dx1), ("dw", &dw, dw1)] {
                    let a = a.get(t)?.flatten_all()?.to_vec1::<f64>()?;
                    assert_eq!(a, b.flatten_all()?.to_vec1::<f64>()?, "{case:?} {what}");
                }
            }
        }
        Ok(())
    }

    /// An inf or a NaN in an operand gives the direct convolution's inf and NaN (the
    /// transforms alone would turn `inf` into `inf - inf`), and the finite entries stay
    /// within rounding of it.
    #[test]
    fn non_finite_operands_give_the_direct_results() -> crate::Result<()> {
        let dev = Device::Cpu;
        let case = CASES[0];
        let (n, c_in, h, w, c_out, _) = case;
        let geometry = conv(None, case);
        let k = Tensor::randn(0f64, 1.0, (c_out, c_in, 3, 3), &dev)?.abs()?;
        for bad in [f64::INFINITY, f64::NEG_INFINITY, f64::NAN] {
            let mut xs = Tensor::randn(0f64, 1.0, (n, c_in, h, w), &dev)?
                .flatten_all()?
                .to_vec1::<f64>()?;
            xs[5 * w + 6] = bad;
            let x = Tensor::from_vec(xs, (n, c_in, h, w), &dev)?;
            let y = im2col::conv2d(&x, &k, None, (0, 1, 1), false)?.unwrap();
            let theirs = x.conv2d(&k, 0, 1, 1, 1)?;
            let gy = Tensor::ones_like(&y)?;
            let dw = im2col::weight_grad(&geometry, &x, &gy)?.unwrap();
            let xv = Var::from_tensor(&x)?;
            let kv = Var::from_tensor(&k)?;
            let grads = xv.conv2d(&kv, 0, 1, 1, 1)?.sum_all()?.backward()?;
            let dw_theirs = grads.get(&kv).unwrap();
            // The input gradient for an output gradient with the bad value.
            let mut gys = Tensor::randn(0f64, 1.0, y.dims(), &dev)?
                .flatten_all()?
                .to_vec1::<f64>()?;
            gys[3 * (w - 2) + 4] = bad;
            let gy_bad = Tensor::from_vec(gys, y.dims(), &dev)?;
            let dx = im2col::input_grad(&geometry, &gy_bad, &k)?.unwrap();
            let grads = (xv.conv2d(&kv, 0, 1, 1, 1)? * &gy_bad)?
                .sum_all()?
                .backward()?;
            let dx_theirs = grads.get(&xv).unwrap();
            let cases = [
                ("y", &y, &theirs),
                ("dw", &dw, dw_theirs),
                ("dx", &dx, dx_theirs),
            ];
            for (what, a, b) in cases {
                let a = a.flatten_all()?.to_vec1::<f64>()?;
                let b = b.flatten_all()?.to_vec1::<f64>()?;
                assert!(a.iter().any(|v| !v.is_finite()), "{bad} {what}");
                for (p, q) in a.iter().zip(&b) {
                    let same = if q.is_finite() {
                        (p - q).abs() <= 1e-12 * q.abs().max(1.0)
                    } else {
                        p.is_nan() == q.is_nan() && (q.is_nan() || p == q)
                    };
                    assert!(same, "{bad} {what}: {p} against {q}");
                }
            }
        }
        Ok(())
    }
}
