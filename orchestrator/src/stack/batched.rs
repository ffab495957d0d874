//! [`Batched`]: the `Journal` for backends that cannot commit atomically (SQS and DynamoDB),
//! grouping the commits of concurrent handlers to save requests.
//!
//! Each commit keeps the order of [`super::Sequential`]: its record write, then its messages,
//! then its acknowledgement, so that a crash anywhere leaves the handled message
//! unacknowledged and its redelivery sends the commands again. What changes is that the commits
//! that arrive while a group is being committed form the next group: their writes run side by
//! side (one conditional write per record, which DynamoDB cannot batch), and the messages and
//! acknowledgements of all of them go out in as few batch requests as the queue allows (ten per
//! `SendMessageBatch` and `DeleteMessageBatch` on SQS). Under load a transition then costs
//! about one request plus a fraction; alone, a commit waits for nobody.
//!
//! A failure stays with the commits it concerns: a failed write fails its own commit only, and
//! if a grouped send or acknowledgement fails, each commit of the group is tried again on its
//! own before any is reported failed.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tracing::debug;

use crate::ports::{
    Commit, Delivery, Error, Journal, Outgoing, Queue, QueueKind, Receipt, RecordWrite, Store,
    WriteError,
};

type Results = Vec<Result<Vec<Delivery>, WriteError>>;

/// A commit's messages and acknowledgement, once its write is under way.
type Rest = (Vec<Outgoing>, Option<(QueueKind, Receipt)>);

struct Pending {
    commits: Vec<Commit>,
    reply: oneshot::Sender<Results>,
}

/// A `Journal` over any `Store` and `Queue` that commits concurrent commits in groups.
#[derive(Debug)]
pub struct Batched {
    tx: mpsc::UnboundedSender<Pending>,
    waiting: Arc<AtomicUsize>,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("commits", &self.commits.len())
            .finish()
    }
}

/// The three operations a group needs, so that the committer can be tested without a backend.
trait Sink: Send + Sync + 'static {
    fn write(&self, write: RecordWrite) -> impl Future<Output = Result<(), WriteError>> + Send;
    fn send(&self, messages: Vec<Outgoing>) -> impl Future<Output = Result<(), Error>> + Send;
    fn ack(
        &self,
        queue: QueueKind,
        receipts: Vec<Receipt>,
    ) -> impl Future<Output = Result<Vec<Receipt>, Error>> + Send;
}

struct Ports<S, Q> {
    store: Arc<S>,
    queue: Arc<Q>,
}

impl<S: Store, Q: Queue> Sink for Ports<S, Q> {
    fn write(&self, write: RecordWrite) -> impl Future<Output = Result<(), WriteError>> + Send {
        self.store.write(write)
    }

    fn send(&self, messages: Vec<Outgoing>) -> impl Future<Output = Result<(), Error>> + Send {
        self.queue.send(messages)
    }

    fn ack(
        &self,
        queue: QueueKind,
        receipts: Vec<Receipt>,
    ) -> impl Future<Output = Result<Vec<Receipt>, Error>> + Send {
        self.queue.ack(queue, receipts)
    }
}

impl Batched {
    /// A journal committing to `store` and `queue`, at most `max_group` commits at a time.
    /// Spawns its committer on the current tokio runtime; it ends when the journal is dropped.
    pub fn new<S: Store, Q: Queue>(store: Arc<S>, queue: Arc<Q>, max_group: usize) -> Self {
        Self::with_sink(Ports { store, queue }, max_group)
    }

    fn with_sink<K: Sink>(sink: K, max_group: usize) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let waiting = Arc::new(AtomicUsize::new(0));
        tokio::spawn(committer(
            Arc::new(sink),
            rx,
            max_group.max(1),
            waiting.clone(),
        ));
        Self { tx, waiting }
    }

    /// Commits waiting for the committer: a backlog that grows means the backend is slower
    /// than the handlers.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }
}

impl Journal for Batched {
    async fn commit(&self, commits: Vec<Commit>) -> Results {
        let n = commits.len();
        let (reply, answer) = oneshot::channel();
        let gone = || {
            (0..n)
                .map(|_| Err(unavailable("the committer stopped")))
                .collect()
        };
        self.waiting.fetch_add(n, Ordering::Relaxed);
        if self.tx.send(Pending { commits, reply }).is_err() {
            self.waiting.fetch_sub(n, Ordering::Relaxed);
            return gone();
        }
        answer.await.unwrap_or_else(|_| gone())
    }
}

async fn committer<K: Sink>(
    sink: Arc<K>,
    mut rx: mpsc::UnboundedReceiver<Pending>,
    max_group: usize,
    waiting: Arc<AtomicUsize>,
) {
    while let Some(first) = rx.recv().await {
        let mut size = first.commits.len();
        let mut group = vec![first];
        while size < max_group {
            match rx.try_recv() {
                Ok(p) => {
                    size += p.commits.len();
                    group.push(p);
                }
                Err(_) => break,
            }
        }
        waiting.fetch_sub(size, Ordering::Relaxed);
        let mut commits = Vec::with_capacity(size);
        let mut replies = Vec::with_capacity(group.len());
        for p in group {
            replies.push((p.commits.len(), p.reply));
            commits.extend(p.commits);
        }
        debug!(commits = commits.len(), "committing a group");
        let mut results = commit_group(&sink, commits).await.into_iter();
        for (n, reply) in replies {
            // A caller that went away (its handler was cancelled) needs no answer.
            let _ = reply.send(
                results
                    .by_ref()
                    .take(n)
                    .map(|r| r.map(|()| Vec::new()))
                    .collect(),
            );
        }
    }
}

/// Commits `commits` in the order write, send, acknowledge; one result per commit.
async fn commit_group<K: Sink>(sink: &Arc<K>, commits: Vec<Commit>) -> Vec<Result<(), WriteError>> {
    let mut results: Vec<Result<(), WriteError>> = (0..commits.len()).map(|_| Ok(())).collect();
    let mut rest: Vec<Rest> = Vec::with_capacity(commits.len());

    // Writes side by side: each is one conditional write of its own record.
    let mut writes = JoinSet::new();
    for (i, commit) in commits.into_iter().enumerate() {
        if let Some(write) = commit.write {
            let sink = sink.clone();
            writes.spawn(async move { (i, sink.write(write).await) });
        }
        rest.push((commit.send, commit.ack));
    }
    while let Some(done) = writes.join_next().await {
        match done {
            Ok((i, r)) => results[i] = r,
            Err(e) => {
                // The write task panicked: whether it took effect is unknown, which
                // redelivery resolves like any lost answer. Which commit it was is lost with
                // the task, so the whole group is reported failed.
                debug!(error = %e, "a write task did not finish");
                return (0..results.len())
                    .map(|_| Err(unavailable("a write task did not finish")))
                    .collect();
            }
        }
    }

    // The messages of every commit whose write succeeded, in one send.
    let sending: Vec<usize> = (0..rest.len())
        .filter(|&i| results[i].is_ok() && !rest[i].0.is_empty())
        .collect();
    if !sending.is_empty() {
        let all: Vec<Outgoing> = sending
            .iter()
            .flat_map(|&i| rest[i].0.iter().cloned())
            .collect();
        if let Err(e) = sink.send(all).await {
            debug!(error = %crate::ports::chain(&e), "grouped send failed; sending commit by commit");
            // Some messages may have gone out already; sending them again is what a
            // redelivery would do too, and their handlers are idempotent.
            for &i in &sending {
                if let Err(e) = sink.send(rest[i].0.clone()).await {
                    results[i] = Err(WriteError::Store(e));
                }
            }
        }
    }

    // Acknowledgements of every commit that got this far, grouped per queue.
    let mut acks: BTreeMap<QueueKind, Vec<(usize, Receipt)>> = BTreeMap::new();
    for (i, (_, ack)) in rest.into_iter().enumerate() {
        if let (Ok(()), Some((q, receipt))) = (&results[i], ack) {
            acks.entry(q).or_default().push((i, receipt));
        }
    }
    for (q, entries) in acks {
        let receipts: Vec<Receipt> = entries.iter().map(|(_, r)| r.clone()).collect();
        // Receipts that are no longer current belong to messages delivered again since: the
        // new delivery finds the event applied, as with `Sequential`.
        if let Err(e) = sink.ack(q, receipts).await {
            debug!(error = %crate::ports::chain(&e), "grouped acknowledgement failed; acknowledging one by one");
            for (i, receipt) in entries {
                if let Err(e) = sink.ack(q, vec![receipt]).await {
                    results[i] = Err(WriteError::Store(e));
                }
            }
        }
    }
    results
}

fn unavailable(message: &str) -> WriteError {
    WriteError::Store(Error::unavailable("journal", message.to_owned()))
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashSet};
    use std::sync::Mutex;
    use std::time::Duration;

    use tokio::sync::{Notify, Semaphore};
    use workflows::{Environment, EventId, State, TenantId, Timestamp, WorkflowKey};

    use super::*;

    /// Records every call; writes of `conflicting` keys conflict, sends containing a body in
    /// `refused` fail, and the first write waits for `gate` when one is set.
    #[derive(Default)]
    struct Fake {
        calls: Mutex<Vec<String>>,
        conflicting: HashSet<String>,
        refused: HashSet<String>,
        gate: Option<Semaphore>,
        writing: Notify,
    }

    impl Fake {
        fn calls(&self) -> Vec<String> {
            self.calls.lock().map(|c| c.clone()).unwrap_or_default()
        }

        fn log(&self, call: String) {
            if let Ok(mut c) = self.calls.lock() {
                c.push(call);
            }
        }
    }

    impl Sink for Arc<Fake> {
        async fn write(&self, write: RecordWrite) -> Result<(), WriteError> {
            self.writing.notify_one();
            if let Some(gate) = &self.gate {
                let _permit = gate.acquire().await;
            }
            self.log(format!("write {}", write.key));
            if self.conflicting.contains(&write.key.to_string()) {
                return Err(WriteError::Conflict {
                    key: write.key,
                    expected: write.expected_version,
                    found: write.version,
                });
            }
            Ok(())
        }

        async fn send(&self, messages: Vec<Outgoing>) -> Result<(), Error> {
            let bodies: Vec<String> = messages
                .iter()
                .map(|m| String::from_utf8_lossy(&m.body).into_owned())
                .collect();
            self.log(format!("send {}", bodies.join(",")));
            if bodies.iter().any(|b| self.refused.contains(b)) {
                return Err(Error::invalid("refused".to_owned()));
            }
            Ok(())
        }

        async fn ack(
            &self,
            queue: QueueKind,
            receipts: Vec<Receipt>,
        ) -> Result<Vec<Receipt>, Error> {
            let r: Vec<String> = receipts.into_iter().map(|r| r.0).collect();
            self.log(format!("ack {queue} {}", r.join(",")));
            Ok(Vec::new())
        }
    }

    fn write(tenant: &str) -> RecordWrite {
        RecordWrite {
            key: WorkflowKey::new(TenantId::new(tenant).expect("tenant"), Environment::Dev),
            expected_version: 0,
            version: 1,
            state: State::Preparing,
            updated_at: Timestamp::from_unix_millis(1),
            record: Vec::new(),
            event_id: EventId::new(format!("e-{tenant}")).expect("event id"),
            history: Vec::new(),
        }
    }

    fn commit(tenant: &str) -> Commit {
        Commit {
            write: Some(write(tenant)),
            send: vec![Outgoing {
                queue: QueueKind::Steps,
                group: None,
                dedup_id: None,
                delay: Duration::ZERO,
                body: format!("m-{tenant}").into_bytes(),
                attributes: BTreeMap::new(),
            }],
            ack: Some((QueueKind::Steps, Receipt(format!("r-{tenant}")))),
            claim: None,
        }
    }

    fn tenants(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("tenant{i:02}")).collect()
    }

    /// Commits `n` single commits while a first one holds the committer in its write, so
    /// that they all wait together; returns the calls the sink saw.
    async fn commit_while_held(n: usize, max_group: usize) -> Vec<String> {
        let fake = Arc::new(Fake {
            gate: Some(Semaphore::new(0)),
            ..Fake::default()
        });
        let journal = Arc::new(Batched::with_sink(fake.clone(), max_group));
        let first = {
            let j = journal.clone();
            tokio::spawn(async move { j.commit(vec![commit("first")]).await })
        };
        fake.writing.notified().await;
        let mut others = JoinSet::new();
        for t in tenants(n) {
            let j = journal.clone();
            others.spawn(async move { j.commit(vec![commit(&t)]).await });
        }
        while journal.waiting() < n {
            tokio::task::yield_now().await;
        }
        if let Some(gate) = &fake.gate {
            gate.add_permits(1000);
        }
        assert!(first.await.expect("first").iter().all(Result::is_ok));
        while let Some(r) = others.join_next().await {
            assert!(r.expect("joined").iter().all(Result::is_ok));
        }
        assert_eq!(journal.waiting(), 0);
        fake.calls()
    }

    fn sizes(calls: &[String], prefix: &str) -> Vec<usize> {
        calls
            .iter()
            .filter(|c| c.starts_with(prefix))
            .map(|c| c.split(',').count())
            .collect()
    }

    #[tokio::test]
    async fn commits_that_wait_together_go_out_together() {
        let calls = commit_while_held(25, 100).await;
        assert_eq!(sizes(&calls, "send"), [1, 25], "{calls:?}");
        assert_eq!(sizes(&calls, "ack"), [1, 25], "{calls:?}");
        // Every write of the group came before its send and acknowledgement.
        let last_write = calls.iter().rposition(|c| c.starts_with("write"));
        let last_send = calls.iter().rposition(|c| c.starts_with("send"));
        assert!(last_write < last_send, "{calls:?}");
    }

    #[tokio::test]
    async fn groups_are_bounded() {
        let calls = commit_while_held(10, 4).await;
        assert_eq!(sizes(&calls, "send"), [1, 4, 4, 2], "{calls:?}");
    }

    #[tokio::test]
    async fn a_conflict_fails_its_own_commit_only() {
        let fake = Arc::new(Fake {
            conflicting: HashSet::from(["bravo#dev".to_owned()]),
            ..Fake::default()
        });
        let journal = Batched::with_sink(fake.clone(), 100);
        let results = journal
            .commit(vec![commit("alpha"), commit("bravo"), commit("charlie")])
            .await;
        assert!(results[0].is_ok());
        assert!(matches!(results[1], Err(WriteError::Conflict { .. })));
        assert!(results[2].is_ok());
        let calls = fake.calls();
        assert!(
            calls.contains(&"send m-alpha,m-charlie".to_owned()),
            "{calls:?}"
        );
        assert!(
            calls.contains(&"ack steps r-alpha,r-charlie".to_owned()),
            "{calls:?}"
        );
    }

    #[tokio::test]
    async fn a_refused_send_is_retried_alone_and_fails_only_its_commit() {
        let fake = Arc::new(Fake {
            refused: HashSet::from(["m-bravo".to_owned()]),
            ..Fake::default()
        });
        let journal = Batched::with_sink(fake.clone(), 100);
        let results = journal
            .commit(vec![commit("alpha"), commit("bravo"), commit("charlie")])
            .await;
        assert!(results[0].is_ok());
        assert!(
            matches!(&results[1], Err(WriteError::Store(Error::Invalid { .. }))),
            "{results:?}"
        );
        assert!(results[2].is_ok());
        let calls = fake.calls();
        assert!(
            calls.contains(&"send m-alpha,m-bravo,m-charlie".to_owned()),
            "{calls:?}"
        );
        assert!(calls.contains(&"send m-alpha".to_owned()), "{calls:?}");
        assert!(calls.contains(&"send m-charlie".to_owned()), "{calls:?}");
        // The commit whose messages did not go out keeps its message unacknowledged.
        assert!(
            calls.contains(&"ack steps r-alpha,r-charlie".to_owned()),
            "{calls:?}"
        );
    }
}
