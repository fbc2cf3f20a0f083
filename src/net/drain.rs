//! The process's drain: once started, readiness fails and every listener
//! stops accepting; the listeners and the operator endpoints share it.

use tokio::sync::watch;

/// Process-wide drain state: once draining, readiness fails and listeners
/// stop accepting.
#[derive(Clone, Debug)]
pub struct Drain {
    tx: watch::Sender<bool>,
}

impl Default for Drain {
    fn default() -> Self {
        Drain {
            tx: watch::Sender::new(false),
        }
    }
}

impl Drain {
    /// Starts draining; returns `false` if it had already started.
    pub fn start(&self, why: &str) -> bool {
        let first = self
            .tx
            .send_if_modified(|draining| !std::mem::replace(draining, true));
        if first {
            tracing::info!(reason = why, "draining: readiness off, no new connections");
        }
        first
    }

    pub fn is_draining(&self) -> bool {
        *self.tx.borrow()
    }

    /// Completes when draining starts.
    pub async fn started(&self) {
        let mut rx = self.tx.subscribe();
        let _ = rx.wait_for(|draining| *draining).await;
    }
}
