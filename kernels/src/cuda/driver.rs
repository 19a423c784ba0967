//! The real device: a CUDA GPU through cudarc — the kernels compiled with NVRTC for its
//! architecture, cuBLAS for the GEMMs, one stream for everything.

use super::device::{Device, DeviceBuffer, DeviceValue, Gemm, KernelArg, Launch, check_gemm};
use super::{CudaError, Dtype, Element, compile_all, device_arch, open_device};
use cudarc::cublas::CudaBlas;
use cudarc::cublas::sys::cublasOperation_t;
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg};
use std::collections::HashMap;
use std::sync::Arc;

impl<T: DeviceValue> DeviceBuffer<T> for CudaSlice<T> {
    fn len(&self) -> usize {
        CudaSlice::len(self)
    }
}

/// A CUDA GPU with the project's kernels loaded.
#[derive(Debug)]
pub struct CudaDevice {
    name: String,
    _ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    /// Entry points by full name (`rms_norm_bf16`).
    functions: HashMap<String, CudaFunction>,
}

impl CudaDevice {
    /// Opens device `ordinal`, compiles every kernel for it and loads cuBLAS. Each missing
    /// library (driver, NVRTC, cuBLAS) is its own error.
    pub fn open(ordinal: usize) -> Result<CudaDevice, CudaError> {
        let ctx = open_device(ordinal)?;
        if !super::cublas_available() {
            return Err(CudaError::NoBlas);
        }
        let arch = device_arch(&ctx)?;
        let mut functions = HashMap::new();
        for (name, ptx) in compile_all(arch)? {
            let module = ctx.load_module(ptx)?;
            for entry in super::entry_points(name) {
                for dtype in Dtype::ALL {
                    let full = format!("{entry}_{}", dtype.suffix());
                    functions.insert(full.clone(), module.load_function(&full)?);
                }
            }
        }
        let stream = ctx.default_stream();
        let blas = CudaBlas::new(stream.clone()).map_err(CudaError::Blas)?;
        let name = format!("cuda:{ordinal} ({})", ctx.name()?);
        Ok(CudaDevice { name, _ctx: ctx, stream, blas, functions })
    }

    /// The stream every launch and copy goes to (for timing with CUDA events).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}

impl Device for CudaDevice {
    type Buffer<T: DeviceValue> = CudaSlice<T>;

    fn name(&self) -> String {
        self.name.clone()
    }

    fn alloc_zeros<T: DeviceValue>(&self, len: usize) -> Result<CudaSlice<T>, CudaError> {
        Ok(self.stream.alloc_zeros(len)?)
    }

    fn upload<T: DeviceValue>(&self, host: &[T]) -> Result<CudaSlice<T>, CudaError> {
        Ok(self.stream.clone_htod(host)?)
    }

    fn write<T: DeviceValue>(&self, host: &[T], dst: &mut CudaSlice<T>) -> Result<(), CudaError> {
        if host.len() > dst.len() {
            return Err(CudaError::Arguments(format!("{} values do not fit a buffer of {}", host.len(), dst.len())));
        }
        Ok(self.stream.memcpy_htod(host, dst)?)
    }

    fn download<T: DeviceValue>(&self, src: &CudaSlice<T>) -> Result<Vec<T>, CudaError> {
        Ok(self.stream.clone_dtoh(src)?)
    }

    fn address<T: DeviceValue>(&self, buf: &CudaSlice<T>) -> u64 {
        // Every use is on the one stream, so the ordering the guard records is already given.
        buf.device_ptr(&self.stream).0
    }

    unsafe fn launch(&self, launch: &Launch<'_>) -> Result<(), CudaError> {
        let func = self
            .functions
            .get(launch.entry)
            .ok_or_else(|| CudaError::Arguments(format!("no kernel {}", launch.entry)))?;
        let mut b = self.stream.launch_builder(func);
        for arg in launch.args {
            match arg {
                KernelArg::Ptr(p) => b.arg(p),
                KernelArg::I32(v) => b.arg(v),
                KernelArg::I64(v) => b.arg(v),
                KernelArg::F32(v) => b.arg(v),
            };
        }
        let cfg = LaunchConfig { grid_dim: launch.grid, block_dim: launch.block, shared_mem_bytes: 0 };
        // SAFETY: the caller guarantees the arguments match the kernel and point into live
        // buffers large enough for it.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    unsafe fn gemm<E: Element>(
        &self,
        op: Gemm,
        a: &CudaSlice<E>,
        b: &CudaSlice<E>,
        c: &mut CudaSlice<E>,
    ) -> Result<(), CudaError> {
        check_gemm(&op, a, b, c)?;
        let int =
            |v: usize| i32::try_from(v).map_err(|_| CudaError::Arguments(format!("GEMM dimension {v} too large")));
        let t = |yes: bool| if yes { cublasOperation_t::CUBLAS_OP_T } else { cublasOperation_t::CUBLAS_OP_N };
        let cfg = cudarc::cublas::GemmConfig {
            transa: t(op.transa),
            transb: t(op.transb),
            m: int(op.m)?,
            n: int(op.n)?,
            k: int(op.k)?,
            alpha: E::from_f32(1.0),
            lda: int(op.lda)?,
            ldb: int(op.ldb)?,
            beta: E::from_f32(0.0),
            ldc: int(op.ldc)?,
        };
        // SAFETY: the operands were checked against the shape above, and `c` is borrowed
        // mutably, so it is neither `a` nor `b`.
        unsafe { E::cublas_gemm(&self.blas, cfg, a, b, c) }.map_err(CudaError::Blas)
    }

    fn synchronize(&self) -> Result<(), CudaError> {
        Ok(self.stream.synchronize()?)
    }
}
