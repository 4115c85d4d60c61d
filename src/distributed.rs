//! Data-parallel training on several GPUs: the launcher that starts one process per GPU, the
//! rendezvous where those processes meet, and the gradient average that keeps them one model.
//!
//! `train --gpus N` is the launcher. It checks the run as a one-GPU run would, then starts N
//! copies of the same command, one per GPU, each told its place by environment variables
//! ([`Replica`]). Rank 0 listens at the rendezvous address; the other ranks connect to it and
//! receive the NCCL id that rank 0 made; then all join one NCCL communicator ([`DataParallel`]).
//! Every step, each rank computes the gradient of its B/N rows of the global batch, and an
//! all-reduce replaces it with the mean over the ranks: the gradient of the whole batch, so
//! every rank takes the same update and the N copies of the model stay one model.
//!
//! Several hosts follow torchrun's conventions: each host runs the launcher with the same
//! `--nnodes` and `--gpus`, its own `--node-rank`, and the address of node 0 as
//! `--master-addr` (or `MASTER_ADDR`, `MASTER_PORT`, `PET_NNODES`, `PET_NODE_RANK`). docs/distributed.md
//! tells the whole story.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::process::{Child, ExitStatus};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use multitoken_cuda::{Communicator, Gpu, UNIQUE_ID_BYTES};

use crate::device::DeviceKind;
use crate::error::{Error, Result};
use crate::invalid;
use crate::tensor::{Device, Tensor};

/// The variables through which the launcher tells each process its place.
pub const RANK_VARIABLE: &str = "MULTITOKEN_RANK";
/// This process's GPU on its host.
pub const LOCAL_RANK_VARIABLE: &str = "MULTITOKEN_LOCAL_RANK";
/// The number of processes (GPUs) in the run, over all hosts.
pub const WORLD_SIZE_VARIABLE: &str = "MULTITOKEN_WORLD_SIZE";
/// Rank 0's rendezvous address, `host:port`.
pub const RENDEZVOUS_VARIABLE: &str = "MULTITOKEN_RENDEZVOUS";
/// The launcher's process id, which a rank checks is still its parent.
pub const LAUNCHER_VARIABLE: &str = "MULTITOKEN_LAUNCHER_PID";
/// Seconds a rank waits for the others in a collective before it gives up (default 45).
pub const COLLECTIVE_TIMEOUT_VARIABLE: &str = "MULTITOKEN_COLLECTIVE_TIMEOUT";
/// Seconds the ranks wait for each other at the rendezvous (default 300).
pub const RENDEZVOUS_TIMEOUT_VARIABLE: &str = "MULTITOKEN_RENDEZVOUS_TIMEOUT";
/// torchrun's default rendezvous port, used between hosts when none is given.
pub const DEFAULT_MASTER_PORT: u16 = 29500;

/// Where a multi-GPU run's processes are: GPUs per host and hosts, this host's place, and the
/// rendezvous. One GPU on one host is the ordinary run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    /// processes, one per GPU, on this host
    pub gpus: usize,
    /// hosts
    pub nnodes: usize,
    /// this host's place, 0 to nnodes − 1
    pub node_rank: usize,
    /// node 0's address, where rank 0 listens (several hosts; one host meets on the loopback)
    pub master_addr: String,
    /// the rendezvous port; on one host a free one is chosen when none is given
    pub master_port: Option<u16>,
}

impl Default for Topology {
    fn default() -> Self {
        Topology { gpus: 1, nnodes: 1, node_rank: 0, master_addr: "127.0.0.1".into(), master_port: None }
    }
}

impl Topology {
    /// The number of processes over all hosts.
    pub fn world_size(&self) -> usize {
        self.gpus * self.nnodes
    }

    /// Checks the flags against each other, the device and the global batch of `batch` rows,
    /// which every rank shares out (`batch` / world size rows each); None where the batch is
    /// not known yet (a resumed run's is saved with it, and checked when it is read).
    pub fn check(&self, device: DeviceKind, batch: Option<usize>) -> Result<()> {
        if self.gpus == 0 || self.nnodes == 0 {
            return invalid!("--gpus and --nnodes must be at least 1");
        }
        if self.node_rank >= self.nnodes {
            return invalid!("--node-rank {} must be below --nnodes {}", self.node_rank, self.nnodes);
        }
        let world = self.world_size();
        if world == 1 {
            return Ok(());
        }
        if device != DeviceKind::Cuda {
            return invalid!("--gpus {} (or --nnodes {}) needs --device cuda", self.gpus, self.nnodes);
        }
        if let Some(batch) = batch.filter(|b| !b.is_multiple_of(world)) {
            return invalid!(
                "--batch {batch} is the global batch and must divide among the {world} GPUs (each takes batch / {world} rows); pass a multiple of {world}"
            );
        }
        Ok(())
    }

    /// Checks that this host has the GPUs asked for and NCCL (`libnccl.so`, or its soname
    /// `libnccl.so.2`, which [`launch`] makes loadable for the ranks).
    pub fn check_host(&self) -> Result<()> {
        crate::device::check_available(DeviceKind::Cuda)?;
        if multitoken_cuda::nccl_soname_path().is_none() {
            multitoken_cuda::check_nccl()?;
        }
        let present = multitoken_cuda::device_count();
        if present < self.gpus {
            return invalid!("--gpus {} asks for more GPUs than this host has ({present})", self.gpus);
        }
        Ok(())
    }
}

/// One process's place in a multi-GPU run, as the launcher set it in the environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Replica {
    /// 0 to world size − 1; rank 0 writes the checkpoints, the metrics and the progress bar
    pub rank: usize,
    /// the GPU on this host
    pub local_rank: usize,
    /// the number of processes
    pub world_size: usize,
    /// rank 0's rendezvous address, `host:port`
    pub rendezvous: String,
}

impl Replica {
    /// This process's place, or None where it was not started by the launcher.
    pub fn from_env() -> Result<Option<Self>> {
        let Ok(rank) = std::env::var(RANK_VARIABLE) else { return Ok(None) };
        let number = |name: &str, text: Option<String>| -> Result<usize> {
            match text.as_deref().map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(n),
                _ => invalid!("{name} must be set to a number by the launcher (train --gpus N); unset {RANK_VARIABLE} to train on one GPU"),
            }
        };
        let rank = number(RANK_VARIABLE, Some(rank))?;
        let local_rank = number(LOCAL_RANK_VARIABLE, std::env::var(LOCAL_RANK_VARIABLE).ok())?;
        let world_size = number(WORLD_SIZE_VARIABLE, std::env::var(WORLD_SIZE_VARIABLE).ok())?;
        let rendezvous = std::env::var(RENDEZVOUS_VARIABLE).unwrap_or_default();
        if rank >= world_size || rendezvous.is_empty() {
            return invalid!("{RANK_VARIABLE} {rank} must be below {WORLD_SIZE_VARIABLE} {world_size}, and {RENDEZVOUS_VARIABLE} set");
        }
        Ok(Some(Replica { rank, local_rank, world_size, rendezvous }))
    }

    /// Whether this process writes the run's files (rank 0).
    pub fn writes(&self) -> bool {
        self.rank == 0
    }
}

fn seconds_from_env(name: &str, default: u64) -> Duration {
    Duration::from_secs(std::env::var(name).ok().and_then(|s| s.parse().ok()).filter(|&s| s > 0).unwrap_or(default))
}

// The rendezvous: rank 0 listens; every other rank connects, says who it is, and waits; once
// all have come, rank 0 answers each with the NCCL id. A hello is the magic bytes, then rank
// and world size as little-endian u32s; the answer is the id's 128 bytes.
const MAGIC: &[u8; 8] = b"mtoken01";

fn resolve(address: &str) -> Result<SocketAddr> {
    let failed = || {
        Error::Invalid(format!("the rendezvous address '{address}' is not host:port that resolves (check --master-addr and --master-port)"))
    };
    address.to_socket_addrs().map_err(|_| failed())?.next().ok_or_else(failed)
}

/// Meets the other ranks at `address` and returns the id rank 0 brought: rank 0 passes its id
/// and listens there; every other rank connects (retrying until rank 0 listens). Fails once
/// `limit` has passed without every rank arriving.
pub fn rendezvous(
    address: &str,
    rank: usize,
    world_size: usize,
    id: Option<[u8; UNIQUE_ID_BYTES]>,
    limit: Duration,
) -> Result<[u8; UNIQUE_ID_BYTES]> {
    let deadline = Instant::now() + limit;
    let target = resolve(address)?;
    let too_late = |what: &str| {
        Error::Invalid(format!(
            "rank {rank}: {what} at the rendezvous {address} within {} s; start every rank, with the same --nnodes, --gpus, --master-addr and --master-port",
            limit.as_secs()
        ))
    };
    let io = |e: std::io::Error| Error::Invalid(format!("rank {rank}: the rendezvous at {address} failed: {e}"));
    match (rank, id) {
        (0, Some(id)) => {
            let listener = TcpListener::bind(target).map_err(|e| {
                Error::Invalid(format!(
                    "rank 0 cannot listen at {address} ({e}); choose another --master-port, or an address of this host as --master-addr"
                ))
            })?;
            listener.set_nonblocking(true).map_err(io)?;
            let mut joined: Vec<Option<TcpStream>> = (0..world_size).map(|_| None).collect();
            while joined.iter().skip(1).any(Option::is_none) {
                if Instant::now() > deadline {
                    let missing: Vec<String> = (1..world_size).filter(|&r| joined[r].is_none()).map(|r| r.to_string()).collect();
                    return Err(too_late(&format!("ranks {} did not arrive", missing.join(", "))));
                }
                let mut stream = match listener.accept() {
                    Ok((stream, _)) => stream,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                    Err(e) => return Err(io(e)),
                };
                stream.set_nonblocking(false).map_err(io)?;
                stream.set_read_timeout(Some(Duration::from_secs(10))).map_err(io)?;
                let mut hello = [0u8; 16];
                // a stranger on the port (a scanner, a stale rank) is ignored, not fatal
                if stream.read_exact(&mut hello).is_err() || &hello[..8] != MAGIC {
                    continue;
                }
                let their_rank = u32::from_le_bytes(hello[8..12].try_into().expect("4 bytes")) as usize;
                let their_world = u32::from_le_bytes(hello[12..16].try_into().expect("4 bytes")) as usize;
                if their_world != world_size {
                    return invalid!("a rank arrived at the rendezvous with a world of {their_world} GPUs, this run has {world_size}; pass the same --nnodes and --gpus on every host");
                }
                if their_rank == 0 || their_rank >= world_size || joined[their_rank].is_some() {
                    return invalid!(
                        "rank {their_rank} arrived at the rendezvous twice or out of range; give every host its own --node-rank"
                    );
                }
                joined[their_rank] = Some(stream);
            }
            for stream in joined.iter_mut().flatten() {
                stream.write_all(&id).map_err(io)?;
            }
            Ok(id)
        }
        (0, None) => invalid!("rank 0 must bring the id to the rendezvous"),
        _ => {
            let mut stream = loop {
                match TcpStream::connect_timeout(&target, Duration::from_secs(1)) {
                    Ok(stream) => break stream,
                    Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
                    Err(_) => return Err(too_late("rank 0 was not listening")),
                }
            };
            let mut hello = Vec::with_capacity(16);
            hello.extend_from_slice(MAGIC);
            hello.extend_from_slice(&(rank as u32).to_le_bytes());
            hello.extend_from_slice(&(world_size as u32).to_le_bytes());
            stream.write_all(&hello).map_err(io)?;
            let remaining = deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(1));
            stream.set_read_timeout(Some(remaining)).map_err(io)?;
            let mut id = [0u8; UNIQUE_ID_BYTES];
            stream.read_exact(&mut id).map_err(|_| too_late("the other ranks did not all arrive"))?;
            Ok(id)
        }
    }
}

/// A free TCP port on this host, for a one-host run's rendezvous.
fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .map_err(|e| Error::Invalid(format!("no free port for the rendezvous ({e}); pass --master-port")))?;
    Ok(listener.local_addr().map_err(|e| Error::Invalid(format!("no free port for the rendezvous ({e}); pass --master-port")))?.port())
}

/// How a launched run ended, when it did not end well: a signal's death exits 128 + N.
fn failure(rank: usize, status: ExitStatus) -> Error {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => Error::RankFailed { rank, code: code.clamp(1, 255) as u8, signal: None },
        (None, signal) => Error::RankFailed { rank, code: (128 + signal.unwrap_or(0)).clamp(1, 255) as u8, signal },
    }
}

fn send_signal(child: &Child, signal: i32) {
    // SAFETY: kill(2) on a child's pid, which stays ours until it is waited for.
    unsafe {
        libc::kill(child.id() as libc::pid_t, signal);
    }
}

/// The exit status of a rank that stopped because every rank agreed to (Ctrl-C, SIGTERM,
/// `--stop-after-steps`): its peers, rank 0 saving, end by themselves.
const INTERRUPTED_STATUS: i32 = 130;

/// How long the other ranks get to end by themselves after a rank failed with an error of its
/// own (they may be failing alike, and saying so), before the launcher stops them.
const GRACE: Duration = Duration::from_secs(2);

/// Starts this command once per GPU of this host, as ranks `node_rank · gpus + i`, and waits for
/// them. Ctrl-C and SIGTERM are passed on to every rank, which stop at the same step (rank 0
/// saves once). A rank killed by a signal stops the others at once; a rank that fails with an
/// error of its own (which it printed) stops them after a moment's grace; the error names the
/// rank. `NCCL_NVLS_ENABLE=0` is set for every rank, whatever the environment says.
pub fn launch(topology: &Topology) -> Result<()> {
    // on one host the ranks meet on the loopback, whatever MASTER_ADDR the environment holds
    let (address, port) = match (topology.nnodes, topology.master_port) {
        (1, port) => ("127.0.0.1", port.map_or_else(free_port, Ok)?),
        (_, port) => (topology.master_addr.as_str(), port.unwrap_or(DEFAULT_MASTER_PORT)),
    };
    let rendezvous = format!("{address}:{port}");
    resolve(&rendezvous)?;
    let program = std::env::current_exe().map_err(|e| Error::Invalid(format!("cannot find this program to start the ranks ({e})")))?;
    if crate::train::STOP_REQUESTED.load(Ordering::SeqCst) {
        return invalid!("interrupted before the ranks started; nothing was written");
    }
    let nccl_link = nccl_link()?;
    let mut children: Vec<(usize, Child)> = Vec::new();
    for local in 0..topology.gpus {
        let rank = topology.node_rank * topology.gpus + local;
        let mut command = std::process::Command::new(&program);
        command
            .args(std::env::args_os().skip(1))
            .env(RANK_VARIABLE, rank.to_string())
            .env(LOCAL_RANK_VARIABLE, local.to_string())
            .env(WORLD_SIZE_VARIABLE, topology.world_size().to_string())
            .env(RENDEZVOUS_VARIABLE, &rendezvous)
            .env(LAUNCHER_VARIABLE, std::process::id().to_string())
            // NVLink multicast (NVLS) can take a shared host's GPUs out of service: always off
            .env("NCCL_NVLS_ENABLE", "0");
        if rank != 0 {
            command.stdout(std::process::Stdio::null());
        }
        if let Some(link) = &nccl_link {
            let paths = std::env::var_os("LD_LIBRARY_PATH").unwrap_or_default();
            let mut joined = link.0.as_os_str().to_os_string();
            if !paths.is_empty() {
                joined.push(":");
                joined.push(paths);
            }
            command.env("LD_LIBRARY_PATH", joined);
        }
        match command.spawn() {
            Ok(child) => children.push((rank, child)),
            Err(e) => {
                for (_, child) in &mut children {
                    let _ = child.kill();
                    let _ = child.wait();
                }
                return invalid!("could not start rank {rank} ({e})");
            }
        }
    }
    let mut finished: Vec<Option<ExitStatus>> = vec![None; children.len()];
    let mut stop_passed_on = false;
    let mut first_error: Option<(usize, Instant)> = None;
    loop {
        if crate::train::STOP_REQUESTED.load(Ordering::SeqCst) && !stop_passed_on {
            children.iter().for_each(|(_, child)| send_signal(child, libc::SIGTERM));
            stop_passed_on = true;
        }
        for (i, (_, child)) in children.iter_mut().enumerate() {
            if finished[i].is_none() {
                finished[i] = child.try_wait().map_err(|e| Error::Invalid(format!("waiting for the ranks failed ({e})")))?;
                if finished[i].is_some_and(|s| !s.success() && s.code() != Some(INTERRUPTED_STATUS)) && first_error.is_none() {
                    first_error = Some((i, Instant::now()));
                }
            }
        }
        let error_waited = first_error.map(|(i, at)| (i, at.elapsed()));
        if let Some(reported) = outcome(&finished, error_waited) {
            for (j, (_, child)) in children.iter_mut().enumerate() {
                if finished[j].is_none() {
                    let _ = child.kill();
                    let _ = child.wait();
                }
            }
            return match reported {
                Some(i) => Err(failure(children[i].0, finished[i].expect("a reported rank has ended"))),
                None => Ok(()),
            };
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A directory of this launcher's own that holds `libnccl.so`, a link to NCCL's `libnccl.so.2`,
/// where only the latter is installed (the name cudarc loads NCCL by); removed when dropped.
struct NcclLink(std::path::PathBuf);

impl Drop for NcclLink {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn nccl_link() -> Result<Option<NcclLink>> {
    if multitoken_cuda::nccl_present() {
        return Ok(None);
    }
    let Some(target) = multitoken_cuda::nccl_soname_path() else { return Ok(None) };
    let dir = std::env::temp_dir().join(format!("multitoken-nccl-{}", std::process::id()));
    let made = std::fs::create_dir_all(&dir).and_then(|()| std::os::unix::fs::symlink(&target, dir.join("libnccl.so")));
    made.map_err(|e| Error::Invalid(format!("cannot link libnccl.so to {} in {} ({e})", target.display(), dir.display())))?;
    Ok(Some(NcclLink(dir)))
}

/// Whether the launcher stops now, given how each rank has ended so far (`finished`, in order of
/// rank on this host) and which failed first with an error of its own, how long ago: None to
/// wait on; Some(None) when every rank succeeded; Some(Some(i)) to stop the rest and report
/// rank i. A death by a signal is reported at once; an error of a rank's own after [`GRACE`]
/// or once all have ended; an agreed stop (every rank exits [`INTERRUPTED_STATUS`]) by rank 0's,
/// once all have ended.
fn outcome(finished: &[Option<ExitStatus>], first_error: Option<(usize, Duration)>) -> Option<Option<usize>> {
    use std::os::unix::process::ExitStatusExt;
    let killed = finished.iter().position(|s| s.is_some_and(|s| s.signal().is_some()));
    let given_up = killed.or(first_error.filter(|(_, waited)| *waited > GRACE).map(|(i, _)| i));
    if given_up.is_some() {
        return Some(given_up);
    }
    if !finished.iter().all(Option::is_some) {
        return None;
    }
    let failed = |s: &Option<ExitStatus>| s.is_some_and(|s| !s.success());
    Some(first_error.map(|(i, _)| i).or_else(|| failed(&finished[0]).then_some(0)).or_else(|| finished.iter().position(failed)))
}

/// Makes a rank die with its launcher, so that a launcher killed outright leaves no rank behind.
pub fn die_with_launcher() {
    #[cfg(target_os = "linux")]
    // SAFETY: prctl(PR_SET_PDEATHSIG) changes only this process's own setting; getppid reads.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        // the launcher may have died before the line above: then this rank is someone else's
        let launcher = std::env::var(LAUNCHER_VARIABLE).ok().and_then(|p| p.parse::<i32>().ok());
        if launcher.is_some_and(|pid| pid != libc::getppid()) {
            std::process::exit(1);
        }
    }
}

/// This rank's part of a data-parallel run: its communicator on its GPU.
pub struct DataParallel {
    communicator: Communicator,
    gpu: Arc<Gpu>,
    /// how long a collective may take before the others are taken for dead (rank 0's saves
    /// happen between two collectives, so they must fit in it too)
    limit: Duration,
}

impl DataParallel {
    /// Meets the other ranks and joins their NCCL communicator on `device`.
    pub fn join(replica: &Replica, device: &Device) -> Result<Self> {
        let Some(gpu) = device.gpu() else { return invalid!("data-parallel training needs --device cuda") };
        let id = if replica.rank == 0 { Some(multitoken_cuda::unique_id()?) } else { None };
        let limit = seconds_from_env(RENDEZVOUS_TIMEOUT_VARIABLE, 300);
        let id = rendezvous(&replica.rendezvous, replica.rank, replica.world_size, id, limit)?;
        let limit = seconds_from_env(COLLECTIVE_TIMEOUT_VARIABLE, 45);
        // joining NCCL waits for every rank, with no limit of its own: a rank that died since
        // the rendezvous would hold the others forever, so a watchdog ends this process
        let joined = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watched = joined.clone();
        let rank = replica.rank;
        std::thread::spawn(move || {
            let started = Instant::now();
            while !watched.load(Ordering::SeqCst) {
                if started.elapsed() > limit {
                    eprintln!(
                        "error: rank {rank}: the other ranks did not join NCCL within {} s (one of them died or hangs)",
                        limit.as_secs()
                    );
                    std::process::exit(1);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let communicator = Communicator::join(gpu, &id, replica.rank, replica.world_size);
        joined.store(true, Ordering::SeqCst);
        Ok(DataParallel { communicator: communicator?, gpu: gpu.clone(), limit })
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.communicator.rank()
    }

    /// The number of ranks.
    pub fn world_size(&self) -> usize {
        self.communicator.world_size()
    }

    /// Replaces `values` by their sums over the ranks (the validation's running sums).
    pub fn sum(&mut self, values: &mut [f64]) -> Result<()> {
        let sums = self.gpu.upload(values)?;
        self.communicator.all_reduce(&self.gpu, &[], &[sums.view()])?;
        self.communicator.wait(&self.gpu, self.limit)?;
        values.copy_from_slice(&self.gpu.download(sums.view())?);
        Ok(())
    }

    /// The device time of the last [`DataParallel::average`]'s all-reduce, in milliseconds.
    pub fn last_all_reduce_ms(&self) -> Result<f64> {
        Ok(self.communicator.last_all_reduce_ms()?)
    }

    /// Replaces every gradient by its mean over the ranks, in place, and returns the mean of
    /// `objective` over the ranks and whether any rank asked to stop: what every rank then
    /// acts on alike. A rank gives up when the others have not answered within the collective
    /// time limit plus `allowance`: the time rank 0 may take to write files after the previous
    /// step, which the other ranks do not wait for otherwise.
    pub fn average(&mut self, grads: &mut [Option<Tensor<f32>>], objective: f64, stop: bool, allowance: Duration) -> Result<(f64, bool)> {
        let scalars = self.gpu.upload(&[objective, if stop { 1.0 } else { 0.0 }])?;
        let mut views = Vec::new();
        for grad in grads.iter_mut().flatten() {
            let Some(cuda) = grad.cuda_mut()? else { return invalid!("data-parallel gradients must be on the GPU") };
            views.push(cuda.view());
        }
        self.communicator.all_reduce(&self.gpu, &views, &[scalars.view()])?;
        self.communicator.wait(&self.gpu, self.limit + allowance)?;
        let totals = self.gpu.download(scalars.view())?;
        Ok((totals[0] / self.world_size() as f64, totals[1] > 0.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_shares_out_in_equal_contiguous_shards_that_cover_it_once() {
        use crate::data::Batch;
        let rows: Vec<Vec<u32>> = (0..8u32).map(|r| (0..5).map(|t| r * 100 + t).collect()).collect();
        let refs: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
        let whole = Batch::from_rows(&refs, 3, 2); // B 8, T 3, n 2
        for world in [1, 2, 4, 8] {
            let shards: Vec<Batch> = (0..world).map(|rank| whole.shard(rank, world)).collect();
            assert!(shards.iter().all(|s| s.rows() == 8 / world));
            assert_eq!(shards.iter().flat_map(|s| s.inputs.clone()).collect::<Vec<_>>(), whole.inputs);
            assert_eq!(shards.iter().flat_map(|s| s.targets.clone()).collect::<Vec<_>>(), whole.targets);
        }
        assert_eq!(whole.shard(1, 4).inputs, [200, 201, 202, 300, 301, 302], "rank 1 of 4: rows 2 and 3");
    }

    #[test]
    fn the_launcher_reports_the_rank_that_ended_the_run() {
        use std::os::unix::process::ExitStatusExt;
        let exited = |code: i32| Some(ExitStatus::from_raw(code << 8));
        let signalled = |signal: i32| Some(ExitStatus::from_raw(signal));
        let (ok, interrupted, error) = (exited(0), exited(INTERRUPTED_STATUS), exited(1));
        let soon = Some((1, Duration::from_millis(100)));
        let later = Some((1, GRACE + Duration::from_millis(1)));
        assert_eq!(outcome(&[None, None], None), None, "running");
        assert_eq!(outcome(&[ok, ok], None), Some(None), "success");
        assert_eq!(outcome(&[None, signalled(9)], None), Some(Some(1)), "a kill -9 stops the rest at once");
        assert_eq!(outcome(&[None, error], soon), None, "an error of its own: a grace for the others");
        assert_eq!(outcome(&[None, error], later), Some(Some(1)), "then they are stopped");
        assert_eq!(outcome(&[exited(1), error], soon), Some(Some(1)), "all ended: the first error");
        // an agreed stop: rank 1 ends first, and rank 0, still saving, is waited for
        assert_eq!(outcome(&[None, interrupted], None), None);
        assert_eq!(outcome(&[interrupted, interrupted], None), Some(Some(0)), "rank 0 reports the stop");
        assert_eq!(outcome(&[signalled(15), interrupted], None), Some(Some(0)), "a signal's death is named");
        let reported = |finished: &[Option<ExitStatus>], i: usize| failure(i, finished[i].unwrap());
        assert!(matches!(reported(&[signalled(9)], 0), Error::RankFailed { rank: 0, code: 137, signal: Some(9) }));
        assert!(matches!(reported(&[interrupted], 0), Error::RankFailed { code: 130, signal: None, .. }));
    }

    #[test]
    fn the_topology_is_checked_before_anything_starts() {
        let two = Topology { gpus: 2, ..Topology::default() };
        assert!(two.check(DeviceKind::Cuda, Some(32)).is_ok());
        assert!(two.check(DeviceKind::Cuda, None).is_ok(), "a resumed run's batch is checked when it is read");
        let message = |t: &Topology, device, batch| t.check(device, Some(batch)).unwrap_err().to_string();
        assert!(message(&two, DeviceKind::Cpu, 32).contains("needs --device cuda"));
        assert!(message(&two, DeviceKind::Cuda, 15).contains("must divide among the 2 GPUs"));
        assert!(message(&Topology { gpus: 0, ..Topology::default() }, DeviceKind::Cuda, 8).contains("at least 1"));
        let nodes = Topology { gpus: 2, nnodes: 2, node_rank: 2, ..Topology::default() };
        assert!(message(&nodes, DeviceKind::Cuda, 8).contains("--node-rank 2 must be below --nnodes 2"));
        assert_eq!(Topology { gpus: 4, nnodes: 3, ..Topology::default() }.world_size(), 12);
        assert!(Topology::default().check(DeviceKind::Cpu, Some(7)).is_ok(), "one GPU: any batch, any device");
    }

    #[test]
    fn ranks_meet_at_the_rendezvous_and_all_receive_rank_0s_id() {
        let address = format!("127.0.0.1:{}", free_port().unwrap());
        let id: [u8; UNIQUE_ID_BYTES] = std::array::from_fn(|i| (i * 7 + 3) as u8);
        let world = 4;
        let limit = Duration::from_secs(20);
        let others: Vec<_> = (1..world)
            .map(|rank| {
                let address = address.clone();
                // the others may come before rank 0 listens: they retry
                std::thread::spawn(move || rendezvous(&address, rank, world, None, limit))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(rendezvous(&address, 0, world, Some(id), limit).unwrap(), id);
        for other in others {
            assert_eq!(other.join().unwrap().unwrap(), id);
        }
    }

    #[test]
    fn the_rendezvous_gives_up_with_a_one_line_error() {
        let address = format!("127.0.0.1:{}", free_port().unwrap());
        let message = rendezvous(&address, 1, 2, None, Duration::from_secs(1)).unwrap_err().to_string();
        assert!(message.contains("rank 1: rank 0 was not listening") && !message.contains('\n'), "{message}");
        let id = [1u8; UNIQUE_ID_BYTES];
        let message = rendezvous(&address, 0, 3, Some(id), Duration::from_secs(1)).unwrap_err().to_string();
        assert!(message.contains("ranks 1, 2 did not arrive"), "{message}");
        // a rank of another run's size is refused by name
        let (a, limit) = (address.clone(), Duration::from_secs(10));
        let stranger = std::thread::spawn(move || rendezvous(&a, 1, 3, None, limit));
        let message = rendezvous(&address, 0, 2, Some(id), limit).unwrap_err().to_string();
        assert!(message.contains("world of 3 GPUs, this run has 2"), "{message}");
        assert!(stranger.join().unwrap().is_err());
    }
}
