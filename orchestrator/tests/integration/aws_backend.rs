//! The port conformance suite on SQS and DynamoDB, against a `moto_server` of the test's own
//! on a free port (fresh state for every check), plus the engine on this backend.

use std::sync::Arc;
use std::time::Duration;

use crate::conformance::{Harness, conformance_tests, slot_tests};
use orchestrator::aws::dynamo::DynamoStore;
use orchestrator::aws::sqs::SqsQueue;
use orchestrator::aws::{AwsStack, Names, RequestCounter};
use orchestrator::clock::ManualClock;
use orchestrator::stack::{Batched, Stack};
use testkit::moto::Moto;
use workflows::Timestamp;

const MAX_RECEIVES: u32 = 3;

struct Aws {
    _moto: Moto,
    stack: AwsStack,
}

async fn aws() -> (Moto, AwsStack, RequestCounter) {
    let moto = Moto::start().await;
    let sdk = moto.sdk_config();
    let names = Names::new("test");
    orchestrator::aws::init::create_all(&sdk, &names, MAX_RECEIVES)
        .await
        .expect("init");
    let counter = RequestCounter::new();
    let stack = orchestrator::aws::connect(&sdk, &names, &counter, 64)
        .await
        .expect("connect");
    (moto, stack, counter)
}

impl Harness for Aws {
    type Backend = AwsStack;

    fn backend(&self) -> &AwsStack {
        &self.stack
    }

    async fn advance(&self, d: Duration) {
        // moto keeps wall-clock time.
        tokio::time::sleep(d).await;
    }

    fn visibility(&self) -> Duration {
        Duration::from_secs(2)
    }

    fn max_receives(&self) -> u32 {
        MAX_RECEIVES
    }

    fn rejects_stale_receipts(&self) -> bool {
        false
    }
}

impl Aws {
    async fn new() -> Self {
        let (moto, stack, _) = aws().await;
        Aws { _moto: moto, stack }
    }
}

/// The suite on SQS and DynamoDB (moto), with the `Batched` journal workers run.
mod conforms {
    use super::*;
    conformance_tests!(Aws::new().await);
}

/// DynamoDB's slots on a clock of the test's (moto's own time cannot be moved).
struct Slots {
    _moto: Moto,
    clock: ManualClock,
    stack: AwsStack,
}

impl Harness for Slots {
    type Backend = AwsStack;

    fn backend(&self) -> &AwsStack {
        &self.stack
    }

    async fn advance(&self, d: Duration) {
        self.clock.advance(d);
    }

    fn max_receives(&self) -> u32 {
        MAX_RECEIVES
    }
}

impl Slots {
    async fn new() -> Self {
        let (moto, stack, _) = aws().await;
        let clock = ManualClock::new(Timestamp::from_unix_millis(1_800_000_000_000));
        let store = Arc::new((*stack.store).clone().with_clock(Arc::new(clock.clone())));
        let stack = Stack {
            journal: Arc::new(Batched::new(store.clone(), stack.queue.clone(), 64)),
            store,
            queue: stack.queue,
        };
        Slots {
            _moto: moto,
            clock,
            stack,
        }
    }
}

/// DynamoDB's slot leases and line.
mod leases_slots {
    use super::*;
    slot_tests!(Slots::new().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_is_idempotent_and_startup_names_what_is_missing() {
    let moto = Moto::start().await;
    let sdk = moto.sdk_config();
    let names = Names::new("fresh");
    let counter = RequestCounter::new();
    let missing = SqsQueue::connect(&sdk, &names, &counter)
        .await
        .expect_err("no queues yet");
    assert!(
        missing.to_string().contains("fresh-events.fifo"),
        "{missing}"
    );
    assert!(
        missing.to_string().contains("orchestrator init"),
        "{missing}"
    );
    let missing = DynamoStore::connect(&sdk, &names, &counter)
        .await
        .expect_err("no tables yet");
    assert!(missing.to_string().contains("fresh-"), "{missing}");
    for _ in 0..2 {
        orchestrator::aws::init::create_all(&sdk, &names, MAX_RECEIVES)
            .await
            .expect("init, twice");
    }
    SqsQueue::connect(&sdk, &names, &counter)
        .await
        .expect("queues");
    DynamoStore::connect(&sdk, &names, &counter)
        .await
        .expect("tables");
    assert!(counter.total() > 0, "requests are counted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_takes_pushes_to_live_on_sqs_and_dynamodb() {
    let (_moto, stack, counter) = aws().await;
    let transitions = testkit::live::pushes_reach_live(Arc::new(stack)).await;
    let requests = counter.total();
    eprintln!("engine on moto: {transitions} transitions, {requests} AWS requests");
    assert!(transitions > 0 && requests > 0);
}

/// A worker shutting down while its long poll is open: SQS hands what arrives meanwhile to the
/// poll even though the worker no longer wants it. The engine finishes the poll and releases
/// those messages, so the next worker gets them at once rather than after the visibility
/// timeout (60 s here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_during_a_long_poll_hands_back_what_it_received() {
    use orchestrator::ports::{Queue, QueueKind};
    let (_moto, stack, _) = aws().await;
    let stack = Arc::new(stack);
    let clock: orchestrator::clock::SharedClock = Arc::new(orchestrator::clock::SystemClock);
    let engine = testkit::live::start(&stack, &clock);
    // The engine polls with a wait of 200 ms, which SQS takes as one second.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stopping = tokio::spawn(engine.stop());
    stack
        .send(vec![crate::conformance::step_message("late")])
        .await
        .expect("send");
    stopping.await.expect("stopped");
    let got = stack
        .receive(
            QueueKind::Steps,
            10,
            Duration::from_secs(30),
            Duration::from_secs(1),
        )
        .await
        .expect("receive");
    assert_eq!(
        got.iter().map(|d| d.body.clone()).collect::<Vec<_>>(),
        [b"late".to_vec()],
        "the message is not hidden by the stopped worker's poll"
    );
}
