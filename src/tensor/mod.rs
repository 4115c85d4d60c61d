//! `Tensor<T>`: a shape, and elements that live on the CPU or on one GPU.
//!
//! On the CPU the elements are an `ndarray::ArcArray` in standard (row-major) layout: cloning a
//! tensor is cheap (an op's backward rule keeps the inputs it needs by cloning them),
//! kernels see a plain slice, and writing to a shared tensor copies it first. On a GPU they are
//! a window into a reference-counted device buffer, f32 only ([`CudaTensor`]), which in bf16
//! training may carry the same elements rounded to bf16 (written by the kernel that wrote them,
//! dropped when the tensor is written in place); the same rules hold, and [`Tensor::data`] is not
//! available there: bring the tensor to the host first with [`Tensor::to_host`]. Ops look at where their inputs live and run the kernel of that device
//! (`ops/`); nothing else in the crate needs to know.

mod device;

use std::sync::Arc;

pub use self::device::Device;
pub use crate::kernels::Float;
pub use crate::random::Rng;

use multitoken_cuda::{Buffer, Gpu, View};
use ndarray::{ArcArray, ArrayD, ArrayViewD, IxDyn};

use crate::error::Result;

/// A shape and its elements in row-major order, on the CPU or a GPU. Cloning shares the
/// elements; writing to shared elements copies them first.
#[derive(Clone, Debug)]
pub struct Tensor<T: Float> {
    storage: Storage<T>,
}

#[derive(Clone, Debug)]
enum Storage<T: Float> {
    Cpu(ArcArray<T, IxDyn>),
    Cuda(CudaTensor),
}

/// A tensor's elements on a GPU: `len` f32s at `offset` in a shared buffer, and the device; in
/// bf16 training, where the kernel that wrote them also wrote them rounded to bf16 (for the
/// products that read them), that rounding too, indexed as the buffer is.
#[derive(Clone)]
pub struct CudaTensor {
    gpu: Arc<Gpu>,
    buffer: Arc<Buffer<f32>>,
    rounded: Option<Arc<Buffer<u16>>>,
    offset: usize,
    shape: Vec<usize>,
}

/// A GPU tensor's elements rounded to bf16: what a bf16 product reads, and all that a backward
/// rule keeps of an input it reads only rounded (a window into a shared buffer).
#[derive(Clone)]
pub struct Rounded {
    buffer: Arc<Buffer<u16>>,
    offset: usize,
    len: usize,
}

impl Rounded {
    /// The whole of `buffer`.
    pub fn new(buffer: Buffer<u16>) -> Self {
        let len = buffer.len();
        Rounded { buffer: Arc::new(buffer), offset: 0, len }
    }

    /// The bf16 elements, as a device view for a kernel or a product.
    pub fn view(&self) -> View<u16> {
        self.buffer.view().slice(self.offset, self.len)
    }
}

impl std::fmt::Debug for CudaTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaTensor({:?} on {})", self.shape, self.gpu.name())
    }
}

impl CudaTensor {
    /// The GPU the elements live on.
    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// The number of elements: the product of the shape.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The elements, as a device view for a kernel.
    pub fn view(&self) -> View<f32> {
        self.buffer.view().slice(self.offset, self.len())
    }

    /// The elements rounded to bf16, where the kernel that wrote them wrote that too.
    pub fn rounded(&self) -> Option<Rounded> {
        self.rounded.as_ref().map(|buffer| Rounded { buffer: buffer.clone(), offset: self.offset, len: self.len() })
    }

    /// The elements rounded to bf16: the rounding the tensor carries, or a new one.
    pub fn rounded_or_round(&self) -> Result<Rounded> {
        match self.rounded() {
            Some(rounded) => Ok(rounded),
            None => Ok(Rounded::new(self.gpu.bf16_copy(self.view())?)),
        }
    }

    /// Whether no other tensor shares the buffer (then it may be written in place). Writing in
    /// place outdates the rounding, so a caller that will write drops it.
    fn unique(&mut self) -> bool {
        Arc::get_mut(&mut self.buffer).is_some()
    }
}

fn elements(shape: &[usize]) -> usize {
    shape.iter().product()
}

impl<T: Float> Tensor<T> {
    /// A tensor of the given shape holding `data` in row-major order, on the CPU.
    ///
    /// Panics when `data.len()` is not the product of `shape`: that is a bug in the caller.
    pub fn from_vec(shape: &[usize], data: Vec<T>) -> Self {
        let array = ArcArray::from_shape_vec(IxDyn(shape), data)
            .unwrap_or_else(|_| panic!("tensor of shape {shape:?} needs {} elements", elements(shape)));
        Tensor { storage: Storage::Cpu(array) }
    }

    /// A CPU tensor holding `array` (copied into row-major order if it is not already).
    pub fn from_array(array: ArrayD<T>) -> Self {
        let array = if array.is_standard_layout() { array } else { array.as_standard_layout().into_owned() };
        Tensor { storage: Storage::Cpu(array.into_shared()) }
    }

    /// The elements as an `ndarray` view, with the tensor's shape. CPU tensors only, as
    /// [`Tensor::data`].
    pub fn array(&self) -> ArrayViewD<'_, T> {
        self.cpu_array().view()
    }

    /// A tensor on `gpu` holding `buffer` (of exactly the shape's size).
    pub fn from_cuda(gpu: &Arc<Gpu>, buffer: Buffer<f32>, shape: &[usize]) -> Self {
        assert_eq!(buffer.len(), elements(shape), "a device buffer of {} elements for shape {shape:?}", buffer.len());
        Tensor {
            storage: Storage::Cuda(CudaTensor {
                gpu: gpu.clone(),
                buffer: Arc::new(buffer),
                rounded: None,
                offset: 0,
                shape: shape.to_vec(),
            }),
        }
    }

    /// A tensor on `gpu` holding `buffer`, and `rounded` where given: the same elements rounded
    /// to bf16 by the kernel that wrote them (of the same size).
    pub fn from_cuda_with_rounding(gpu: &Arc<Gpu>, buffer: Buffer<f32>, rounded: Option<Buffer<u16>>, shape: &[usize]) -> Self {
        if let Some(rounded) = &rounded {
            assert_eq!(rounded.len(), buffer.len(), "a rounding of {} elements for {}", rounded.len(), buffer.len());
        }
        let mut tensor = Self::from_cuda(gpu, buffer, shape);
        if let Storage::Cuda(cuda) = &mut tensor.storage {
            cuda.rounded = rounded.map(Arc::new);
        }
        tensor
    }

    /// Zeros of the given shape, on the CPU.
    pub fn zeros(shape: &[usize]) -> Self {
        Self::full(shape, T::zero())
    }

    /// `value` in every element, on the CPU.
    pub fn full(shape: &[usize], value: T) -> Self {
        Self::from_vec(shape, vec![value; elements(shape)])
    }

    /// A tensor of shape `[]` holding `value`, on the CPU.
    pub fn scalar(value: T) -> Self {
        Self::from_vec(&[], vec![value])
    }

    /// Elements drawn from N(0, std²).
    pub fn randn(shape: &[usize], std: f64, rng: &mut Rng) -> Self {
        let count = elements(shape);
        Self::from_vec(shape, (0..count).map(|_| T::of(rng.normal() * std)).collect())
    }

    /// `value` in every element, on `device`.
    pub fn full_on(shape: &[usize], value: T, device: &Device) -> Result<Self> {
        match device {
            Device::Cpu => Ok(Self::full(shape, value)),
            Device::Cuda(gpu) => {
                let buffer = gpu.upload(&vec![value.as_f64() as f32; elements(shape)])?;
                Ok(Self::from_cuda(gpu, buffer, shape))
            }
        }
    }

    /// The size of each axis; `[]` for a scalar.
    pub fn shape(&self) -> &[usize] {
        match &self.storage {
            Storage::Cpu(array) => array.shape(),
            Storage::Cuda(cuda) => &cuda.shape,
        }
    }

    /// The number of elements: the product of the shape.
    pub fn len(&self) -> usize {
        elements(self.shape())
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Where the elements live.
    pub fn device(&self) -> Device {
        match &self.storage {
            Storage::Cpu(_) => Device::Cpu,
            Storage::Cuda(cuda) => Device::Cuda(cuda.gpu.clone()),
        }
    }

    /// The GPU side, when the tensor lives on a GPU.
    pub fn cuda(&self) -> Option<&CudaTensor> {
        match &self.storage {
            Storage::Cpu(_) => None,
            Storage::Cuda(cuda) => Some(cuda),
        }
    }

    /// The GPU side, to write in place (the optimizer's update): copies the elements first if
    /// another tensor shares them, so that it keeps its own. None on the CPU.
    pub fn cuda_mut(&mut self) -> Result<Option<&CudaTensor>> {
        let Storage::Cuda(cuda) = &mut self.storage else { return Ok(None) };
        if !cuda.unique() {
            let copy = cuda.gpu.duplicate(cuda.view())?;
            *cuda = CudaTensor { buffer: Arc::new(copy), offset: 0, ..cuda.clone() };
        }
        cuda.rounded = None;
        Ok(Some(cuda))
    }

    fn cpu_array(&self) -> &ArcArray<T, IxDyn> {
        match &self.storage {
            Storage::Cpu(array) => array,
            Storage::Cuda(cuda) => {
                panic!("a tensor of shape {:?} on {} has no host data; call to_host() first", cuda.shape, cuda.gpu.name())
            }
        }
    }

    /// The elements in row-major order. CPU tensors only: panics for a tensor on a GPU, whose
    /// elements [`Tensor::to_host`] brings back.
    pub fn data(&self) -> &[T] {
        self.cpu_array().as_slice().expect("tensors are always contiguous")
    }

    /// Mutable elements; copies the buffer first if another tensor shares it. CPU tensors only.
    pub fn data_mut(&mut self) -> &mut [T] {
        match &mut self.storage {
            Storage::Cpu(array) => array.as_slice_mut().expect("tensors are always contiguous"),
            Storage::Cuda(_) => panic!("data_mut() of a tensor on a GPU; call to_host() first"),
        }
    }

    /// The elements in row-major order, copied only if another tensor shares them. CPU tensors
    /// only: panics for a tensor on a GPU.
    pub fn into_vec(self) -> Vec<T> {
        match self.storage {
            Storage::Cpu(array) => array.into_owned().into_raw_vec_and_offset().0,
            Storage::Cuda(_) => panic!("into_vec() of a tensor on a GPU; call to_host() first"),
        }
    }

    /// The same elements on `device` (a copy, unless they are there already).
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        match (&self.storage, device) {
            (Storage::Cpu(_), Device::Cpu) => Ok(self.clone()),
            (Storage::Cuda(cuda), Device::Cuda(gpu)) if Arc::ptr_eq(&cuda.gpu, gpu) => Ok(self.clone()),
            (Storage::Cpu(_), Device::Cuda(gpu)) => {
                if T::DTYPE != f32::DTYPE {
                    return crate::invalid!(
                        "a GPU holds f32 tensors only; this one is {} (cast it first, or keep it on the CPU)",
                        T::DTYPE
                    );
                }
                let host: Vec<f32> = self.data().iter().map(|x| x.as_f64() as f32).collect();
                Ok(Self::from_cuda(gpu, gpu.upload(&host)?, self.shape()))
            }
            (Storage::Cuda(_), _) => self.to_host()?.to_device(device),
        }
    }

    /// The same elements on the CPU.
    pub fn to_host(&self) -> Result<Self> {
        match &self.storage {
            Storage::Cpu(_) => Ok(self.clone()),
            Storage::Cuda(cuda) => {
                let host = cuda.gpu.download(cuda.view())?;
                Ok(Self::from_vec(&cuda.shape, host.into_iter().map(|x| T::of(x as f64)).collect()))
            }
        }
    }

    /// The same elements under another shape of equal size (no copy).
    pub fn reshape(&self, shape: &[usize]) -> Self {
        assert_eq!(elements(shape), self.len(), "reshape {:?} to {shape:?}", self.shape());
        match &self.storage {
            Storage::Cpu(array) => {
                Tensor { storage: Storage::Cpu(array.clone().into_shape_with_order(IxDyn(shape)).expect("contiguous reshape")) }
            }
            Storage::Cuda(cuda) => Tensor { storage: Storage::Cuda(CudaTensor { shape: shape.to_vec(), ..cuda.clone() }) },
        }
    }

    /// Rows `first..first + count` along the first dimension (a view on a GPU, a copy on the CPU).
    pub fn rows(&self, first: usize, count: usize) -> Self {
        let shape = self.shape();
        assert!(!shape.is_empty() && first + count <= shape[0], "rows {first}..{} of a tensor of shape {shape:?}", first + count);
        let row: usize = shape[1..].iter().product();
        let mut new_shape = shape.to_vec();
        new_shape[0] = count;
        match &self.storage {
            Storage::Cpu(_) => Self::from_vec(&new_shape, self.data()[first * row..(first + count) * row].to_vec()),
            Storage::Cuda(cuda) => {
                Tensor { storage: Storage::Cuda(CudaTensor { offset: cuda.offset + first * row, shape: new_shape, ..cuda.clone() }) }
            }
        }
    }

    /// The single element of a one-element tensor on the CPU.
    pub fn item(&self) -> T {
        assert_eq!(self.len(), 1, "item() of a tensor of shape {:?}", self.shape());
        self.data()[0]
    }

    /// Converts every element to another float type (CPU tensors).
    pub fn cast<U: Float>(&self) -> Tensor<U> {
        Tensor::from_vec(self.shape(), self.data().iter().map(|&x| U::of(x.as_f64())).collect())
    }

    /// `self += other`, elementwise, on either device; shapes and devices must match. Writes in
    /// place unless the elements are shared with another tensor, which then keeps its own.
    pub fn add_assign(&mut self, other: &Tensor<T>) -> Result<()> {
        assert_eq!(self.shape(), other.shape(), "add_assign shapes");
        let devices = (self.device(), other.device());
        match (&mut self.storage, &other.storage) {
            (Storage::Cpu(ours), Storage::Cpu(theirs)) => {
                let theirs = theirs.as_slice().expect("tensors are always contiguous");
                for (a, &b) in ours.as_slice_mut().expect("tensors are always contiguous").iter_mut().zip(theirs) {
                    *a += b;
                }
                Ok(())
            }
            (Storage::Cuda(ours), Storage::Cuda(theirs)) if Arc::ptr_eq(&ours.gpu, &theirs.gpu) => {
                let gpu = ours.gpu.clone();
                if ours.unique() {
                    gpu.add(ours.view(), theirs.view(), ours.view())?;
                    ours.rounded = None;
                } else {
                    let sum = gpu.alloc::<f32>(ours.len())?;
                    gpu.add(ours.view(), theirs.view(), sum.view())?;
                    *ours = CudaTensor { gpu: gpu.clone(), buffer: Arc::new(sum), rounded: None, offset: 0, shape: ours.shape.clone() };
                }
                Ok(())
            }
            _ => crate::invalid!("add_assign: the tensors live on different devices ({} and {})", devices.0, devices.1),
        }
    }

    /// Every element times `factor`, on the tensor's device (a new tensor).
    pub fn scaled(&self, factor: T) -> Result<Self> {
        match &self.storage {
            Storage::Cpu(_) => Ok(Self::from_vec(self.shape(), self.data().iter().map(|&x| x * factor).collect())),
            Storage::Cuda(cuda) => {
                let out = cuda.gpu.alloc::<f32>(cuda.len())?;
                cuda.gpu.scale(cuda.view(), factor.as_f64() as f32, out.view())?;
                Ok(Self::from_cuda(&cuda.gpu, out, &cuda.shape))
            }
        }
    }

    /// Sum of squares of all elements of a CPU tensor, accumulated in f64.
    pub fn sum_of_squares(&self) -> f64 {
        self.data().iter().map(|&x| x.as_f64() * x.as_f64()).sum()
    }

    /// The largest absolute elementwise difference to `other` (CPU tensors).
    pub fn max_abs_diff(&self, other: &Tensor<T>) -> f64 {
        assert_eq!(self.shape(), other.shape(), "max_abs_diff shapes");
        self.data().iter().zip(other.data()).map(|(&a, &b)| (a.as_f64() - b.as_f64()).abs()).fold(0.0, f64::max)
    }
}
