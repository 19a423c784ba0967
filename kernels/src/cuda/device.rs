//! The device seam: what the CUDA launch wrappers and the CUDA executor need from a device —
//! memory, copies, launches of the kernels by entry point with typed arguments, and GEMMs — as
//! one trait with two implementations: [`super::CudaDevice`] (cudarc, a real GPU) and
//! [`super::Emulator`] (host memory, the kernels compiled for the CPU, GEMMs on the CPU).

use super::{CudaError, Element};
use std::fmt::Debug;

/// Values that can live in device buffers: plain data, valid as all-zero bytes.
pub trait DeviceValue:
    cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits + Copy + Send + Sync + Debug + 'static
{
}

impl DeviceValue for f32 {}
impl DeviceValue for half::bf16 {}
impl DeviceValue for half::f16 {}
impl DeviceValue for i32 {}
impl DeviceValue for super::LoraSlotEntry {}

/// A buffer of `T` in a device's memory.
pub trait DeviceBuffer<T>: Debug + Send + Sync {
    /// Elements it holds.
    fn len(&self) -> usize;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One argument of a kernel launch, by value, as the kernel's parameter list declares it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KernelArg {
    /// A device address (any pointer parameter).
    Ptr(u64),
    I32(i32),
    I64(i64),
    F32(f32),
}

impl KernelArg {
    /// Bytes the kernel's parameter occupies.
    pub fn size(&self) -> usize {
        match self {
            KernelArg::Ptr(_) | KernelArg::I64(_) => 8,
            KernelArg::I32(_) | KernelArg::F32(_) => 4,
        }
    }
}

/// A kernel launch: entry point (with its dtype suffix), grid and block shapes, arguments.
#[derive(Debug, Clone, Copy)]
pub struct Launch<'a> {
    pub entry: &'a str,
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub args: &'a [KernelArg],
}

/// A matrix product with cuBLAS's meaning: column-major `c[m, n] = op(a)[m, k] · op(b)[k, n]`,
/// where `op` transposes when asked; `lda`, `ldb` and `ldc` are the leading dimensions of the
/// stored matrices. Accumulation is in f32 whatever the element type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gemm {
    pub transa: bool,
    pub transb: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
}

impl Gemm {
    /// Elements each operand must hold at least: `(a, b, c)`.
    pub fn extents(&self) -> (usize, usize, usize) {
        // A column-major `rows × cols` matrix with leading dimension `ld` ends at
        // (cols - 1) · ld + rows.
        let span =
            |rows: usize, cols: usize, ld: usize| if rows == 0 || cols == 0 { 0 } else { (cols - 1) * ld + rows };
        let (ar, ac) = if self.transa { (self.k, self.m) } else { (self.m, self.k) };
        let (br, bc) = if self.transb { (self.n, self.k) } else { (self.k, self.n) };
        (span(ar, ac, self.lda), span(br, bc, self.ldb), span(self.m, self.n, self.ldc))
    }

    /// Whether the leading dimensions fit the shapes, as cuBLAS requires.
    pub fn check(&self) -> Result<(), CudaError> {
        let rows_a = if self.transa { self.k } else { self.m };
        let rows_b = if self.transb { self.n } else { self.k };
        if self.lda < rows_a.max(1) || self.ldb < rows_b.max(1) || self.ldc < self.m.max(1) {
            return Err(CudaError::Arguments(format!("GEMM leading dimensions too small: {self:?}")));
        }
        Ok(())
    }
}

/// A device the CUDA kernels run on.
///
/// Launches and copies are ordered: each starts after every earlier one on the same device has
/// finished (one stream). Downloads wait for the work before them.
pub trait Device: Debug + Send + Sync + 'static {
    type Buffer<T: DeviceValue>: DeviceBuffer<T>;

    /// The device, for logs and `Info` (for example `cuda:0 (NVIDIA H200)`).
    fn name(&self) -> String;

    fn alloc_zeros<T: DeviceValue>(&self, len: usize) -> Result<Self::Buffer<T>, CudaError>;

    /// A new buffer holding a copy of `host`.
    fn upload<T: DeviceValue>(&self, host: &[T]) -> Result<Self::Buffer<T>, CudaError>;

    /// Overwrites the first `host.len()` elements of `dst`.
    fn write<T: DeviceValue>(&self, host: &[T], dst: &mut Self::Buffer<T>) -> Result<(), CudaError>;

    /// A host copy of the whole buffer.
    fn download<T: DeviceValue>(&self, src: &Self::Buffer<T>) -> Result<Vec<T>, CudaError>;

    /// The device address of the buffer's first element (for pointer arguments and for tables
    /// of pointers the kernels read).
    fn address<T: DeviceValue>(&self, buf: &Self::Buffer<T>) -> u64;

    /// Launches a kernel.
    ///
    /// # Safety
    /// The arguments must match the entry point's parameters, and every address must point into
    /// live buffers of this device large enough for what the kernel reads and writes.
    unsafe fn launch(&self, launch: &Launch<'_>) -> Result<(), CudaError>;

    /// `c = op(a) · op(b)` (see [`Gemm`]).
    ///
    /// # Safety
    /// `c` must not be `a` or `b`; the buffers are checked against the shape.
    unsafe fn gemm<E: Element>(
        &self,
        op: Gemm,
        a: &Self::Buffer<E>,
        b: &Self::Buffer<E>,
        c: &mut Self::Buffer<E>,
    ) -> Result<(), CudaError>;

    /// Waits for everything launched so far.
    fn synchronize(&self) -> Result<(), CudaError>;
}

/// Refuses a GEMM whose operands are smaller than its shape.
pub(super) fn check_gemm<E>(
    op: &Gemm,
    a: &impl DeviceBuffer<E>,
    b: &impl DeviceBuffer<E>,
    c: &impl DeviceBuffer<E>,
) -> Result<(), CudaError> {
    op.check()?;
    let (na, nb, nc) = op.extents();
    if a.len() < na || b.len() < nb || c.len() < nc {
        return Err(CudaError::Arguments(format!(
            "GEMM operands hold {}, {}, {} values; {op:?} needs {na}, {nb}, {nc}",
            a.len(),
            b.len(),
            c.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemm_extents_follow_the_transposes_and_leading_dimensions() {
        // The executor's linear layer: row-major y[4, 6] = x[4, 3] · w[6, 3]ᵀ as column-major
        // yᵀ = w · xᵀ, with A = w stored 3×6 (transposed), B = x stored 3×4.
        let op = Gemm { transa: true, transb: false, m: 6, n: 4, k: 3, lda: 3, ldb: 3, ldc: 6 };
        assert_eq!(op.extents(), (18, 12, 24));
        assert!(op.check().is_ok());
        assert!(Gemm { lda: 2, ..op }.check().is_err(), "lda below the stored rows");
        let wide = Gemm { ldc: 10, ..op };
        assert_eq!(wide.extents().2, 3 * 10 + 6, "the last column ends at its row count");
    }
}
