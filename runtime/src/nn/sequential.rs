//! `Sequential`: layers applied in order, named `0`, `1`, ... as in PyTorch.

use std::any::Any;
use std::sync::Arc;

use super::{Activation, MaxPool2d, Module, Parameters, Visitor};
use crate::error::Result;
use crate::tensor::Tensor;

/// A layer that can sit in a [`Sequential`]: a [`Module`] with [`Parameters`] that can be
/// cloned. Implemented for every such `Clone + Send + Sync` type.
pub trait Layer: Module + Parameters + Send + Sync {
    /// A boxed clone.
    fn clone_box(&self) -> Box<dyn Layer>;

    /// The layer as `Any`, so that [`Sequential`] can recognise the built-in layers it
    /// reorders. The default (for a hand-written impl) is recognised as none of them.
    fn as_any(&self) -> &dyn Any {
        &()
    }
}

impl<T: Module + Parameters + Clone + Send + Sync + 'static> Layer for T {
    fn clone_box(&self) -> Box<dyn Layer> {
        Box::new(self.clone())
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl Clone for Box<dyn Layer> {
    fn clone(&self) -> Self {
        self.clone_box()
    }
}

type SharedFn = Arc<dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync>;

/// A parameter-free layer from a closure (see [`Sequential::add_fn`]).
#[derive(Clone)]
pub struct Func(SharedFn);

impl Func {
    /// Wraps a closure.
    pub fn new(f: impl Fn(&Tensor) -> Result<Tensor> + Send + Sync + 'static) -> Self {
        Func(Arc::new(f))
    }
}

impl std::fmt::Debug for Func {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Func")
    }
}

impl Module for Func {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        (self.0)(x)
    }
}

impl Parameters for Func {
    fn visit(&mut self, _v: &mut Visitor<'_>) -> Result<()> {
        Ok(())
    }
}

/// Layers applied in order. Children are named by position, counting parameter-free
/// layers too, as PyTorch's `nn.Sequential` does: `[linear, relu, linear]` has
/// `0.weight`, `0.bias`, `2.weight`, `2.bias`.
#[derive(Clone, Default)]
pub struct Sequential {
    layers: Vec<Box<dyn Layer>>,
}

impl std::fmt::Debug for Sequential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sequential({} layers)", self.layers.len())
    }
}

/// An empty [`Sequential`].
pub fn seq() -> Sequential {
    Sequential::default()
}

impl Sequential {
    /// Appends a layer.
    #[allow(clippy::should_implement_trait)]
    pub fn add<L: Layer + 'static>(mut self, layer: L) -> Self {
        self.layers.push(Box::new(layer));
        self
    }

    /// Appends a parameter-free closure.
    pub fn add_fn(self, f: impl Fn(&Tensor) -> Result<Tensor> + Send + Sync + 'static) -> Self {
        self.add(Func::new(f))
    }

    /// Number of layers.
    pub fn len(&self) -> usize {
        self.layers.len()
    }

    /// Whether it has no layers.
    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }

    /// The layers.
    pub fn layers(&self) -> &[Box<dyn Layer>] {
        &self.layers
    }
}

impl Module for Sequential {
    /// The layers in order, except that a ReLU followed by a max pool runs as the pool
    /// followed by the ReLU: the same values and derivatives of every order (max and ReLU
    /// commute exactly, ties and NaN included), on a tensor a quarter the size for 2 x 2
    /// windows. A pass that fails puts back the buffers it wrote
    /// ([`super::restore_buffers_on_error`]).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        super::restore_buffers_on_error(|| {
            let mut y = x.clone();
            let mut rest = self.layers.as_slice();
            while let Some((layer, tail)) = rest.split_first() {
                let pool = tail
                    .first()
                    .and_then(|next| next.as_any().downcast_ref::<MaxPool2d>());
                let relu = layer.as_any().downcast_ref::<Activation>() == Some(&Activation::Relu);
                (y, rest) = match pool {
                    Some(pool) if relu => (pool.forward(&y)?.relu()?, &tail[1..]),
                    _ => (layer.forward(&y)?, tail),
                };
            }
            Ok(y)
        })
    }
}

impl Parameters for Sequential {
    fn visit(&mut self, v: &mut Visitor<'_>) -> Result<()> {
        for (i, layer) in self.layers.iter_mut().enumerate() {
            layer.visit(&mut v.pp(&i.to_string()))?;
        }
        Ok(())
    }
}
