//! Criterion benches of the hot ops at the `small` preset's training shapes
//! (B = 8, T = 256, C = 256, H = 4, V = 4096; N = B·T = 2048 rows).
//!
//! cargo bench --bench ops

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use multitoken::autograd::Tape;
use multitoken::kernels::gemm::{matmul, Layout};
use multitoken::ops;
use multitoken::tensor::{Rng, Tensor};

const N: usize = 2048;
const C: usize = 256;
const V: usize = 4096;
const T: usize = 256;
const H: usize = 4;

fn gemm_shapes(c: &mut Criterion) {
    let mut rng = Rng::new(0);
    let mut group = c.benchmark_group("matmul");
    // (name, m, k, n, a layout, b layout): forward, dx and dW products of the small model
    let shapes = [
        ("qkv fwd x·W", N, C, 3 * C, Layout::Normal, Layout::Normal),
        ("qkv dx dout·Wᵀ", N, 3 * C, C, Layout::Normal, Layout::Transposed),
        ("qkv dW xᵀ·dout", C, N, 3 * C, Layout::Transposed, Layout::Normal),
        ("unembed h·wteᵀ", N, C, V, Layout::Normal, Layout::Transposed),
        ("unembed dwte dlᵀ·h", V, N, C, Layout::Transposed, Layout::Normal),
    ];
    for (name, m, k, n, la, lb) in shapes {
        let a: Vec<f32> = (0..m * k).map(|_| rng.normal() as f32).collect();
        let b: Vec<f32> = (0..k * n).map(|_| rng.normal() as f32).collect();
        let mut out = vec![0.0f32; m * n];
        group.throughput(Throughput::Elements((2 * m * k * n) as u64));
        group.bench_function(name, |bench| bench.iter(|| matmul(&a, la, &b, lb, &mut out, m, k, n, false)));
    }
    group.finish();
}

/// Decoding's products: one token (m = 1) and a speculative pass (m = 4) through the
/// `small` model's MLP weight and its tied unembedding.
fn decode_shapes(c: &mut Criterion) {
    let mut rng = Rng::new(7);
    let mut group = c.benchmark_group("decode matmul");
    for (name, k, n, lb) in [("x·W_fc 256→1024", C, 4 * C, Layout::Normal), ("z·wteᵀ 256→4096", C, V, Layout::Transposed)] {
        let b: Vec<f32> = (0..k * n).map(|_| rng.normal() as f32).collect();
        for m in [1, 4, 16] {
            let a: Vec<f32> = (0..m * k).map(|_| rng.normal() as f32).collect();
            let mut out = vec![0.0f32; m * n];
            group.bench_function(format!("{name} m={m}"), |bench| {
                bench.iter(|| matmul(&a, Layout::Normal, &b, lb, &mut out, m, k, n, false))
            });
        }
    }
    group.finish();
}

/// One decoding pass of the `small` backbone over 1 and 4 new tokens after 100 cached ones.
fn decode_backbone(c: &mut Criterion) {
    use multitoken::decode::kv_cache::CachedBackbone;
    use multitoken::model::{gpt2, ModelConfig};
    let config = ModelConfig::preset("small", V, 4, 4).unwrap();
    let params = gpt2::init_params::<f32>(&config, &mut Rng::new(3));
    let prompt: Vec<u32> = (0..100).map(|i| (i * 37 % V) as u32).collect();
    let mut group = c.benchmark_group("decode backbone");
    for m in [1, 4] {
        let mut backbone = CachedBackbone::new(&config, &params);
        backbone.forward(&prompt);
        let tokens: Vec<u32> = (0..m as u32).collect();
        group.bench_function(format!("m={m}"), |bench| {
            bench.iter(|| {
                let h = backbone.forward(&tokens);
                backbone.truncate(100);
                h
            })
        });
    }
    group.finish();
}

/// What starting a decoding team costs (`decode::team`): an empty pass with one barrier, on a
/// pool like the command line's, after some microseconds of one thread's work (the head's,
/// between two passes).
fn decode_team_start(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode team start");
    let busy = |micros: u128| {
        let start = std::time::Instant::now();
        while start.elapsed().as_micros() < micros {
            std::hint::spin_loop();
        }
    };
    for pause in [0, 400] {
        group.bench_function(format!("after {pause} µs"), |bench| {
            bench.iter_custom(|iterations| {
                rayon::ThreadPoolBuilder::new().build().unwrap().install(|| {
                    let mut total = std::time::Duration::ZERO;
                    for _ in 0..iterations {
                        busy(pause);
                        let start = std::time::Instant::now();
                        multitoken::kernels::team::together(|team| team.sync());
                        total += start.elapsed();
                    }
                    total
                })
            })
        });
    }
    group.finish();
}

/// The head of a `small` n = 4, r = 4 model at decoding: the next-token distributions at one
/// state (an autoregressive step's r rows) and the draft's other horizons there (r·(n − 1) rows).
fn decode_head(c: &mut Criterion) {
    use multitoken::decode::head::Head;
    use multitoken::model::{gpt2, ModelConfig};
    let config = ModelConfig::preset("small", V, 4, 4).unwrap();
    let params = gpt2::init_params::<f32>(&config, &mut Rng::new(3));
    let head = Head::new(&config, &params);
    let hidden: Vec<f32> = (0..C).map(|i| (i as f32 * 0.37).sin()).collect();
    let mut group = c.benchmark_group("decode head");
    group.bench_function("next token (r rows)", |bench| bench.iter(|| head.states(&hidden, 1).unwrap()));
    group.bench_function("draft horizons (r·(n − 1) rows)", |bench| {
        bench.iter_batched(
            || head.states(&hidden, 1).unwrap().remove(0),
            |mut state| head.fill(&mut [&mut state], 4).unwrap(),
            criterion::BatchSize::SmallInput,
        )
    });
    group.finish();
}

fn attention(c: &mut Criterion) {
    let qkv = Tensor::<f32>::randn(&[N, 3 * C], 1.0, &mut Rng::new(1));
    let weights = Tensor::<f32>::randn(&[N, C], 1.0, &mut Rng::new(2));
    c.bench_function("attention forward+backward", |bench| {
        bench.iter(|| {
            let mut tape = Tape::new();
            let x = tape.leaf(qkv.clone(), true);
            let out = ops::causal_self_attention(&mut tape, x, T, H).unwrap();
            let loss = ops::weighted_sum(&mut tape, out, &weights).unwrap();
            tape.backward(loss).unwrap()
        })
    });
}

fn elementwise(c: &mut Criterion) {
    let x = Tensor::<f32>::randn(&[N, C], 1.0, &mut Rng::new(3));
    let w = Tensor::<f32>::full(&[C], 1.0);
    let b = Tensor::<f32>::zeros(&[C]);
    let weights = Tensor::<f32>::randn(&[N, C], 1.0, &mut Rng::new(4));
    c.bench_function("layernorm forward+backward", |bench| {
        bench.iter(|| {
            let mut tape = Tape::new();
            let (xv, wv, bv) = (tape.leaf(x.clone(), true), tape.leaf(w.clone(), true), tape.leaf(b.clone(), true));
            let out = ops::layernorm(&mut tape, xv, wv, bv).unwrap();
            let loss = ops::weighted_sum(&mut tape, out, &weights).unwrap();
            tape.backward(loss).unwrap()
        })
    });
    let x4 = Tensor::<f32>::randn(&[N, 4 * C], 1.0, &mut Rng::new(5));
    let weights4 = Tensor::<f32>::randn(&[N, 4 * C], 1.0, &mut Rng::new(6));
    c.bench_function("gelu forward+backward", |bench| {
        bench.iter(|| {
            let mut tape = Tape::new();
            let xv = tape.leaf(x4.clone(), true);
            let out = ops::gelu(&mut tape, xv).unwrap();
            let loss = ops::weighted_sum(&mut tape, out, &weights4).unwrap();
            tape.backward(loss).unwrap()
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).measurement_time(std::time::Duration::from_secs(2)).warm_up_time(std::time::Duration::from_millis(500));
    targets = gemm_shapes, decode_shapes, decode_backbone, decode_team_start, decode_head, attention, elementwise
}
criterion_main!(benches);
