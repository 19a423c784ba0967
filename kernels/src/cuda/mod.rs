//! The CUDA kernels: `.cu` sources in `kernels/cuda/`, compiled at run time with NVRTC and
//! launched through cudarc. Nothing here needs a CUDA toolkit at build time; at run time the
//! driver (`libcuda`) and NVRTC (`libnvrtc`) are loaded dynamically, and their absence is an
//! error value, never a panic.
//!
//! Every kernel has a CPU counterpart of the same name in this crate that specifies it.
//!
//! The kernels run on a [`Device`]: a real GPU ([`CudaDevice`]) or the CPU emulation of one
//! ([`Emulator`], with the `emulation` feature), which compiles these same sources with the host
//! C++ compiler so that tests check the kernels and the CUDA executor without a GPU.

pub mod check;
mod device;
mod driver;
pub mod emulator;
mod launch;

pub use device::{Device, DeviceBuffer, DeviceValue, Gemm, KernelArg, Launch};
pub use driver::CudaDevice;
pub use emulator::Emulator;
pub use launch::{CudaKernels, LoraRows, LoraSlotEntry, SEGMENT_PIECE_ROWS, Segments, split_segments};

use cudarc::cublas::{CudaBlas, GemmConfig};
use cudarc::driver::{CudaContext, CudaSlice, DriverError};
use cudarc::nvrtc::{CompileOptions, Ptx};
use std::sync::Arc;

/// Helpers every source is compiled with (numeric types, warp reductions).
const PRELUDE: &str = include_str!("../../cuda/prelude.cuh");

/// The kernel sources, by name.
pub const SOURCES: &[(&str, &str)] = &[
    ("lora", include_str!("../../cuda/lora.cu")),
    ("ops", include_str!("../../cuda/ops.cu")),
    ("attention", include_str!("../../cuda/attention.cu")),
];

/// Entry points defined by each source, without the dtype suffix.
const ENTRY_POINTS: &[(&str, &[&str])] = &[
    ("lora", &["sgmv_shrink", "sgmv_expand", "bgmv_shrink", "bgmv_expand"]),
    ("ops", &["add_bias", "embedding", "rms_norm", "rope", "silu_mul", "add_inplace"]),
    ("attention", &["write_kv", "paged_attention"]),
];

/// The entry points (without dtype suffix) a source defines.
fn entry_points(source: &str) -> &'static [&'static str] {
    ENTRY_POINTS.iter().find(|(s, _)| *s == source).map_or(&[], |(_, e)| e)
}

/// Every entry point's full name (with its dtype suffix).
pub fn entry_point_names() -> Vec<String> {
    let mut names = Vec::new();
    for (_, entries) in ENTRY_POINTS {
        for entry in *entries {
            names.extend(Dtype::ALL.iter().map(|d| format!("{entry}_{}", d.suffix())));
        }
    }
    names
}

/// Element types the kernels are instantiated for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F32,
    Bf16,
    F16,
}

impl Dtype {
    pub const ALL: [Dtype; 3] = [Dtype::F32, Dtype::Bf16, Dtype::F16];

    /// Suffix of the kernel entry points for this type.
    pub fn suffix(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
            Dtype::F16 => "f16",
        }
    }
}

/// The element types the kernels compute on (activations, weights, the KV cache).
pub trait Element: DeviceValue {
    const DTYPE: Dtype;
    fn from_f32(v: f32) -> Self;
    fn to_f32(self) -> f32;

    /// cuBLAS's GEMM for this type (f32 accumulation).
    ///
    /// # Safety
    /// As [`cudarc::cublas::Gemm::gemm`]: the buffers must hold what `cfg` describes.
    unsafe fn cublas_gemm(
        blas: &CudaBlas,
        cfg: GemmConfig<Self>,
        a: &CudaSlice<Self>,
        b: &CudaSlice<Self>,
        c: &mut CudaSlice<Self>,
    ) -> Result<(), cudarc::cublas::result::CublasError>;
}

macro_rules! element {
    ($t:ty, $dtype:expr, $from:expr, $to:expr) => {
        impl Element for $t {
            const DTYPE: Dtype = $dtype;
            fn from_f32(v: f32) -> Self {
                $from(v)
            }
            fn to_f32(self) -> f32 {
                $to(self)
            }
            unsafe fn cublas_gemm(
                blas: &CudaBlas,
                cfg: GemmConfig<Self>,
                a: &CudaSlice<Self>,
                b: &CudaSlice<Self>,
                c: &mut CudaSlice<Self>,
            ) -> Result<(), cudarc::cublas::result::CublasError> {
                // SAFETY: forwarded from the caller.
                unsafe { cudarc::cublas::Gemm::gemm(blas, cfg, a, b, c) }
            }
        }
    };
}

element!(f32, Dtype::F32, |v| v, |v| v);
element!(half::bf16, Dtype::Bf16, half::bf16::from_f32, half::bf16::to_f32);
element!(half::f16, Dtype::F16, half::f16::from_f32, half::f16::to_f32);

/// Why the CUDA path is unavailable or failed.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error("the CUDA driver library (libcuda.so) was not found; install the NVIDIA driver or run on the CPU")]
    NoDriver,
    #[error("NVRTC (libnvrtc.so.13) was not found; install the CUDA 13 runtime compiler or add it to LD_LIBRARY_PATH")]
    NoNvrtc,
    #[error("cuBLAS (libcublas.so.13) was not found; add the CUDA 13 libraries to LD_LIBRARY_PATH")]
    NoBlas,
    #[error("cuBLAS: {0:?}")]
    Blas(cudarc::cublas::result::CublasError),
    #[error("this build has no CUDA emulation (it is built for tests, with the kernels crate's `emulation` feature)")]
    NoEmulation,
    #[error("emulated kernel {entry}: {message}")]
    Emulation { entry: String, message: String },
    #[error("no CUDA device {0}")]
    NoDevice(usize),
    #[error("compiling kernel source {name}.cu failed:\n{log}")]
    Compile { name: String, log: String },
    #[error("CUDA driver: {0}")]
    Driver(#[from] DriverError),
    #[error("invalid kernel arguments: {0}")]
    Arguments(String),
}

impl CudaError {
    /// Whether the device ran out of memory (an allocation failed; the device is fine).
    pub fn is_out_of_memory(&self) -> bool {
        use cudarc::cublas::sys::cublasStatus_t;
        use cudarc::driver::sys::CUresult;
        match self {
            CudaError::Driver(e) => e.0 == CUresult::CUDA_ERROR_OUT_OF_MEMORY,
            CudaError::Blas(e) => e.0 == cublasStatus_t::CUBLAS_STATUS_ALLOC_FAILED,
            _ => false,
        }
    }

    /// Whether the device itself failed while running work: an error from the driver, cuBLAS
    /// or an emulated kernel that is not a lack of memory. Such errors are sticky on a GPU (a
    /// faulted context fails every later call), so nothing more should run on the device.
    pub fn is_device_fault(&self) -> bool {
        matches!(self, CudaError::Driver(_) | CudaError::Blas(_) | CudaError::Emulation { .. })
            && !self.is_out_of_memory()
    }
}

/// Whether NVRTC can be loaded.
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to dlopen the library; no symbol is called.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Whether cuBLAS can be loaded.
pub fn cublas_available() -> bool {
    // SAFETY: only tries to dlopen the library; no symbol is called.
    unsafe { cudarc::cublas::sys::is_culib_present() }
}

/// Whether the CUDA driver library can be loaded.
pub fn driver_available() -> bool {
    // SAFETY: only tries to dlopen the library; no symbol is called.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// NVRTC's `--gpu-architecture` value for a compute capability.
fn arch_for(major: i32, minor: i32) -> &'static str {
    match (major, minor) {
        (7, 0) => "compute_70",
        (7, 5) => "compute_75",
        (8, 0) => "compute_80",
        (8, 6) => "compute_86",
        (8, 9) => "compute_89",
        (9, 0) => "compute_90",
        (10, 0) => "compute_100",
        (12, 0) => "compute_120",
        // Newer or unlisted parts run PTX for the newest architecture we name, JIT-compiled by
        // the driver.
        _ => "compute_80",
    }
}

/// Compiles one source (with the prelude) to PTX for `arch` (e.g. `compute_90`).
pub fn compile(name: &str, source: &str, arch: &'static str) -> Result<Ptx, CudaError> {
    if !nvrtc_available() {
        return Err(CudaError::NoNvrtc);
    }
    let full = format!("{PRELUDE}\n{source}");
    let opts = CompileOptions {
        arch: Some(arch),
        name: Some(format!("{name}.cu")),
        options: vec!["--std=c++17".into()],
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(full, opts)
        .map_err(|e| CudaError::Compile { name: name.to_string(), log: format!("{e:?}") })
}

/// Compiles every source for `arch`; the first failure names its file and carries NVRTC's log.
/// Results are cached per architecture for the life of the process (every executor of a
/// process, and every test, shares one compilation).
pub fn compile_all(arch: &'static str) -> Result<Vec<(&'static str, Ptx)>, CudaError> {
    type Compiled = Vec<(&'static str, Ptx)>;
    static CACHE: std::sync::Mutex<Vec<(&'static str, Compiled)>> = std::sync::Mutex::new(Vec::new());
    let mut cache = CACHE.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((_, ptx)) = cache.iter().find(|(a, _)| *a == arch) {
        return Ok(ptx.clone());
    }
    let compiled: Compiled =
        SOURCES.iter().map(|&(name, src)| compile(name, src, arch).map(|ptx| (name, ptx))).collect::<Result<_, _>>()?;
    cache.push((arch, compiled.clone()));
    Ok(compiled)
}

/// Opens device `ordinal`, checking for the driver first (cudarc panics without it).
pub fn open_device(ordinal: usize) -> Result<Arc<CudaContext>, CudaError> {
    if !driver_available() {
        return Err(CudaError::NoDriver);
    }
    let count = CudaContext::device_count()?;
    if ordinal >= count.max(0) as usize {
        return Err(CudaError::NoDevice(ordinal));
    }
    Ok(CudaContext::new(ordinal)?)
}

/// The NVRTC architecture for a context's device.
pub fn device_arch(ctx: &CudaContext) -> Result<&'static str, CudaError> {
    let (major, minor) = ctx.compute_capability()?;
    Ok(arch_for(major, minor))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Compiles every kernel source to PTX. Needs only NVRTC (no GPU); CI installs it and sets
    /// `SWITCHYARD_REQUIRE_NVRTC=1` so that a missing NVRTC fails instead of skipping.
    #[test]
    fn every_kernel_source_compiles_with_nvrtc() {
        if !nvrtc_available() {
            assert!(
                std::env::var_os("SWITCHYARD_REQUIRE_NVRTC").is_none(),
                "SWITCHYARD_REQUIRE_NVRTC is set but libnvrtc.so.13 cannot be loaded"
            );
            // Straight to stderr (not eprintln!, which the test harness captures) so the skip
            // shows in the test output.
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "kernels: skipped NVRTC compilation, libnvrtc.so.13 not found");
            return;
        }
        for arch in ["compute_80", "compute_90"] {
            for (name, ptx) in compile_all(arch).unwrap_or_else(|e| panic!("{e}")) {
                let text = ptx.to_src();
                for dtype in ["f32", "bf16", "f16"] {
                    let entry = format!(".entry {}", entry_points(name)[0]);
                    assert!(text.contains(&format!("{entry}_{dtype}")), "{name}.cu lacks {entry}_{dtype}");
                }
            }
        }
    }

    #[test]
    fn every_entry_point_is_listed_for_a_source_that_exists() {
        for (source, entries) in ENTRY_POINTS {
            let (_, text) = SOURCES.iter().find(|(s, _)| s == source).expect("source exists");
            for e in *entries {
                assert!(text.contains(&format!("INSTANTIATE({e},")), "{source}.cu does not instantiate {e}");
            }
        }
    }

    #[test]
    fn missing_libraries_are_errors_not_panics() {
        // On a machine without a driver this is the NoDriver path; with one, a bad ordinal.
        match open_device(10_000) {
            Err(CudaError::NoDriver) | Err(CudaError::NoDevice(_)) | Err(CudaError::Driver(_)) => {}
            Ok(_) => panic!("device 10000 should not exist"),
            Err(e) => panic!("unexpected error {e}"),
        }
    }
}
