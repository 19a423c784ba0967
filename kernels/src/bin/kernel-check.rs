//! `kernel-check`: runs every CUDA kernel against its CPU reference on fresh random inputs of
//! several shapes and dtypes, then times the batched LoRA kernels. Prints a table; with
//! `--out FILE` also writes it (and every measured figure) to FILE. Exits 1 when a check fails,
//! 2 when no GPU can be used.
//!
//! Options: `--out FILE`, `--torch FILE` (baseline timings from
//! `scripts/device-check/torch_baselines.py`, lines `name microseconds`).

#![allow(clippy::too_many_arguments)]

use cudarc::driver::CudaStream;
use cudarc::driver::sys::CUevent_flags;
use half::bf16;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::process::ExitCode;
use std::sync::Arc;
use switchyard_kernels::cuda::check::{self, Checker};
use switchyard_kernels::cuda::{CudaDevice, CudaError, CudaKernels, Device, LoraRows, SEGMENT_PIECE_ROWS, Segments};
use switchyard_kernels::lora;

type Result<T> = std::result::Result<T, CudaError>;
type Check<'a> = Checker<'a, CudaDevice>;

/// Median milliseconds of `f` over `groups` groups of `reps` back-to-back runs, after a warm-up.
fn time_ms(stream: &Arc<CudaStream>, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..3 {
        f()?;
    }
    stream.synchronize()?;
    let mut samples = Vec::new();
    for _ in 0..7 {
        let start = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        for _ in 0..reps {
            f()?;
        }
        let end = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        samples.push(start.elapsed_ms(&end)? as f64 / reps as f64);
    }
    samples.sort_by(f64::total_cmp);
    Ok(samples[samples.len() / 2])
}

struct LoraBench {
    kernels_ms: f64,
    bytes: f64,
}

/// Times shrink+expand (`h → r → h`, bf16) for `rows` rows over `adapters` distinct adapters
/// of rank `rank`, rows assigned round-robin. SGMV when rows share adapters, BGMV otherwise.
fn lora_bench(
    k: &CudaKernels<CudaDevice>,
    c: &mut Check<'_>,
    rows: usize,
    adapters: usize,
    rank: usize,
    h: usize,
    piece: u32,
) -> Result<LoraBench> {
    let (table, _keep, _host) = c.adapters::<bf16>(&vec![rank; adapters], h, h)?;
    let (x, _) = c.random::<bf16>(rows * h, 1.0);
    let (y, _) = c.random::<bf16>(rows * h, 1.0);
    let (d_x, mut d_y) = (c.up(&x)?, c.up(&y)?);
    let dev = k.device();
    let mut v = dev.alloc_zeros::<f32>(rows * rank)?;
    // Rows of one adapter are contiguous (the scheduler sorts rows by adapter).
    let per = rows.div_ceil(adapters);
    let row_slots: Vec<Option<u32>> = (0..rows).map(|t| Some((t / per) as u32)).collect();
    let segs = Segments::upload_pieces(dev, &lora::segments(&row_slots), piece)?;
    let slots_i: Vec<i32> = row_slots.iter().map(|s| s.map_or(-1, |s| s as i32)).collect();
    let d_slots = c.up(&slots_i)?;
    let decode_shaped = per == 1;
    let ms = time_ms(dev.stream(), 20, || {
        let sel = if decode_shaped { LoraRows::PerRow { slots: &d_slots, rows } } else { LoraRows::Segments(&segs) };
        k.lora_shrink(&d_x, h, sel, &table, rank, &mut v, rank)?;
        k.lora_expand(&v, rank, sel, &table, &mut d_y, h, 0, h)
    })?;
    // Bytes that must move: every used adapter's A and Bᵀ once, x once, v written and read, y
    // read and written.
    let used = adapters.min(rows);
    let bytes = (used * 2 * rank * h * 2 + rows * h * 2 + rows * rank * 4 * 2 + rows * h * 2 * 2) as f64;
    Ok(LoraBench { kernels_ms: ms, bytes })
}

fn copy_bandwidth(stream: &Arc<CudaStream>) -> Result<f64> {
    let n = 1usize << 29; // 2 GiB of f32
    let src = stream.alloc_zeros::<f32>(n)?;
    let mut dst = stream.alloc_zeros::<f32>(n)?;
    let ms = time_ms(stream, 5, || Ok(stream.memcpy_dtod(&src, &mut dst)?))?;
    Ok(2.0 * (n * 4) as f64 / (ms * 1e-3))
}

fn run(out: Option<String>, torch: HashMap<String, f64>) -> Result<bool> {
    let k = CudaKernels::new(CudaDevice::open(0)?);
    let seed = std::process::id() as u64;
    let rows = Checker::new(&k, seed).run_all()?;
    let all_ok = rows.iter().all(check::CheckRow::passed);
    let mut report = String::new();
    let _ = writeln!(
        report,
        "device: {}\n\nkernel checks (‖gpu − cpu‖ / ‖cpu‖ on fresh random inputs, seed {seed}; outputs poisoned with NaN first)",
        k.device().name()
    );
    report.push_str(&check::table(&rows));

    let mut c = Checker::new(&k, seed);
    let copy = copy_bandwidth(k.device().stream())?;
    let big = lora_bench(&k, &mut c, 256, 256, 64, 4096, SEGMENT_PIECE_ROWS)?;
    let small = lora_bench(&k, &mut c, 64, 64, 16, 4096, SEGMENT_PIECE_ROWS)?;
    let one = lora_bench(&k, &mut c, 64, 1, 16, 4096, SEGMENT_PIECE_ROWS)?;
    let mut pieces = Vec::new();
    for piece in [1u32, 2, 8, 16, 64] {
        pieces.push((piece, lora_bench(&k, &mut c, 64, 1, 16, 4096, piece)?.kernels_ms));
    }
    let _ = writeln!(report, "\nLoRA benchmarks (bf16, shrink+expand, hidden 4096; medians of CUDA-event timings)");
    let _ = writeln!(report, "device-to-device copy bandwidth: {:.0} GB/s (read+write)", copy / 1e9);
    let big_bw = big.bytes / (big.kernels_ms * 1e-3);
    let _ = writeln!(
        report,
        "256 tokens x 256 adapters, rank 64: {:.1} us, {:.0} GB/s effective = {:.2} of copy bandwidth (goal >= 0.70)",
        big.kernels_ms * 1e3,
        big_bw / 1e9,
        big_bw / copy
    );
    let _ = writeln!(report, "64 tokens x 64 adapters, rank 16: {:.1} us", small.kernels_ms * 1e3);
    let _ = writeln!(
        report,
        "64 tokens x 1 adapter, rank 16: {:.1} us (segments split every {SEGMENT_PIECE_ROWS} rows)",
        one.kernels_ms * 1e3
    );
    for (piece, ms) in pieces {
        let _ = writeln!(report, "  with pieces of {piece} rows: {:.1} us", ms * 1e3);
    }
    let _ = writeln!(report, "64 distinct / 1 adapter: {:.2}x (goal <= 2.5x)", small.kernels_ms / one.kernels_ms);
    for (baseline, goal) in [("torch_loop_us", 10.0), ("torch_gather_bmm_us", 3.0)] {
        if let Some(t) = torch.get(baseline) {
            let _ = writeln!(
                report,
                "vs {baseline} ({t:.1} us): {:.1}x faster (goal >= {goal}x)",
                t / (small.kernels_ms * 1e3)
            );
        }
    }
    print!("{report}");
    if let Some(path) = out
        && let Err(e) = std::fs::write(&path, &report)
    {
        eprintln!("cannot write {path}: {e}");
    }
    Ok(all_ok)
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (mut out, mut torch) = (None, HashMap::new());
    while let Some(a) = args.next() {
        match (a.as_str(), args.next()) {
            ("--out", Some(p)) => out = Some(p),
            ("--torch", Some(p)) => match std::fs::read_to_string(&p) {
                Ok(text) => {
                    for line in text.lines() {
                        if let Some((k, v)) = line.split_once(' ')
                            && let Ok(v) = v.trim().parse()
                        {
                            torch.insert(k.to_string(), v);
                        }
                    }
                }
                Err(e) => eprintln!("cannot read {p}: {e}; continuing without baselines"),
            },
            _ => {
                eprintln!("usage: kernel-check [--out FILE] [--torch FILE]");
                return ExitCode::from(2);
            }
        }
    }
    match run(out, torch) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("kernel-check: some kernels do not match their CPU reference");
            ExitCode::from(1)
        }
        Err(e @ (CudaError::NoDriver | CudaError::NoDevice(_) | CudaError::NoNvrtc | CudaError::NoBlas)) => {
            eprintln!("kernel-check: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("kernel-check: {e}");
            ExitCode::from(1)
        }
    }
}
