//! The NVML sampler on a thread of its own: a driver call that hangs (a GPU that fell off the
//! bus, a wedged driver) must not stop the kernel side's figures, `/healthz`, or the systemd
//! watchdog. The session asks for a poll and waits a bounded time; an answer that comes later
//! is picked up at the next interval.
use std::{
    sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender},
    thread,
    time::{Duration, Instant},
};

use super::{GpuError, GpuOptions, GpuReading, NvmlSampler};

/// The sampler thread.
pub struct Sampler {
    source: &'static str,
    ask: SyncSender<()>,
    answers: Receiver<Vec<GpuReading>>,
    /// When the outstanding poll was asked for.
    asked: Option<Instant>,
}

/// What a poll brought.
pub enum Polled {
    Readings(Vec<GpuReading>),
    /// The driver has not answered yet; it was asked this long ago.
    Waiting(Duration),
}

impl Sampler {
    /// Initialises NVML on the sampler thread, waiting at most `timeout` for it.
    pub fn start(opts: GpuOptions, timeout: Duration) -> Result<Self, GpuError> {
        let (init_tx, init_rx) = mpsc::sync_channel(1);
        let (ask, asks) = mpsc::sync_channel::<()>(1);
        let (answer, answers) = mpsc::sync_channel(1);
        thread::Builder::new()
            .name("nvml".into())
            .spawn(move || {
                let mut sampler = match NvmlSampler::new(&opts) {
                    Ok(s) => {
                        let _ = init_tx.send(Ok(s.source()));
                        s
                    }
                    Err(e) => {
                        let _ = init_tx.send(Err(e));
                        return;
                    }
                };
                // Ends when the session drops its side.
                while asks.recv().is_ok() {
                    if answer.send(sampler.poll()).is_err() {
                        return;
                    }
                }
            })
            .map_err(|e| GpuError::Thread(e.to_string()))?;
        let source = match init_rx.recv_timeout(timeout) {
            Ok(r) => r?,
            Err(RecvTimeoutError::Timeout) => return Err(GpuError::InitTimeout(timeout)),
            Err(RecvTimeoutError::Disconnected) => {
                return Err(GpuError::Thread("the NVML thread ended".into()));
            }
        };
        Ok(Self {
            source,
            ask,
            answers,
            asked: None,
        })
    }

    /// `"nvml"`, or `"simulated"` for the stand-in library.
    pub fn source(&self) -> &'static str {
        self.source
    }

    /// Asks for a poll (unless one is outstanding) and waits at most `wait` for the answer.
    pub fn poll(&mut self, wait: Duration) -> Polled {
        let asked = *self.asked.get_or_insert_with(|| {
            let _ = self.ask.try_send(());
            Instant::now()
        });
        match self.answers.recv_timeout(wait) {
            Ok(r) => {
                self.asked = None;
                Polled::Readings(r)
            }
            Err(_) => Polled::Waiting(asked.elapsed()),
        }
    }
}
