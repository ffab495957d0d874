//! The SQS adapter of the `Queue` port on moto: the start-up check, the queues of
//! `orchestrator init`, chained long delays, dead letters and redrive, batches and groups. The
//! conformance suite runs on the whole AWS backend in `aws_backend.rs`.
//!
//! The fixture pairs the SQS queue with a SQLite file's store and journal (through `Stack`).
//! moto keeps wall-clock time, so `advance` sleeps and the visibility timeout is 2 s.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::conformance::{Harness, event_message, step_message};
use aws_sdk_sqs::types::{MessageAttributeValue, QueueAttributeName};
use orchestrator::aws::sqs::{SqsQueue, create_queues};
use orchestrator::aws::{Names, RequestCounter, sqs};
use orchestrator::ports::{Delivery, Error, Queue, QueueKind, Receipt};
use orchestrator::sqlite::{SqliteBackend, SqliteConfig};
use orchestrator::stack::Stack;
use testkit::moto::Moto;

const PREFIX: &str = "orchestrator";
const MAX_RECEIVES: u32 = 3;

type Backend = Stack<SqliteBackend, SqsQueue, SqliteBackend>;

struct Aws {
    _moto: Moto,
    _dir: tempfile::TempDir,
    client: aws_sdk_sqs::Client,
    counter: RequestCounter,
    backend: Backend,
    visibility: Duration,
}

impl Aws {
    /// moto with the four queues created by `create_queues`, and the adapter connected; the
    /// checks receive with a visibility timeout of 2 s.
    async fn new() -> Self {
        Self::with_visibility(Duration::from_secs(2)).await
    }

    async fn with_visibility(visibility: Duration) -> Self {
        let moto = Moto::start().await;
        let sdk = moto.sdk_config();
        let names = Names::new(PREFIX);
        let counter = RequestCounter::new();
        let client = sqs::client(&sdk, &counter);
        create_queues(&client, &names, MAX_RECEIVES)
            .await
            .expect("create queues");
        let queue = SqsQueue::connect(&sdk, &names, &counter)
            .await
            .expect("connect");
        let dir = tempfile::tempdir().expect("tempdir");
        let sqlite = SqliteBackend::open(SqliteConfig::new(dir.path().join("o.sqlite")))
            .expect("open sqlite");
        let backend = Stack {
            store: Arc::new(sqlite.clone()),
            queue: Arc::new(queue),
            journal: Arc::new(sqlite),
        };
        Self {
            _moto: moto,
            _dir: dir,
            client,
            counter,
            backend,
            visibility,
        }
    }

    fn queue(&self) -> &SqsQueue {
        &self.backend.queue
    }

    async fn url(&self, name: &str) -> String {
        self.client
            .get_queue_url()
            .queue_name(name)
            .send()
            .await
            .expect("queue url")
            .queue_url
            .expect("url")
    }

    /// Receives until a receive comes back empty (after something came) or five tries.
    async fn receive_all(&self, queue: QueueKind) -> Vec<Delivery> {
        let mut all = Vec::new();
        for _ in 0..5 {
            let got = self
                .queue()
                .receive(queue, 10, self.visibility(), Duration::ZERO)
                .await
                .expect("receive");
            if got.is_empty() && !all.is_empty() {
                break;
            }
            all.extend(got);
        }
        all
    }

    fn requests(&self, operation: &str) -> u64 {
        self.counter
            .snapshot()
            .iter()
            .filter(|c| c.operation == operation)
            .map(|c| c.count)
            .sum()
    }
}

impl Harness for Aws {
    type Backend = Backend;

    fn backend(&self) -> &Backend {
        &self.backend
    }

    async fn advance(&self, d: Duration) {
        tokio::time::sleep(d).await;
    }

    fn visibility(&self) -> Duration {
        self.visibility
    }

    fn max_receives(&self) -> u32 {
        MAX_RECEIVES
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).expect("ms"))
        .expect("after 1970")
}

fn body(d: &Delivery) -> String {
    String::from_utf8_lossy(&d.body).into_owned()
}

/// Stops at the suite's last assertion: SQS (and moto) delete a message with an earlier
/// receipt handle of it, so the stale receipt is not reported.
/// Stops at the suite's last assertion: SQS (and moto) accept an earlier receipt handle for
/// `ChangeMessageVisibility`.
/// The check lets 6 s pass with the undelayed message received and not acknowledged: the
/// visibility timeout must outlast that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_start_up_check_names_a_missing_queue() {
    let moto = Moto::start().await;
    let sdk = moto.sdk_config();
    let names = Names::new(PREFIX);
    let counter = RequestCounter::new();
    let err = SqsQueue::connect(&sdk, &names, &counter)
        .await
        .expect_err("nothing exists yet");
    let message = err.to_string();
    assert!(matches!(err, Error::Invalid { .. }), "{err:?}");
    assert!(
        message.contains("queue orchestrator-events.fifo does not exist"),
        "{message}"
    );
    assert!(message.contains("orchestrator init"), "{message}");

    // Only the steps dead-letter queue is missing: that is the one named.
    let client = sqs::client(&sdk, &counter);
    create_queues(&client, &names, MAX_RECEIVES)
        .await
        .expect("create");
    let url = client
        .get_queue_url()
        .queue_name(&names.steps_dlq)
        .send()
        .await
        .expect("url")
        .queue_url
        .expect("url");
    client
        .delete_queue()
        .queue_url(url)
        .send()
        .await
        .expect("delete");
    let message = SqsQueue::connect(&sdk, &names, &counter)
        .await
        .expect_err("steps-dlq is gone")
        .to_string();
    assert!(
        message.contains("queue orchestrator-steps-dlq does not exist"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_start_up_check_wants_the_redrive_policy() {
    let moto = Moto::start().await;
    let sdk = moto.sdk_config();
    let names = Names::new(PREFIX);
    let counter = RequestCounter::new();
    let client = sqs::client(&sdk, &counter);
    for (name, fifo) in [
        (&names.events_queue, true),
        (&names.events_dlq, true),
        (&names.steps_queue, false),
        (&names.steps_dlq, false),
    ] {
        let mut create = client.create_queue().queue_name(name);
        if fifo {
            create = create.attributes(QueueAttributeName::FifoQueue, "true");
        }
        create.send().await.expect("create");
    }
    let message = SqsQueue::connect(&sdk, &names, &counter)
        .await
        .expect_err("no redrive policy")
        .to_string();
    assert_eq!(
        message,
        "queue orchestrator-events.fifo has no redrive policy to orchestrator-events-dlq.fifo: \
         run `orchestrator init`"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_creates_the_queues_and_can_run_again() {
    let aws = Aws::new().await;
    let names = Names::new(PREFIX);
    // Again, with another maxReceiveCount: it converges.
    create_queues(&aws.client, &names, 5)
        .await
        .expect("create again");
    assert!(matches!(
        create_queues(&aws.client, &names, 0).await,
        Err(Error::Invalid { .. })
    ));
    let attributes = |name: String| {
        let client = aws.client.clone();
        async move {
            let url = client
                .get_queue_url()
                .queue_name(&name)
                .send()
                .await
                .expect("url")
                .queue_url
                .expect("url");
            client
                .get_queue_attributes()
                .queue_url(url)
                .attribute_names(QueueAttributeName::All)
                .send()
                .await
                .expect("attributes")
                .attributes
                .expect("attributes")
        }
    };
    let events = attributes(names.events_queue.clone()).await;
    let get = |a: &std::collections::HashMap<QueueAttributeName, String>, k| {
        a.get(&k).cloned().unwrap_or_default()
    };
    assert_eq!(get(&events, QueueAttributeName::FifoQueue), "true");
    assert_eq!(
        get(&events, QueueAttributeName::ContentBasedDeduplication),
        "false"
    );
    assert_eq!(
        get(&events, QueueAttributeName::MessageRetentionPeriod),
        "1209600"
    );
    assert_eq!(get(&events, QueueAttributeName::VisibilityTimeout), "60");
    let policy: serde_json::Value =
        serde_json::from_str(&get(&events, QueueAttributeName::RedrivePolicy)).expect("json");
    assert_eq!(policy["maxReceiveCount"].as_u64(), Some(5));
    assert!(
        policy["deadLetterTargetArn"]
            .as_str()
            .is_some_and(|a| a.ends_with(":orchestrator-events-dlq.fifo")),
        "{policy}"
    );
    let events_dlq = attributes(names.events_dlq.clone()).await;
    assert_eq!(get(&events_dlq, QueueAttributeName::FifoQueue), "true");
    assert_eq!(
        get(&events_dlq, QueueAttributeName::MessageRetentionPeriod),
        "1209600"
    );
    let steps = attributes(names.steps_queue.clone()).await;
    assert_eq!(get(&steps, QueueAttributeName::FifoQueue), "");
    let policy: serde_json::Value =
        serde_json::from_str(&get(&steps, QueueAttributeName::RedrivePolicy)).expect("json");
    assert!(
        policy["deadLetterTargetArn"]
            .as_str()
            .is_some_and(|a| a.ends_with(":orchestrator-steps-dlq")),
        "{policy}"
    );
    let steps_dlq = attributes(names.steps_dlq.clone()).await;
    assert_eq!(
        get(&steps_dlq, QueueAttributeName::MessageRetentionPeriod),
        "1209600"
    );
    // A new connection reads the new count.
    let again = SqsQueue::connect_with(aws.client.clone(), &names)
        .await
        .expect("connect");
    assert_eq!(again.max_receives(QueueKind::Events), 5);
    assert_eq!(aws.queue().max_receives(QueueKind::Steps), MAX_RECEIVES);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_delays_are_chained() {
    let aws = Aws::new().await;
    let q = aws.queue();

    // 1000 s: sent with SQS's longest delay (the `not-before` attribute is checked by the unit
    // tests of the adapter); it waits.
    let mut far = step_message("far");
    far.delay = Duration::from_secs(1000);
    q.send(vec![far]).await.expect("send");
    let stats = q.stats(QueueKind::Steps).await.expect("stats");
    assert_eq!((stats.visible, stats.delayed), (0, 1), "{stats:?}");
    assert!(aws.receive_all(QueueKind::Steps).await.is_empty());

    // A message whose `not-before` is 3 s away arrives at once (as the last link of a chain
    // would, early): it is sent on with the rest of the delay, not delivered.
    let url = aws.url("orchestrator-steps").await;
    let not_before = now_ms() + 3_000;
    let string = |s: String| {
        MessageAttributeValue::builder()
            .data_type("String")
            .string_value(s)
            .build()
            .expect("attribute")
    };
    aws.client
        .send_message()
        .queue_url(&url)
        .message_body("near")
        .message_attributes("not-before", string(not_before.to_string()))
        .message_attributes("traceparent", string("00-abc-def-01".into()))
        .send()
        .await
        .expect("raw send");
    let sent_before = aws.requests("SendMessageBatch");
    assert!(
        aws.receive_all(QueueKind::Steps).await.is_empty(),
        "not yet"
    );
    assert_eq!(
        aws.requests("SendMessageBatch"),
        sent_before + 1,
        "sent on once"
    );
    let stats = q.stats(QueueKind::Steps).await.expect("stats");
    assert_eq!(
        (stats.visible, stats.in_flight, stats.delayed),
        (0, 0, 2),
        "the chained link waits, the original is deleted: {stats:?}"
    );
    let sent_at = now_ms();
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    let got = aws.receive_all(QueueKind::Steps).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(now_ms() >= not_before);
    assert_eq!(body(&got[0]), "near");
    assert_eq!(got[0].receive_count, 1);
    assert_eq!(
        got[0].attributes,
        BTreeMap::from([("traceparent".to_owned(), "00-abc-def-01".to_owned())]),
        "the adapter's own attributes are not shown"
    );
    assert!(
        got[0].sent_at.as_unix_millis() < sent_at,
        "sent_at is the first send"
    );

    // A `not-before` that has passed is delivered as it is.
    aws.client
        .send_message()
        .queue_url(&url)
        .message_body("due")
        .message_attributes("not-before", string((now_ms() - 1).to_string()))
        .send()
        .await
        .expect("raw send");
    let got = aws.receive_all(QueueKind::Steps).await;
    assert_eq!(got.iter().map(body).collect::<Vec<_>>(), ["due"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redrive_moves_dead_letters_back() {
    let aws = Aws::new().await;
    let q = aws.queue();
    let mut a = step_message("a");
    a.attributes
        .insert("traceparent".into(), "00-abc-def-01".into());
    q.send(vec![a, step_message("b"), step_message("c")])
        .await
        .expect("send");
    let got = aws.receive_all(QueueKind::Steps).await;
    assert_eq!(got.len(), 3);
    for d in &got {
        match body(d).as_str() {
            "c" => {
                let failed = q
                    .ack(QueueKind::Steps, vec![d.receipt.clone()])
                    .await
                    .expect("ack");
                assert!(failed.is_empty());
            }
            other => q
                .quarantine(d, &format!("bad {other}"))
                .await
                .expect("quarantine"),
        }
    }
    let dead = q.dead_letters(QueueKind::Steps, 10).await.expect("dead");
    let mut reasons: Vec<&str> = dead.iter().map(|d| d.reason.as_str()).collect();
    reasons.sort();
    assert_eq!(reasons, ["bad a", "bad b"]);
    assert!(
        dead.iter()
            .all(|d| d.receive_count == 1 && d.queue == QueueKind::Steps)
    );
    assert!(dead.iter().all(|d| d.dead_at >= d.sent_at));
    assert_eq!(q.stats(QueueKind::Steps).await.expect("stats").dead, 2);
    // Peeking does not hide them.
    assert_eq!(
        q.dead_letters(QueueKind::Steps, 10)
            .await
            .expect("dead")
            .len(),
        2
    );
    assert_eq!(
        q.dead_letters(QueueKind::Steps, 1)
            .await
            .expect("dead")
            .len(),
        1
    );

    let a_id = dead
        .iter()
        .find(|d| d.body == b"a")
        .map(|d| d.id.clone())
        .expect("a");
    assert_eq!(
        q.redrive(QueueKind::Steps, Some(vec!["no-such-id".into()]))
            .await
            .expect("redrive nothing"),
        Vec::<String>::new()
    );
    assert_eq!(
        q.redrive(QueueKind::Steps, Some(vec![a_id.clone()]))
            .await
            .expect("redrive a"),
        [a_id]
    );
    let dead = q.dead_letters(QueueKind::Steps, 10).await.expect("dead");
    assert_eq!(
        dead.iter().map(|d| d.body.clone()).collect::<Vec<_>>(),
        [b"b"]
    );
    let back = aws.receive_all(QueueKind::Steps).await;
    assert_eq!(back.iter().map(body).collect::<Vec<_>>(), ["a"]);
    assert_eq!(back[0].receive_count, 1);
    assert_eq!(
        back[0].attributes,
        BTreeMap::from([("traceparent".to_owned(), "00-abc-def-01".to_owned())])
    );
    q.ack(QueueKind::Steps, vec![back[0].receipt.clone()])
        .await
        .expect("ack");
    assert_eq!(
        q.redrive(QueueKind::Steps, None)
            .await
            .expect("redrive")
            .len(),
        1
    );
    assert!(
        q.dead_letters(QueueKind::Steps, 10)
            .await
            .expect("dead")
            .is_empty()
    );
    assert_eq!(
        aws.receive_all(QueueKind::Steps)
            .await
            .iter()
            .map(body)
            .collect::<Vec<_>>(),
        ["b"]
    );

    // Events go back into their group, under a new deduplication id (the original's window
    // would drop them).
    q.send(vec![event_message("acme#dev", "e-1", "push")])
        .await
        .expect("send");
    let got = aws.receive_all(QueueKind::Events).await;
    assert_eq!(got.len(), 1);
    q.quarantine(&got[0], "undecodable")
        .await
        .expect("quarantine");
    let dead = q.dead_letters(QueueKind::Events, 10).await.expect("dead");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].group.as_deref(), Some("acme#dev"));
    assert_eq!(
        q.redrive(QueueKind::Events, None).await.expect("redrive"),
        [dead[0].id.clone()]
    );
    let back = aws.receive_all(QueueKind::Events).await;
    assert_eq!(back.iter().map(body).collect::<Vec<_>>(), ["push"]);
    assert_eq!(back[0].group.as_deref(), Some("acme#dev"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_count_visible_in_flight_delayed_and_dead() {
    let aws = Aws::new().await;
    let q = aws.queue();
    let mut later = step_message("later");
    later.delay = Duration::from_secs(60);
    q.send(vec![step_message("one"), step_message("two"), later])
        .await
        .expect("send");
    let got = q
        .receive(QueueKind::Steps, 1, Duration::from_secs(30), Duration::ZERO)
        .await
        .expect("receive");
    assert_eq!(got.len(), 1, "at most max");
    let stats = q.stats(QueueKind::Steps).await.expect("stats");
    assert_eq!(
        (stats.visible, stats.in_flight, stats.delayed, stats.dead),
        (1, 1, 1, 0),
        "{stats:?}"
    );
    assert_eq!(stats.oldest_age, None, "a CloudWatch metric only");
    q.quarantine(&got[0], "bad").await.expect("quarantine");
    let stats = q.stats(QueueKind::Steps).await.expect("stats");
    assert_eq!((stats.in_flight, stats.dead), (0, 1), "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_of_more_than_ten_and_rejected_receipts() {
    let aws = Aws::new().await;
    let q = aws.queue();
    let sent: Vec<String> = (0..25).map(|i| format!("m{i:02}")).collect();
    q.send(sent.iter().map(|s| step_message(s)).collect())
        .await
        .expect("send");
    assert_eq!(aws.requests("SendMessageBatch"), 3);
    let got = q
        .receive(
            QueueKind::Steps,
            25,
            Duration::from_secs(30),
            Duration::ZERO,
        )
        .await
        .expect("receive");
    let mut bodies: Vec<String> = got.iter().map(body).collect();
    bodies.sort();
    assert_eq!(bodies, sent, "filled up to max while messages kept coming");
    let mut receipts: Vec<Receipt> = got.iter().map(|d| d.receipt.clone()).collect();
    receipts.insert(4, Receipt("not-a-receipt".into()));
    let before = aws.requests("DeleteMessageBatch");
    let failed = q.ack(QueueKind::Steps, receipts).await.expect("ack");
    assert_eq!(failed, [Receipt("not-a-receipt".into())]);
    assert_eq!(aws.requests("DeleteMessageBatch") - before, 3);
    assert_eq!(q.stats(QueueKind::Steps).await.expect("stats").in_flight, 0);
    let err = q
        .extend(
            QueueKind::Steps,
            &Receipt("not-a-receipt".into()),
            Duration::from_secs(5),
        )
        .await
        .expect_err("an invalid receipt cannot extend");
    let text = orchestrator::ports::chain(&err);
    assert!(text.contains("ReceiptHandleIsInvalid"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_is_handed_out_one_message_at_a_time() {
    let aws = Aws::new().await;
    let q = aws.queue();
    q.send(
        (1..=4)
            .map(|i| event_message("acme#dev", &format!("e-{i}"), &format!("a{i}")))
            .collect(),
    )
    .await
    .expect("send");
    for i in 1..=4 {
        let got = aws.receive_all(QueueKind::Events).await;
        assert_eq!(got.iter().map(body).collect::<Vec<_>>(), [format!("a{i}")]);
        assert_eq!(
            got[0].receive_count, 1,
            "waiting in its group is not a receive"
        );
        q.ack(QueueKind::Events, vec![got[0].receipt.clone()])
            .await
            .expect("ack");
    }
    assert!(aws.receive_all(QueueKind::Events).await.is_empty());
}
