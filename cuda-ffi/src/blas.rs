//! Matrix products through cuBLAS and cuBLASLt, and the linear layer (a product whose epilogue
//! adds the bias, and the residual too where asked).
//!
//! Row-major products go to cuBLAS as the column-major product of the transposes (`C = A·B` is
//! `Cᵀ = Bᵀ·Aᵀ`), so nothing is copied. In bf16 ([`ProductPrecision::Bf16`]) the two inputs are
//! rounded into bf16 copies first; the results, and everything outside the products, stay f32.

use std::sync::{Arc, Mutex};

use cudarc::cublas::sys::{cublasMath_t, cublasOperation_t};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaStream};

use crate::memory::{Buffer, View, Workspace};
use crate::{check, CudaError, Gpu, Result};

/// One operand of a matrix product: its view, and whether it is stored transposed.
#[derive(Clone, Copy, Debug)]
pub struct Operand {
    /// the elements
    pub data: View<f32>,
    /// whether the matrix is stored transposed, (cols, rows)
    pub transposed: bool,
    /// elements between consecutive matrices of a batch (0 for a single matrix)
    pub batch_stride: usize,
    /// elements between consecutive stored rows (0: the stored row length, a dense matrix);
    /// larger when the matrix is a block of columns of a wider one
    pub leading: usize,
    /// in bf16, a copy of `data` already rounded to bf16 (same layout), so that an input of two
    /// products is rounded once
    pub rounded: Option<View<u16>>,
}

impl Operand {
    /// A dense matrix stored as it is used.
    pub fn normal(data: View<f32>) -> Self {
        Operand { data, transposed: false, batch_stride: 0, leading: 0, rounded: None }
    }

    /// A dense matrix stored transposed.
    pub fn transposed(data: View<f32>) -> Self {
        Operand { data, transposed: true, batch_stride: 0, leading: 0, rounded: None }
    }

    /// The same matrix, with `rounded` its elements already rounded to bf16 (used in bf16 only).
    pub fn rounded(self, rounded: View<u16>) -> Self {
        Operand { rounded: Some(rounded), ..self }
    }

    /// A matrix that exists only in bf16, `transposed` or not: what a kernel wrote in bf16 for
    /// the products alone (the head's dℓ), or all that a backward rule kept of an input (a linear
    /// layer's x). A product in another precision refuses it.
    pub fn bf16_only(rounded: View<u16>, transposed: bool) -> Self {
        Operand { transposed, ..Operand::normal(View::new(NO_F32_ELEMENTS, rounded.len())).rounded(rounded) }
    }

    /// Stored rows are `leading` elements apart.
    pub fn leading(self, leading: usize) -> Self {
        Operand { leading, ..self }
    }

    /// A batch of matrices `batch_stride` elements apart.
    pub fn strided(self, batch_stride: usize) -> Self {
        Operand { batch_stride, ..self }
    }

    /// Whether the matrix is dense and stored as it is used: what a linear layer's input must be.
    fn is_plain(&self) -> bool {
        !self.transposed && self.leading == 0 && self.batch_stride == 0
    }

    /// The leading dimension of a logical (rows, cols) matrix and the elements that `batch` of
    /// them span, after checking that they fit in the view.
    fn layout(&self, rows: usize, cols: usize, batch: usize) -> Option<(usize, usize)> {
        let (stored_rows, stored_cols) = if self.transposed { (cols, rows) } else { (rows, cols) };
        let leading = if self.leading == 0 { stored_cols } else { self.leading };
        let needed = self.batch_stride * (batch - 1) + (stored_rows - 1) * leading + stored_cols;
        (leading >= stored_cols && self.data.len() >= needed).then_some((leading, needed))
    }
}

impl From<View<f32>> for Operand {
    fn from(data: View<f32>) -> Self {
        Operand::normal(data)
    }
}

/// The arithmetic of matrix products (`--precision`). Every other kernel computes in f32 whatever
/// this says; in bf16 the buffers a product reads are bf16 copies (rounded by the kernel that
/// wrote the f32 values, or just before the product), and so is what a backward rule keeps of an
/// input it reads only rounded; every other buffer is f32.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ProductPrecision {
    /// f32 inputs and arithmetic, on the CUDA cores
    #[default]
    F32,
    /// f32 inputs that the tensor cores read as TF32 (10-bit mantissa); f32 accumulation
    Tf32,
    /// inputs rounded to bf16 (8-bit mantissa) by a kernel, the bf16 tensor cores (twice TF32's
    /// rate), f32 accumulation and f32 results
    Bf16,
}

/// Which cuBLAS entry point single matrix products go through (batched products always use
/// `cublasSgemmStridedBatched`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmRoute {
    /// `cublasSgemm`
    Blas,
    /// `cublasLtMatmul` with its heuristic's first choice (what PyTorch's `addmm` uses)
    BlasLt,
}

/// Bytes of cuBLAS and cuBLASLt workspace (NVIDIA's recommendation for Hopper).
const WORKSPACE_BYTES: usize = 32 << 20;

/// The cuBLAS and cuBLASLt handles, cuBLASLt's plans by shape, and their workspaces (declared
/// last: fields drop in order, so the handles go first).
pub(crate) struct Blas {
    cublas: CudaBlas,
    lt: LtHandle,
    plans: Mutex<std::collections::HashMap<LtKey, LtPlan>>,
    _cublas_workspace: Workspace,
    lt_workspace: Workspace,
}

struct LtHandle(cudarc::cublaslt::sys::cublasLtHandle_t);

// SAFETY: the handle is used from one thread at a time (its plans sit behind a mutex, and the
// Gpu queues work on one stream).
unsafe impl Send for LtHandle {}
unsafe impl Sync for LtHandle {}

impl Drop for LtHandle {
    fn drop(&mut self) {
        // SAFETY: the handle was created by create_handle and is destroyed once.
        unsafe {
            let _ = cudarc::cublaslt::result::destroy_handle(self.0);
        }
    }
}

impl Blas {
    pub(crate) fn new(context: &Arc<CudaContext>, stream: &Arc<CudaStream>) -> Result<Self> {
        let cublas = CudaBlas::new(stream.clone())?;
        let cublas_workspace = Workspace::new(context, WORKSPACE_BYTES)?;
        // SAFETY: the workspace outlives the handle (both live in Blas; the handle drops first).
        unsafe {
            cudarc::cublas::sys::cublasSetWorkspace_v2(*cublas.handle(), cublas_workspace.view.ptr as *mut _, WORKSPACE_BYTES).result()?;
        }
        Ok(Blas {
            cublas,
            lt: LtHandle(cudarc::cublaslt::result::create_handle()?),
            plans: Default::default(),
            _cublas_workspace: cublas_workspace,
            lt_workspace: Workspace::new(context, WORKSPACE_BYTES)?,
        })
    }
}

/// What a cuBLASLt product's plan depends on (pointers and β are passed per call).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct LtKey {
    /// whether A, B are transposed
    transposed: [bool; 2],
    m: usize,
    n: usize,
    k: usize,
    lda: i32,
    ldb: i32,
    epilogue: LtEpilogue,
    precision: ProductPrecision,
    /// whether D (and C) are bf16, not f32
    output_bf16: bool,
}

/// What a cuBLASLt product does to its sums before it writes D (its plan's part).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum LtEpilogue {
    /// nothing
    None,
    /// adds the bias to every column
    Bias,
    /// adds the bias, writes the sums so far to the aux matrix (bf16 here: what GELU's backward
    /// keeps), and writes GELU of them (the tanh form, GPT-2's) as D
    GeluAuxBias,
}

/// An epilogue with the device addresses it reads and writes (a call's part). The bias is of
/// D's type: f32, or bf16.
#[derive(Clone, Copy)]
enum LtEpilogueOperands {
    None,
    Bias(u64),
    GeluAuxBias { bias: u64, aux: View<u16> },
}

impl LtEpilogueOperands {
    fn kind(&self) -> LtEpilogue {
        match self {
            LtEpilogueOperands::None => LtEpilogue::None,
            LtEpilogueOperands::Bias(_) => LtEpilogue::Bias,
            LtEpilogueOperands::GeluAuxBias { .. } => LtEpilogue::GeluAuxBias,
        }
    }
}

/// Where a cuBLASLt product reads C and writes D: both f32 (they may be one view), or D in bf16
/// (β = 0, nothing read).
enum LtOutput {
    F32 { c: View<f32>, d: View<f32> },
    Bf16(View<u16>),
}

/// A cuBLASLt product made ready: descriptor, matrix layouts, and the heuristic's algorithm.
struct LtPlan {
    desc: cudarc::cublaslt::sys::cublasLtMatmulDesc_t,
    a_layout: cudarc::cublaslt::sys::cublasLtMatrixLayout_t,
    b_layout: cudarc::cublaslt::sys::cublasLtMatrixLayout_t,
    c_layout: cudarc::cublaslt::sys::cublasLtMatrixLayout_t,
    algo: cudarc::cublaslt::sys::cublasLtMatmulAlgo_t,
}

// SAFETY: the handles are plain descriptors, used under the Blas's mutex only.
unsafe impl Send for LtPlan {}

impl LtPlan {
    unsafe fn new(handle: cudarc::cublaslt::sys::cublasLtHandle_t, key: LtKey, workspace_bytes: usize) -> Result<Self> {
        use cudarc::cublaslt::{result as lt, sys as lt_sys};
        let f32_type = lt_sys::cudaDataType_t::CUDA_R_32F;
        let (compute, input_type) = match key.precision {
            ProductPrecision::F32 => (lt_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, f32_type),
            ProductPrecision::Tf32 => (lt_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32, f32_type),
            ProductPrecision::Bf16 => (lt_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, lt_sys::cudaDataType_t::CUDA_R_16BF),
        };
        let (m, n, k) = (key.m as u64, key.n as u64, key.k as u64);
        let (a_rows, a_cols) = if key.transposed[0] { (k, m) } else { (m, k) };
        let (b_rows, b_cols) = if key.transposed[1] { (n, k) } else { (k, n) };
        let mut plan = LtPlan {
            desc: lt::create_matmul_desc(compute, f32_type)?,
            a_layout: lt::create_matrix_layout(input_type, a_rows, a_cols, key.lda as i64)?,
            b_layout: lt::create_matrix_layout(input_type, b_rows, b_cols, key.ldb as i64)?,
            c_layout: lt::create_matrix_layout(
                if key.output_bf16 { lt_sys::cudaDataType_t::CUDA_R_16BF } else { f32_type },
                m,
                n,
                m as i64,
            )?,
            algo: std::mem::zeroed(),
        };
        let set_desc =
            |attribute, value: *const std::ffi::c_void, bytes: usize| lt::set_matmul_desc_attribute(plan.desc, attribute, value, bytes);
        for (attribute, transposed) in [
            (lt_sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA, key.transposed[0]),
            (lt_sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB, key.transposed[1]),
        ] {
            let op = if transposed { cublasOperation_t::CUBLAS_OP_T } else { cublasOperation_t::CUBLAS_OP_N } as i32;
            set_desc(attribute, (&op) as *const i32 as *const _, std::mem::size_of::<i32>())?;
        }
        use lt_sys::cublasLtMatmulDescAttributes_t as Attribute;
        let epilogue = match key.epilogue {
            LtEpilogue::None => None,
            // D = op(A)·op(B) + bias, the bias added to every column (a row of the row-major result)
            LtEpilogue::Bias => Some(lt_sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS),
            LtEpilogue::GeluAuxBias => Some(lt_sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_GELU_AUX_BIAS),
        };
        if let Some(epilogue) = epilogue {
            // (the bias is read as D's type: f32, or bf16)
            set_desc(Attribute::CUBLASLT_MATMUL_DESC_EPILOGUE, (&epilogue) as *const _ as *const _, std::mem::size_of_val(&epilogue))?;
        }
        if key.epilogue == LtEpilogue::GeluAuxBias {
            // the aux matrix is laid out as D (and is of D's type)
            let aux_leading = m as i64;
            set_desc(
                Attribute::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD,
                (&aux_leading) as *const i64 as *const _,
                std::mem::size_of::<i64>(),
            )?;
        }
        let preference = lt::create_matmul_pref()?;
        let heuristic = lt::set_matmul_pref_attribute(
            preference,
            lt_sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
            (&workspace_bytes) as *const usize as *const _,
            std::mem::size_of::<usize>(),
        )
        .and_then(|()| {
            lt::get_matmul_algo_heuristic(handle, plan.desc, plan.a_layout, plan.b_layout, plan.c_layout, plan.c_layout, preference)
        });
        lt::destroy_matmul_pref(preference)?;
        // (the plan is dropped, and its descriptors destroyed, if there is no algorithm)
        plan.algo = heuristic?.algo;
        Ok(plan)
    }
}

impl Drop for LtPlan {
    fn drop(&mut self) {
        use cudarc::cublaslt::result as lt;
        // SAFETY: each was created once, in LtPlan::new, and is destroyed once.
        unsafe {
            let _ = lt::destroy_matmul_desc(self.desc);
            for layout in [self.a_layout, self.b_layout, self.c_layout] {
                let _ = lt::destroy_matrix_layout(layout);
            }
        }
    }
}

/// The address an operand made by [`Operand::bf16_only`] gives for the f32 elements it does not
/// have.
const NO_F32_ELEMENTS: u64 = 0;

/// A product's input as cuBLAS reads it: the f32 elements, or in bf16 their bf16 copy (one the
/// operand brought, or one made for this product and kept alive until it is queued).
struct ProductInput {
    ptr: u64,
    _made: Option<Buffer<u16>>,
}

impl Gpu {
    /// `data` (the first `span` elements) as the product in `self.precision` reads it.
    fn product_input(&self, data: View<f32>, rounded: Option<View<u16>>, span: usize) -> Result<ProductInput> {
        let data = data.slice(0, span);
        Ok(match (self.precision, rounded) {
            (ProductPrecision::Bf16, Some(rounded)) => {
                check(rounded.len() >= span, || format!("matmul: a bf16 copy of {} elements for {span}", rounded.len()))?;
                ProductInput { ptr: rounded.ptr, _made: None }
            }
            (ProductPrecision::Bf16, None) => {
                let made = self.bf16_copy(data)?;
                ProductInput { ptr: made.view().ptr, _made: Some(made) }
            }
            (precision, _) => {
                check(data.ptr != NO_F32_ELEMENTS, || format!("matmul: an operand that exists only in bf16, in a {precision:?} product"))?;
                ProductInput { ptr: data.ptr, _made: None }
            }
        })
    }

    /// `c (m,n) = a (m,k) · b (k,n)` (plus c when `accumulate`), row-major.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul(&self, a: Operand, b: Operand, c: View<f32>, m: usize, k: usize, n: usize, accumulate: bool) -> Result<()> {
        self.matmul_batched(a, b, c, m, k, n, 1, accumulate)
    }

    /// `c (m,n) = a (m,k) · b (k,n)` (plus c itself when `accumulate`), row-major, for `batch`
    /// matrices at the operands' batch strides. Through cuBLAS, in `self.precision`.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_batched(
        &self,
        a: Operand,
        b: Operand,
        c: View<f32>,
        m: usize,
        k: usize,
        n: usize,
        batch: usize,
        accumulate: bool,
    ) -> Result<()> {
        check(c.len() == batch * m * n, || format!("matmul: c holds {}, not {batch} × {m}×{n}", c.len()))?;
        let c = Operand::normal(c).strided(if batch > 1 { m * n } else { 0 });
        self.matmul_general(a, b, c, m, k, n, batch, accumulate)
    }

    /// `c (m,n) = a (m,k) · b (k,n)`, row-major, written in bf16: a bf16 product (the device's
    /// precision must be [`ProductPrecision::Bf16`]) whose f32 sums cuBLASLt rounds to nearest
    /// as it writes them, so that what only reads the result (the CP head's logits) moves half
    /// the bytes. One dense matrix each.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_into_bf16(&self, a: Operand, b: Operand, c: View<u16>, m: usize, k: usize, n: usize) -> Result<()> {
        check(self.precision == ProductPrecision::Bf16, || format!("matmul_into_bf16: a bf16 product, not {:?}", self.precision))?;
        check(m > 0 && k > 0 && n > 0, || format!("matmul_into_bf16: an empty product {m}×{k} · {k}×{n}"))?;
        let shapes = (a.leading == 0 && b.leading == 0).then(|| Some((a.layout(m, k, 1)?, b.layout(k, n, 1)?))).flatten();
        let Some(((a_leading, a_span), (b_leading, b_span))) = shapes.filter(|_| c.len() == m * n) else {
            return Err(CudaError::Shape(format!(
                "matmul_into_bf16: operands do not hold {m}×{k} · {k}×{n} (a {}, b {}, c {})",
                a.data.len(),
                b.data.len(),
                c.len()
            )));
        };
        let op = |t: bool| if t { cublasOperation_t::CUBLAS_OP_T } else { cublasOperation_t::CUBLAS_OP_N };
        let (a_in, b_in) = (self.product_input(a.data, a.rounded, a_span)?, self.product_input(b.data, b.rounded, b_span)?);
        let (lda, ldb) = (b_leading as i32, a_leading as i32);
        // SAFETY: the sizes were checked above; as in matmul_general, the column-major Cᵀ = Bᵀ·Aᵀ.
        unsafe {
            self.lt_matmul(
                op(b.transposed),
                op(a.transposed),
                n,
                m,
                k,
                b_in.ptr,
                lda,
                a_in.ptr,
                ldb,
                0.0,
                LtOutput::Bf16(c),
                LtEpilogueOperands::None,
            )
        }
    }

    /// As [`Gpu::matmul_batched`], with `c` given as an operand too (its own batch stride and
    /// leading dimension; not transposed): products written into blocks of larger matrices.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_general(
        &self,
        a: Operand,
        b: Operand,
        c: Operand,
        m: usize,
        k: usize,
        n: usize,
        batch: usize,
        accumulate: bool,
    ) -> Result<()> {
        if m == 0 || n == 0 {
            return Ok(());
        }
        if k == 0 {
            // an empty sum: c = 0 (or stays c)
            return if accumulate { Ok(()) } else { self.fill_zero(c.data) };
        }
        let shapes =
            (batch >= 1 && !c.transposed).then(|| Some((a.layout(m, k, batch)?, b.layout(k, n, batch)?, c.layout(m, n, batch)?))).flatten();
        let Some(((a_leading, a_span), (b_leading, b_span), (c_leading, _))) = shapes else {
            return Err(CudaError::Shape(format!(
                "matmul: operands do not hold {batch} products {m}×{k} · {k}×{n} (a {}, b {}, c {})",
                a.data.len(),
                b.data.len(),
                c.data.len()
            )));
        };
        let dense = a.leading == 0 && b.leading == 0 && c.leading == 0;
        let (c_stride, c) = (c.batch_stride, c.data);
        // cuBLAS is column-major: a row-major C = A·B is the column-major Cᵀ = Bᵀ·Aᵀ.
        let op = |t: bool| if t { cublasOperation_t::CUBLAS_OP_T } else { cublasOperation_t::CUBLAS_OP_N };
        let (alpha, beta) = (1.0f32, if accumulate { 1.0f32 } else { 0.0 });
        let math = if self.precision == ProductPrecision::Tf32 {
            cublasMath_t::CUBLAS_TF32_TENSOR_OP_MATH
        } else {
            cublasMath_t::CUBLAS_DEFAULT_MATH
        };
        let handle = *self.blas.cublas.handle();
        let (lda, ldb, ldc) = (b_leading as i32, a_leading as i32, c_leading as i32);
        let (op_b, op_a) = (op(b.transposed), op(a.transposed));
        let (a_in, b_in) = (self.product_input(a.data, a.rounded, a_span)?, self.product_input(b.data, b.rounded, b_span)?);
        if batch == 1 && dense && self.gemm_route == GemmRoute::BlasLt {
            // SAFETY: the sizes were checked above.
            return unsafe {
                self.lt_matmul(op_b, op_a, n, m, k, b_in.ptr, lda, a_in.ptr, ldb, beta, LtOutput::F32 { c, d: c }, LtEpilogueOperands::None)
            };
        }
        if self.precision == ProductPrecision::Bf16 {
            use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cudaDataType_t};
            let bf16 = cudaDataType_t::CUDA_R_16BF;
            // SAFETY: as below; the bf16 copies span what a and b span, in the same layout.
            unsafe {
                cudarc::cublas::sys::cublasGemmStridedBatchedEx(
                    handle,
                    op_b,
                    op_a,
                    n as i32,
                    m as i32,
                    k as i32,
                    (&alpha) as *const f32 as *const _,
                    b_in.ptr as *const _,
                    bf16,
                    lda,
                    b.batch_stride as i64,
                    a_in.ptr as *const _,
                    bf16,
                    ldb,
                    a.batch_stride as i64,
                    (&beta) as *const f32 as *const _,
                    c.ptr as *mut _,
                    cudaDataType_t::CUDA_R_32F,
                    ldc,
                    c_stride as i64,
                    batch as i32,
                    cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
                )
                .result()?;
            }
            return Ok(());
        }
        // SAFETY: the handle is ours and bound to our stream; the sizes were checked above.
        unsafe {
            cudarc::cublas::sys::cublasSetMathMode(handle, math).result()?;
            let (b_ptr, a_ptr, c_ptr) = (b.data.ptr as *const f32, a.data.ptr as *const f32, c.ptr as *mut f32);
            if batch == 1 {
                cudarc::cublas::sys::cublasSgemm_v2(
                    handle, op_b, op_a, n as i32, m as i32, k as i32, &alpha, b_ptr, lda, a_ptr, ldb, &beta, c_ptr, ldc,
                )
                .result()?;
            } else {
                cudarc::cublas::sys::cublasSgemmStridedBatched(
                    handle,
                    op_b,
                    op_a,
                    n as i32,
                    m as i32,
                    k as i32,
                    &alpha,
                    b_ptr,
                    lda,
                    b.batch_stride as i64,
                    a_ptr,
                    ldb,
                    a.batch_stride as i64,
                    &beta,
                    c_ptr,
                    ldc,
                    c_stride as i64,
                    batch as i32,
                )
                .result()?;
            }
        }
        Ok(())
    }

    /// Column-major `D (m,n) = op(A) (m,k) · op(B) (k,n) + beta·C (+ bias)` through cuBLASLt.
    /// The descriptors and the heuristic's algorithm are made once per shape and kept
    /// ([`LtPlan`]): asking the heuristic costs more host time than a small product takes on
    /// the device, which is what decoding does, token after token. C is read with `beta` and D
    /// written (`output`); `a` and `b` point at elements of `self.precision`'s input type (bf16
    /// copies in bf16).
    #[allow(clippy::too_many_arguments)]
    unsafe fn lt_matmul(
        &self,
        op_a: cublasOperation_t,
        op_b: cublasOperation_t,
        m: usize,
        n: usize,
        k: usize,
        a: u64,
        lda: i32,
        b: u64,
        ldb: i32,
        beta: f32,
        output: LtOutput,
        epilogue: LtEpilogueOperands,
    ) -> Result<()> {
        use cudarc::cublaslt::{result as lt, sys as lt_sys};
        let transposed = [op_a, op_b].map(|op| op == cublasOperation_t::CUBLAS_OP_T);
        let (c, d, output_bf16) = match output {
            LtOutput::F32 { c, d } => (c.ptr, d.ptr, false),
            LtOutput::Bf16(d) => (d.ptr, d.ptr, true),
        };
        let key = LtKey { transposed, m, n, k, lda, ldb, epilogue: epilogue.kind(), precision: self.precision, output_bf16 };

        let blas = &self.blas;
        let mut plans = blas.plans.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let plan = match plans.entry(key) {
            std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
            std::collections::hash_map::Entry::Vacant(entry) => entry.insert(LtPlan::new(blas.lt.0, key, blas.lt_workspace.view.len())?),
        };
        let (bias, aux) = match epilogue {
            LtEpilogueOperands::None => (None, None),
            LtEpilogueOperands::Bias(bias) => (Some(bias), None),
            LtEpilogueOperands::GeluAuxBias { bias, aux } => (Some(bias), Some(aux)),
        };
        if let Some(bias) = bias {
            lt::set_matmul_desc_attribute(
                plan.desc,
                lt_sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                (&bias) as *const u64 as *const _,
                std::mem::size_of::<u64>(),
            )?;
        }
        if let Some(aux) = aux {
            lt::set_matmul_desc_attribute(
                plan.desc,
                lt_sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER,
                (&aux.ptr) as *const u64 as *const _,
                std::mem::size_of::<u64>(),
            )?;
        }
        let alpha = 1.0f32;
        lt::matmul(
            blas.lt.0,
            plan.desc,
            (&alpha) as *const f32 as *const _,
            (&beta) as *const f32 as *const _,
            a as *const _,
            plan.a_layout,
            b as *const _,
            plan.b_layout,
            c as *const _,
            plan.c_layout,
            d as *mut _,
            plan.c_layout,
            (&plan.algo) as *const _,
            blas.lt_workspace.view.ptr as *mut _,
            blas.lt_workspace.view.len(),
            self.stream.cu_stream() as *mut _,
        )?;
        Ok(())
    }

    /// A linear layer: `out (rows, n_out) = x (rows, n_in) · weight (n_in, n_out) + bias`, the
    /// bias added by the matrix product's epilogue (cuBLASLt) or, on the plain cuBLAS route, by
    /// filling `out` with it first. `x` is a view, or a plain [`Operand`] carrying its bf16 copy.
    pub fn linear(&self, x: impl Into<Operand>, weight: View<f32>, bias: View<f32>, out: View<f32>) -> Result<()> {
        self.linear_plus(x.into(), weight, bias, None, out)
    }

    /// A linear layer on a residual stream: `out = residual + x · weight + bias`, the residual
    /// added by the product itself (cuBLASLt reads it as C with β = 1 and writes D = out).
    pub fn linear_residual(
        &self,
        x: impl Into<Operand>,
        weight: View<f32>,
        bias: View<f32>,
        residual: View<f32>,
        out: View<f32>,
    ) -> Result<()> {
        check(residual.len() == out.len(), || "linear_residual: residual and out differ in length".into())?;
        self.linear_plus(x.into(), weight, bias, Some(residual), out)
    }

    /// Whether [`Gpu::linear_gelu_bf16`] takes a layer of `n_in` inputs and `n_out` outputs: in
    /// bf16, through cuBLASLt (not the plain cuBLAS route), with n_out a multiple of 8 (the aux
    /// matrix's alignment) and a product to run (n_in > 0).
    pub fn fuses_linear_gelu(&self, n_in: usize, n_out: usize) -> bool {
        let lt_bf16 = self.precision == ProductPrecision::Bf16 && self.gemm_route == GemmRoute::BlasLt;
        lt_bf16 && n_in > 0 && n_out.is_multiple_of(8)
    }

    /// A linear layer and the GELU after it in one bf16 product, as bf16 training runs GPT-2's
    /// MLP: `out = gelu(x · weight + bias)` and `pre = x · weight + bias`, both written in bf16
    /// alone (cuBLASLt's GELU_AUX_BIAS epilogue, whose GELU is the tanh form GPT-2 uses, on the
    /// f32 sums; the bias rounded to bf16 first, as autocast rounds it): what the next product
    /// reads, and what GELU's backward keeps. Where [`Gpu::fuses_linear_gelu`] says no, an error.
    pub fn linear_gelu_bf16(&self, x: Operand, weight: View<f32>, bias: View<f32>, out: View<u16>, pre: View<u16>) -> Result<()> {
        check(pre.len() == out.len(), || format!("linear_gelu_bf16: pre ({}) and out ({}) differ in length", pre.len(), out.len()))?;
        let shape @ (rows, n_in, n_out) = linear_shape(&x, weight, bias, out.len())?;
        check(self.fuses_linear_gelu(n_in, n_out), || {
            format!(
                "linear_gelu_bf16: needs bf16 products through cuBLASLt, and widths that are not 0 and a multiple of 8 ({n_in}, {n_out})"
            )
        })?;
        if rows == 0 {
            return Ok(());
        }
        // cuBLASLt reads the bias of a bf16 D in bf16 (an f32 one it refused), as autocast rounds it
        let bias = self.bf16_copy(bias)?;
        let epilogue = LtEpilogueOperands::GeluAuxBias { bias: bias.view().ptr, aux: pre };
        // SAFETY: shapes checked by linear_shape; pre laid out as out, of its length.
        unsafe { self.linear_through_lt(x, weight, shape, 0.0, LtOutput::Bf16(out), epilogue) }
    }

    /// `out = gelu(x · weight + bias)`: the product, then the GELU.
    pub fn linear_gelu(&self, x: View<f32>, weight: View<f32>, bias: View<f32>, out: View<f32>) -> Result<()> {
        self.linear(x, weight, bias, out)?;
        self.gelu_forward(out, out)
    }

    fn linear_plus(&self, x: Operand, weight: View<f32>, bias: View<f32>, residual: Option<View<f32>>, out: View<f32>) -> Result<()> {
        let shape @ (rows, n_in, n_out) = linear_shape(&x, weight, bias, out.len())?;
        if rows == 0 {
            return Ok(());
        }
        if self.gemm_route == GemmRoute::Blas || n_in == 0 {
            self.broadcast_rows(bias, out)?;
            self.matmul(x, Operand::normal(weight), out, rows, n_in, n_out, true)?;
            return match residual {
                Some(residual) => self.add(out, residual, out),
                None => Ok(()),
            };
        }
        let (beta, c) = match residual {
            Some(residual) => (1.0, residual),
            None => (0.0, out),
        };
        // SAFETY: shapes checked by linear_shape; c is out, or the residual of out's length.
        unsafe { self.linear_through_lt(x, weight, shape, beta, LtOutput::F32 { c, d: out }, LtEpilogueOperands::Bias(bias.ptr)) }
    }

    /// A linear layer's product through cuBLASLt, in column-major terms out (n_out, rows) =
    /// weight (n_out, n_in) · x (n_in, rows), then `epilogue`.
    ///
    /// # Safety
    /// `shape` is (rows, n_in, n_out) as [`linear_shape`] checked it for x, the weight and the
    /// output; C and D hold rows·n_out elements.
    unsafe fn linear_through_lt(
        &self,
        x: Operand,
        weight: View<f32>,
        (rows, n_in, n_out): (usize, usize, usize),
        beta: f32,
        output: LtOutput,
        epilogue: LtEpilogueOperands,
    ) -> Result<()> {
        let op_n = cublasOperation_t::CUBLAS_OP_N;
        let (weight, x) = (self.product_input(weight, None, weight.len())?, self.product_input(x.data, x.rounded, x.data.len())?);
        self.lt_matmul(op_n, op_n, n_out, rows, n_in, weight.ptr, n_out as i32, x.ptr, n_in as i32, beta, output, epilogue)
    }
}

/// (rows, n_in, n_out) of a linear layer `out (rows, n_out) = x (rows, n_in) · weight (n_in,
/// n_out) + bias` from its operands' lengths, x a dense matrix stored as it is used.
fn linear_shape(x: &Operand, weight: View<f32>, bias: View<f32>, out_len: usize) -> Result<(usize, usize, usize)> {
    let n_out = bias.len();
    check(n_out > 0 && out_len.is_multiple_of(n_out) && weight.len().is_multiple_of(n_out), || "linear: shapes do not fit".into())?;
    let (rows, n_in) = (out_len / n_out, weight.len() / n_out);
    check(x.is_plain(), || "linear: x must be a dense matrix stored as it is used".into())?;
    check(x.data.len() == rows * n_in, || format!("linear: x has {} elements, not {rows}×{n_in}", x.data.len()))?;
    Ok((rows, n_in, n_out))
}
