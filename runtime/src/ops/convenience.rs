//! Small ops a first program reaches for: `argmax`/`argmin`/`topk` along a dimension,
//! `clamp_min`/`clamp_max`, the matrix-vector product `mv`, and a typed `to_vec`.

use candle_core::WithDType;

use super::Operand;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

fn check_dim(op: &'static str, t: &Tensor, dim: usize) -> Result<()> {
    if dim >= t.rank() {
        return Err(Error::InvalidArgument {
            op,
            message: format!("dimension {dim} out of range for shape {:?}", t.dims()),
        });
    }
    Ok(())
}

/// The `u32` indices of an arg-reduction over `dim` of an empty tensor whose `dim` is not
/// empty: as empty as the tensor (candle's reduction takes no empty tensor).
fn empty_indices(t: &Tensor, dim: usize) -> Result<Tensor> {
    let mut shape = t.dims().to_vec();
    shape.remove(dim);
    Tensor::zeros(&shape, candle_core::DType::U32, t.device())
}

impl Tensor {
    /// Index of the largest value along `dim`, removing it (`torch.argmax(dim)`): a `u32`
    /// constant (not differentiable). Among equal values, the first; a slice holding a NaN
    /// gives its first NaN, as in PyTorch.
    pub fn argmax(&self, dim: usize) -> Result<Tensor> {
        check_dim("argmax", self, dim)?;
        super::reduce::check_not_empty("argmax", self, dim)?;
        if self.elem_count() == 0 {
            return empty_indices(self, dim);
        }
        nan_first(self.value(), dim, self.value().argmax(dim)?)
    }

    /// Index of the smallest value along `dim`, removing it (`torch.argmin(dim)`): a `u32`
    /// constant (not differentiable). Among equal values, the first; a slice holding a NaN
    /// gives its first NaN, as in PyTorch.
    pub fn argmin(&self, dim: usize) -> Result<Tensor> {
        check_dim("argmin", self, dim)?;
        super::reduce::check_not_empty("argmin", self, dim)?;
        if self.elem_count() == 0 {
            return empty_indices(self, dim);
        }
        nan_first(self.value(), dim, self.value().argmin(dim)?)
    }

    /// The `k` largest values along `dim`, largest first, and their indices
    /// (`torch.topk(k, dim)`): the values are differentiable (the gradient goes to the
    /// selected positions, as a `gather`), the indices are a `u32` constant. `k` must not
    /// exceed the dimension's size; `k = 0`, or an empty tensor, gives empty results, as in
    /// PyTorch. NaN counts as the largest value, as in PyTorch (its order among infinities
    /// is unspecified).
    pub fn topk(&self, k: usize, dim: usize) -> Result<(Tensor, Tensor)> {
        check_dim("topk", self, dim)?;
        let size = self.dims()[dim];
        if k > size {
            return Err(Error::InvalidArgument {
                op: "topk",
                message: format!("k = {k} exceeds the size {size} of dimension {dim}"),
            });
        }
        if k == 0 || self.elem_count() == 0 {
            // Nothing to sort (candle's sort takes no empty tensor).
            let mut shape = self.dims().to_vec();
            shape[dim] = k;
            let indices = Tensor::zeros(&shape, candle_core::DType::U32, self.device())?;
            return Ok((super::connected_zeros(&shape, self, &[self])?, indices));
        }
        let last = self.rank() - 1;
        // NaN sorts as the largest value (PyTorch's topk); candle's sort does not order it.
        let key = if self.dtype().is_float() {
            let x = self.value();
            x.ne(x)?
                .where_cond(&x.ones_like()?.affine(0.0, f64::INFINITY)?, x)?
        } else {
            self.value().clone()
        };
        let sorted = key
            .transpose(dim, last)?
            .contiguous()?
            .arg_sort_last_dim(false)?
            .narrow(last, 0, k)?
            .transpose(dim, last)?
            .contiguous()?;
        let indices = Tensor::new(sorted);
        Ok((self.gather(&indices, dim)?, indices))
    }

    /// Every element raised to at least `min` (`torch.clamp_min`); `min` is a float or a
    /// tensor that broadcasts. The gradient passes to `self` where `x >= min`.
    pub fn clamp_min(&self, min: impl Into<Operand>) -> Result<Tensor> {
        self.clamp(min, f64::INFINITY)
    }

    /// Every element lowered to at most `max` (`torch.clamp_max`); `max` is a float or a
    /// tensor that broadcasts. The gradient passes to `self` where `x <= max`.
    pub fn clamp_max(&self, max: impl Into<Operand>) -> Result<Tensor> {
        self.clamp(f64::NEG_INFINITY, max)
    }

    /// Matrix-vector product of `self` `[m, n]` with `vector` `[n]`, giving `[m]`
    /// (`torch.mv`); differentiable in both.
    pub fn mv(&self, vector: &Tensor) -> Result<Tensor> {
        if self.rank() != 2 || vector.rank() != 1 || self.dims()[1] != vector.dims()[0] {
            return Err(Error::ShapeMismatch {
                op: "mv",
                expected: format!(
                    "a matrix [m, n] and a vector [n]; the vector has shape {:?}",
                    vector.dims()
                ),
                got: self.dims().to_vec(),
            });
        }
        self.matmul(&vector.unsqueeze(1)?)?.squeeze(1)
    }

    /// Every element, in row-major order, converted to `T` (`f32`, `f64`, `u32`, `i64`,
    /// ...) as [`Tensor::to_dtype`] converts: floats to integers truncate. Like
    /// [`Tensor::to_vec_f64`], it reads a value out of the graph.
    #[track_caller]
    pub fn to_vec<T: WithDType>(&self) -> Result<Vec<T>> {
        crate::tensor::graph_exit::note(
            "to_vec",
            self.requires_grad(),
            std::panic::Location::caller(),
        );
        let flat = self.0.value.flatten_all()?;
        let flat = if flat.dtype() == T::DTYPE {
            flat
        } else {
            flat.to_dtype(T::DTYPE)?
        };
        Ok(flat.to_vec1::<T>()?)
    }
}

/// `indices` (an argmax or argmin along `dim`), replaced by the first NaN's index in every
/// slice that holds one. Integer tensors hold no NaN.
fn nan_first(x: &candle_core::Tensor, dim: usize, indices: candle_core::Tensor) -> Result<Tensor> {
    if !x.dtype().is_float() {
        return Ok(Tensor::new(indices));
    }
    let is_nan = x.ne(x)?;
    let has_nan = is_nan.max(dim)?;
    if has_nan.max_all()?.to_scalar::<u8>()? == 0 {
        return Ok(Tensor::new(indices));
    }
    let first_nan = is_nan.argmax(dim)?;
    Ok(Tensor::new(has_nan.where_cond(&first_nan, &indices)?))
}
