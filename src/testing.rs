//! Seams for the unit tests of several capabilities.

/// Holds a call at a point a test chooses until the test lets it go.
pub(crate) struct Gate {
    armed: std::sync::atomic::AtomicBool,
    pub(crate) entered: tokio::sync::Notify,
    open: tokio::sync::Semaphore,
}

impl Default for Gate {
    fn default() -> Self {
        Gate {
            armed: Default::default(),
            entered: Default::default(),
            open: tokio::sync::Semaphore::new(0),
        }
    }
}

impl Gate {
    /// Holds the next calls that pass; an opened gate can be armed again.
    pub(crate) fn arm(&self) {
        self.open.forget_permits(usize::MAX);
        self.armed.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub(crate) fn open(&self) {
        self.armed.store(false, std::sync::atomic::Ordering::SeqCst);
        self.open.add_permits(1 << 20);
    }

    /// Waits here while the gate is armed and not yet open.
    pub(crate) async fn pass(&self) {
        if self.armed.load(std::sync::atomic::Ordering::SeqCst) {
            self.entered.notify_one();
            drop(self.open.acquire().await);
        }
    }
}

/// Polls `call` until it waits at `gate`, then drops it, as tonic drops a handler's
/// future when its call is cancelled or times out.
pub(crate) async fn drop_at_the_gate<T: std::fmt::Debug>(
    gate: &Gate,
    call: impl std::future::Future<Output = T>,
) {
    tokio::pin!(call);
    tokio::select! {
        done = &mut call => panic!("the gate should hold the write: {done:?}"),
        _ = gate.entered.notified() => {}
    }
}
