//! The paper's rank table on real corpora: for a prose and a code corpus, with the same token
//! budget for every run, train a next-token model, then n = 4 heads of rank r = 1, 2, 4, 8 from
//! scratch, and head-only fine-tunes of the next-token backbone with the same ranks. For each:
//! validation joint and next-token loss, mean accepted tokens per pass (greedy, and sampling at
//! temperature 1), acceptance rate per draft position, and speed against autoregressive decoding.
//!
//! Writes `docs/rank-table.svg`, `runs/rank-table/results.jsonl`, and the table into
//! docs/results.md between the `rank-table` markers. Run through `scripts/rank-table.sh`, which
//! fetches the corpora and prepares the data first.
//!
//! cargo run --release --example rank_table -- RUN_DIR STEPS MODEL SEQ BATCH CORPUS=DATA_DIR...
//! (with RANK_TABLE_RENDER_ONLY=1 it only redraws from RUN_DIR/results.jsonl)

use std::path::{Path, PathBuf};

use multitoken::bench::bench_decode;
use multitoken::data::tokenizer;
use multitoken::decode::{Draft, SamplingConfig};
use multitoken::device::DeviceKind;
use multitoken::train::{self, checkpoint, RunOptions, TrainSettings};
use plotters::prelude::*;
use serde_json::{json, Value};

const RANKS: [usize; 4] = [1, 2, 4, 8];
const HORIZON: usize = 4;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    anyhow::ensure!(args.len() >= 6, "usage: rank_table RUN_DIR STEPS MODEL SEQ BATCH CORPUS=DATA_DIR...");
    let run_dir = PathBuf::from(&args[0]);
    let (steps, model, seq, batch): (u64, String, usize, usize) = (args[1].parse()?, args[2].clone(), args[3].parse()?, args[4].parse()?);
    let corpora: Vec<(String, PathBuf)> = args[5..]
        .iter()
        .map(|a| {
            a.split_once('=')
                .map(|(n, d)| (n.to_string(), PathBuf::from(d)))
                .ok_or_else(|| anyhow::anyhow!("expected NAME=DATA_DIR, got {a}"))
        })
        .collect::<anyhow::Result<_>>()?;
    std::fs::create_dir_all(&run_dir)?;
    let mut rows = Vec::new();
    if std::env::var("RANK_TABLE_RENDER_ONLY").is_ok_and(|v| v == "1") {
        // redraw the table and plot from an earlier run's results
        let text = std::fs::read_to_string(run_dir.join("results.jsonl"))?;
        rows = text.lines().map(serde_json::from_str).collect::<Result<_, _>>()?;
    }
    let render_only = !rows.is_empty();
    for (corpus, data) in corpora.iter().filter(|_| !render_only) {
        let base = TrainSettings {
            model: model.clone(),
            steps,
            batch,
            seq,
            eval_every: steps,
            save_every: 0,
            lr: 3e-3,
            ..TrainSettings::default()
        };
        let ntp_dir = run_dir.join(format!("{corpus}-ntp"));
        let mut variants = vec![("next-token".to_string(), 1, ntp_dir.clone(), TrainSettings { horizon: 1, rank: 1, ..base.clone() })];
        for r in RANKS {
            variants.push((
                "scratch".into(),
                r,
                run_dir.join(format!("{corpus}-n4-r{r}")),
                TrainSettings { horizon: HORIZON, rank: r, ..base.clone() },
            ));
        }
        for r in RANKS {
            let settings =
                TrainSettings { horizon: HORIZON, rank: r, init_from: Some(ntp_dir.clone()), freeze_backbone: true, ..base.clone() };
            variants.push(("head-only".into(), r, run_dir.join(format!("{corpus}-ft-r{r}")), settings));
        }
        for (kind, rank, out, settings) in variants {
            eprintln!("== {corpus}: {kind} n={} r={rank}", settings.horizon);
            let _ = std::fs::remove_dir_all(&out);
            let summary = train::train(data, &out, settings.clone(), &RunOptions { show_progress: true, ..Default::default() })?;
            let row = decode_row(corpus, &kind, &out, data, &summary)?;
            eprintln!("{row}");
            rows.push(row);
        }
    }
    let results: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(run_dir.join("results.jsonl"), results)?;
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
    std::fs::write(docs.join("rank-table.svg"), plot(&rows))?;
    let table = markdown(&rows, steps, &model, seq, batch);
    update_results(&docs.join("results.md"), &table)?;
    println!("{table}");
    Ok(())
}

/// Decoding measurements of one trained checkpoint, on a prompt from the validation split.
fn decode_row(corpus: &str, kind: &str, dir: &Path, data: &Path, summary: &train::TrainSummary) -> anyhow::Result<Value> {
    let ckpt = checkpoint::load(dir)?;
    let tok = tokenizer::from_json(ckpt.tokenizer_json.as_deref().unwrap_or_default(), dir)?;
    let val = multitoken::data::tokens::read(&data.join("val.bin"))?.tokens;
    let prompt = &val[..64.min(val.len())];
    let _ = tokenizer::decode(&tok, prompt)?;
    let greedy = bench_decode(&ckpt.config, &ckpt.params, prompt, 128, &SamplingConfig::greedy(), 0, 1, DeviceKind::Cpu, Draft::Mixture)?;
    let sampled = bench_decode(
        &ckpt.config,
        &ckpt.params,
        prompt,
        128,
        &SamplingConfig { greedy: false, temperature: 1.0, top_k: 0, top_p: 1.0 },
        0,
        1,
        DeviceKind::Cpu,
        Draft::Mixture,
    )?;
    Ok(json!({
        "corpus": corpus,
        "kind": kind,
        "horizon": ckpt.config.horizon,
        "rank": ckpt.config.rank,
        "val_joint_loss": summary.val_joint_loss,
        "val_ntp_loss": summary.val_ntp_loss,
        "greedy_mean_accepted": greedy.mean_accepted,
        "greedy_acceptance": greedy.acceptance_rates,
        "greedy_speedup": greedy.speedup,
        "greedy_identical": greedy.identical_output,
        "sampled_mean_accepted": sampled.mean_accepted,
        "sampled_acceptance": sampled.acceptance_rates,
        "sampled_speedup": sampled.speedup,
        "ar_tokens_per_s": greedy.ar_tokens_per_s,
        "spec_tokens_per_s": greedy.spec_tokens_per_s,
        "step_cost_ratio": greedy.step_cost_ratio,
    }))
}

fn fmt_list(v: &Value) -> String {
    v.as_array().map(|a| a.iter().map(|x| format!("{:.2}", x.as_f64().unwrap_or(0.0))).collect::<Vec<_>>().join(" ")).unwrap_or_default()
}

fn markdown(rows: &[Value], steps: u64, model: &str, seq: usize, batch: usize) -> String {
    let mut out = format!(
        "Model `{model}`, {steps} steps of B = {batch}, T = {seq} ({} tokens per run), n = {HORIZON}; decoding 128 new tokens after the first 64 validation tokens.\n\n",
        steps as usize * batch * seq
    );
    out += "| corpus | training | r | val joint | val next-token | greedy accepted/pass | acceptance by draft position | sampled (T=1) accepted/pass | greedy speed-up | spec pass / AR pass |\n";
    out += "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n";
    for r in rows {
        out += &format!(
            "| {} | {} | {} | {:.3} | {:.3} | {:.2} | {} | {:.2} | {:.2}× | {:.2} |\n",
            r["corpus"].as_str().unwrap_or(""),
            r["kind"].as_str().unwrap_or(""),
            r["rank"],
            r["val_joint_loss"].as_f64().unwrap_or(f64::NAN),
            r["val_ntp_loss"].as_f64().unwrap_or(f64::NAN),
            r["greedy_mean_accepted"].as_f64().unwrap_or(f64::NAN),
            fmt_list(&r["greedy_acceptance"]),
            r["sampled_mean_accepted"].as_f64().unwrap_or(f64::NAN),
            r["greedy_speedup"].as_f64().unwrap_or(f64::NAN),
            r["step_cost_ratio"].as_f64().unwrap_or(f64::NAN),
        );
    }
    out
}

/// Mean accepted tokens per pass against rank, one line per (corpus, training, decoding).
fn plot(rows: &[Value]) -> String {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (800, 480)).into_drawing_area();
        let _ = root.fill(&WHITE);
        let top = rows
            .iter()
            .flat_map(|r| [r["greedy_mean_accepted"].as_f64(), r["sampled_mean_accepted"].as_f64()])
            .flatten()
            .fold(2.0f64, f64::max);
        let mut chart = ChartBuilder::on(&root)
            .caption("Mean accepted tokens per forward pass (n = 4)", ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(48)
            .build_cartesian_2d(0.8f64..8.5f64, 0.9f64..top + 0.2)
            .expect("chart");
        let _ = chart.configure_mesh().x_desc("rank r").y_desc("tokens per pass").draw();
        let colors = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK, RGBColor(255, 140, 0), RGBColor(128, 0, 128)];
        let mut index = 0;
        let corpora: Vec<String> = rows.iter().filter_map(|r| r["corpus"].as_str().map(String::from)).fold(Vec::new(), |mut v, c| {
            if !v.contains(&c) {
                v.push(c);
            }
            v
        });
        for corpus in &corpora {
            for kind in ["scratch", "head-only"] {
                for (mode, key) in [("greedy", "greedy_mean_accepted"), ("sampled", "sampled_mean_accepted")] {
                    let points: Vec<(f64, f64)> = rows
                        .iter()
                        .filter(|r| r["corpus"] == corpus.as_str() && r["kind"] == kind)
                        .filter_map(|r| Some((r["rank"].as_f64()?, r[key].as_f64()?)))
                        .collect();
                    let color = colors[index % colors.len()];
                    index += 1;
                    if let Ok(series) = chart.draw_series(LineSeries::new(points.clone(), color.stroke_width(2))) {
                        series
                            .label(format!("{corpus} {kind} {mode}"))
                            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
                    }
                    let _ = chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())));
                }
            }
        }
        let _ = chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw();
        let _ = root.present();
    }
    svg
}

/// Replaces the text between the rank-table markers of docs/results.md.
fn update_results(path: &Path, table: &str) -> anyhow::Result<()> {
    let (start, end) = ("<!-- rank-table:start -->", "<!-- rank-table:end -->");
    let text = std::fs::read_to_string(path)?;
    let (Some(a), Some(b)) = (text.find(start), text.find(end)) else {
        anyhow::bail!("{} lacks the rank-table markers", path.display());
    };
    let updated = format!("{}{start}\n{table}\n![mean accepted against rank](rank-table.svg)\n\n{}", &text[..a], &text[b..]);
    std::fs::write(path, updated)?;
    Ok(())
}
