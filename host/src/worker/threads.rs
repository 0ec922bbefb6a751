//! Threads of workers: starting them with their VMs, and waiting on their commands.

use super::Worker;
use crate::vm::VmError;
use crate::{Plugin, Wake};
use bytes::Bytes;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Instant;

/// Why a thread of workers did not start.
pub(crate) enum ThreadStart {
    /// A plugin's first VM did not start.
    Start(VmError),
    /// The thread could not be started, or ended before its VMs did.
    Thread(std::io::Error),
}

/// Starts a thread `name` that makes a [`Worker`] for each of `plugins` (each woken by
/// `wake`) and hands them to `run`. Returns once every VM has started, or with the first that
/// did not (the thread has then ended).
pub(crate) fn spawn_workers(
    name: String,
    plugins: Vec<(Plugin, Vec<Bytes>)>,
    wake: Wake,
    run: impl FnOnce(Vec<Worker>) + Send + 'static,
) -> Result<JoinHandle<()>, ThreadStart> {
    let (started, start_result) = mpsc::channel();
    let thread = std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            let mut workers = Vec::with_capacity(plugins.len());
            for (plugin, configurations) in plugins {
                match Worker::with_root_contexts(&plugin, configurations) {
                    Ok(mut worker) => {
                        worker.set_wake(Some(wake.clone()));
                        workers.push(worker);
                    }
                    Err(error) => {
                        let _ = started.send(Err(error));
                        return;
                    }
                }
            }
            let _ = started.send(Ok(()));
            run(workers);
        })
        .map_err(ThreadStart::Thread)?;
    let failed = match start_result.recv() {
        Ok(Ok(())) => return Ok(thread),
        Ok(Err(error)) => ThreadStart::Start(error),
        Err(_) => ThreadStart::Thread(std::io::Error::other(
            "the thread ended while starting its VMs",
        )),
    };
    let _ = thread.join();
    Err(failed)
}

/// The next message on `commands`, waiting until `deadline` at most (`Ok(None)` then), or
/// for ever without one; `Err` when every sender is gone.
pub(crate) fn recv_until<T>(
    commands: &mpsc::Receiver<T>,
    deadline: Option<Instant>,
) -> Result<Option<T>, mpsc::RecvError> {
    match deadline {
        Some(at) => match commands.recv_timeout(at.saturating_duration_since(Instant::now())) {
            Ok(command) => Ok(Some(command)),
            Err(mpsc::RecvTimeoutError::Timeout) => Ok(None),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(mpsc::RecvError),
        },
        None => commands.recv().map(Some),
    }
}
