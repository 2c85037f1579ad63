//! Where audit records go: the [`LogSink`] trait and its implementations.
//!
//! | sink | what it does |
//! |---|---|
//! | [`JsonlSink`] | one JSON object per line in a file (or any writer), written by its own thread behind a bounded queue; drops counted |
//! | `TracingSink` (feature `tracing`) | one `tracing` event per record |
//! | [`MemorySink`] | keeps records in memory, for tests |
//! | [`FanOut`] | sends each record to several sinks |
//! | [`FnSink`] | a closure |
//!
//! **The request path never waits on a sink.** [`LogSink::record`] is synchronous and must
//! return at once: a sink that does I/O puts the record in a bounded queue that it owns, and
//! when the queue is full the record is dropped and counted ([`JsonlSink::dropped`]) — a
//! deliberate choice over back-pressure, so that a stalled disk never stalls traffic, and over
//! an unbounded queue, so that it never exhausts memory either.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use super::record::AuditRecord;

/// Receives one [`AuditRecord`] per request.
///
/// Object safe: the layer holds an `Arc<dyn LogSink>`. Implemented for `Arc<T>` and `Box<T>`
/// of a sink, and for closures through [`FnSink`].
pub trait LogSink: Send + Sync + 'static {
    /// Takes a record. Called on the request path (in a response body's `poll_frame` or
    /// `Drop`): it must not block, nor wait on I/O. A sink that cannot keep up drops records
    /// and counts them rather than slow requests down.
    ///
    /// A panic here is caught by the audit layer: the response is unaffected, and the record
    /// is lost and counted ([`AuditLayer::sink_panics`](crate::AuditLayer::sink_panics)). A
    /// sink that blocks is not caught: it holds up the response it is called from.
    fn record(&self, record: &AuditRecord);

    /// Waits until every record taken so far is written out (for sinks with a queue; a no-op
    /// by default). Not for the request path: call it at shutdown, or in tests.
    fn flush(&self) {}
}

impl<T: LogSink + ?Sized> LogSink for Arc<T> {
    fn record(&self, record: &AuditRecord) {
        (**self).record(record);
    }

    fn flush(&self) {
        (**self).flush();
    }
}

impl<T: LogSink + ?Sized> LogSink for Box<T> {
    fn record(&self, record: &AuditRecord) {
        (**self).record(record);
    }

    fn flush(&self) {
        (**self).flush();
    }
}

// ---------------------------------------------------------------------------------------------
// MemorySink

/// Keeps every record in memory, in order. For tests: it grows without bound.
///
/// Cloning shares the same records; `record` is synchronous, so a record is readable as soon
/// as the request's response body has ended (or been dropped).
#[derive(Clone, Debug, Default)]
pub struct MemorySink {
    records: Arc<Mutex<Vec<AuditRecord>>>,
}

impl MemorySink {
    /// An empty sink.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<AuditRecord>> {
        self.records.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A copy of the records so far.
    pub fn records(&self) -> Vec<AuditRecord> {
        self.lock().clone()
    }

    /// Takes the records so far, leaving the sink empty.
    pub fn take(&self) -> Vec<AuditRecord> {
        std::mem::take(&mut *self.lock())
    }

    /// The last record, if any.
    pub fn last(&self) -> Option<AuditRecord> {
        self.lock().last().cloned()
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether there is no record.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

impl LogSink for MemorySink {
    fn record(&self, record: &AuditRecord) {
        self.lock().push(record.clone());
    }
}

// ---------------------------------------------------------------------------------------------
// FanOut

/// Sends every record to several sinks, in order.
#[derive(Clone, Default)]
pub struct FanOut {
    sinks: Vec<Arc<dyn LogSink>>,
}

impl FanOut {
    /// No sinks yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a sink.
    #[must_use]
    pub fn with(mut self, sink: impl LogSink) -> Self {
        self.sinks.push(Arc::new(sink));
        self
    }

    /// Number of sinks.
    pub fn len(&self) -> usize {
        self.sinks.len()
    }

    /// Whether there is no sink.
    pub fn is_empty(&self) -> bool {
        self.sinks.is_empty()
    }
}

impl FromIterator<Arc<dyn LogSink>> for FanOut {
    fn from_iter<I: IntoIterator<Item = Arc<dyn LogSink>>>(iter: I) -> Self {
        FanOut {
            sinks: iter.into_iter().collect(),
        }
    }
}

impl fmt::Debug for FanOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FanOut")
            .field("sinks", &self.sinks.len())
            .finish()
    }
}

impl LogSink for FanOut {
    /// Sends the record to every sink in turn. A sink that panics does not keep the record
    /// from the others: the first panic is resumed once every sink has had the record (and the
    /// audit layer contains it, see [`AuditLayer::sink_panics`](crate::AuditLayer::sink_panics)).
    fn record(&self, record: &AuditRecord) {
        let mut panic = None;
        for sink in &self.sinks {
            let result =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sink.record(record)));
            if let Err(payload) = result {
                panic.get_or_insert(payload);
            }
        }
        if let Some(payload) = panic {
            std::panic::resume_unwind(payload);
        }
    }

    fn flush(&self) {
        for sink in &self.sinks {
            sink.flush();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// FnSink

/// A closure as a sink. The closure runs on the request path: keep it quick.
///
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use std::sync::Arc;
/// use tower_llm_policy::audit::{AuditLayer, FnSink};
///
/// let spent = Arc::new(AtomicU64::new(0));
/// let counter = spent.clone();
/// let layer = AuditLayer::new(FnSink::new(move |record| {
///     let micro_usd = record.cost_usd.unwrap_or(0.0) * 1e6;
///     counter.fetch_add(micro_usd as u64, Ordering::Relaxed);
/// }));
/// # drop(layer);
/// ```
#[derive(Clone)]
pub struct FnSink<F>(F);

impl<F> FnSink<F>
where
    F: Fn(&AuditRecord) + Send + Sync + 'static,
{
    /// Wraps `f`.
    pub fn new(f: F) -> Self {
        FnSink(f)
    }
}

impl<F> fmt::Debug for FnSink<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FnSink").finish_non_exhaustive()
    }
}

impl<F> LogSink for FnSink<F>
where
    F: Fn(&AuditRecord) + Send + Sync + 'static,
{
    fn record(&self, record: &AuditRecord) {
        (self.0)(record);
    }
}

// ---------------------------------------------------------------------------------------------
// TracingSink

/// Emits each record as one `tracing` event (target `tower_llm_policy::audit`, level `INFO`,
/// `WARN` for upstream errors), with the record's fields as event fields.
#[cfg(feature = "tracing")]
#[cfg_attr(docsrs, doc(cfg(feature = "tracing")))]
#[derive(Clone, Copy, Debug, Default)]
pub struct TracingSink;

#[cfg(feature = "tracing")]
impl TracingSink {
    /// The sink.
    pub fn new() -> Self {
        TracingSink
    }
}

#[cfg(feature = "tracing")]
impl LogSink for TracingSink {
    fn record(&self, r: &AuditRecord) {
        macro_rules! event {
            ($level:expr) => {
                tracing::event!(
                    target: "tower_llm_policy::audit",
                    $level,
                    request_id = %r.request_id,
                    key = r.key.as_deref(),
                    user = r.user.as_deref(),
                    client_ip = r.client_ip.map(tracing::field::display),
                    method = %r.method,
                    path = %r.path,
                    endpoint = %r.endpoint,
                    model = r.model.as_deref(),
                    canonical_model = r.canonical_model.as_deref(),
                    stream = r.stream,
                    status = r.status,
                    outcome = r.outcome.as_str(),
                    blocked_by = r.blocked_by.as_deref(),
                    code = r.code.as_deref(),
                    flags = ?r.flags,
                    prompt_tokens = r.prompt_tokens,
                    completion_tokens = r.completion_tokens,
                    total_tokens = r.total_tokens,
                    cached_tokens = r.cached_tokens,
                    reasoning_tokens = r.reasoning_tokens,
                    cost_usd = r.cost_usd,
                    latency_ms = r.latency_ms,
                    ttft_ms = r.ttft_ms,
                    "llm request"
                )
            };
        }
        if r.outcome == super::record::Outcome::UpstreamError {
            event!(tracing::Level::WARN);
        } else {
            event!(tracing::Level::INFO);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// JsonlSink

/// Default number of records a [`JsonlSink`] queues for its writer thread.
pub const DEFAULT_JSONL_QUEUE: usize = 8192;

/// Default bound on the bytes of the lines a [`JsonlSink`] queues for its writer thread
/// (64 MiB): over it, records are dropped and counted like a full queue.
pub const DEFAULT_JSONL_QUEUE_BYTES: usize = 64 * 1024 * 1024;

/// Default size of a [`JsonlSink`]'s write buffer (64 KiB).
pub const DEFAULT_JSONL_BUFFER: usize = 64 * 1024;

/// How often a busy [`JsonlSink`]'s writer thread writes and flushes what was queued: 10 ms.
pub const DEFAULT_JSONL_FLUSH_INTERVAL: Duration = Duration::from_millis(10);

enum Message {
    Line(Vec<u8>),
    Flush(SyncSender<io::Result<()>>),
    Shutdown,
}

#[derive(Debug, Default)]
struct Counters {
    written: AtomicU64,
    dropped: AtomicU64,
    write_errors: AtomicU64,
    /// Bytes of the lines queued and not yet written.
    queued_bytes: AtomicU64,
    /// Lines queued and not yet written.
    queued: AtomicU64,
}

/// Writes records as JSON Lines: one JSON object per line, appended to a file (or any
/// [`Write`]).
///
/// [`record`](LogSink::record) serializes the record on the caller's thread (a few
/// microseconds) and hands the line to a writer thread that the sink owns, through a bounded
/// queue ([`DEFAULT_JSONL_QUEUE`] lines and [`DEFAULT_JSONL_QUEUE_BYTES`] bytes), without
/// ever waiting: when the queue is full (in lines or in bytes) the record is dropped and
/// counted in [`dropped`](Self::dropped). The writer thread writes
/// in batches: while records arrive it wakes every flush interval (10 ms by default), writes
/// what was queued and flushes, and senders never wake it, so a busy sink costs neither a
/// thread switch nor a write per record; lines are written whole by that one thread, so the file is valid JSON Lines however many requests record at once. (Share one
/// sink rather than opening the same file twice.)
///
/// [`flush`](Self::flush) waits until everything queued is written and flushed;
/// [`shutdown`](Self::shutdown) does that and stops the thread; dropping the last clone of the
/// sink shuts it down. No async runtime is involved.
///
/// ```
/// use tower_llm_policy::audit::{JsonlSink, LogSink};
/// # let dir = tempfile::tempdir().unwrap();
/// # let path = dir.path().join("audit.jsonl");
///
/// let sink = JsonlSink::open(&path).unwrap();
/// // ... give `sink.clone()` to an AuditLayer, serve requests ...
/// sink.flush().unwrap();
/// assert_eq!(sink.dropped(), 0);
/// ```
#[derive(Clone)]
pub struct JsonlSink {
    shared: Arc<JsonlShared>,
}

struct JsonlShared {
    tx: SyncSender<Message>,
    queue_bytes: u64,
    counters: Arc<Counters>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// Options for a [`JsonlSink`]: `JsonlSink::builder().queue_capacity(1024).open(path)`.
#[derive(Clone, Copy, Debug)]
pub struct JsonlSinkBuilder {
    queue: usize,
    queue_bytes: usize,
    buffer: usize,
    flush_interval: Duration,
}

impl Default for JsonlSinkBuilder {
    fn default() -> Self {
        JsonlSinkBuilder {
            queue: DEFAULT_JSONL_QUEUE,
            queue_bytes: DEFAULT_JSONL_QUEUE_BYTES,
            buffer: DEFAULT_JSONL_BUFFER,
            flush_interval: DEFAULT_JSONL_FLUSH_INTERVAL,
        }
    }
}

impl JsonlSinkBuilder {
    /// How many lines may wait for the writer thread before records are dropped (at least 1).
    #[must_use]
    pub fn queue_capacity(mut self, lines: usize) -> Self {
        self.queue = lines.max(1);
        self
    }

    /// How many bytes of lines may wait for the writer thread before records are dropped
    /// (default [`DEFAULT_JSONL_QUEUE_BYTES`]): a record whose line would take the queued
    /// bytes over it is dropped and counted in [`JsonlSink::dropped`], like one that finds the
    /// queue full. A single line longer than the budget is always dropped.
    #[must_use]
    pub fn queue_bytes(mut self, bytes: usize) -> Self {
        self.queue_bytes = bytes;
        self
    }

    /// The writer thread's buffer size in bytes.
    #[must_use]
    pub fn buffer_size(mut self, bytes: usize) -> Self {
        self.buffer = bytes;
        self
    }

    /// How often the writer thread writes and flushes what was queued while records arrive
    /// (default [`DEFAULT_JSONL_FLUSH_INTERVAL`]): records reach the file at most about this
    /// much later. Make sure the queue holds what arrives in one interval at peak.
    #[must_use]
    pub fn flush_interval(mut self, interval: Duration) -> Self {
        self.flush_interval = interval;
        self
    }

    /// Appends to the file at `path`, creating it if needed.
    pub fn open(self, path: impl AsRef<Path>) -> io::Result<JsonlSink> {
        let file: File = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path.as_ref())?;
        self.writer(file)
    }

    /// Writes to `writer`, on a thread the sink owns.
    pub fn writer<W: Write + Send + 'static>(self, writer: W) -> io::Result<JsonlSink> {
        let (tx, rx) = mpsc::sync_channel(self.queue);
        let counters = Arc::new(Counters::default());
        let thread_counters = counters.clone();
        let buffer = self.buffer;
        let interval = self.flush_interval;
        let thread = std::thread::Builder::new()
            .name("llm-audit-jsonl".into())
            .spawn(move || {
                write_lines(
                    rx,
                    BufWriter::with_capacity(buffer, writer),
                    &thread_counters,
                    interval,
                )
            })?;
        Ok(JsonlSink {
            shared: Arc::new(JsonlShared {
                tx,
                queue_bytes: self.queue_bytes as u64,
                counters,
                thread: Mutex::new(Some(thread)),
            }),
        })
    }
}

/// The writer thread. While records arrive it wakes every `interval`, writes everything queued
/// and flushes once per batch; senders never wake it, so a busy sink costs neither a thread
/// switch nor a write per record. After ten quiet intervals it parks on the queue until the
/// next record, which it writes and flushes at once (a lone record after an idle spell is on
/// disk within the interval, not held until the next burst). A `Flush` is answered after
/// everything queued before it is written.
fn write_lines<W: Write>(
    rx: Receiver<Message>,
    mut out: BufWriter<W>,
    counters: &Counters,
    interval: Duration,
) {
    const QUIET_BEFORE_PARKING: u32 = 10;
    let flush = |out: &mut BufWriter<W>| {
        let result = out.flush();
        if result.is_err() {
            counters.write_errors.fetch_add(1, Ordering::Relaxed);
        }
        result
    };
    // Handles one message; false when the thread should stop.
    let handle = |out: &mut BufWriter<W>, message: Message| match message {
        Message::Line(line) => {
            counters
                .queued_bytes
                .fetch_sub(line.len() as u64, Ordering::Relaxed);
            counters.queued.fetch_sub(1, Ordering::Relaxed);
            match out.write_all(&line) {
                Ok(()) => counters.written.fetch_add(1, Ordering::Relaxed),
                Err(_) => counters.write_errors.fetch_add(1, Ordering::Relaxed),
            };
            true
        }
        Message::Flush(done) => {
            let _ = done.send(flush(out));
            true
        }
        Message::Shutdown => false,
    };
    let mut quiet = 0;
    // A message came while parked: it is written and flushed at once, not at the next burst.
    let mut woke = false;
    'run: loop {
        let mut got = std::mem::take(&mut woke);
        loop {
            match rx.try_recv() {
                Ok(message) => {
                    got = true;
                    if !handle(&mut out, message) {
                        break 'run;
                    }
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => break 'run,
            }
        }
        if got {
            quiet = 0;
            let _ = flush(&mut out);
            std::thread::sleep(interval);
        } else if quiet < QUIET_BEFORE_PARKING {
            quiet += 1;
            std::thread::sleep(interval);
        } else {
            // Idle: park until the next message (one wake-up after a quiet spell).
            match rx.recv() {
                Ok(message) => {
                    quiet = 0;
                    if !handle(&mut out, message) {
                        break 'run;
                    }
                    woke = true;
                }
                Err(_) => break 'run,
            }
        }
    }
    let _ = flush(&mut out);
}

impl JsonlSink {
    /// Options for a sink.
    pub fn builder() -> JsonlSinkBuilder {
        JsonlSinkBuilder::default()
    }

    /// Appends to the file at `path` (created if needed), with the default options.
    pub fn open(path: impl AsRef<Path>) -> io::Result<Self> {
        Self::builder().open(path)
    }

    /// Writes to `writer` with the default options.
    pub fn from_writer<W: Write + Send + 'static>(writer: W) -> io::Result<Self> {
        Self::builder().writer(writer)
    }

    /// Records dropped so far because the queue was full, in lines or in bytes (or the sink
    /// was shut down).
    pub fn dropped(&self) -> u64 {
        self.shared.counters.dropped.load(Ordering::Relaxed)
    }

    /// Lines handed to the writer so far.
    pub fn written(&self) -> u64 {
        self.shared.counters.written.load(Ordering::Relaxed)
    }

    /// Failed writes and flushes so far.
    pub fn write_errors(&self) -> u64 {
        self.shared.counters.write_errors.load(Ordering::Relaxed)
    }

    /// Records queued for the writer thread and not yet written (the queue's depth now).
    pub fn queued(&self) -> u64 {
        self.shared.counters.queued.load(Ordering::Relaxed)
    }

    /// Bytes of the records queued for the writer thread and not yet written (at most the
    /// queue's byte budget, [`JsonlSinkBuilder::queue_bytes`]).
    pub fn queued_bytes(&self) -> u64 {
        self.shared.counters.queued_bytes.load(Ordering::Relaxed)
    }

    /// Waits until every record queued before this call is written and the writer flushed.
    /// Blocks: not for the request path. An error when the flush failed or the writer thread
    /// is gone.
    pub fn flush(&self) -> io::Result<()> {
        let (done_tx, done_rx) = mpsc::sync_channel(1);
        let gone = || io::Error::new(io::ErrorKind::BrokenPipe, "the audit writer has stopped");
        self.shared
            .tx
            .send(Message::Flush(done_tx))
            .map_err(|_| gone())?;
        done_rx.recv().map_err(|_| gone())?
    }

    /// Writes out what is queued, then stops the writer thread and waits for it. Records that
    /// come later are dropped (and counted). Called by the last clone's `Drop`.
    pub fn shutdown(&self) {
        self.shared.shutdown();
    }
}

impl JsonlShared {
    fn shutdown(&self) {
        let thread = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(thread) = thread {
            let _ = self.tx.send(Message::Shutdown);
            let _ = thread.join();
        }
    }
}

impl Drop for JsonlShared {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl fmt::Debug for JsonlSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JsonlSink")
            .field("written", &self.written())
            .field("dropped", &self.dropped())
            .field("write_errors", &self.write_errors())
            .finish()
    }
}

impl LogSink for JsonlSink {
    fn record(&self, record: &AuditRecord) {
        let counters = &self.shared.counters;
        let mut line = match serde_json::to_vec(record) {
            Ok(line) => line,
            Err(_) => {
                counters.write_errors.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        line.push(b'\n');
        let len = line.len() as u64;
        // Reserve the line's bytes in the budget first; give them back if it does not fit.
        let before = counters.queued_bytes.fetch_add(len, Ordering::Relaxed);
        if before.saturating_add(len) > self.shared.queue_bytes {
            counters.queued_bytes.fetch_sub(len, Ordering::Relaxed);
            counters.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        // Counted before the send, so that the writer never takes it below zero.
        counters.queued.fetch_add(1, Ordering::Relaxed);
        match self.shared.tx.try_send(Message::Line(line)) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                counters.queued.fetch_sub(1, Ordering::Relaxed);
                counters.queued_bytes.fetch_sub(len, Ordering::Relaxed);
                counters.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn flush(&self) {
        let _ = JsonlSink::flush(self);
    }
}
