//! `wfctl dlq` on a backend with an engine: dead letters of every kind are assessed, redriven
//! or discarded, and redrive never applies an event twice, even one that has left the record's
//! deduplication window.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use orchestrator::clock::{Clock, SharedClock, SystemClock};
use orchestrator::engine::{enqueue, outgoing};
use orchestrator::ports::{Journal, Outgoing, Queue, QueueKind, Store};
use serde_json::Value;
use wfctl::dlq::{self, Selection};
use wfctl::output::{Format, Printer};
use workflows::{
    Body, Command, DEDUP_WINDOW, Envelope, Environment, Event, EventId, RepoKind, Signal, State,
    TenantId, Timestamp, WorkflowKey,
};

use testkit::fixtures::{push, tenant};
use testkit::live::{retried, start};

/// Runs a `wfctl dlq` command function with JSON output and returns what it printed (stdout
/// parsed, stderr as text) and its result.
async fn json<F, T>(f: F) -> (Value, String, Result<(), wfctl::Error>)
where
    F: AsyncFnOnce(&mut Printer<'_>) -> Result<T, wfctl::Error>,
{
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let result = {
        let mut p = Printer::new(Format::Json, false, SystemClock.now(), &mut out, &mut err);
        f(&mut p).await.map(|_| ())
    };
    let value = serde_json::from_slice(&out).unwrap_or(Value::Null);
    (value, String::from_utf8_lossy(&err).into_owned(), result)
}

async fn until<F: AsyncFnMut() -> bool>(what: &str, mut check: F) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every history entry of `key`.
async fn history<S: Store>(store: &S, key: &WorkflowKey) -> Vec<workflows::HistoryEntry> {
    retried(async || store.history(key, 0, usize::MAX).await).await
}

/// The scenario. With `evict`, more than a deduplication window of events follows the first
/// push, so that only the history knows it was applied (one FIFO group's 65 events take about
/// a minute on moto, so the AWS test leaves that to the SQLite one).
async fn dead_letters_are_assessed_redriven_and_never_applied_twice<B>(stack: Arc<B>, evict: bool)
where
    B: Queue + Store + Journal,
{
    let clock: SharedClock = Arc::new(SystemClock);
    retried(async || stack.put_tenant(&tenant("acme", 1, 2), true).await).await;
    let acme = WorkflowKey::new(TenantId::new("acme").expect("id"), Environment::Dev);
    let ghost = WorkflowKey::new(TenantId::new("ghost").expect("id"), Environment::Dev);

    // acme#dev goes live; then more than a deduplication window of refused signals pushes
    // the first app push out of the record's window.
    let first_app = push("p-app-1", RepoKind::App, 2, clock.now());
    for event in [
        push("p-infra-1", RepoKind::Infra, 1, clock.now()),
        first_app.clone(),
    ] {
        retried(async || enqueue(&*stack, &acme, event.clone(), clock.now()).await).await;
    }
    let engine = start(&stack, &clock);
    until("acme#dev live", async || {
        matches!(stack.workflow(&acme).await, Ok(Some(r)) if r.state() == State::Live
            && r.workflow().deployed.as_ref().is_some_and(|d| d.release.app.is_some() && d.release.infra.is_some()))
    })
    .await;
    let signals: Vec<Outgoing> = (0..=if evict { DEDUP_WINDOW } else { 0 })
        .map(|i| {
            let event = Event::Signal {
                event_id: EventId::new(format!("approve-{i}")).expect("id"),
                signal: Signal::Approve,
                actor: "test".into(),
            };
            outgoing_event(&acme, event, &format!("approve-{i}"), clock.now())
        })
        .collect();
    for chunk in signals.chunks(10) {
        retried(async || stack.send(chunk.to_vec()).await).await;
    }
    until("the signals applied", async || {
        matches!(stack.workflow(&acme).await, Ok(Some(r)) if r.has_applied(&first_app.id()) != evict
            && r.has_applied(&EventId::new(format!("approve-{}", signals.len() - 1)).expect("id")))
    })
    .await;
    engine.stop().await;
    let before = retried(async || stack.workflow(&acme).await)
        .await
        .expect("acme#dev");

    // Four dead letters: the applied push again, a push for a tenant not registered yet,
    // garbage, and a step message of the finished first run.
    let first_run_step = history(&*stack, &acme)
        .await
        .into_iter()
        .flat_map(|e| e.commands)
        .find(|c| matches!(c, Command::RunStep(_)))
        .expect("a step of the first run");
    let mut garbage = outgoing_event(&acme, first_app.clone(), "garbage", clock.now());
    garbage.body = b"{\"not\": \"an envelope\"}".to_vec();
    let mut messages = vec![
        outgoing_event(&acme, first_app.clone(), "p-app-1-again", clock.now()),
        outgoing_event(
            &ghost,
            push("ghost-app-1", RepoKind::App, 7, clock.now()),
            "ghost-app-1",
            clock.now(),
        ),
        garbage,
    ];
    messages.extend(outgoing(&acme, &[first_run_step], clock.now()));
    let sent = messages.len();
    retried(async || stack.send(messages.clone()).await).await;
    let mut quarantined = 0;
    until("four messages quarantined", async || {
        for q in QueueKind::ALL {
            let got = retried(async || {
                stack
                    .receive(q, 10, Duration::from_secs(30), Duration::from_millis(200))
                    .await
            })
            .await;
            for d in got {
                retried(async || stack.quarantine(&d, "poison for the test").await).await;
                quarantined += 1;
            }
        }
        quarantined == sent
    })
    .await;

    // `list` tells what each one is.
    let queues = dlq::queues(None);
    let (listed, _, result) =
        json(async |p| dlq::list(&*stack, &*stack, &queues, 100, p).await).await;
    result.expect("list");
    let rows = listed.as_array().expect("array").clone();
    assert_eq!(rows.len(), 4, "{listed:#}");
    let row = |message: &str, workflow: &str| {
        rows.iter()
            .find(|r| r["message"] == message && r["workflow"] == workflow)
            .unwrap_or_else(|| panic!("no {message} of {workflow} in {listed:#}"))
            .clone()
    };
    let applied = row("push", "acme#dev");
    assert_eq!(applied["status"], "applied", "{applied:#}");
    assert_eq!(applied["event_id"], "p-app-1");
    assert_eq!(applied["queue"], "events");
    assert_eq!(applied["reason"], "poison for the test");
    assert!(
        applied["status_detail"]
            .as_str()
            .is_some_and(|s| s.contains("applied at version")),
        "{applied:#}"
    );
    let pending = row("push", "ghost#dev");
    assert_eq!(pending["status"], "pending", "{pending:#}");
    let undecodable = row("undecodable", "acme#dev");
    assert_eq!(undecodable["status"], "undecodable");
    let stale = row("step", "acme#dev");
    assert_eq!(stale["status"], "stale", "{stale:#}");
    assert_eq!(stale["queue"], "steps");
    for r in &rows {
        for field in ["id", "summary", "receive_count", "sent_at", "dead_at"] {
            assert!(!r[field].is_null(), "{field} in {r:#}");
        }
    }

    // `show` gives the envelope, or the raw body of one that does not decode.
    let id = |r: &Value| r["id"].as_str().expect("id").to_owned();
    let (shown, _, result) =
        json(async |p| dlq::show(&*stack, &*stack, &queues, &id(&applied), p).await).await;
    result.expect("show");
    assert_eq!(
        shown["envelope"]["body"]["event"]["push"]["event_id"], "p-app-1",
        "{shown:#}"
    );
    let (shown, _, result) =
        json(async |p| dlq::show(&*stack, &*stack, &queues, &id(&undecodable), p).await).await;
    result.expect("show");
    assert_eq!(shown["raw"], "{\"not\": \"an envelope\"}", "{shown:#}");
    let (_, _, result) =
        json(async |p| dlq::show(&*stack, &*stack, &queues, "no-such-id", p).await).await;
    let e = result.expect_err("unknown id");
    assert!(
        e.to_string().contains(&id(&applied)),
        "lists what exists: {e}"
    );
    // Unknown ids: nothing is moved.
    let (_, _, result) = json(async |p| {
        dlq::redrive(
            &*stack,
            &*stack,
            &queues,
            &Selection::Ids(vec![id(&pending), "nope".into()]),
            p,
        )
        .await
    })
    .await;
    assert!(result.expect_err("unknown id").to_string().contains("nope"));
    assert_eq!(dead(&*stack).await, 4, "nothing moved");

    // The cause is fixed (ghost registered); redrive everything.
    retried(async || stack.put_tenant(&tenant("ghost", 3, 4), true).await).await;
    let (outcomes, _, result) =
        json(async |p| dlq::redrive(&*stack, &*stack, &queues, &Selection::All, p).await).await;
    result.expect("redrive");
    let action: BTreeMap<String, String> = outcomes
        .as_array()
        .expect("array")
        .iter()
        .map(|o| {
            (
                o["id"].as_str().unwrap_or_default().to_owned(),
                o["action"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        action.get(&id(&applied)).map(String::as_str),
        Some("discarded"),
        "{outcomes:#}"
    );
    for r in [&pending, &undecodable, &stale] {
        assert_eq!(
            action.get(&id(r)).map(String::as_str),
            Some("redriven"),
            "{outcomes:#}"
        );
    }

    let engine = start(&stack, &clock);
    until(
        "ghost's push applied and the garbage quarantined again",
        async || matches!(stack.workflow(&ghost).await, Ok(Some(_))) && dead(&*stack).await == 1,
    )
    .await;
    // Let the stale step message be handled (it is dropped without a history entry).
    until("the queues drained", async || {
        let mut busy = 0;
        for q in QueueKind::ALL {
            let s = retried(async || stack.stats(q).await).await;
            busy += s.visible + s.in_flight + s.delayed;
        }
        busy == 0
    })
    .await;
    engine.stop().await;

    let after = retried(async || stack.workflow(&acme).await)
        .await
        .expect("acme#dev");
    assert_eq!(after.version, before.version, "acme#dev did not change");
    let applications = history(&*stack, &acme)
        .await
        .iter()
        .filter(|e| e.event.id() == first_app.id())
        .count();
    assert_eq!(applications, 1, "the applied push was not applied again");
    let ghost_pushes = history(&*stack, &ghost)
        .await
        .iter()
        .filter(|e| e.event.id().as_str() == "ghost-app-1")
        .count();
    assert_eq!(ghost_pushes, 1, "the redriven push was applied once");

    // The garbage came back; discard it for good.
    let (listed, _, _) = json(async |p| dlq::list(&*stack, &*stack, &queues, 100, p).await).await;
    assert_eq!(listed[0]["message"], "undecodable", "{listed:#}");
    let garbage_id = id(&listed[0]);
    let (outcomes, _, result) = json(async |p| {
        dlq::discard(
            &*stack,
            &*stack,
            &queues,
            &Selection::Ids(vec![garbage_id.clone()]),
            p,
        )
        .await
    })
    .await;
    result.expect("discard");
    assert_eq!(outcomes[0]["action"], "discarded", "{outcomes:#}");
    assert_eq!(dead(&*stack).await, 0);
    let (listed, note, _) =
        json(async |p| dlq::list(&*stack, &*stack, &queues, 100, p).await).await;
    assert_eq!(listed, serde_json::json!([]), "{note}");
}

/// How many dead letters there are, in both queues.
async fn dead<Q: Queue>(queue: &Q) -> usize {
    let mut n = 0;
    for q in QueueKind::ALL {
        n += retried(async || queue.dead_letters(q, usize::MAX).await)
            .await
            .len();
    }
    n
}

/// `event` for `key` as the events queue carries it, under deduplication id `dedup`.
fn outgoing_event(key: &WorkflowKey, event: Event, dedup: &str, now: Timestamp) -> Outgoing {
    let envelope = Envelope::new(key.clone(), now, Body::Event(event));
    Outgoing {
        queue: QueueKind::Events,
        group: Some(key.to_string()),
        dedup_id: Some(dedup.to_owned()),
        delay: Duration::ZERO,
        body: workflows::encode(&envelope),
        attributes: BTreeMap::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_redriven_without_applying_an_event_twice() {
    let dir = tempfile::tempdir().expect("tempdir");
    let backend = orchestrator::sqlite::SqliteBackend::open(
        orchestrator::sqlite::SqliteConfig::new(dir.path().join("o.sqlite")),
    )
    .expect("open");
    dead_letters_are_assessed_redriven_and_never_applied_twice(Arc::new(backend), true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_redriven_without_applying_an_event_twice_on_sqs() {
    let moto = testkit::moto::Moto::start().await;
    let (stack, _) = moto.stack("test", 3).await;
    dead_letters_are_assessed_redriven_and_never_applied_twice(Arc::new(stack), false).await;
}
