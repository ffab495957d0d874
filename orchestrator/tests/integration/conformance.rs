//! The conformance suite of the `Queue`, `Store` and `Journal` ports, written once against
//! the traits. Each backend's test module provides a [`Harness`] (a fresh backend and a way
//! to let time pass) and expands [`conformance_tests`] (and [`slot_tests`]): one test per
//! check, each on a fresh harness, so that they run side by side and fail one by one.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use orchestrator::ports::{
    Commit, Error, Journal, Outgoing, Queue, QueueKind, RecordWrite, SlotGrant, Store,
    WorkflowFilter, WriteError,
};
pub(crate) use testkit::fixtures::{key, tenant};
use workflows::testing::Driver;
use workflows::{
    Domain, Environment, RepoKind, State, TenantId, Timestamp, WorkflowKey, WorkflowRecord,
};

/// A fresh backend and control of its time.
pub(crate) trait Harness {
    /// The backend under test.
    type Backend: Queue + Store + Journal;

    /// The backend.
    fn backend(&self) -> &Self::Backend;

    /// Lets `d` pass for the backend's visibility timeouts, delays and windows.
    fn advance(&self, d: Duration) -> impl Future<Output = ()>;

    /// The visibility timeout to use: long enough that handling never outlives it by accident.
    fn visibility(&self) -> Duration {
        Duration::from_secs(30)
    }

    /// The deduplication window of the backend's events queue.
    fn dedup_window(&self) -> Duration {
        Duration::from_secs(300)
    }

    /// How many receives the backend allows before dead-lettering.
    fn max_receives(&self) -> u32;

    /// Whether a receipt of an earlier delivery of a message is refused. SQS documents that a
    /// delete with an old receipt "succeeds, but the message might not be deleted" (and moto
    /// deletes it); the engine does not rely on the refusal: a message acknowledged by a late
    /// worker was applied by that worker, and its redelivery would have found it applied.
    fn rejects_stale_receipts(&self) -> bool {
        true
    }
}

/// One test per check of the suite, each on a fresh harness that `$make` (an expression, which
/// may `.await`) builds: expand it in a module of its own per backend.
macro_rules! conformance_tests {
    ($make:expr) => {
        $crate::conformance::conformance_tests!(@each $make;
            send_receive_ack,
            unacknowledged_messages_come_back,
            visibility_can_be_extended_and_released,
            delayed_messages_wait,
            events_are_fifo_per_group,
            duplicate_dedup_ids_are_dropped_within_the_window,
            too_many_receives_dead_letter,
            quarantine_dead_letters_with_the_reason,
            dead_letters_are_redriven_or_discarded,
            oversized_messages_are_refused,
            writes_are_conditional_on_the_version,
            workflows_are_listed_by_state_env_and_tenant,
            corrupt_records_are_reported_not_panicked,
            tenants_are_found_by_id_and_project,
            domains_belong_to_one_tenant,
            tenant_updates_are_conditional_on_what_was_read,
            a_removed_tenant_frees_its_projects_and_domain,
            allocations_are_exclusive,
            a_commit_is_all_or_nothing,
            commits_of_a_batch_succeed_or_fail_alone,
            claimed_messages_are_delivered_once,
        );
    };
    (@each $make:expr; $($check:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                let harness = $make;
                $crate::conformance::$check(&harness).await;
            }
        )*
    };
}
pub(crate) use conformance_tests;

/// The slot checks as tests, for backends that lease slots (see `Store::acquire_slot`); as
/// [`conformance_tests`].
macro_rules! slot_tests {
    ($make:expr) => {
        $crate::conformance::conformance_tests!(@each $make;
            slots_are_capped_and_served_in_rounds,
            slot_leases_lapse_unless_renewed,
        );
    };
}
pub(crate) use slot_tests;

pub(crate) fn step_message(body: &str) -> Outgoing {
    Outgoing {
        queue: QueueKind::Steps,
        group: None,
        dedup_id: None,
        delay: Duration::ZERO,
        body: body.as_bytes().to_vec(),
        attributes: BTreeMap::new(),
    }
}

pub(crate) fn event_message(group: &str, dedup: &str, body: &str) -> Outgoing {
    Outgoing {
        queue: QueueKind::Events,
        group: Some(group.to_owned()),
        dedup_id: Some(dedup.to_owned()),
        delay: Duration::ZERO,
        body: body.as_bytes().to_vec(),
        attributes: BTreeMap::new(),
    }
}

fn bodies(deliveries: &[orchestrator::ports::Delivery]) -> Vec<String> {
    let mut b: Vec<String> = deliveries
        .iter()
        .map(|d| String::from_utf8_lossy(&d.body).into_owned())
        .collect();
    b.sort();
    b
}

async fn receive<H: Harness>(h: &H, queue: QueueKind) -> Vec<orchestrator::ports::Delivery> {
    h.backend()
        .receive(queue, 10, h.visibility(), Duration::ZERO)
        .await
        .expect("receive")
}

async fn receive_all<H: Harness>(h: &H, queue: QueueKind) -> Vec<orchestrator::ports::Delivery> {
    // Queues may spread a batch over several receives (SQS does); keep going until empty.
    let mut all = Vec::new();
    for _ in 0..5 {
        let got = receive(h, queue).await;
        if got.is_empty() && !all.is_empty() {
            break;
        }
        all.extend(got);
    }
    all
}

pub(crate) async fn send_receive_ack<H: Harness>(h: &H) {
    let b = h.backend();
    let mut msg = step_message("one");
    msg.attributes
        .insert("traceparent".into(), "00-abc-def-01".into());
    b.send(vec![msg, step_message("two"), step_message("three")])
        .await
        .expect("send");
    let got = receive_all(h, QueueKind::Steps).await;
    assert_eq!(bodies(&got), ["one", "three", "two"]);
    let one = got.iter().find(|d| d.body == b"one").expect("one");
    assert_eq!(
        one.attributes.get("traceparent").map(String::as_str),
        Some("00-abc-def-01")
    );
    assert!(got.iter().all(|d| d.receive_count == 1));
    let failed = b
        .ack(
            QueueKind::Steps,
            got.iter().map(|d| d.receipt.clone()).collect(),
        )
        .await
        .expect("ack");
    assert!(failed.is_empty(), "{failed:?}");
    h.advance(h.visibility() + Duration::from_secs(1)).await;
    assert!(
        receive(h, QueueKind::Steps).await.is_empty(),
        "acked is gone"
    );
}

pub(crate) async fn unacknowledged_messages_come_back<H: Harness>(h: &H) {
    let b = h.backend();
    b.send(vec![step_message("m")]).await.expect("send");
    let first = receive_all(h, QueueKind::Steps).await;
    assert_eq!(first.len(), 1);
    assert!(
        receive(h, QueueKind::Steps).await.is_empty(),
        "invisible while in flight"
    );
    h.advance(h.visibility() + Duration::from_secs(1)).await;
    let second = receive_all(h, QueueKind::Steps).await;
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].id, first[0].id);
    assert_eq!(second[0].receive_count, 2);
    assert_ne!(second[0].receipt, first[0].receipt);
    let failed = b
        .ack(
            QueueKind::Steps,
            vec![first[0].receipt.clone(), second[0].receipt.clone()],
        )
        .await
        .expect("ack");
    if h.rejects_stale_receipts() {
        assert_eq!(
            failed,
            vec![first[0].receipt.clone()],
            "the stale receipt fails alone"
        );
    }
    h.advance(h.visibility() + Duration::from_secs(1)).await;
    assert!(
        receive_all(h, QueueKind::Steps).await.is_empty(),
        "acknowledged"
    );
}

pub(crate) async fn visibility_can_be_extended_and_released<H: Harness>(h: &H) {
    let b = h.backend();
    b.send(vec![step_message("m")]).await.expect("send");
    let got = receive_all(h, QueueKind::Steps).await;
    assert_eq!(got.len(), 1);
    b.extend(QueueKind::Steps, &got[0].receipt, h.visibility() * 3)
        .await
        .expect("extend");
    h.advance(h.visibility() + Duration::from_secs(1)).await;
    assert!(receive(h, QueueKind::Steps).await.is_empty(), "extended");
    b.extend(QueueKind::Steps, &got[0].receipt, Duration::ZERO)
        .await
        .expect("release");
    let again = receive_all(h, QueueKind::Steps).await;
    assert_eq!(again.len(), 1, "released at once");
    if h.rejects_stale_receipts() {
        let stale = b
            .extend(QueueKind::Steps, &got[0].receipt, h.visibility())
            .await;
        assert!(stale.is_err(), "an old receipt cannot extend");
    }
}

pub(crate) async fn delayed_messages_wait<H: Harness>(h: &H) {
    let b = h.backend();
    let mut later = step_message("later");
    later.delay = Duration::from_secs(5);
    b.send(vec![later, step_message("now")])
        .await
        .expect("send");
    let got = receive_all(h, QueueKind::Steps).await;
    assert_eq!(bodies(&got), ["now"]);
    b.ack(QueueKind::Steps, vec![got[0].receipt.clone()])
        .await
        .expect("ack");
    h.advance(Duration::from_secs(6)).await;
    let got = receive_all(h, QueueKind::Steps).await;
    assert_eq!(bodies(&got), ["later"]);
}

pub(crate) async fn events_are_fifo_per_group<H: Harness>(h: &H) {
    let b = h.backend();
    b.send(vec![
        event_message("a#dev", "a1", "a1"),
        event_message("a#dev", "a2", "a2"),
        event_message("b#dev", "b1", "b1"),
    ])
    .await
    .expect("send");
    let got = receive_all(h, QueueKind::Events).await;
    let heads: Vec<String> = bodies(&got);
    assert!(heads.contains(&"a1".to_owned()) && heads.contains(&"b1".to_owned()));
    assert!(
        !heads.contains(&"a2".to_owned()),
        "a2 waits for a1: {heads:?}"
    );
    let a1 = got.iter().find(|d| d.body == b"a1").expect("a1");
    assert_eq!(a1.group.as_deref(), Some("a#dev"));
    assert!(
        receive(h, QueueKind::Events).await.is_empty(),
        "a2 waits while a1 is in flight"
    );
    b.ack(QueueKind::Events, vec![a1.receipt.clone()])
        .await
        .expect("ack");
    let got = receive_all(h, QueueKind::Events).await;
    assert_eq!(bodies(&got), ["a2"]);
}

pub(crate) async fn duplicate_dedup_ids_are_dropped_within_the_window<H: Harness>(h: &H) {
    let b = h.backend();
    b.send(vec![event_message("a#dev", "e-1", "first")])
        .await
        .expect("send");
    b.send(vec![event_message("a#dev", "e-1", "again")])
        .await
        .expect("a duplicate is accepted");
    let got = receive_all(h, QueueKind::Events).await;
    assert_eq!(bodies(&got), ["first"]);
    b.ack(QueueKind::Events, vec![got[0].receipt.clone()])
        .await
        .expect("ack");
    assert!(receive(h, QueueKind::Events).await.is_empty());
    if h.dedup_window() > Duration::from_secs(60) {
        // SQS's window is fixed at five minutes and moto keeps wall-clock time: the expiry is
        // shown on the backends whose clock the test controls.
        return;
    }
    h.advance(h.dedup_window() + Duration::from_secs(1)).await;
    b.send(vec![event_message("a#dev", "e-1", "after")])
        .await
        .expect("send");
    let got = receive_all(h, QueueKind::Events).await;
    assert_eq!(bodies(&got), ["after"], "the window has passed");
}

pub(crate) async fn too_many_receives_dead_letter<H: Harness>(h: &H) {
    let b = h.backend();
    b.send(vec![step_message("poison")]).await.expect("send");
    for n in 1..=h.max_receives() {
        let got = receive_all(h, QueueKind::Steps).await;
        assert_eq!(got.len(), 1, "receive {n}");
        h.advance(h.visibility() + Duration::from_secs(1)).await;
    }
    assert!(
        receive_all(h, QueueKind::Steps).await.is_empty(),
        "dead-lettered instead of delivered again"
    );
    let dead = b
        .dead_letters(QueueKind::Steps, 10)
        .await
        .expect("dead letters");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].body, b"poison");
    assert!(dead[0].reason.contains("received"), "{}", dead[0].reason);
}

pub(crate) async fn quarantine_dead_letters_with_the_reason<H: Harness>(h: &H) {
    let b = h.backend();
    b.send(vec![event_message("a#dev", "q-1", "garbage")])
        .await
        .expect("send");
    let got = receive_all(h, QueueKind::Events).await;
    assert_eq!(got.len(), 1);
    b.quarantine(&got[0], "undecodable: expected value at line 1")
        .await
        .expect("quarantine");
    h.advance(h.visibility() + Duration::from_secs(1)).await;
    assert!(receive_all(h, QueueKind::Events).await.is_empty());
    let dead = b
        .dead_letters(QueueKind::Events, 10)
        .await
        .expect("dead letters");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reason, "undecodable: expected value at line 1");
    assert_eq!(dead[0].group.as_deref(), Some("a#dev"));
}

pub(crate) async fn dead_letters_are_redriven_or_discarded<H: Harness>(h: &H) {
    let b = h.backend();
    let mut y = event_message("b#dev", "e-y", "y");
    y.attributes
        .insert("traceparent".into(), "00-abc-def-01".into());
    b.send(vec![
        event_message("a#dev", "e-x", "x"),
        y,
        event_message("c#dev", "e-z", "z"),
    ])
    .await
    .expect("send");
    let got = receive_all(h, QueueKind::Events).await;
    assert_eq!(bodies(&got), ["x", "y", "z"]);
    for d in &got {
        b.quarantine(d, "poison").await.expect("quarantine");
    }
    let dead = b
        .dead_letters(QueueKind::Events, 10)
        .await
        .expect("dead letters");
    assert_eq!(dead.len(), 3);
    let id_of = |body: &[u8]| {
        dead.iter()
            .find(|d| d.body == body)
            .map(|d| d.id.clone())
            .expect("dead letter")
    };
    let (x, y, z) = (id_of(b"x"), id_of(b"y"), id_of(b"z"));

    assert_eq!(
        b.discard(QueueKind::Events, vec![x.clone(), "404".into()])
            .await
            .expect("discard"),
        std::slice::from_ref(&x)
    );
    assert!(
        b.redrive(QueueKind::Events, Some(vec![x, "no-such-id".into()]))
            .await
            .expect("redrive nothing")
            .is_empty(),
        "a discarded or unknown id is not found"
    );
    assert!(
        b.redrive(QueueKind::Steps, None)
            .await
            .expect("redrive the empty one")
            .is_empty()
    );
    // `y`'s deduplication id is still within its window: redriven all the same.
    assert_eq!(
        b.redrive(QueueKind::Events, Some(vec![y.clone()]))
            .await
            .expect("redrive y"),
        [y]
    );
    assert_eq!(
        b.redrive(QueueKind::Events, None)
            .await
            .expect("redrive all"),
        [z]
    );
    assert!(
        b.dead_letters(QueueKind::Events, 10)
            .await
            .expect("dead letters")
            .is_empty()
    );
    let back = receive_all(h, QueueKind::Events).await;
    assert_eq!(bodies(&back), ["y", "z"]);
    let y = back.iter().find(|d| d.body == b"y").expect("y");
    assert_eq!(y.group.as_deref(), Some("b#dev"), "back in its group");
    assert_eq!(
        y.attributes.get("traceparent").map(String::as_str),
        Some("00-abc-def-01")
    );
}

pub(crate) async fn oversized_messages_are_refused<H: Harness>(h: &H) {
    let b = h.backend();
    let mut big = step_message("");
    big.body = vec![b'x'; 300 * 1024];
    match b.send(vec![big]).await {
        Err(Error::TooLarge { size, limit }) => {
            assert_eq!(size, 300 * 1024);
            assert!(limit <= 256 * 1024);
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert!(receive_all(h, QueueKind::Steps).await.is_empty());
}

/// A record at version 1 (after a push) and the write that stores it.
pub(crate) fn first_write(tenant: &str, env: Environment) -> (WorkflowRecord, RecordWrite) {
    let mut d = Driver::new(env);
    d.record = WorkflowRecord::new(key(tenant, env), Timestamp::from_unix_millis(1_000));
    let event = d.push_event(RepoKind::Infra, 1);
    let applied = d.apply(&event);
    let entry = d.record.history_entry(&event, &applied);
    let write = RecordWrite::new(&d.record, &entry);
    (d.record, write)
}

pub(crate) async fn writes_are_conditional_on_the_version<H: Harness>(h: &H) {
    let b = h.backend();
    let k = key("acme", Environment::Dev);
    assert!(b.workflow(&k).await.expect("get").is_none());
    let (record, write) = first_write("acme", Environment::Dev);
    b.write(write.clone()).await.expect("create");
    let stored = b.workflow(&k).await.expect("get").expect("exists");
    assert_eq!(stored, record);
    match b.write(write.clone()).await {
        Err(WriteError::Conflict {
            expected, found, ..
        }) => assert_eq!((expected, found), (0, 1)),
        other => panic!("expected a conflict, got {other:?}"),
    }
    // The next transition writes version 2 over version 1.
    let mut next = record.clone();
    let event = workflows::Event::Signal {
        event_id: workflows::EventId::new("sig-1").expect("id"),
        signal: workflows::Signal::Cancel,
        actor: "ops".into(),
    };
    let applied = next.apply(
        &event,
        workflows::Input {
            now: Timestamp::from_unix_millis(5_000),
            settings: Default::default(),
        },
    );
    let entry = next.history_entry(&event, &applied);
    b.write(RecordWrite::new(&next, &entry))
        .await
        .expect("version 2");
    let history = b.history(&k, 0, 10).await.expect("history");
    assert_eq!(
        history.iter().map(|e| e.version).collect::<Vec<_>>(),
        [1, 2]
    );
    assert_eq!(b.history(&k, 1, 10).await.expect("range").len(), 1);
    let found = b
        .history_of_event(&k, &event.id())
        .await
        .expect("by event")
        .expect("found");
    assert_eq!(found.version, 2);
    assert_eq!(found.to, State::Unprovisioned);
}

pub(crate) async fn workflows_are_listed_by_state_env_and_tenant<H: Harness>(h: &H) {
    let b = h.backend();
    for tenant in ["alpha", "bravo", "charlie"] {
        for env in [Environment::Dev, Environment::Production] {
            let (_, write) = first_write(tenant, env);
            b.write(write).await.expect("write");
        }
    }
    let all = b
        .workflows(&WorkflowFilter::default(), None, 100)
        .await
        .expect("list");
    assert_eq!(all.len(), 6);
    assert!(
        all.windows(2).all(|w| w[0].key < w[1].key),
        "ordered by key"
    );
    assert!(
        all.iter()
            .all(|s| s.state == State::Preparing && s.version == 1)
    );
    let prod = WorkflowFilter {
        env: Some(Environment::Production),
        ..WorkflowFilter::default()
    };
    assert_eq!(b.workflows(&prod, None, 100).await.expect("list").len(), 3);
    let bravo = WorkflowFilter {
        tenant: Some(TenantId::new("bravo").expect("id")),
        ..WorkflowFilter::default()
    };
    assert_eq!(b.workflows(&bravo, None, 100).await.expect("list").len(), 2);
    let live = WorkflowFilter {
        state: Some(State::Live),
        ..WorkflowFilter::default()
    };
    assert!(
        b.workflows(&live, None, 100)
            .await
            .expect("list")
            .is_empty()
    );
    // Pages of two, following the last key.
    let mut seen = Vec::new();
    let mut after: Option<WorkflowKey> = None;
    loop {
        let page = b
            .workflows(&WorkflowFilter::default(), after.as_ref(), 2)
            .await
            .expect("page");
        if page.is_empty() {
            break;
        }
        after = page.last().map(|s| s.key.clone());
        seen.extend(page.into_iter().map(|s| s.key));
    }
    assert_eq!(seen, all.iter().map(|s| s.key.clone()).collect::<Vec<_>>());
}

pub(crate) async fn corrupt_records_are_reported_not_panicked<H: Harness>(h: &H) {
    let b = h.backend();
    let (_, mut write) = first_write("acme", Environment::Staging);
    write.record = br#"{"schema_version": 1, "key": "acme#staging""#.to_vec();
    b.write(write)
        .await
        .expect("the store does not judge bytes");
    let k = key("acme", Environment::Staging);
    match b.workflow(&k).await {
        Err(Error::Corrupt { what, .. }) => assert!(what.contains("acme#staging"), "{what}"),
        other => panic!("expected Corrupt, got {other:?}"),
    }
    b.mark_corrupt(&k, "record does not decode: EOF")
        .await
        .expect("mark");
    let listed = b
        .workflows(&WorkflowFilter::default(), None, 10)
        .await
        .expect("list");
    assert_eq!(
        listed[0].corrupt.as_deref(),
        Some("record does not decode: EOF")
    );
}

pub(crate) async fn tenants_are_found_by_id_and_project<H: Harness>(h: &H) {
    let b = h.backend();
    let acme = tenant("acme", 11, 12);
    b.put_tenant(&acme, true).await.expect("create");
    b.put_tenant(&tenant("globex", 21, 22), true)
        .await
        .expect("create");
    assert!(matches!(
        b.put_tenant(&acme, true).await,
        Err(Error::AlreadyExists(_))
    ));
    assert!(
        matches!(
            b.put_tenant(&tenant("initech", 12, 31), true).await,
            Err(Error::AlreadyExists(_))
        ),
        "a project belongs to one tenant"
    );
    let got = b.tenant(&acme.id).await.expect("get").expect("exists");
    assert_eq!(got, acme);
    let by_app = b.tenant_by_project(22).await.expect("get").expect("exists");
    assert_eq!(by_app.id.as_str(), "globex");
    assert!(b.tenant_by_project(99).await.expect("get").is_none());
    let mut changed = acme.clone();
    changed.production_approval = true;
    b.put_tenant(&changed, false).await.expect("update");
    let ids: Vec<String> = b
        .tenants()
        .await
        .expect("list")
        .into_iter()
        .map(|t| t.id.to_string())
        .collect();
    assert_eq!(ids, ["acme", "globex"]);
    assert!(
        b.tenant(&acme.id)
            .await
            .expect("get")
            .expect("exists")
            .production_approval
    );
}

pub(crate) async fn domains_belong_to_one_tenant<H: Harness>(h: &H) {
    let b = h.backend();
    let domain = |d: &str| Domain::new(d).expect("domain");
    let acme = tenant("acme", 11, 12);
    b.put_tenant(&acme, true).await.expect("create");
    let mut umbrella = tenant("umbrella", 21, 22);
    umbrella.domain = acme.domain.clone();
    match b.put_tenant(&umbrella, true).await {
        Err(Error::AlreadyExists(what)) => {
            assert!(
                what.contains("acme.example") && what.contains("acme"),
                "{what}"
            );
        }
        other => panic!("a second tenant took acme's domain: {other:?}"),
    }
    assert!(
        b.tenant(&umbrella.id).await.expect("get").is_none(),
        "nothing of a refused tenant is written"
    );
    assert!(b.tenant_by_project(21).await.expect("get").is_none());
    let owner = b.tenant_by_domain(&acme.domain).await.expect("get");
    assert_eq!(owner.map(|t| t.id), Some(acme.id.clone()));
    assert!(
        b.tenant_by_domain(&domain("nobody.example"))
            .await
            .expect("get")
            .is_none()
    );

    // A tenant that moves to another domain frees its old one.
    let mut moved = acme.clone();
    moved.domain = domain("acme.test");
    b.put_tenant(&moved, false).await.expect("move");
    b.put_tenant(&umbrella, true)
        .await
        .expect("the freed domain");
    let owner = b.tenant_by_domain(&acme.domain).await.expect("get");
    assert_eq!(owner.map(|t| t.id), Some(umbrella.id.clone()));
    let owner = b.tenant_by_domain(&moved.domain).await.expect("get");
    assert_eq!(owner.map(|t| t.id), Some(acme.id.clone()));
    assert!(
        matches!(
            b.put_tenant(&acme, false).await,
            Err(Error::AlreadyExists(_))
        ),
        "an update cannot take another tenant's domain either"
    );
    let kept = b.tenant(&acme.id).await.expect("get").expect("exists");
    assert_eq!(kept.domain, moved.domain);
}

pub(crate) async fn tenant_updates_are_conditional_on_what_was_read<H: Harness>(h: &H) {
    let b = h.backend();
    b.put_tenant(&tenant("acme", 11, 12), true)
        .await
        .expect("create");
    // Two operators read the tenant, then each changes it.
    let read = b
        .tenant(&TenantId::new("acme").expect("id"))
        .await
        .expect("get")
        .expect("exists");
    let mut first = read.clone();
    first.webhook.token_sha256 = "11".repeat(32);
    first.updated_at = Timestamp::from_unix_millis(2_000);
    let mut second = read.clone();
    second.webhook.signing_secret = Some("whsec_c2Vjb25k".into());
    second.updated_at = Timestamp::from_unix_millis(2_000);
    b.update_tenant(&read, &first)
        .await
        .expect("the first change");
    match b.update_tenant(&read, &second).await {
        Err(e) => {
            assert!(e.is_retryable(), "{e}");
            assert!(e.to_string().contains("changed since it was read"), "{e}");
        }
        Ok(()) => panic!("the second change overwrote the first"),
    }
    let stored = b.tenant(&read.id).await.expect("get").expect("exists");
    assert_eq!(stored, first, "the first change is kept whole");
    // Read again, the second change goes through, keeping the first.
    let mut again = stored.clone();
    again.webhook.signing_secret = Some("whsec_c2Vjb25k".into());
    b.update_tenant(&stored, &again)
        .await
        .expect("after a fresh read");
    let stored = b.tenant(&read.id).await.expect("get").expect("exists");
    assert_eq!(stored.webhook.token_sha256, "11".repeat(32));
    assert!(stored.webhook.signing_secret.is_some());
}

pub(crate) async fn a_removed_tenant_frees_its_projects_and_domain<H: Harness>(h: &H) {
    let b = h.backend();
    b.put_tenant(&tenant("acme", 11, 12), true)
        .await
        .expect("create");
    let id = TenantId::new("acme").expect("id");
    let read = b.tenant(&id).await.expect("get").expect("exists");
    // A change since the read keeps the tenant.
    let mut changed = read.clone();
    changed.production_approval = !read.production_approval;
    b.update_tenant(&read, &changed).await.expect("change");
    let e = b.remove_tenant(&read).await.expect_err("stale read");
    assert!(e.is_retryable(), "{e}");
    assert!(b.tenant(&id).await.expect("get").is_some());
    // Read again, it goes, with its projects and domain.
    b.remove_tenant(&changed).await.expect("remove");
    assert!(b.tenant(&id).await.expect("get").is_none());
    assert!(b.tenant_by_project(11).await.expect("get").is_none());
    assert!(
        b.tenant_by_domain(&changed.domain)
            .await
            .expect("get")
            .is_none()
    );
    assert!(b.tenants().await.expect("list").is_empty());
    // Gone already: no error. Another tenant may take what it had.
    b.remove_tenant(&changed).await.expect("again");
    let mut heir = tenant("globex", 11, 12);
    heir.domain = changed.domain.clone();
    b.put_tenant(&heir, true)
        .await
        .expect("projects and domain are free");
}

pub(crate) async fn allocations_are_exclusive<H: Harness>(h: &H) {
    let b = h.backend();
    assert!(b.allocate("priority", 7, "acme#dev").await.expect("take"));
    assert!(
        b.allocate("priority", 7, "acme#dev").await.expect("again"),
        "idempotent for its owner"
    );
    assert!(
        !b.allocate("priority", 7, "globex#dev")
            .await
            .expect("other"),
        "never two owners"
    );
    assert_eq!(
        b.allocation_of("priority", "acme#dev").await.expect("of"),
        Some(7)
    );
    b.release("priority", 7, "globex#dev")
        .await
        .expect("a non-owner release is a no-op");
    assert!(
        !b.allocate("priority", 7, "globex#dev")
            .await
            .expect("other")
    );
    b.release("priority", 7, "acme#dev").await.expect("release");
    assert!(
        b.allocate("priority", 7, "globex#dev")
            .await
            .expect("free now")
    );
    assert_eq!(
        b.allocation_of("priority", "acme#dev").await.expect("of"),
        None
    );
}

pub(crate) async fn a_commit_is_all_or_nothing<H: Harness>(h: &H) {
    let b = h.backend();
    b.send(vec![step_message("input")]).await.expect("send");
    let input = receive_all(h, QueueKind::Steps).await.remove(0);
    let (_, write) = first_write("acme", Environment::Dev);
    let results = b
        .commit(vec![Commit {
            write: Some(write.clone()),
            send: vec![event_message("acme#dev", "out-1", "output")],
            ack: Some((QueueKind::Steps, input.receipt.clone())),
            claim: None,
        }])
        .await;
    assert!(results[0].is_ok(), "{results:?}");
    let out = receive_all(h, QueueKind::Events).await;
    assert_eq!(bodies(&out), ["output"]);
    h.advance(h.visibility() + Duration::from_secs(1)).await;
    assert!(
        receive_all(h, QueueKind::Steps).await.is_empty(),
        "the input was acknowledged"
    );
    // The same write again conflicts: nothing is sent, nothing acknowledged.
    b.send(vec![step_message("input-2")]).await.expect("send");
    let input2 = receive_all(h, QueueKind::Steps).await.remove(0);
    let results = b
        .commit(vec![Commit {
            write: Some(write),
            send: vec![event_message("acme#dev", "out-2", "must not be sent")],
            ack: Some((QueueKind::Steps, input2.receipt.clone())),
            claim: None,
        }])
        .await;
    assert!(matches!(results[0], Err(WriteError::Conflict { .. })));
    b.ack(
        QueueKind::Events,
        out.iter().map(|d| d.receipt.clone()).collect(),
    )
    .await
    .expect("ack");
    h.advance(h.visibility() + Duration::from_secs(1)).await;
    assert!(receive_all(h, QueueKind::Events).await.is_empty());
    assert_eq!(
        bodies(&receive_all(h, QueueKind::Steps).await),
        ["input-2"],
        "not acknowledged"
    );
}

pub(crate) async fn commits_of_a_batch_succeed_or_fail_alone<H: Harness>(h: &H) {
    let b = h.backend();
    let (_, taken) = first_write("acme", Environment::Dev);
    b.write(taken.clone()).await.expect("first");
    let mut commits = vec![Commit {
        write: Some(taken),
        send: vec![step_message("conflicting")],
        ack: None,
        claim: None,
    }];
    for tenant in ["t-one", "t-two", "t-three"] {
        let (_, w) = first_write(tenant, Environment::Dev);
        commits.push(Commit {
            write: Some(w),
            send: vec![step_message(tenant)],
            ack: None,
            claim: None,
        });
    }
    let results = b.commit(commits).await;
    assert!(matches!(results[0], Err(WriteError::Conflict { .. })));
    assert!(results[1..].iter().all(Result::is_ok), "{results:?}");
    assert_eq!(
        bodies(&receive_all(h, QueueKind::Steps).await),
        ["t-one", "t-three", "t-two"]
    );
}

pub(crate) async fn claimed_messages_are_delivered_once<H: Harness>(h: &H) {
    let b = h.backend();
    let (_, write) = first_write("acme", Environment::Dev);
    let mut delayed = step_message("later");
    delayed.delay = Duration::from_secs(5);
    let results = b
        .commit(vec![Commit {
            write: Some(write),
            send: vec![
                step_message("next"),
                delayed,
                event_message("acme#dev", "c-1", "event"),
            ],
            ack: None,
            claim: Some(h.visibility()),
        }])
        .await;
    let claimed = match &results[0] {
        Ok(c) => c.clone(),
        Err(e) => panic!("commit: {e}"),
    };
    // A journal may claim the undelayed step message (and nothing else), or claim nothing.
    assert!(claimed.len() <= 1, "{claimed:?}");
    let received = receive_all(h, QueueKind::Steps).await;
    let mut got: Vec<_> = claimed.iter().chain(&received).cloned().collect();
    assert_eq!(bodies(&got), ["next"], "the undelayed step message, once");
    assert_eq!(bodies(&receive_all(h, QueueKind::Events).await), ["event"]);
    let next = got.remove(0);
    let failed = b
        .ack(QueueKind::Steps, vec![next.receipt.clone()])
        .await
        .expect("ack");
    assert!(failed.is_empty(), "a claimed receipt acknowledges");
    h.advance(Duration::from_secs(6)).await;
    assert_eq!(bodies(&receive_all(h, QueueKind::Steps).await), ["later"]);
}

const TTL: Duration = Duration::from_secs(60);

/// Asks for an image slot for `tenant`'s `env` (run 1); its wake message names it.
async fn acquire<H: Harness>(h: &H, tenant: &str, env: Environment, cap: u32) -> SlotGrant {
    acquire_woken(h, tenant, env, cap).await.0
}

async fn acquire_woken<H: Harness>(
    h: &H,
    tenant: &str,
    env: Environment,
    cap: u32,
) -> (SlotGrant, Vec<String>) {
    let k = key(tenant, env);
    let holder = format!("{k}/r1");
    let (grant, woken) = h
        .backend()
        .acquire_slot(
            "image",
            &k,
            &holder,
            cap,
            TTL,
            format!("wake {holder}").as_bytes(),
        )
        .await
        .expect("acquire");
    (grant, names(woken))
}

fn names(woken: Vec<Vec<u8>>) -> Vec<String> {
    woken
        .into_iter()
        .map(|w| String::from_utf8(w).expect("utf-8"))
        .collect()
}

async fn release<H: Harness>(h: &H, holder: &str, cap: u32) -> Vec<String> {
    names(
        h.backend()
            .release_slot("image", holder, cap, TTL)
            .await
            .expect("release"),
    )
}

fn holders(view: &[orchestrator::ports::SlotEntry]) -> Vec<&str> {
    view.iter().map(|e| e.holder.as_str()).collect()
}

pub(crate) async fn slots_are_capped_and_served_in_rounds<H: Harness>(h: &H) {
    use Environment::{Dev, Production, Staging};
    let b = h.backend();
    let held = |g: SlotGrant| matches!(g, SlotGrant::Held { .. });
    assert!(held(acquire(h, "aaa", Dev, 2).await));
    h.advance(Duration::from_millis(5)).await;
    assert!(held(acquire(h, "bbb", Dev, 2).await));
    h.advance(Duration::from_millis(5)).await;
    assert_eq!(
        acquire(h, "ccc", Dev, 2).await,
        SlotGrant::Waiting { ahead: 0 }
    );
    h.advance(Duration::from_millis(5)).await;
    assert_eq!(
        acquire(h, "ddd", Dev, 2).await,
        SlotGrant::Waiting { ahead: 1 }
    );
    // Renewing keeps the lease and its grant time.
    let SlotGrant::Held { since } = acquire(h, "aaa", Dev, 2).await else {
        panic!("aaa's lease is renewed");
    };
    h.advance(Duration::from_millis(5)).await;
    // Tenant aaa holds one already: its second workflow is in round 1, behind eee's first.
    assert_eq!(
        acquire(h, "aaa", Staging, 2).await,
        SlotGrant::Waiting { ahead: 2 }
    );
    h.advance(Duration::from_millis(5)).await;
    assert_eq!(
        acquire(h, "eee", Dev, 2).await,
        SlotGrant::Waiting { ahead: 2 }
    );
    h.advance(Duration::from_millis(5)).await;
    assert_eq!(
        acquire(h, "aaa", Production, 2).await,
        SlotGrant::Waiting { ahead: 4 },
        "round 2: behind everyone"
    );
    let view = b.slots("image").await.expect("slots");
    assert_eq!(holders(&view.held), ["aaa#dev/r1", "bbb#dev/r1"]);
    assert_eq!(view.held[0].since, since);
    assert_eq!(
        holders(&view.waiting),
        [
            "ccc#dev/r1",
            "ddd#dev/r1",
            "eee#dev/r1",
            "aaa#staging/r1",
            "aaa#production/r1"
        ]
    );
    // Another kind is counted apart.
    let k = key("zzz", Dev);
    assert!(held(
        b.acquire_slot("database", &k, "zzz#dev/r1", 1, TTL, b"z")
            .await
            .expect("other kind")
            .0
    ));

    // A freed slot goes to the head of the line at once, and its wake message comes back
    // for the caller to send.
    assert_eq!(release(h, "aaa#dev/r1", 2).await, ["wake ccc#dev/r1"]);
    let view = b.slots("image").await.expect("slots");
    assert_eq!(holders(&view.held), ["bbb#dev/r1", "ccc#dev/r1"]);
    assert!(held(acquire(h, "ccc", Dev, 2).await), "woken, it holds");
    assert_eq!(
        acquire(h, "ddd", Dev, 2).await,
        SlotGrant::Waiting { ahead: 0 }
    );
    // Leaving the line lets the next move up; releasing what is not held does nothing.
    assert!(release(h, "ddd#dev/r1", 2).await.is_empty());
    assert!(release(h, "nobody#dev/r1", 2).await.is_empty());
    assert_eq!(release(h, "bbb#dev/r1", 2).await, ["wake eee#dev/r1"]);
    let view = b.slots("image").await.expect("slots");
    assert_eq!(holders(&view.held), ["ccc#dev/r1", "eee#dev/r1"]);
    assert_eq!(
        holders(&view.waiting),
        ["aaa#staging/r1", "aaa#production/r1"]
    );
    // A larger cap frees two at once, granted in line order by whoever asks next: fff, a
    // first round newcomer, goes before aaa's second workflow, which is woken.
    let (grant, woken) = acquire_woken(h, "fff", Dev, 4).await;
    assert!(held(grant));
    assert_eq!(woken, ["wake aaa#staging/r1"]);
    let view = b.slots("image").await.expect("slots");
    assert_eq!(holders(&view.waiting), ["aaa#production/r1"]);
}

pub(crate) async fn slot_leases_lapse_unless_renewed<H: Harness>(h: &H) {
    use Environment::Dev;
    let b = h.backend();
    assert!(matches!(
        acquire(h, "aaa", Dev, 1).await,
        SlotGrant::Held { .. }
    ));
    assert_eq!(
        acquire(h, "bbb", Dev, 1).await,
        SlotGrant::Waiting { ahead: 0 }
    );
    assert_eq!(
        acquire(h, "ccc", Dev, 1).await,
        SlotGrant::Waiting { ahead: 1 }
    );
    // bbb keeps its place by asking; aaa (a dead worker's lease) and ccc do not renew.
    h.advance(Duration::from_secs(40)).await;
    assert_eq!(
        acquire(h, "bbb", Dev, 1).await,
        SlotGrant::Waiting { ahead: 0 }
    );
    h.advance(Duration::from_secs(30)).await;
    let view = b.slots("image").await.expect("slots");
    assert!(view.held.is_empty(), "aaa's lease lapsed: {view:?}");
    assert_eq!(holders(&view.waiting), ["bbb#dev/r1"]);
    // The next request finds the lapsed slot free: bbb asks and takes it.
    assert!(matches!(
        acquire(h, "bbb", Dev, 1).await,
        SlotGrant::Held { .. }
    ));
    // ccc comes back after its place lapsed: at the end of the line again.
    assert_eq!(
        acquire(h, "ccc", Dev, 1).await,
        SlotGrant::Waiting { ahead: 0 }
    );
}
