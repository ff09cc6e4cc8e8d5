//! Access logs: workers format a line and hand it over a bounded channel; one flusher thread
//! owns the files, writes in batches and reopens them on request (log rotation).
//!
//! A worker never blocks on the disk. When the channel is full the line is dropped and counted
//! (`server.access_log_dropped`), because stalling the request path on a slow disk would hurt
//! every client, while a lost log line hurts none.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use tracing::{error, info};

/// Lines that may wait for the flusher before new ones are dropped.
const CHANNEL_CAPACITY: usize = 64 * 1024;
/// Under a steady stream of lines the flusher still writes at least every this many lines.
const MAX_BATCH: usize = 4096;

enum Message {
    Line { file: usize, line: String },
    Reopen,
}

/// The flusher thread and the files it writes. Dropping every [`LogSender`] and then calling
/// [`AccessLog::finish`] writes what is queued and stops the thread.
pub struct AccessLog {
    tx: SyncSender<Message>,
    thread: JoinHandle<()>,
}

/// A worker's handle: cheap to clone, never blocks.
#[derive(Clone)]
pub struct LogSender {
    tx: SyncSender<Message>,
}

/// Where a listener's access log lines go.
#[derive(Clone)]
pub struct LogTarget {
    pub sender: LogSender,
    pub file: usize,
}

impl AccessLog {
    /// Opens every file (so that a bad path fails before anything serves) and starts the flusher.
    pub fn start(paths: Vec<PathBuf>) -> io::Result<AccessLog> {
        let files = paths
            .into_iter()
            .map(|path| {
                let file = open(&path).map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("cannot open access log {}: {e}", path.display()),
                    )
                })?;
                Ok(LogFile {
                    path,
                    out: BufWriter::with_capacity(64 * 1024, file),
                })
            })
            .collect::<io::Result<Vec<_>>>()?;
        let (tx, rx) = sync_channel(CHANNEL_CAPACITY);
        let thread = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || flusher(files, rx))?;
        Ok(AccessLog { tx, thread })
    }

    pub fn sender(&self) -> LogSender {
        LogSender {
            tx: self.tx.clone(),
        }
    }

    /// Asks the flusher to reopen every file, after the current lines are written.
    pub fn reopen(&self) {
        // The flusher only stops after `finish`, so the send can only fail during shutdown.
        let _ = self.tx.send(Message::Reopen);
    }

    /// Writes what is queued and waits for the flusher to stop.
    pub fn finish(self) {
        drop(self.tx);
        if self.thread.join().is_err() {
            error!("the access log thread panicked; some lines may be lost");
        }
    }
}

impl LogSender {
    /// Queues `line` (without newline) for file `file`; false when the queue is full and the
    /// line was dropped.
    pub fn send(&self, file: usize, line: String) -> bool {
        self.tx.try_send(Message::Line { file, line }).is_ok()
    }
}

struct LogFile {
    path: PathBuf,
    out: BufWriter<File>,
}

fn open(path: &PathBuf) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

fn flusher(mut files: Vec<LogFile>, rx: Receiver<Message>) {
    while let Ok(first) = rx.recv() {
        // Handle this message and what else is already queued, then flush once.
        let mut next = Some(first);
        let mut handled = 0;
        while let Some(message) = next.take() {
            match message {
                Message::Line { file, line } => {
                    if let Some(f) = files.get_mut(file) {
                        write_line(f, &line);
                    }
                }
                Message::Reopen => reopen_all(&mut files),
            }
            handled += 1;
            if handled < MAX_BATCH {
                next = rx.try_recv().ok();
            }
        }
        flush_all(&mut files);
    }
    flush_all(&mut files);
}

fn reopen_all(files: &mut [LogFile]) {
    flush_all(files);
    let mut reopened = 0;
    for f in files.iter_mut() {
        match open(&f.path) {
            Ok(file) => {
                f.out = BufWriter::with_capacity(64 * 1024, file);
                reopened += 1;
            }
            Err(e) => error!(
                path = %f.path.display(),
                "cannot reopen access log: {e}; lines keep going to the file it had open"
            ),
        }
    }
    info!(reopened, of = files.len(), "access logs reopened");
}

fn write_line(f: &mut LogFile, line: &str) {
    let result = f
        .out
        .write_all(line.as_bytes())
        .and_then(|()| f.out.write_all(b"\n"));
    if let Err(e) = result {
        error!(path = %f.path.display(), "cannot write access log: {e}");
    }
}

fn flush_all(files: &mut [LogFile]) {
    for f in files {
        if let Err(e) = f.out.flush() {
            error!(path = %f.path.display(), "cannot write access log: {e}");
        }
    }
}
