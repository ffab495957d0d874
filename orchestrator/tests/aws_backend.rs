//! The port conformance suite on SQS and DynamoDB, against a `moto_server` of the test's own
//! on a free port (fresh state for every check), plus the engine on this backend.

mod conformance;
mod moto;

use std::sync::Arc;
use std::time::Duration;

use conformance::{Harness, run_all};
use moto::Moto;
use orchestrator::aws::dynamo::DynamoStore;
use orchestrator::aws::sqs::SqsQueue;
use orchestrator::aws::{AwsStack, Names, RequestCounter};

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqs_and_dynamodb_conform() {
    run_all(async || {
        let (moto, stack, _) = aws().await;
        Aws { _moto: moto, stack }
    })
    .await;
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

/// Activities that finish at once with a plausible output.
struct Instant;

impl activities::Activities for Instant {
    async fn invoke(&self, invocation: activities::Invocation<'_>) -> activities::Outcome {
        activities::Outcome::Done(workflows::testing::output_for(invocation.task))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_takes_pushes_to_live_on_sqs_and_dynamodb() {
    use orchestrator::clock::{SharedClock, SystemClock};
    use orchestrator::engine::{Engine, EngineConfig, enqueue};
    use orchestrator::ports::{Queue, QueueKind, Store};
    use workflows::{Environment, Event, EventId, GitSha, Push, RepoKind, State, WorkflowKey};

    let (_moto, stack, counter) = aws().await;
    let stack = Arc::new(stack);
    stack
        .put_tenant(&conformance::tenant("acme", 1, 2), true)
        .await
        .expect("tenant");
    let clock: SharedClock = Arc::new(SystemClock);
    let engine = Arc::new(Engine::new(
        stack.clone(),
        stack.clone(),
        stack.clone(),
        Arc::new(Instant),
        clock.clone(),
        EngineConfig {
            wait: Duration::from_millis(200),
            ..EngineConfig::default()
        },
    ));
    let keys: Vec<WorkflowKey> = [Environment::Dev, Environment::Production]
        .into_iter()
        .map(|env| conformance::key("acme", env))
        .collect();
    for (i, key) in keys.iter().enumerate() {
        for (n, repo) in [(1u32, RepoKind::Infra), (2, RepoKind::App)] {
            let event = Event::Push(Push {
                event_id: EventId::new(format!("p{i}-{n}")).expect("id"),
                repo,
                sha: GitSha::new(format!("{n:040x}")).expect("sha"),
                git_ref: "refs/heads/main".into(),
                author: "jane".into(),
                message: "m".into(),
                received_at: clock.now(),
            });
            enqueue(&*stack, key, event, clock.now())
                .await
                .expect("enqueue");
        }
    }
    let stop = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(engine.clone().run(stop.clone()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let mut live = true;
        for key in &keys {
            live &= matches!(stack.workflow(key).await, Ok(Some(r)) if r.state() == State::Live
                && r.workflow().deployed.as_ref().is_some_and(|d| d.release.app.is_some() && d.release.infra.is_some()));
        }
        if live {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "not live in time");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.cancel();
    running.await.expect("engine stops");
    for q in QueueKind::ALL {
        let s = stack.stats(q).await.expect("stats");
        assert_eq!(s.dead, 0, "{q}");
    }
    let transitions = engine.stats().snapshot().transitions;
    let requests = counter.total();
    eprintln!("engine on moto: {transitions} transitions, {requests} AWS requests");
    assert!(transitions > 0 && requests > 0);
}
