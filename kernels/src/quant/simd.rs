//! What the SIMD paths share: the const parameters their panel kernels are monomorphized on, and
//! the check of the extents their loads rely on.

use super::{BLOCK, Format, Q8Row, TILE};

// The formats as const parameters (the index of each in `Format::ALL`).
pub(super) const Q8_0: u8 = 0;
pub(super) const Q4_0: u8 = 1;
pub(super) const Q4_1: u8 = 2;
pub(super) const Q4_K: u8 = 3;
pub(super) const Q6_K: u8 = 4;
pub(super) const Q5_0: u8 = 5;
pub(super) const Q5_1: u8 = 6;
pub(super) const Q5_K: u8 = 7;

/// `format` as the const parameter `K`.
pub(super) fn kind(format: Format) -> u8 {
    match format {
        Format::Q8_0 => Q8_0,
        Format::Q4_0 => Q4_0,
        Format::Q4_1 => Q4_1,
        Format::Q4_K => Q4_K,
        Format::Q6_K => Q6_K,
        Format::Q5_0 => Q5_0,
        Format::Q5_1 => Q5_1,
        Format::Q5_K => Q5_K,
    }
}

/// Calls `$kernel::<R, K, F>` for the number of activation rows `R` (1 to [`TILE`]), the
/// format `K` and whether the activations have two limbs `F`: the const parameters each path's
/// kernel is monomorphized on.
macro_rules! dispatch {
    ($kernel:ident, $format:expr, $blocks:expr, $panel:expr, $xs:expr, $out:expr, $ahead:expr) => {{
        macro_rules! go {
            ($r:literal) => {{
                use super::simd::{Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0, kind};
                match (kind($format), $xs.first().is_some_and(|x| !x.lo.is_empty())) {
                    (Q8_0, false) => $kernel::<$r, Q8_0, false>($blocks, $panel, $xs, $out, $ahead),
                    (Q4_0, false) => $kernel::<$r, Q4_0, false>($blocks, $panel, $xs, $out, $ahead),
                    (Q4_1, false) => $kernel::<$r, Q4_1, false>($blocks, $panel, $xs, $out, $ahead),
                    (Q4_K, false) => $kernel::<$r, Q4_K, false>($blocks, $panel, $xs, $out, $ahead),
                    (Q5_0, false) => $kernel::<$r, Q5_0, false>($blocks, $panel, $xs, $out, $ahead),
                    (Q5_1, false) => $kernel::<$r, Q5_1, false>($blocks, $panel, $xs, $out, $ahead),
                    (Q5_K, false) => $kernel::<$r, Q5_K, false>($blocks, $panel, $xs, $out, $ahead),
                    (_, false) => $kernel::<$r, Q6_K, false>($blocks, $panel, $xs, $out, $ahead),
                    (Q8_0, true) => $kernel::<$r, Q8_0, true>($blocks, $panel, $xs, $out, $ahead),
                    (Q4_0, true) => $kernel::<$r, Q4_0, true>($blocks, $panel, $xs, $out, $ahead),
                    (Q4_1, true) => $kernel::<$r, Q4_1, true>($blocks, $panel, $xs, $out, $ahead),
                    (Q4_K, true) => $kernel::<$r, Q4_K, true>($blocks, $panel, $xs, $out, $ahead),
                    (Q5_0, true) => $kernel::<$r, Q5_0, true>($blocks, $panel, $xs, $out, $ahead),
                    (Q5_1, true) => $kernel::<$r, Q5_1, true>($blocks, $panel, $xs, $out, $ahead),
                    (Q5_K, true) => $kernel::<$r, Q5_K, true>($blocks, $panel, $xs, $out, $ahead),
                    (_, true) => $kernel::<$r, Q6_K, true>($blocks, $panel, $xs, $out, $ahead),
                }
            }};
        }
        match $xs.len() {
            0 => {}
            1 => go!(1),
            2 => go!(2),
            3 => go!(3),
            4 => go!(4),
            5 => go!(5),
            6 => go!(6),
            7 => go!(7),
            _ => go!(8),
        }
    }};
}
pub(super) use dispatch;

/// Checks what every path's loads rely on: `panel` is `blocks` blocks of `format`, and each
/// activation row has `blocks` blocks, with low limbs for all of them or none.
pub(super) fn check(format: Format, blocks: usize, panel: &[u8], xs: &[Q8Row<'_>]) {
    assert!(panel.len() == format.panel_bytes(blocks), "dot: the panel is not {blocks} blocks");
    assert!(xs.len() <= TILE, "dot: tile too large");
    let limbs = xs.first().is_some_and(|x| !x.lo.is_empty());
    for x in xs {
        assert!(
            x.q.len() >= blocks * BLOCK && x.d.len() >= blocks && x.sum.len() >= blocks && x.halves.len() >= 2 * blocks,
            "dot: activations shorter than the weight row"
        );
        assert!(
            if limbs { x.lo.len() >= blocks * BLOCK } else { x.lo.is_empty() },
            "dot: activations of mixed precision"
        );
    }
}
