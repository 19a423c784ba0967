//! The CUDA kernels on the CPU emulation of a CUDA device: the same `.cu` sources NVRTC compiles,
//! built with the host C++ compiler, each block's threads run as fibers in varying orders with
//! real barriers and shuffles. This checks the kernels' arithmetic and indexing (and catches a
//! missing `__syncthreads()`); it does not check timing or the GPU memory model — the device
//! check does that on a real GPU with the same checks.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a test fails loudly

use switchyard_kernels::cuda::check::{self, Checker};
use switchyard_kernels::cuda::{CudaError, CudaKernels, Device, Emulator, KernelArg, Launch};

fn emulator() -> Emulator {
    Emulator::new().expect("the emulation is built into the tests")
}

#[test]
fn emulated_cuda_every_kernel_matches_its_cpu_specification() {
    let k = CudaKernels::new(emulator());
    let rows = Checker::new(&k, 7).run_all().expect("every check runs");
    let table = check::table(&rows);
    eprintln!("kernel checks on the emulator:\n{table}");
    for kernel in [
        "embedding",
        "rms_norm",
        "silu_mul",
        "add_bias",
        "add_inplace",
        "rope",
        "paged_attention",
        "write_kv",
        "sgmv",
        "bgmv",
    ] {
        for dtype in ["f32", "bf16", "f16"] {
            assert!(
                rows.iter().any(|r| r.kernel.starts_with(kernel) && r.kernel.ends_with(dtype)),
                "no check of {kernel} in {dtype}"
            );
        }
    }
    let failed: Vec<_> = rows.iter().filter(|r| !r.passed()).cloned().collect();
    assert!(failed.is_empty(), "kernels that disagree with their CPU specification:\n{}", check::table(&failed));
}

/// Launches one of the emulation's self-test kernels on 1-D blocks.
fn run(dev: &Emulator, entry: &str, blocks: u32, threads: u32, args: &[KernelArg]) -> Result<(), CudaError> {
    let launch = Launch { entry, grid: (blocks, 1, 1), block: (threads, 1, 1), args };
    // SAFETY: the self-test kernels touch `blocks · threads` elements of each buffer argument,
    // and every caller passes buffers of that size.
    unsafe { dev.launch(&launch) }
}

#[test]
fn a_missing_barrier_changes_the_result_and_the_barrier_restores_it() {
    let dev = emulator();
    let (blocks, threads) = (6u32, 256u32);
    let n = (blocks * threads) as usize;
    let input: Vec<i32> = (0..n as i32).collect();
    let want: Vec<i32> = input.chunks(threads as usize).flat_map(|c| c.iter().rev().copied()).collect();
    let d_in = dev.upload(&input).unwrap();
    for synced in [1, 0] {
        let d_out = dev.alloc_zeros::<i32>(n).unwrap();
        let args = [KernelArg::Ptr(dev.address(&d_in)), KernelArg::Ptr(dev.address(&d_out)), KernelArg::I32(synced)];
        run(&dev, "selftest_reverse", blocks, threads, &args).unwrap();
        let got = dev.download(&d_out).unwrap();
        if synced == 1 {
            assert_eq!(got, want, "with the barrier every block is reversed");
        } else {
            // Every block meets an order in which some thread reads its mirror's slot too early.
            for (b, (g, w)) in got.chunks(threads as usize).zip(want.chunks(threads as usize)).enumerate() {
                assert_ne!(g, w, "block {b} without its barrier read only fresh values");
            }
        }
    }
}

#[test]
fn a_missing_barrier_at_the_end_of_a_loop_is_caught_by_warps_running_ahead() {
    // Shuffles keep warps abreast when threads take turns; only a warp that runs ahead to the
    // next barrier overwrites a partial sum before the thread that adds them has read it.
    let dev = emulator();
    let (blocks, threads, rows) = (10u32, 256u32, 4usize);
    let n = blocks as usize * rows * threads as usize;
    // Small integers, so every sum is exact in f32 and each row's differs.
    let input: Vec<f32> = (0..n).map(|i| ((i * 7) % 13) as f32 + (i / threads as usize) as f32).collect();
    let want: Vec<f32> = input.chunks(threads as usize).map(|row| row.iter().sum()).collect();
    let d_in = dev.upload(&input).unwrap();
    for synced in [1, 0] {
        let d_out = dev.alloc_zeros::<f32>(want.len()).unwrap();
        let args = [
            KernelArg::Ptr(dev.address(&d_in)),
            KernelArg::Ptr(dev.address(&d_out)),
            KernelArg::I32(rows as i32),
            KernelArg::I32(synced),
        ];
        run(&dev, "selftest_row_sums", blocks, threads, &args).unwrap();
        let got = dev.download(&d_out).unwrap();
        let wrong = got.chunks(rows).zip(want.chunks(rows)).filter(|(g, w)| g != w).count();
        if synced == 1 {
            assert_eq!(got, want, "with the barrier every row sums right");
        } else {
            assert!(wrong > 0, "no block without the end-of-row barrier summed a row wrong");
        }
    }
}

#[test]
fn a_barrier_in_divergent_code_is_reported_as_a_deadlock() {
    let dev = emulator();
    let out = dev.alloc_zeros::<f32>(32).unwrap();
    let err = run(&dev, "selftest_divergent", 1, 32, &[KernelArg::Ptr(dev.address(&out))]).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("selftest_divergent") && text.contains("deadlock"), "{text}");
    assert!(text.contains("16 threads wait at __syncthreads(), 16 at a warp shuffle"), "{text}");
    // The emulator is usable afterwards: the fibers were abandoned, not leaked into the next launch.
    let input: Vec<f32> = (0..64).map(|i| i as f32).collect();
    let (d_in, d_out) = (dev.upload(&input).unwrap(), dev.alloc_zeros::<f32>(64).unwrap());
    run(&dev, "selftest_warp_sum", 1, 64, &[KernelArg::Ptr(dev.address(&d_in)), KernelArg::Ptr(dev.address(&d_out))])
        .unwrap();
    let got = dev.download(&d_out).unwrap();
    let (first, second) = ((0..32).sum::<i32>() as f32, (32..64).sum::<i32>() as f32);
    assert!(got[..32].iter().all(|&v| v == first) && got[32..].iter().all(|&v| v == second), "{got:?}");
}

#[test]
fn launches_that_do_not_match_the_kernel_are_refused_by_name() {
    let dev = emulator();
    let out = dev.alloc_zeros::<f32>(32).unwrap();
    let p = KernelArg::Ptr(dev.address(&out));
    let err = run(&dev, "no_such_kernel_f32", 1, 32, &[p]).unwrap_err();
    assert!(err.to_string().contains("no_such_kernel_f32: no such kernel"), "{err}");
    // selftest_warp_sum takes two pointers.
    let err = run(&dev, "selftest_warp_sum", 1, 32, &[p, KernelArg::I32(3)]).unwrap_err();
    assert!(err.to_string().contains("arguments of [8, 4] bytes for parameters of [8, 8] bytes"), "{err}");
    let err = run(&dev, "selftest_warp_sum", 1, 2048, &[p, p]).unwrap_err();
    assert!(err.to_string().contains("invalid launch shape"), "{err}");
}
