//! Data-parallel training on two GPUs (`train --gpus 2`), driven through the command line as a
//! user runs it: one GPU and two train the same model, a resumed run ends bit for bit, and a
//! rank that dies or hangs ends the run within a minute with the checkpoint whole. Needs two
//! CUDA devices and NCCL; elsewhere each test says it was skipped.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::cli::*;
use serde_json::Value;

/// Whether this machine has two GPUs (else the test says it was skipped); with two GPUs,
/// NCCL must load, or the test fails instead of passing unrun. The tests take the GPUs in turn.
fn two_gpus(test: &str) -> Option<std::sync::MutexGuard<'static, ()>> {
    static GPUS: std::sync::Mutex<()> = std::sync::Mutex::new(());
    if multitoken_cuda::device_count() < 2 {
        println!("{test}: skipped (needs two CUDA devices)");
        return None;
    }
    let nccl = multitoken_cuda::nccl_present() || multitoken_cuda::nccl_soname_path().is_some();
    assert!(nccl, "{test}: two GPUs, but NCCL (libnccl.so or libnccl.so.2) does not load");
    Some(GPUS.lock().unwrap_or_else(|poisoned| poisoned.into_inner()))
}

/// `tiny` n = 2, r = 2 on the GPU, B = 8 global, T = 32.
fn args<'a>(ws: &'a Workspace, out: &'a Path, steps: &'a str, gpus: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["train", "--data", s(&ws.data), "--out", s(out), "--steps", steps, "--gpus", gpus];
    args.extend(["--model", "tiny", "--horizon", "2", "--rank", "2", "--batch", "8", "--seq", "32", "--eval-every", "5"]);
    args.extend(["--device", "cuda", "--json"]);
    args.extend(extra);
    args
}

fn metrics(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn value_at(rows: &[Value], key: &str, step: u64) -> f64 {
    rows.iter().find(|r| r["step"] == step && r.get(key).is_some()).unwrap_or_else(|| panic!("no {key} at step {step}"))[key]
        .as_f64()
        .unwrap()
}

#[test]
fn two_gpus_train_the_model_that_one_gpu_trains() {
    let Some(_gpus) = two_gpus("two_gpus_train_the_model_that_one_gpu_trains") else { return };
    let ws = workspace("two-gpus");
    let (one, two) = (ws.root.join("one"), ws.root.join("two"));
    let summary_one = run_json(&args(&ws, &one, "20", "1", &[])[..]);
    let summary_two = run_json(&args(&ws, &two, "20", "2", &[])[..]);
    let (a, b) = (metrics(&one), metrics(&two));
    let mut worst: f64 = 0.0;
    for step in [10, 20] {
        for key in ["train_loss", "grad_norm"] {
            let (x, y) = (value_at(&a, key, step), value_at(&b, key, step));
            worst = worst.max((x - y).abs() / x.abs());
            println!("step {step} {key}: one GPU {x:.7}, two {y:.7}");
        }
    }
    for key in ["val_joint_loss", "val_ntp_loss"] {
        let (x, y) = (summary_one[key].as_f64().unwrap(), summary_two[key].as_f64().unwrap());
        worst = worst.max((x - y).abs() / x);
        println!("{key}: one GPU {x:.7}, two {y:.7}");
    }
    println!("largest relative difference, one GPU against two: {worst:.2e}");
    // the same rows and the same update, added up in another order (and the load-balancing term
    // per rank's rows): float differences, which 20 steps of AdamW do not blow up
    assert!(worst < 2e-3, "one GPU and two disagree by {worst:.2e}");
    assert!(worst > 0.0 || summary_two["steps"] == 20, "ran");
}

#[test]
fn resume_on_two_gpus_ends_bit_for_bit_like_an_uninterrupted_run() {
    let Some(_gpus) = two_gpus("resume_on_two_gpus_ends_bit_for_bit_like_an_uninterrupted_run") else { return };
    let ws = workspace("two-gpus-resume");
    let (straight, resumed) = (ws.root.join("straight"), ws.root.join("resumed"));
    run_json(&args(&ws, &straight, "12", "2", &["--save-every", "4"])[..]);
    let stopped = output_within(binary().args(args(&ws, &resumed, "12", "2", &["--save-every", "4", "--stop-after-steps", "6"])), 300);
    assert_eq!(stopped.status.code(), Some(130), "{}", String::from_utf8_lossy(&stopped.stderr));
    let stderr = String::from_utf8_lossy(&stopped.stderr);
    assert_eq!(stderr.lines().filter(|l| l.starts_with("error")).count(), 1, "one line for the run, not one per rank: {stderr}");
    assert!(stderr.contains("interrupted at step 6"), "{stderr}");
    run_json(&args(&ws, &resumed, "12", "2", &["--resume"])[..]);
    assert_eq!(tensors(&straight.join("model.safetensors")), tensors(&resumed.join("model.safetensors")), "model");
    assert_eq!(tensors(&straight.join("optimizer.safetensors")), tensors(&resumed.join("optimizer.safetensors")), "optimizer");

    // another number of GPUs continues the same run, correctly but not bit for bit
    let other = ws.root.join("other");
    let stopped = output_within(binary().args(args(&ws, &other, "12", "2", &["--save-every", "4", "--stop-after-steps", "6"])), 300);
    assert_eq!(stopped.status.code(), Some(130));
    let finished = run_json(&args(&ws, &other, "12", "1", &["--resume"])[..]);
    let straight_val = value_at(&metrics(&straight), "val_joint_loss", 12);
    let other_val = finished["val_joint_loss"].as_f64().unwrap();
    println!("resumed on one GPU after six steps on two: val joint loss {other_val:.7}, straight on two {straight_val:.7}");
    assert!((other_val - straight_val).abs() / straight_val < 2e-3);
}

/// The launcher's children, the ranks, by their parent's pid.
fn ranks_of(launcher: &Child) -> Vec<i32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // pid (comm) state ppid ...: the comm may hold spaces, so read after its ')'
        let Some(after) = stat.rsplit_once(')').map(|(_, rest)| rest) else { continue };
        let ppid: u32 = after.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
        if ppid == launcher.id() {
            pids.push(entry.file_name().to_string_lossy().parse().unwrap());
        }
    }
    pids.sort();
    pids
}

/// A run in the background, its stderr read as it comes (so that a full pipe never stalls it).
struct LongRun {
    launcher: Child,
    stderr: std::thread::JoinHandle<String>,
}

/// Starts a long run on two GPUs and waits until its first checkpoint is written.
fn start_long_run(ws: &Workspace, out: &Path, environment: &[(&str, &str)]) -> LongRun {
    let mut command: Command = binary();
    command.args(args(ws, out, "100000", "2", &["--save-every", "5"])).stdout(Stdio::null()).stderr(Stdio::piped());
    command.envs(environment.iter().copied());
    let mut launcher = command.spawn().unwrap();
    let mut pipe = launcher.stderr.take().unwrap();
    let stderr = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut pipe, &mut text);
        text
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    while !out.join("model.safetensors").exists() {
        assert!(Instant::now() < deadline, "no checkpoint within two minutes");
        std::thread::sleep(Duration::from_millis(100));
    }
    LongRun { launcher, stderr }
}

/// Whom a test signals: one rank of a long run (by its index among the ranks), or the launcher.
enum Target {
    Rank(usize),
    Launcher,
}

/// How a signalled run ended: the launcher's status, its error lines, the time from the signal
/// to its end, and the ranks' pids.
struct Ending {
    status: std::process::ExitStatus,
    stderr: String,
    took: Duration,
    ranks: Vec<i32>,
}

/// Starts a long run into `out`, sends `signal` to `target` once the first checkpoint is written,
/// and waits for the launcher to end (90 s at most), saying how long that took.
fn signal_long_run(ws: &Workspace, out: &Path, environment: &[(&str, &str)], target: Target, signal: i32) -> Ending {
    let LongRun { mut launcher, stderr } = start_long_run(ws, out, environment);
    let ranks = ranks_of(&launcher);
    assert_eq!(ranks.len(), 2, "one process per GPU");
    let pid = match target {
        Target::Rank(index) => ranks[index],
        Target::Launcher => launcher.id() as i32,
    };
    let sent = Instant::now();
    // SAFETY: kill(2) on a child of ours (or its child).
    unsafe { libc::kill(pid, signal) };
    let status = loop {
        if let Some(status) = launcher.try_wait().unwrap() {
            break status;
        }
        assert!(sent.elapsed() < Duration::from_secs(90), "the run was still going 90 s later");
        std::thread::sleep(Duration::from_millis(50));
    };
    let took = sent.elapsed();
    let errors: Vec<String> = stderr.join().unwrap().lines().filter(|l| l.starts_with("error")).map(String::from).collect();
    let stderr = errors.join("\n");
    println!("signal {signal}: the run ended {:.1} s later: {}", took.as_secs_f64(), stderr.trim());
    Ending { status, stderr, took, ranks }
}

fn checkpoint_loads(out: &Path) {
    let checkpoint = multitoken::train::checkpoint::load(out).expect("the checkpoint left behind loads");
    assert!(checkpoint.resume.is_some_and(|r| r.step > 0 && r.step.is_multiple_of(5)));
}

#[test]
fn a_rank_that_dies_or_hangs_ends_the_run_within_a_minute() {
    let Some(_gpus) = two_gpus("a_rank_that_dies_or_hangs_ends_the_run_within_a_minute") else { return };
    let ws = workspace("two-gpus-fail");

    // kill -9 of rank 1: the launcher stops rank 0 at once and says what happened
    let out = ws.root.join("killed");
    let killed = signal_long_run(&ws, &out, &[], Target::Rank(1), libc::SIGKILL);
    assert!(!killed.status.success() && killed.took < Duration::from_secs(60));
    assert!(killed.stderr.contains("was killed by signal 9"), "{}", killed.stderr);
    assert_eq!(killed.stderr.lines().count(), 1, "one error line: {}", killed.stderr);
    checkpoint_loads(&out);

    // a rank that stops answering (SIGSTOP): rank 0 gives up on the all-reduce
    let out = ws.root.join("hung");
    let hung = signal_long_run(&ws, &out, &[("MULTITOKEN_COLLECTIVE_TIMEOUT", "15")], Target::Rank(1), libc::SIGSTOP);
    assert!(!hung.status.success() && hung.took < Duration::from_secs(60));
    assert!(hung.stderr.contains("did not answer within 15 s"), "{}", hung.stderr);
    checkpoint_loads(&out);
    assert!(gone(hung.ranks[1]), "the launcher killed the hung rank");
}

fn gone(pid: i32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{pid}")).exists() {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

#[test]
fn sigterm_stops_every_rank_at_one_step_and_rank_0_saves_once() {
    let Some(_gpus) = two_gpus("sigterm_stops_every_rank_at_one_step_and_rank_0_saves_once") else { return };
    let ws = workspace("two-gpus-term");
    let out = ws.root.join("term");
    let Ending { status, stderr, .. } = signal_long_run(&ws, &out, &[], Target::Launcher, libc::SIGTERM);
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one error line, not one per rank: {stderr}");
    let step: u64 = stderr.split("interrupted at step ").nth(1).and_then(|r| r.split_whitespace().next()).unwrap().parse().unwrap();
    let saved = multitoken::train::checkpoint::load(&out).unwrap();
    assert_eq!(saved.resume.unwrap().step, step, "the checkpoint holds the step every rank stopped at");
}
