//! WebAssembly runtime: runs WASI preview 1 commands under wasmtime with memory, time and output caps.
//! A guest sees its args, its env and `/scratch`; no other files, no network, nothing of the host's.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::io::AsyncWrite;
use tokio_util::sync::CancellationToken;
use wasmtime::{Config, Engine, InstancePre, Linker, Module, ResourceLimiter, Store, Trap, UpdateDeadline};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtxBuilder};

use super::output::SharedCapture;
use super::usage::{self, MemoryIntegral};
use super::{AttemptContext, End, Ending, Measured, Outcome, RuntimeError, deadline, expired, human_bytes, human_duration};

/// How often the engine epoch advances, and so how late a timeout or cancel can land.
const EPOCH_TICK: Duration = Duration::from_millis(10);
/// argv[0] the guest sees; the real file name is a digest and says nothing useful.
const GUEST_ARGV0: &str = "task.wasm";
/// Where the attempt's scratch directory appears inside the guest.
const SCRATCH_GUEST_PATH: &str = "/scratch";
/// Table elements cost host memory the memory cap does not see; 1 Mi elements is 8 MiB.
const MAX_TABLE_ELEMENTS: usize = 1 << 20;

/// Most compiled modules kept; an evicted one is compiled again when next assigned.
pub const MAX_CACHED_MODULES: usize = 32;

/// Compiled modules by digest, with the order they were compiled in.
#[derive(Default)]
struct ModuleCache {
    by_digest: HashMap<String, InstancePre<TaskState>>,
    order: std::collections::VecDeque<String>,
}

impl ModuleCache {
    fn len(&self) -> usize {
        self.by_digest.len()
    }

    fn contains_key(&self, sha256: &str) -> bool {
        self.by_digest.contains_key(sha256)
    }

    fn get(&self, sha256: &str) -> Option<&InstancePre<TaskState>> {
        self.by_digest.get(sha256)
    }

    fn insert(&mut self, sha256: String, pre: InstancePre<TaskState>) {
        if self.by_digest.insert(sha256.clone(), pre).is_none() {
            self.order.push_back(sha256);
        }
        while self.by_digest.len() > MAX_CACHED_MODULES {
            let Some(oldest) = self.order.pop_front() else { break };
            self.by_digest.remove(&oldest);
        }
    }
}

/// Compiles WASI modules once and runs attempts of them, each in a fresh store.
pub struct WasmRuntime {
    engine: Engine,
    linker: Linker<TaskState>,
    /// Keyed by lowercase sha256 of the module bytes, at most [`MAX_CACHED_MODULES`]: past it
    /// the module compiled longest ago is dropped (submitters choose how many distinct modules
    /// a node sees, and each compiled module holds its machine code in memory).
    modules: Mutex<ModuleCache>,
    _ticker: EpochTicker,
}

impl fmt::Debug for WasmRuntime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WasmRuntime").field("cached_modules", &self.cache().len()).finish_non_exhaustive()
    }
}

impl WasmRuntime {
    /// Builds the engine and starts the thread that ticks its epoch for as long as the runtime lives.
    pub fn new() -> Result<Self, RuntimeError> {
        let mut config = Config::new();
        config.epoch_interruption(true);
        // Fuel is metered, not limited (every store gets u64::MAX): it is the deterministic
        // measure of work done that usage receipts carry. Time limits stay with the epoch.
        config.consume_fuel(true);
        let engine = Engine::new(&config).map_err(|e| RuntimeError::Engine(format!("{e:#}")))?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_async(&mut linker, |state: &mut TaskState| &mut state.wasi)
            .map_err(|e| RuntimeError::Engine(format!("cannot link WASI: {e:#}")))?;
        let ticker = EpochTicker::start(engine.clone()).map_err(|e| RuntimeError::Engine(format!("cannot start the epoch thread: {e}")))?;
        Ok(Self { engine, linker, modules: Mutex::new(ModuleCache::default()), _ticker: ticker })
    }

    /// Checks `bytes` against `sha256`, compiles them and caches the result; a module already
    /// cached is not compiled again. Compiling a large module takes a while on the calling
    /// thread, so async callers should use `spawn_blocking`. The engine is built with the `wat`
    /// feature, so the text format is accepted too (tests rely on it).
    pub fn load(&self, sha256: &str, bytes: &[u8]) -> Result<(), RuntimeError> {
        let expected = sha256.to_ascii_lowercase();
        let actual = hex::encode(Sha256::digest(bytes));
        if actual != expected {
            return Err(RuntimeError::DigestMismatch { expected, actual });
        }
        if self.is_cached(&actual) {
            return Ok(());
        }
        let module = Module::new(&self.engine, bytes).map_err(|e| RuntimeError::InvalidModule { sha256: actual.clone(), reason: format!("{e:#}") })?;
        let pre = self.linker.instantiate_pre(&module).map_err(|e| RuntimeError::UnsupportedImports { sha256: actual.clone(), reason: format!("{e:#}") })?;
        self.cache().insert(actual, pre);
        Ok(())
    }

    pub fn is_cached(&self, sha256: &str) -> bool {
        self.cache().contains_key(&sha256.to_ascii_lowercase())
    }

    /// Runs the cached module `sha256` as a WASI command (`_start`) with argv
    /// `["task.wasm", args...]`. Never panics on a bad module: every problem becomes a failed
    /// [`Outcome`] with a message. Dropping the returned future cancels the attempt.
    pub async fn run(&self, sha256: &str, args: &[String], ctx: &AttemptContext, cancel: CancellationToken) -> Outcome {
        let started = Instant::now();
        let Some(pre) = self.cache().get(&sha256.to_ascii_lowercase()).cloned() else {
            return Outcome::not_started(format!("module sha256 {sha256} is not loaded on this node"));
        };
        let stop = cancel.child_token();
        let _stop_if_dropped = stop.clone().drop_guard();
        let (stdout, stderr) = SharedCapture::streams_for(ctx);
        let attempt = GuestAttempt {
            engine: self.engine.clone(),
            pre,
            argv: std::iter::once(GUEST_ARGV0.to_owned()).chain(args.iter().cloned()).collect(),
            env: ctx.task_env(),
            scratch_dir: ctx.scratch_dir.clone(),
            memory_bytes: usize::try_from(ctx.memory_bytes).unwrap_or(usize::MAX),
            watch: Watch { cancel: stop, timeout: deadline(started, ctx.timeout), stdout, stderr },
        };
        let (stdout, stderr) = (attempt.watch.stdout.clone(), attempt.watch.stderr.clone());
        // The guest gets a blocking-pool thread of its own: compute-bound wasm never yields, and
        // would otherwise hold a runtime worker for as long as it runs. It is still driven as a
        // future there, so a guest parked in a host call (a long sleep) is dropped on cancel.
        let handle = tokio::runtime::Handle::current();
        let (end, measured) = match tokio::task::spawn_blocking(move || {
            // The guest runs on this thread only, so the thread's CPU clock is its CPU time.
            let cpu_before = usage::thread_cpu_time();
            let (end, mut measured) = handle.block_on(attempt.run());
            measured.cpu_micros = (usage::thread_cpu_time().saturating_sub(cpu_before)).as_micros().try_into().unwrap_or(u64::MAX);
            (end, measured)
        })
        .await
        {
            Ok(done) => done,
            Err(e) => (End::failed(format!("wasm runtime failed: {e}")), Measured::none()),
        };
        let end = end.check_output(&stdout, &stderr);
        Outcome::from_captures(end, &stdout, &stderr, started.elapsed(), measured)
    }

    fn cache(&self) -> MutexGuard<'_, ModuleCache> {
        self.modules.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Advances the engine epoch every [`EPOCH_TICK`]; stops when dropped.
struct EpochTicker {
    _stop: mpsc::Sender<()>,
}

impl EpochTicker {
    fn start(engine: Engine) -> std::io::Result<Self> {
        let (stop, stopped) = mpsc::channel::<()>();
        std::thread::Builder::new().name("wasm-epoch".into()).spawn(move || {
            while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(EPOCH_TICK) {
                engine.increment_epoch();
            }
        })?;
        Ok(Self { _stop: stop })
    }
}

/// Per-store state: the guest's WASI context and its memory account.
struct TaskState {
    wasi: WasiP1Ctx,
    memory: MemoryCap,
}

/// Caps the total linear memory of a store, across all its memories.
struct MemoryCap {
    limit: usize,
    used: usize,
    /// Set when a grow was refused because of the cap, so a failure that follows (usually an
    /// allocator abort) can be reported as what it is.
    refused: bool,
    /// Linear memory over time, for the usage receipt.
    account: MemoryIntegral,
}

impl ResourceLimiter for MemoryCap {
    fn memory_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        if maximum.is_some_and(|max| desired > max) {
            return Ok(false);
        }
        let used = self.used.saturating_sub(current).saturating_add(desired);
        if used > self.limit {
            self.refused = true;
            return Ok(false);
        }
        // If the host then fails to allocate, `used` overcounts; that only makes the cap stricter.
        self.used = used;
        self.account.set(Instant::now(), used as u64);
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS && maximum.is_none_or(|max| desired <= max))
    }
}

/// Why the host stopped a guest.
#[derive(Debug)]
enum Interrupt {
    Cancelled,
    TimedOut(Duration),
    OutputLimit(String),
}

impl fmt::Display for Interrupt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cancelled => f.write_str("cancelled"),
            Self::TimedOut(after) => write!(f, "timed out after {}", human_duration(*after)),
            Self::OutputLimit(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for Interrupt {}

impl Interrupt {
    fn end(&self) -> End {
        match self {
            Self::Cancelled => End::cancelled(),
            Self::TimedOut(after) => End::timed_out(*after),
            Self::OutputLimit(message) => End::failed(message.clone()),
        }
    }
}

/// What can stop a guest from outside: cancellation, the deadline, output past its cap.
#[derive(Clone)]
struct Watch {
    cancel: CancellationToken,
    /// The timeout and the instant it runs out.
    timeout: Option<(Duration, Instant)>,
    stdout: SharedCapture,
    stderr: SharedCapture,
}

impl Watch {
    /// Polled from the epoch callback while guest code runs.
    fn check(&self) -> Option<Interrupt> {
        if self.cancel.is_cancelled() {
            return Some(Interrupt::Cancelled);
        }
        if let Some((after, deadline)) = self.timeout
            && Instant::now() >= deadline
        {
            return Some(Interrupt::TimedOut(after));
        }
        [&self.stdout, &self.stderr].into_iter().find(|c| c.exceeded()).map(|c| Interrupt::OutputLimit(c.limit_message()))
    }

    /// Resolves when the guest must stop even though it is parked in a host call, where the
    /// epoch callback does not run.
    async fn stopped(&self) -> Interrupt {
        tokio::select! {
            () = self.cancel.cancelled() => Interrupt::Cancelled,
            after = expired(self.timeout) => Interrupt::TimedOut(after),
        }
    }
}

/// Everything one attempt needs, moved onto its blocking thread.
struct GuestAttempt {
    engine: Engine,
    pre: InstancePre<TaskState>,
    argv: Vec<String>,
    env: Vec<(String, String)>,
    scratch_dir: PathBuf,
    memory_bytes: usize,
    watch: Watch,
}

impl GuestAttempt {
    /// Runs the guest; returns how it ended and its fuel and memory use (CPU time is measured
    /// by the caller around this, on the same thread).
    async fn run(self) -> (End, Measured) {
        let mut store = match self.store() {
            Ok(store) => store,
            Err(message) => return (End::failed(message), Measured::none()),
        };
        let end = self.run_in(&mut store).await;
        let fuel = u64::MAX - store.get_fuel().unwrap_or(u64::MAX);
        let state = store.into_data();
        let (memory_peak_bytes, memory_mib_millis) = state.memory.account.finish(Instant::now());
        (end, Measured { wasm_fuel: fuel, memory_peak_bytes, memory_mib_millis, source: "wasm-thread", ..Default::default() })
    }

    async fn run_in(&self, store: &mut Store<TaskState>) -> End {
        let result = tokio::select! {
            result = call_start(store, &self.pre) => result,
            interrupt = self.watch.stopped() => Err(GuestError::Run(wasmtime::Error::new(interrupt))),
        };
        let (error, context) = match result {
            Ok(()) => return End::exited(0),
            Err(GuestError::NoStart) => {
                return End::failed("module has no `_start` function: it is not a WASI command");
            }
            Err(GuestError::Instantiate(e)) => (e, "cannot instantiate module"),
            Err(GuestError::Run(e)) => (e, "wasm error"),
        };
        if let Some(interrupt) = error.downcast_ref::<Interrupt>() {
            return interrupt.end();
        }
        let end = classify(&error, context);
        if end.ending == Ending::Failed && store.data().memory.refused {
            let limit = human_bytes(self.memory_bytes as u64);
            return End { message: format!("memory limit {limit} exceeded ({})", end.message), ..end };
        }
        end
    }

    fn store(&self) -> Result<Store<TaskState>, String> {
        let mut wasi = WasiCtxBuilder::new();
        // The builder starts from nothing: no host env, args or stdio, stdin closed, and
        // every socket address denied. The explicit calls keep that true if defaults move.
        wasi.args(&self.argv)
            .envs(&self.env)
            .stdout(self.watch.stdout.clone())
            .stderr(self.watch.stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
        wasi.preopened_dir(&self.scratch_dir, SCRATCH_GUEST_PATH, FsPerms::ReadWrite)
            .map_err(|e| format!("cannot open scratch dir {}: {e:#}", self.scratch_dir.display()))?;
        let memory = MemoryCap { limit: self.memory_bytes, used: 0, refused: false, account: MemoryIntegral::new(Instant::now()) };
        let state = TaskState { wasi: wasi.build_p1(), memory };
        let mut store = Store::new(&self.engine, state);
        store.set_fuel(u64::MAX).map_err(|e| format!("cannot meter fuel: {e:#}"))?;
        store.limiter(|state| &mut state.memory);
        let watch = self.watch.clone();
        store.epoch_deadline_callback(move |_| match watch.check() {
            Some(interrupt) => Err(interrupt.into()),
            None => Ok(UpdateDeadline::Continue(1)),
        });
        store.set_epoch_deadline(1);
        Ok(store)
    }
}

enum GuestError {
    Instantiate(wasmtime::Error),
    NoStart,
    Run(wasmtime::Error),
}

async fn call_start(store: &mut Store<TaskState>, pre: &InstancePre<TaskState>) -> Result<(), GuestError> {
    let instance = pre.instantiate_async(&mut *store).await.map_err(GuestError::Instantiate)?;
    let start = instance.get_typed_func::<(), ()>(&mut *store, "_start").map_err(|_| GuestError::NoStart)?;
    start.call_async(&mut *store, ()).await.map_err(GuestError::Run)
}

/// Turns an error out of a guest into how the attempt ended; `proc_exit` arrives as one too.
fn classify(error: &wasmtime::Error, context: &str) -> End {
    if let Some(I32Exit(code)) = error.downcast_ref::<I32Exit>() {
        return End::exited(*code);
    }
    if let Some(trap) = error.downcast_ref::<Trap>() {
        return End::failed(format!("wasm trap: {trap}"));
    }
    End::failed(format!("{context}: {error:#}"))
}

/// WASI output streams write straight into the attempt's capture.
impl StdoutStream for SharedCapture {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl IsTerminal for SharedCapture {
    fn is_terminal(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests;
