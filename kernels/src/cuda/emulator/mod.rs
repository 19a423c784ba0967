//! The CPU emulation of a CUDA device, for tests: host memory, the project's `.cu` sources
//! compiled by the host C++ compiler against `kernels/emulator/cuda.h`, blocks run one after
//! another with the threads of each block as fibers (see [`block`]), and GEMMs on the CPU with
//! cuBLAS's meaning.
//!
//! It checks the kernels' arithmetic and indexing and the CUDA executor's bookkeeping. It does
//! not check timing, the GPU memory model, or warp-synchronous code without a shuffle or
//! barrier. Each block's threads run in an order that changes from block to block between
//! barriers (thread by thread, ascending, descending or shuffled; or warp by warp, each warp
//! running ahead to the barrier), so a missing `__syncthreads()` changes results.
//!
//! Built with the crate's `emulation` feature (tests enable it); without it
//! [`Emulator::new`] says so and nothing of the emulation is in the binary.

#[cfg(feature = "emulation")]
mod block;

use super::device::{Device, DeviceBuffer, DeviceValue, Gemm, Launch, check_gemm};
use super::{CudaError, Element};
use std::alloc::Layout;
use std::ptr::NonNull;

/// Alignment of every emulated allocation, as `cudaMalloc` gives (the kernels' 16-byte vector
/// loads rely on at least 16).
const ALIGN: usize = 256;

/// A buffer in the emulated device's memory: an aligned, zero-initialized host allocation.
pub struct HostBuffer<T> {
    ptr: NonNull<T>,
    len: usize,
    layout: Layout,
}

// SAFETY: the buffer owns its allocation like a Box<[T]>; T is plain data that is Send + Sync.
unsafe impl<T: DeviceValue> Send for HostBuffer<T> {}
// SAFETY: as above; shared access only reads, and launches write through the addresses the
// caller hands them under `unsafe`.
unsafe impl<T: DeviceValue> Sync for HostBuffer<T> {}

impl<T: DeviceValue> HostBuffer<T> {
    fn zeroed(len: usize) -> Result<HostBuffer<T>, CudaError> {
        let bytes = len
            .checked_mul(std::mem::size_of::<T>())
            .ok_or_else(|| CudaError::Arguments(format!("allocation of {len} elements overflows")))?;
        let layout = Layout::from_size_align(bytes.max(1), ALIGN.max(std::mem::align_of::<T>()))
            .map_err(|e| CudaError::Arguments(format!("allocation of {bytes} bytes: {e}")))?;
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw.cast::<T>())
            .ok_or_else(|| CudaError::Arguments(format!("out of host memory allocating {bytes} bytes")))?;
        Ok(HostBuffer { ptr, len, layout })
    }

    fn as_slice(&self) -> &[T] {
        // SAFETY: `len` initialized elements (zeroed bytes are valid T: ValidAsZeroBits).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    fn as_mut_slice(&mut self) -> &mut [T] {
        // SAFETY: as above, and `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl<T> Drop for HostBuffer<T> {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr().cast(), self.layout) }
    }
}

impl<T> std::fmt::Debug for HostBuffer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostBuffer").field("len", &self.len).finish()
    }
}

impl<T: DeviceValue> DeviceBuffer<T> for HostBuffer<T> {
    fn len(&self) -> usize {
        self.len
    }
}

/// The emulated CUDA device.
#[derive(Debug)]
pub struct Emulator {
    #[cfg(feature = "emulation")]
    kernels: block::Kernels,
}

impl Emulator {
    /// The emulated device, with every entry point the CUDA sources define; an error in a build
    /// without the `emulation` feature.
    pub fn new() -> Result<Emulator, CudaError> {
        #[cfg(feature = "emulation")]
        {
            Ok(Emulator { kernels: block::Kernels::load()? })
        }
        #[cfg(not(feature = "emulation"))]
        {
            Err(CudaError::NoEmulation)
        }
    }

    /// Whether this build can emulate (the `emulation` feature).
    pub fn available() -> bool {
        cfg!(feature = "emulation")
    }
}

/// Copies `len` elements of a buffer to f32.
fn widen<E: Element>(buf: &HostBuffer<E>, len: usize) -> Vec<f32> {
    buf.as_slice()[..len].iter().map(|v| v.to_f32()).collect()
}

impl Device for Emulator {
    type Buffer<T: DeviceValue> = HostBuffer<T>;

    fn name(&self) -> String {
        "emulated-cuda (the CUDA kernels compiled for the CPU)".into()
    }

    fn alloc_zeros<T: DeviceValue>(&self, len: usize) -> Result<HostBuffer<T>, CudaError> {
        HostBuffer::zeroed(len)
    }

    fn upload<T: DeviceValue>(&self, host: &[T]) -> Result<HostBuffer<T>, CudaError> {
        let mut buf = HostBuffer::zeroed(host.len())?;
        buf.as_mut_slice().copy_from_slice(host);
        Ok(buf)
    }

    fn write<T: DeviceValue>(&self, host: &[T], dst: &mut HostBuffer<T>) -> Result<(), CudaError> {
        if host.len() > dst.len {
            return Err(CudaError::Arguments(format!("{} values do not fit a buffer of {}", host.len(), dst.len)));
        }
        dst.as_mut_slice()[..host.len()].copy_from_slice(host);
        Ok(())
    }

    fn download<T: DeviceValue>(&self, src: &HostBuffer<T>) -> Result<Vec<T>, CudaError> {
        Ok(src.as_slice().to_vec())
    }

    fn address<T: DeviceValue>(&self, buf: &HostBuffer<T>) -> u64 {
        buf.ptr.as_ptr() as u64
    }

    unsafe fn launch(&self, launch: &Launch<'_>) -> Result<(), CudaError> {
        #[cfg(feature = "emulation")]
        {
            // SAFETY: forwarded from the caller.
            unsafe { self.kernels.launch(launch) }
        }
        #[cfg(not(feature = "emulation"))]
        {
            let _ = launch;
            Err(CudaError::NoEmulation)
        }
    }

    unsafe fn gemm<E: Element>(
        &self,
        op: Gemm,
        a: &HostBuffer<E>,
        b: &HostBuffer<E>,
        c: &mut HostBuffer<E>,
    ) -> Result<(), CudaError> {
        check_gemm(&op, a, b, c)?;
        let (na, nb, nc) = op.extents();
        if op.m == 0 || op.n == 0 {
            return Ok(());
        }
        // In f32, as cuBLAS accumulates, then rounded to E once.
        let (a32, b32, mut c32) = (widen(a, na), widen(b, nb), vec![0f32; nc]);
        // (row stride, column stride) of op(X) for a column-major X with leading dimension ld.
        let strides = |trans: bool, ld: usize| if trans { (ld as isize, 1) } else { (1, ld as isize) };
        let (a_rs, a_cs) = strides(op.transa, op.lda);
        let (b_rs, b_cs) = strides(op.transb, op.ldb);
        if op.k > 0 {
            // SAFETY: check_gemm proved every element the shape reaches lies inside the three
            // operands, whose f32 copies have exactly those extents; c32 is a separate vector.
            unsafe {
                gemm::gemm(
                    op.m,
                    op.n,
                    op.k,
                    c32.as_mut_ptr(),
                    op.ldc as isize,
                    1,
                    false,
                    a32.as_ptr(),
                    a_cs,
                    a_rs,
                    b32.as_ptr(),
                    b_cs,
                    b_rs,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    crate::matmul::parallelism(op.m, op.n, op.k),
                );
            }
        }
        // Only the m×n result is written; the padding of a wider ldc is left as it was.
        let out = c.as_mut_slice();
        for j in 0..op.n {
            for i in 0..op.m {
                let at = i + j * op.ldc;
                out[at] = E::from_f32(c32[at]);
            }
        }
        Ok(())
    }

    fn synchronize(&self) -> Result<(), CudaError> {
        // Every operation completed before it returned.
        Ok(())
    }
}

#[cfg(all(test, feature = "emulation"))]
mod tests {
    use super::*;

    #[test]
    fn allocations_are_aligned_zeroed_and_round_trip() {
        let dev = Emulator::new().unwrap();
        let buf: HostBuffer<half::bf16> = dev.alloc_zeros(33).unwrap();
        assert_eq!(dev.address(&buf) % ALIGN as u64, 0);
        assert!(dev.download(&buf).unwrap().iter().all(|v| v.to_f32() == 0.0));
        let mut buf = dev.upload(&[1i32, 2, 3, 4]).unwrap();
        dev.write(&[9, 8], &mut buf).unwrap();
        assert_eq!(dev.download(&buf).unwrap(), vec![9, 8, 3, 4]);
        assert!(dev.write(&[0; 5], &mut buf).is_err(), "a write past the end is refused");
    }

    #[test]
    fn gemm_has_cublas_column_major_meaning() {
        let dev = Emulator::new().unwrap();
        // Row-major y[2, 3] = x[2, 4] · w[3, 4]ᵀ, asked as cuBLAS's yᵀ = op(w) · xᵀ.
        let x: Vec<f32> = (0..8).map(|v| v as f32).collect();
        let w: Vec<f32> = (0..12).map(|v| (v as f32) * 0.5 - 2.0).collect();
        let mut want = vec![0f32; 6];
        crate::matmul::linear(&x, 2, 4, &w, 3, &mut want, 3, false);
        let (dw, dx) = (dev.upload(&w).unwrap(), dev.upload(&x).unwrap());
        let mut dy = dev.alloc_zeros::<f32>(6).unwrap();
        let op = Gemm { transa: true, transb: false, m: 3, n: 2, k: 4, lda: 4, ldb: 4, ldc: 3 };
        // SAFETY: three distinct buffers of the sizes the shape needs.
        unsafe { dev.gemm(op, &dw, &dx, &mut dy) }.unwrap();
        assert_eq!(dev.download(&dy).unwrap(), want);
        let short = dev.alloc_zeros::<f32>(5).unwrap();
        // SAFETY: as above; the short operand is refused before anything is read.
        assert!(unsafe { dev.gemm(op, &dw, &short, &mut dy) }.is_err(), "an operand too small is refused");
    }
}
