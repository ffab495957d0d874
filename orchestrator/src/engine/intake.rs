//! The intake loops: one per queue and one for the step messages this worker's commits claimed,
//! sharing one concurrency bound; each message is handled in its own task. On shutdown they
//! stop taking messages, give handlers the grace period, and release what is still held.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use activities::Activities;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::Engine;
use crate::ports::{Delivery, Journal, Queue, QueueKind, Receipt, Store, chain};

/// Where an intake loop takes messages from.
enum Source {
    /// Received from a queue.
    Queue(QueueKind),
    /// Claimed by this worker's own commits.
    Local(mpsc::UnboundedReceiver<Delivery>),
}

/// The receipts of the messages an intake loop's handlers are holding, so that those still
/// held when the shutdown grace is over are released for other workers.
#[derive(Debug, Clone, Default)]
struct InFlight(Arc<Mutex<HashMap<String, (QueueKind, Receipt)>>>);

impl InFlight {
    /// `delivery` is being handled.
    fn hold(&self, delivery: &Delivery) {
        if let Ok(mut m) = self.0.lock() {
            m.insert(
                delivery.id.clone(),
                (delivery.queue, delivery.receipt.clone()),
            );
        }
    }

    /// The message `id` was handled (committed, quarantined or left for redelivery).
    fn done(&self, id: &str) {
        if let Ok(mut m) = self.0.lock() {
            m.remove(id);
        }
    }

    /// The receipts still held.
    fn held(&self) -> Vec<(QueueKind, Receipt)> {
        self.0
            .lock()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }
}

impl<S: Store, Q: Queue, J: Journal, A: Activities> Engine<S, Q, J, A> {
    /// Receives and handles messages from both queues until `shutdown` is cancelled, then
    /// stops receiving, gives in-flight handlers `shutdown_grace` to finish and releases the
    /// messages of those that did not.
    ///
    /// Step messages that a commit claimed for this worker are handled at once, beside the
    /// received ones and under the same concurrency bound.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let permits = Arc::new(Semaphore::new(self.config.concurrency));
        let (local_tx, local_rx) = mpsc::unbounded_channel();
        let mut loops = JoinSet::new();
        for queue in QueueKind::ALL {
            let engine = self.clone();
            let source = Source::Queue(queue);
            loops.spawn(engine.intake(source, permits.clone(), local_tx.clone(), shutdown.clone()));
        }
        let engine = self.clone();
        let source = Source::Local(local_rx);
        loops.spawn(engine.intake(source, permits, local_tx, shutdown));
        while loops.join_next().await.is_some() {}
    }

    /// Takes messages from one source and handles each in its own task.
    async fn intake(
        self: Arc<Self>,
        mut source: Source,
        permits: Arc<Semaphore>,
        local: mpsc::UnboundedSender<Delivery>,
        shutdown: CancellationToken,
    ) {
        let mut handlers: JoinSet<()> = JoinSet::new();
        let in_flight = InFlight::default();
        let mut backoff = Duration::from_millis(50);
        while !shutdown.is_cancelled() {
            while handlers.try_join_next().is_some() {}
            let next = match &mut source {
                Source::Local(rx) => tokio::select! {
                    () = shutdown.cancelled() => None,
                    next = rx.recv() => next.map(|d| vec![d]),
                },
                Source::Queue(queue) => {
                    self.receive(*queue, &permits, &shutdown, &mut backoff)
                        .await
                }
            };
            let Some(deliveries) = next else { break };
            for delivery in deliveries {
                // Received messages are invisible to others already: wait for capacity
                // rather than give them back.
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    break;
                };
                let engine = self.clone();
                let in_flight = in_flight.clone();
                let local = local.clone();
                in_flight.hold(&delivery);
                handlers.spawn(async move {
                    let id = delivery.id.clone();
                    let claimed = engine.handle(delivery).await;
                    in_flight.done(&id);
                    drop(permit);
                    for next in claimed {
                        if let Err(mpsc::error::SendError(next)) = local.send(next) {
                            // Shutting down: release it for the next worker.
                            engine.release(&next.receipt, next.queue).await;
                        }
                    }
                });
            }
        }
        // Shutdown: nothing new is taken. Claimed messages not started yet are released.
        if let Source::Local(rx) = &mut source {
            rx.close();
            while let Ok(d) = rx.try_recv() {
                self.release(&d.receipt, d.queue).await;
            }
        }
        self.finish(handlers, &in_flight).await;
    }

    /// One receive from `queue`, asking for as many messages as can be handled now; `None`
    /// when shutting down. A failed receive is logged and waited out (`backoff` doubles up to
    /// five seconds), and gives an empty batch.
    async fn receive(
        &self,
        queue: QueueKind,
        permits: &Semaphore,
        shutdown: &CancellationToken,
        backoff: &mut Duration,
    ) -> Option<Vec<Delivery>> {
        // Hold no capacity while the receive waits: claimed messages use it meanwhile.
        if permits.available_permits() == 0 {
            tokio::select! {
                () = shutdown.cancelled() => return None,
                p = permits.acquire() => drop(p),
            }
        }
        let n = permits.available_permits().clamp(1, self.config.batch);
        let receive = self
            .queue
            .receive(queue, n, self.config.visibility, self.config.wait);
        tokio::pin!(receive);
        let received = tokio::select! {
            () = shutdown.cancelled() => {
                // The backend may have handed out messages already (a long poll answers a
                // client that went away): dropping the receive would hide them for the
                // visibility timeout. It ends within `wait`; what it got goes back at once.
                if let Ok(got) = receive.await {
                    for d in &got {
                        self.release(&d.receipt, d.queue).await;
                    }
                    if !got.is_empty() {
                        info!(queue = %queue, released = got.len(), "shutdown; released messages received meanwhile");
                    }
                }
                return None;
            }
            r = &mut receive => r,
        };
        match received {
            Ok(d) => {
                *backoff = Duration::from_millis(50);
                Some(d)
            }
            Err(e) => {
                warn!(queue = %queue, error = %chain(&e), "receive failed; backing off");
                tokio::select! {
                    () = shutdown.cancelled() => return None,
                    () = tokio::time::sleep(*backoff) => {}
                }
                *backoff = (*backoff * 2).min(Duration::from_secs(5));
                Some(Vec::new())
            }
        }
    }

    /// Lets `handlers` finish within the grace period, then releases what they still hold.
    async fn finish(&self, mut handlers: JoinSet<()>, in_flight: &InFlight) {
        let grace = tokio::time::sleep(self.config.shutdown_grace);
        tokio::pin!(grace);
        loop {
            tokio::select! {
                next = handlers.join_next() => if next.is_none() { break },
                () = &mut grace => {
                    handlers.abort_all();
                    let left = in_flight.held();
                    for (queue, receipt) in &left {
                        self.release(receipt, *queue).await;
                    }
                    info!(released = left.len(), "shutdown grace over; released in-flight messages");
                    break;
                }
            }
        }
    }

    /// Makes a held message visible again at once, so another worker takes it now instead of
    /// after the visibility timeout. A failure only delays it.
    async fn release(&self, receipt: &Receipt, queue: QueueKind) {
        if let Err(e) = self.queue.extend(queue, receipt, Duration::ZERO).await {
            debug!(queue = %queue, error = %chain(&e), "message not released; it comes back after its visibility timeout");
        }
    }

    /// Extends the visibility of `delivery` every `heartbeat` while it is handled; abort the
    /// task when done.
    pub(super) fn heartbeat(&self, delivery: &Delivery) -> tokio::task::AbortHandle {
        let queue = self.queue.clone();
        let receipt = delivery.receipt.clone();
        let kind = delivery.queue;
        let id = delivery.id.clone();
        // A heartbeat after the visibility timeout would let the message be redelivered while
        // it is handled; configurations are checked, but an engine built in code may not be.
        let every = self.config.heartbeat.min(self.config.visibility / 2);
        let visibility = self.config.visibility;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if let Err(e) = queue.extend(kind, &receipt, visibility).await {
                    debug!(message.id = %id, error = %chain(&e), "visibility not extended");
                    return;
                }
                tracing::trace!(queue = %kind, message.id = %id, "visibility extended");
            }
        })
        .abort_handle()
    }
}
