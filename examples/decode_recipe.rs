//! The speed-up recipe (docs/results.md, "The speed-up recipe"): `base` with the n = 4, r = 4
//! head trained on the code corpus, once per seed, as `train --model base --horizon 4 --rank 4
//! --batch 16 --seq 512 --precision tf32` does; at stages along each run (after 1000, 2000 and
//! 3000 of its 3000 steps by default: the run is stopped there, measured, and resumed), greedy
//! and sampled (T = 1) decoding of 128 new tokens after each held-out code prompt
//! (examples/prompts/code.jsonl, at most 64 tokens each), autoregressive against speculative,
//! one `bench decode` each. Appends a row per (seed, stage, decoding) to RUN_DIR/recipe.jsonl
//! with every prompt's numbers and their medians, then prints the medians over prompts and
//! seeds per stage from every row in the file (rows of several machine sessions add up; a later
//! row of the same seed, stage and decoding replaces an earlier one) and draws them against the
//! training steps beside the rows (`recipe.svg`; `decode-recipe.svg` for docs/decode-recipe.jsonl).
//!
//! cargo run --release --example decode_recipe -- RUN_DIR DATA_DIR SEED[,SEED…] [STAGE,STAGE,…]
//! (scripts/decode-recipe.sh prepares the data and runs it. RECIPE_DEVICE=cpu RECIPE_MODEL=tiny
//! RECIPE_SEQ=64 for a try on the CPU; RECIPE_DECODE_PRECISION=f32,bf16 decodes each stage's
//! model in both precisions on the GPU (`bench decode --precision`; f32 alone by default, and the
//! plot draws f32's rows); RUN_DIR alone, or a rows file such as docs/decode-recipe.jsonl, prints
//! the summary only)

use std::path::{Path, PathBuf};

use multitoken::bench::{bench_decode, BenchDecodeResult};
use multitoken::data::tokenizer;
use multitoken::decode::{Draft, SamplingConfig};
use multitoken::device::{DeviceKind, Precision};
use multitoken::train::{self, checkpoint, RunOptions, TrainSettings};
use plotters::prelude::*;
use serde_json::{json, Value};

const PROMPTS: &str = "examples/prompts/code.jsonl";
/// Tokens of each prompt at most, and new tokens decoded after it.
const PROMPT_TOKENS: usize = 64;
const NEW_TOKENS: usize = 128;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    anyhow::ensure!(!args.is_empty(), "usage: decode_recipe RUN_DIR [DATA_DIR SEED[,SEED…] [STAGE,STAGE,…]]");
    let run_dir = PathBuf::from(&args[0]);
    // a rows file itself (docs/decode-recipe.jsonl), or a run directory's
    let rows_path = if run_dir.extension().is_some_and(|e| e == "jsonl") { run_dir.clone() } else { run_dir.join("recipe.jsonl") };
    if args.len() >= 3 {
        let (data, seeds) = (PathBuf::from(&args[1]), numbers(&args[2])?);
        let stages = numbers(args.get(3).map_or("1000,2000,3000", String::as_str))?;
        anyhow::ensure!(stages.windows(2).all(|w| w[0] < w[1]) && !stages.is_empty(), "stages must rise: {stages:?}");
        std::fs::create_dir_all(&run_dir)?;
        for seed in seeds {
            train_and_measure(&run_dir, &data, seed, &stages, &rows_path)?;
        }
    }
    summarise(&rows_path)
}

/// "1000,2000" → [1000, 2000]
fn numbers(text: &str) -> anyhow::Result<Vec<u64>> {
    text.split(',').map(|n| n.trim().parse().map_err(|e| anyhow::anyhow!("{n}: {e}"))).collect()
}

/// One seed's run, stopped at each stage to measure decoding, then resumed.
fn train_and_measure(run_dir: &Path, data: &Path, seed: u64, stages: &[u64], rows_path: &Path) -> anyhow::Result<()> {
    let device = DeviceKind::parse(&std::env::var("RECIPE_DEVICE").unwrap_or_else(|_| "cuda".into()))?;
    let precision = if device == DeviceKind::Cuda { Precision::Tf32 } else { Precision::F32 };
    let decode_precisions = std::env::var("RECIPE_DECODE_PRECISION").unwrap_or_else(|_| "f32".into());
    let decode_precisions: Vec<Precision> =
        decode_precisions.split(',').map(|name| Precision::parse_for_decoding(name.trim(), device)).collect::<Result<_, _>>()?;
    let settings = TrainSettings {
        model: std::env::var("RECIPE_MODEL").unwrap_or_else(|_| "base".into()),
        horizon: 4,
        rank: 4,
        steps: *stages.last().expect("a stage"),
        batch: 16,
        seq: std::env::var("RECIPE_SEQ").map_or(Ok(512), |s| s.parse())?,
        save_every: 0,
        seed,
        precision,
        ..TrainSettings::default()
    };
    let out = run_dir.join(format!("base-code-seed{seed}"));
    let mut trained_s = 0.0;
    for (index, &stage) in stages.iter().enumerate() {
        let options = RunOptions {
            // RECIPE_RESUME=1: the seed's run is in RUN_DIR already, stopped at an earlier stage
            resume: index > 0 || std::env::var("RECIPE_RESUME").as_deref() == Ok("1"),
            show_progress: true,
            stop_after_steps: Some(stage).filter(|&s| s < settings.steps),
            device,
            ..Default::default()
        };
        let started = std::time::Instant::now();
        match train::train(data, &out, settings.clone(), &options) {
            Ok(_) | Err(multitoken::error::Error::Interrupted { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        trained_s += started.elapsed().as_secs_f64();
        let ckpt = checkpoint::load_for_resume(&out)?;
        let step = ckpt.resume.as_ref().map_or(0, |resume| resume.step);
        anyhow::ensure!(step == stage, "{} holds step {step}, not the stage {stage} to measure", out.display());
        let tok = tokenizer::from_json(ckpt.tokenizer_json.as_deref().unwrap_or_default(), &out)?;
        let prompts = held_out_prompts(&tok)?;
        let sampled = SamplingConfig { greedy: false, temperature: 1.0, top_k: 0, top_p: 1.0 };
        let decodings = [("greedy", SamplingConfig::greedy()), ("sampled, T = 1", sampled)];
        for ((decoding, sampling), &decode_precision) in decodings.iter().flat_map(|d| decode_precisions.iter().map(move |p| (d, p))) {
            let runs: Vec<BenchDecodeResult> = prompts
                .iter()
                .map(|prompt| {
                    bench_decode(
                        &ckpt.config,
                        &ckpt.params,
                        prompt,
                        NEW_TOKENS,
                        sampling,
                        0,
                        1,
                        device,
                        Draft::Mixture,
                        1,
                        decode_precision,
                    )
                })
                .collect::<Result<_, _>>()?;
            let of = |key: fn(&BenchDecodeResult) -> f64| runs.iter().map(key).collect::<Vec<f64>>();
            let row = json!({
                "seed": seed,
                "step": stage,
                "decoding": decoding,
                "precision": decode_precision,
                "training_s": trained_s,
                "median_speedup": median(of(|r| r.speedup)),
                "median_mean_accepted": median(of(|r| r.mean_accepted)),
                "median_step_cost_ratio": median(of(|r| r.step_cost_ratio)),
                "median_ar_tokens_per_s": median(of(|r| r.ar_tokens_per_s)),
                "median_spec_tokens_per_s": median(of(|r| r.spec_tokens_per_s)),
                "speedup": of(|r| r.speedup),
                "mean_accepted": of(|r| r.mean_accepted),
                "step_cost_ratio": of(|r| r.step_cost_ratio),
            });
            eprintln!("{row}");
            let mut file = std::fs::OpenOptions::new().create(true).append(true).open(rows_path)?;
            std::io::Write::write_all(&mut file, format!("{row}\n").as_bytes())?;
        }
    }
    Ok(())
}

/// The committed held-out code prompts (cut from the part of the corpus that validation holds
/// out, by scripts/held-out-prompts.py), each cut to its last [`PROMPT_TOKENS`] tokens.
fn held_out_prompts(tok: &tokenizers::Tokenizer) -> anyhow::Result<Vec<Vec<u32>>> {
    let text = std::fs::read_to_string(PROMPTS).map_err(|e| anyhow::anyhow!("{PROMPTS}: {e} (run from the repository root)"))?;
    let texts: Vec<String> = text.lines().map(serde_json::from_str).collect::<Result<_, _>>()?;
    texts
        .iter()
        .map(|t| {
            let ids = tokenizer::encode(tok, t)?;
            Ok(ids[ids.len().saturating_sub(PROMPT_TOKENS)..].to_vec())
        })
        .collect()
}

/// The median (the mean of the middle two of an even count).
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// Per stage and decoding: the medians over every prompt of every seed, and each seed's median.
fn summarise(rows_path: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(rows_path).map_err(|e| anyhow::anyhow!("{}: {e}", rows_path.display()))?;
    let mut rows: Vec<Value> = Vec::new();
    for line in text.lines() {
        // a seed measured again (its run stopped before every stage was measured) replaces its
        // earlier rows: the training repeats to the bit
        let row: Value = serde_json::from_str(line)?;
        let same =
            |other: &Value| ["seed", "step", "decoding"].iter().all(|key| other[key] == row[key]) && precision(other) == precision(&row);
        rows.retain(|other| !same(other));
        rows.push(row);
    }
    let mut keys: Vec<(u64, String, &str)> =
        rows.iter().map(|r| (r["step"].as_u64().unwrap_or(0), r["decoding"].as_str().unwrap_or("").into(), precision(r))).collect();
    keys.sort();
    keys.dedup();
    println!("| step | decoding | weights | seeds | median speed-up | median tokens per pass | median spec pass / AR pass | AR tokens/s | each seed's median speed-up |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for (step, decoding, weights) in keys {
        let mine: Vec<&Value> = rows
            .iter()
            .filter(|r| r["step"].as_u64() == Some(step) && r["decoding"] == decoding.as_str() && precision(r) == weights)
            .collect();
        let all =
            |key: &str| mine.iter().flat_map(|r| r[key].as_array().into_iter().flatten().filter_map(Value::as_f64)).collect::<Vec<_>>();
        let seeds: Vec<String> = mine.iter().map(|r| format!("{:.2}×", r["median_speedup"].as_f64().unwrap_or(f64::NAN))).collect();
        let ar = median(mine.iter().filter_map(|r| r["median_ar_tokens_per_s"].as_f64()).collect());
        println!(
            "| {step} | {decoding} | {weights} | {} | **{:.2}×** | {:.2} | {:.2} | {ar:.0} | {} |",
            mine.len(),
            median(all("speedup")),
            median(all("mean_accepted")),
            median(all("step_cost_ratio")),
            seeds.join(", ")
        );
    }
    let svg = rows_path.with_extension("svg");
    let in_f32: Vec<Value> = rows.into_iter().filter(|r| precision(r) == "f32").collect();
    std::fs::write(&svg, plot(&in_f32))?;
    eprintln!("plot: {}", svg.display());
    Ok(())
}

/// The weights a row's decoding streamed: "f32" (also for rows written before the key was) or
/// "bf16".
fn precision(row: &Value) -> &str {
    row["precision"].as_str().unwrap_or("f32")
}

/// (training steps, value) pairs.
type Points = Vec<(f64, f64)>;

/// Per decoding, the medians over prompts and seeds at each stage (one line), and each seed's
/// median (points): `key` the per-prompt list, `seed_key` the row's median.
fn by_step(rows: &[Value], decoding: &str, key: &str, seed_key: &str) -> (Points, Points) {
    let mut steps: Vec<u64> = rows.iter().filter_map(|r| r["step"].as_u64()).collect();
    steps.sort();
    steps.dedup();
    let at = |step: u64| rows.iter().filter(move |r| r["step"].as_u64() == Some(step) && r["decoding"] == decoding);
    let line = steps
        .iter()
        .map(|&step| {
            (step as f64, median(at(step).flat_map(|r| r[key].as_array().into_iter().flatten().filter_map(Value::as_f64)).collect()))
        })
        .filter(|p| p.1.is_finite())
        .collect();
    let points = steps.iter().flat_map(|&step| at(step).filter_map(|r| r[seed_key].as_f64()).map(move |y| (step as f64, y))).collect();
    (line, points)
}

/// Two panels against the training steps: tokens per pass, and the speed-up over autoregressive
/// decoding (1× dotted), greedy and sampled, the medians over prompts and seeds as lines and
/// each seed's median as points.
fn plot(rows: &[Value]) -> String {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (1100, 440)).into_drawing_area();
        let _ = root.fill(&WHITE);
        let (left, right) = root.split_horizontally(550);
        let last_step = rows.iter().filter_map(|r| r["step"].as_u64()).max().unwrap_or(1000) as f64;
        let panels = [
            (&left, "Tokens per speculative pass (n = 4)", "mean_accepted", "median_mean_accepted"),
            (&right, "Speed-up over autoregressive decoding", "speedup", "median_speedup"),
        ];
        for (area, caption, key, seed_key) in panels {
            let series: Vec<(&str, RGBColor, _)> = [("greedy", BLUE), ("sampled, T = 1", RED)]
                .into_iter()
                .map(|(decoding, color)| (decoding, color, by_step(rows, decoding, key, seed_key)))
                .collect();
            let top = series.iter().flat_map(|(_, _, (line, points))| line.iter().chain(points).map(|p| p.1)).fold(2.0f64, f64::max);
            let Ok(mut chart) = ChartBuilder::on(area)
                .caption(caption, ("sans-serif", 18))
                .margin(12)
                .x_label_area_size(36)
                .y_label_area_size(48)
                .build_cartesian_2d(0.0..last_step * 1.05, 0.8..top * 1.15)
            else {
                continue;
            };
            let _ = chart.configure_mesh().x_desc("training steps (B = 16, T = 512)").draw();
            if key == "speedup" {
                let _ = chart.draw_series(DashedLineSeries::new(vec![(0.0, 1.0), (last_step * 1.05, 1.0)], 3, 3, BLACK.stroke_width(1)));
            }
            for (decoding, color, (line, points)) in series {
                let style = color.stroke_width(2);
                if let Ok(drawn) = chart.draw_series(LineSeries::new(line.clone(), style)) {
                    drawn
                        .label(format!("{decoding}: median of prompts and seeds"))
                        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
                }
                let _ = chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, color.mix(0.5).filled())));
            }
            let _ = chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw();
        }
        let _ = root.present();
    }
    svg
}
