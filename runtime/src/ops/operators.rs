//! `+ - * /` between tensors and floats, returning `Result<Tensor>` as candle does.

use std::ops::{Add, Div, Mul, Sub};

use super::Operand;
use crate::error::Result;
use crate::tensor::Tensor;

macro_rules! bin_trait {
    ($trait:ident, $fn:ident) => {
        impl<R: Into<Operand>> $trait<R> for Tensor {
            type Output = Result<Tensor>;
            fn $fn(self, rhs: R) -> Self::Output {
                Tensor::$fn(&self, rhs)
            }
        }

        impl<R: Into<Operand>> $trait<R> for &Tensor {
            type Output = Result<Tensor>;
            fn $fn(self, rhs: R) -> Self::Output {
                Tensor::$fn(self, rhs)
            }
        }

        impl $trait<Tensor> for f64 {
            type Output = Result<Tensor>;
            fn $fn(self, rhs: Tensor) -> Self::Output {
                rhs.full_like(self)?.$fn(&rhs)
            }
        }

        impl $trait<&Tensor> for f64 {
            type Output = Result<Tensor>;
            fn $fn(self, rhs: &Tensor) -> Self::Output {
                rhs.full_like(self)?.$fn(rhs)
            }
        }
    };
}

bin_trait!(Add, add);
bin_trait!(Sub, sub);
bin_trait!(Mul, mul);
bin_trait!(Div, div);
