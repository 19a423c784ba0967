//! With the `emulation` feature, compiles the CUDA sources for the CPU emulation (tests only):
//! `emulator/kernels.cpp` includes the same `.cu` files NVRTC compiles at run time.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "emulation")]
    emulation::build();
}

#[cfg(feature = "emulation")]
mod emulation {
    pub fn build() {
        for path in ["emulator", "cuda"] {
            println!("cargo:rerun-if-changed={path}");
        }
        cc::Build::new()
            .cpp(true)
            .std("c++17")
            .file("emulator/kernels.cpp")
            // The emulator is test infrastructure, but unoptimized fibers make every test slow.
            .opt_level(2)
            .debug(false)
            // The kernels read element arrays through 16-byte vector types, as CUDA code does.
            .flag("-fno-strict-aliasing")
            // `#pragma unroll` is a hint NVRTC honours and the host compiler need not.
            .flag_if_supported("-Wno-unknown-pragmas")
            .warnings_into_errors(true)
            .compile("switchyard_cuda_emulation");
    }
}
