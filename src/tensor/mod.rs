//! `Tensor<T>`: a shape and a contiguous, reference-counted CPU buffer.
//!
//! Storage is an `ndarray::ArcArray` in standard (row-major) layout, so cloning a tensor is
//! cheap (the autograd tape keeps the inputs an op's backward needs by cloning them) and
//! kernels see a plain slice. Writing to a shared tensor copies it first.

mod float;
mod random;

pub use float::Float;
pub use random::Rng;

use ndarray::{ArcArray, IxDyn};

#[derive(Clone, Debug)]
pub struct Tensor<T: Float> {
    array: ArcArray<T, IxDyn>,
}

impl<T: Float> Tensor<T> {
    /// A tensor of the given shape holding `data` in row-major order.
    ///
    /// Panics when `data.len()` is not the product of `shape`: that is a bug in the caller.
    pub fn from_vec(shape: &[usize], data: Vec<T>) -> Self {
        let array = ArcArray::from_shape_vec(IxDyn(shape), data)
            .unwrap_or_else(|_| panic!("tensor of shape {shape:?} needs {} elements", shape.iter().product::<usize>()));
        Tensor { array }
    }

    pub fn zeros(shape: &[usize]) -> Self {
        Self::full(shape, T::zero())
    }

    pub fn full(shape: &[usize], value: T) -> Self {
        Self::from_vec(shape, vec![value; shape.iter().product()])
    }

    pub fn scalar(value: T) -> Self {
        Self::from_vec(&[], vec![value])
    }

    /// Elements drawn from N(0, std²).
    pub fn randn(shape: &[usize], std: f64, rng: &mut Rng) -> Self {
        let count = shape.iter().product();
        Self::from_vec(shape, (0..count).map(|_| T::of(rng.normal() * std)).collect())
    }

    pub fn shape(&self) -> &[usize] {
        self.array.shape()
    }

    pub fn len(&self) -> usize {
        self.array.len()
    }

    pub fn is_empty(&self) -> bool {
        self.array.is_empty()
    }

    /// The elements in row-major order.
    pub fn data(&self) -> &[T] {
        self.array.as_slice().expect("tensors are always contiguous")
    }

    /// Mutable elements; copies the buffer first if another tensor shares it.
    pub fn data_mut(&mut self) -> &mut [T] {
        self.array.as_slice_mut().expect("tensors are always contiguous")
    }

    pub fn into_vec(self) -> Vec<T> {
        self.array.into_owned().into_raw_vec_and_offset().0
    }

    /// The same elements under another shape of equal size (no copy).
    pub fn reshape(&self, shape: &[usize]) -> Self {
        assert_eq!(shape.iter().product::<usize>(), self.len(), "reshape {:?} to {shape:?}", self.shape());
        Tensor { array: self.array.clone().into_shape_with_order(IxDyn(shape)).expect("contiguous reshape") }
    }

    /// The single element of a one-element tensor.
    pub fn item(&self) -> T {
        assert_eq!(self.len(), 1, "item() of a tensor of shape {:?}", self.shape());
        self.data()[0]
    }

    /// Converts every element to another float type.
    pub fn cast<U: Float>(&self) -> Tensor<U> {
        Tensor::from_vec(self.shape(), self.data().iter().map(|&x| U::of(x.as_f64())).collect())
    }

    /// `self += other`, elementwise; shapes must match.
    pub fn add_assign(&mut self, other: &Tensor<T>) {
        assert_eq!(self.shape(), other.shape(), "add_assign shapes");
        for (a, &b) in self.data_mut().iter_mut().zip(other.data()) {
            *a += b;
        }
    }

    /// Sum of squares of all elements, accumulated in f64.
    pub fn sum_of_squares(&self) -> f64 {
        self.data().iter().map(|&x| x.as_f64() * x.as_f64()).sum()
    }

    /// The largest absolute elementwise difference to `other`.
    pub fn max_abs_diff(&self, other: &Tensor<T>) -> f64 {
        assert_eq!(self.shape(), other.shape(), "max_abs_diff shapes");
        self.data().iter().zip(other.data()).map(|(&a, &b)| (a.as_f64() - b.as_f64()).abs()).fold(0.0, f64::max)
    }
}
