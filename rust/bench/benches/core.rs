//! `cargo bench -p ferroquant-bench [-- FILTER]`: criterion benchmarks of the core, one
//! `criterion_group!` per module so each owner adds theirs without touching the others:
//!
//! - group "hessian": `HessianAccumulator::add_batch` (f32 and bf16 input), n = 1024, 4096, 11008
//! - group "linalg":  `factor_damped` and `damped_inverse_upper`, n = 1024, 4096, 11008
//! - group "gptq":    `gptq_quantize` (4-bit, group 128, block 128) at rows x cols = 1024x1024,
//!   4096x4096 and 4096x11008, plus act-order at 4096x4096. One 4096x11008 solve is ~1 TFlop
//!   (~10 s on 2 cores), so a full group run takes a few minutes.
//!
//! Sizes are the real ones (n = 4096, 16k tokens), so sample counts are kept at criterion's
//! minimum to keep a full run within minutes on a 2-core machine.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ferroquant_core::hessian::{Activations, HessianAccumulator};
use ferroquant_core::linalg::{damped_inverse_upper, factor_damped, DampingPolicy};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Correlated activations `[rows, n]`: uniform noise mixed with its neighbouring feature.
fn activations(rows: usize, n: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    let u: Vec<f32> = (0..rows * n).map(|_| rng.random::<f32>() - 0.5).collect();
    (0..rows * n)
        .map(|k| {
            let (t, c) = (k / n, k % n);
            u[k] + 0.5 * u[t * n + (c + 1) % n] + 0.1
        })
        .collect()
}

/// A damped-factorable Hessian of `n` features from `2n` correlated tokens.
fn hessian(n: usize) -> Vec<f32> {
    let rows = 2 * n;
    let x = activations(rows, n, 7);
    let mut acc = HessianAccumulator::new(n).expect("n > 0");
    acc.add_batch(Activations::F32(&x), rows)
        .expect("finite input");
    acc.hessian()
}

// ---------------------------------------------------------------------------------------------
// group "hessian"
// ---------------------------------------------------------------------------------------------

fn bench_hessian(c: &mut Criterion) {
    let mut g = c.benchmark_group("hessian");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(5));
    for &(n, tokens) in &[
        (1024usize, 4096usize),
        (1024, 16384),
        (4096, 4096),
        (4096, 16384),
        // the 11008-wide input of a 7B model's down_proj (~0.5 TFlop per batch)
        (11008, 2048),
    ] {
        let x = activations(tokens, n, 1);
        // Flops of the triangle actually computed (n(n+1)/2 dot products of length `tokens`).
        g.throughput(Throughput::Elements((n * (n + 1) * tokens) as u64));
        g.bench_with_input(
            BenchmarkId::new("add_batch_f32", format!("n{n}_t{tokens}")),
            &x,
            |b, x| {
                let mut acc = HessianAccumulator::new(n).expect("n > 0");
                b.iter(|| {
                    acc.add_batch(Activations::F32(black_box(x)), tokens)
                        .expect("finite")
                });
            },
        );
        if tokens == 16384 {
            let xb: Vec<half::bf16> = x.iter().map(|&v| half::bf16::from_f32(v)).collect();
            g.bench_with_input(
                BenchmarkId::new("add_batch_bf16", format!("n{n}_t{tokens}")),
                &xb,
                |b, x| {
                    let mut acc = HessianAccumulator::new(n).expect("n > 0");
                    b.iter(|| {
                        acc.add_batch(Activations::BF16(black_box(x)), tokens)
                            .expect("finite")
                    });
                },
            );
        }
    }
    g.finish();
}

// ---------------------------------------------------------------------------------------------
// group "linalg"
// ---------------------------------------------------------------------------------------------

fn bench_linalg(c: &mut Criterion) {
    let mut g = c.benchmark_group("linalg");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(5));
    for &n in &[1024usize, 4096, 11008] {
        // accumulating a Hessian from tokens costs more than the factor itself at 11008
        let h = if n > 4096 {
            lowrank_hessian(n, 7)
        } else {
            hessian(n)
        };
        // ~n³/3 flops each.
        g.throughput(Throughput::Elements((n * n * n / 3) as u64));
        g.bench_with_input(BenchmarkId::new("factor_damped", n), &h, |b, h| {
            b.iter(|| factor_damped(black_box(h), n, DampingPolicy::default()).expect("SPD"));
        });
        g.bench_with_input(BenchmarkId::new("damped_inverse_upper", n), &h, |b, h| {
            b.iter(|| {
                damped_inverse_upper(black_box(h), n, DampingPolicy::default()).expect("SPD")
            });
        });
    }
    g.finish();
}

// ---------------------------------------------------------------------------------------------
// group "gptq"
// ---------------------------------------------------------------------------------------------

/// Dense correlated SPD Hessian in O(n²·k) (accumulating 2n tokens at n = 11008 would cost
/// ~2.7 TFlop of setup): `D (I + Σ_k u_k u_kᵀ) D` with 8 random directions and log-uniform
/// feature scales. (A Kac-Murdock-Szegő matrix is cheaper still, but its factor decays
/// geometrically into subnormals, which slows every kernel and misleads the timing.)
fn lowrank_hessian(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    let k = 8;
    let u: Vec<f32> = (0..k * n).map(|_| rng.random::<f32>() - 0.5).collect();
    let s: Vec<f32> = (0..n)
        .map(|_| (3.0 * (rng.random::<f32>() - 0.5)).exp())
        .collect();
    (0..n * n)
        .map(|idx| {
            let (i, j) = (idx / n, idx % n);
            let low: f32 = (0..k).map(|r| u[r * n + i] * u[r * n + j]).sum();
            s[i] * s[j] * (low + if i == j { 1.0 } else { 0.0 })
        })
        .collect()
}

fn bench_gptq(c: &mut Criterion) {
    use ferroquant_core::gptq::{gptq_quantize, GptqOptions};
    use ferroquant_core::quantizer::{Observer, QuantSpec};
    let mut g = c.benchmark_group("gptq");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(100))
        .measurement_time(Duration::from_secs(5));
    let opts = |act_order: bool| GptqOptions {
        spec: QuantSpec {
            bits: 4,
            symmetric: false,
            observer: Observer::MinMax,
            scale_dtype: Default::default(),
        },
        group_size: Some(128),
        act_order,
        static_groups: false,
        group_aware: false,
        block_size: 128,
        damping: DampingPolicy::default(),
    };
    for &(rows, cols, act_order) in &[
        (1024usize, 1024usize, false),
        (4096, 4096, false),
        (4096, 4096, true),
        (4096, 11008, false),
    ] {
        let mut rng = StdRng::seed_from_u64(3);
        let w: Vec<f32> = (0..rows * cols)
            .map(|_| rng.random::<f32>() - 0.5)
            .collect();
        let h = lowrank_hessian(cols, 5);
        // Lazy-batch updates ~rows*cols² flops + factorisation ~cols³/3.
        g.throughput(Throughput::Elements(
            (rows * cols * cols + cols * cols * cols / 3) as u64,
        ));
        let name = if act_order { "g128_act_order" } else { "g128" };
        g.bench_with_input(
            BenchmarkId::new(name, format!("{rows}x{cols}")),
            &(w, h),
            |b, (w, h)| {
                b.iter(|| {
                    gptq_quantize(black_box(w), rows, cols, black_box(h), &opts(act_order))
                        .expect("solve")
                });
            },
        );
    }
    g.finish();
}

criterion_group!(hessian_benches, bench_hessian);
criterion_group!(linalg_benches, bench_linalg);
criterion_group!(gptq_benches, bench_gptq);
criterion_main!(hessian_benches, linalg_benches, gptq_benches);
