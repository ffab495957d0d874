//! The DynamoDB adapter of the `Store` port on moto: what only DynamoDB shows (start-up
//! errors, conflicts reporting the version found, consumed capacity, pagination over several
//! pages). The conformance suite runs on the whole AWS backend in `aws_backend.rs`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use crate::conformance::{first_write, key, tenant};
use orchestrator::aws::dynamo::{self, DynamoStore};
use orchestrator::aws::{Names, RequestCounter};
use orchestrator::ports::{Error, RecordWrite, Store, WorkflowFilter, WriteError};
use testkit::moto::Moto;
use workflows::{Environment, EventId, State, TenantId, Timestamp, WorkflowKey, WorkflowRecord};

static PREFIXES: AtomicUsize = AtomicUsize::new(0);

/// Fresh tables on `moto` and a store connected to them.
async fn store(moto: &Moto) -> (DynamoStore, RequestCounter, Names) {
    let names = Names::new(&format!("t{}", PREFIXES.fetch_add(1, Ordering::Relaxed)));
    let sdk = moto.sdk_config();
    let counter = RequestCounter::new();
    dynamo::create_tables(&dynamo::client(&sdk, &counter), &names)
        .await
        .expect("create tables");
    let store = DynamoStore::connect(&sdk, &names, &counter)
        .await
        .expect("connect");
    (store, counter, names)
}

#[tokio::test]
async fn a_missing_table_is_one_clear_error_at_start_up() {
    let moto = Moto::start().await;
    let sdk = moto.sdk_config();
    let names = Names::new("absent");
    match DynamoStore::connect(&sdk, &names, &RequestCounter::new()).await {
        Err(Error::Invalid { what: message, .. }) => {
            assert!(
                message.contains("table absent-workflows does not exist")
                    && message.contains("orchestrator init"),
                "{message}"
            );
        }
        other => panic!("expected a clear error, got {other:?}"),
    }
    // Once created, it connects; creating again changes nothing.
    let client = dynamo::client(&sdk, &RequestCounter::new());
    dynamo::create_tables(&client, &names)
        .await
        .expect("create");
    dynamo::create_tables(&client, &names)
        .await
        .expect("again: idempotent");
    DynamoStore::connect(&sdk, &names, &RequestCounter::new())
        .await
        .expect("connect");
}

#[tokio::test]
async fn a_table_without_its_index_is_refused() {
    let moto = Moto::start().await;
    let sdk = moto.sdk_config();
    let names = Names::new("bare");
    let client = dynamo::client(&sdk, &RequestCounter::new());
    dynamo::create_tables(&client, &names)
        .await
        .expect("create");
    client
        .delete_table()
        .table_name(&names.workflows_table)
        .send()
        .await
        .expect("delete");
    client
        .create_table()
        .table_name(&names.workflows_table)
        .billing_mode(aws_sdk_dynamodb::types::BillingMode::PayPerRequest)
        .attribute_definitions(
            aws_sdk_dynamodb::types::AttributeDefinition::builder()
                .attribute_name("key")
                .attribute_type(aws_sdk_dynamodb::types::ScalarAttributeType::S)
                .build()
                .expect("attribute"),
        )
        .key_schema(
            aws_sdk_dynamodb::types::KeySchemaElement::builder()
                .attribute_name("key")
                .key_type(aws_sdk_dynamodb::types::KeyType::Hash)
                .build()
                .expect("key"),
        )
        .send()
        .await
        .expect("create without the index");
    match DynamoStore::connect(&sdk, &names, &RequestCounter::new()).await {
        Err(Error::Invalid { what: message, .. }) => assert!(
            message.contains("bare-workflows") && message.contains("by_state"),
            "{message}"
        ),
        other => panic!("expected a clear error, got {other:?}"),
    }
}

/// The write that takes `record` (at some version) one transition further.
/// Requests of `operation` counted so far.
fn requests(counter: &RequestCounter, operation: &str) -> u64 {
    counter
        .snapshot()
        .iter()
        .filter(|c| c.operation == operation)
        .map(|c| c.count)
        .sum()
}

fn next_write(record: &mut WorkflowRecord, n: u64) -> RecordWrite {
    let event = workflows::Event::Signal {
        event_id: EventId::new(format!("sig-{n}")).expect("id"),
        signal: workflows::Signal::Cancel,
        actor: "ops".into(),
    };
    let applied = record.apply(
        &event,
        workflows::Input {
            now: Timestamp::from_unix_millis(5_000 + i64::try_from(n).expect("small")),
            settings: Default::default(),
        },
    );
    let entry = record.history_entry(&event, &applied);
    RecordWrite::new(record, &entry)
}

#[tokio::test]
async fn a_conflict_reports_the_version_found() {
    let moto = Moto::start().await;
    let (store, counter, _) = store(&moto).await;
    let (mut record, first) = first_write("acme", Environment::Dev);
    store.write(first.clone()).await.expect("v1");
    let second = next_write(&mut record, 2);
    store.write(second.clone()).await.expect("v2");
    let before = counter.total();
    for (write, expected) in [(first, 0), (second, 1)] {
        match store.write(write).await {
            Err(WriteError::Conflict {
                key: k,
                expected: e,
                found,
            }) => {
                assert_eq!(k, key("acme", Environment::Dev));
                assert_eq!((e, found), (expected, 2));
            }
            other => panic!("expected a conflict, got {other:?}"),
        }
    }
    assert_eq!(
        counter.total() - before,
        2,
        "the version found comes with the failed write: no extra read"
    );
    // Expecting a version of a workflow that has none: found 0.
    let (_, mut ghost) = first_write("ghost", Environment::Dev);
    ghost.expected_version = 4;
    ghost.version = 5;
    match store.write(ghost).await {
        Err(WriteError::Conflict { found, .. }) => assert_eq!(found, 0),
        other => panic!("expected a conflict, got {other:?}"),
    }
    // A failed write changed nothing.
    let history = store
        .history(&key("acme", Environment::Dev), 0, 10)
        .await
        .expect("history");
    assert_eq!(
        history.iter().map(|e| e.version).collect::<Vec<_>>(),
        [1, 2]
    );
    assert!(
        store
            .workflow(&key("ghost", Environment::Dev))
            .await
            .expect("get")
            .is_none()
    );
}

#[tokio::test]
async fn consumed_write_capacity_is_counted() {
    let moto = Moto::start().await;
    let (store, counter, _) = store(&moto).await;
    assert_eq!(store.consumed_wcu(), 0.0);
    let (_, write) = first_write("acme", Environment::Dev);
    let kib = |b: usize| b.div_ceil(1024).max(1) as f64;
    // Two items, each at least 2 units (transactional writes cost double).
    let at_least = 2.0 * kib(write.record.len()) + 2.0 * kib(write.history.len());
    store.write(write).await.expect("write");
    let after_one = store.consumed_wcu();
    assert!(after_one >= at_least, "{after_one} < {at_least}");
    assert!(after_one <= at_least + 4.0, "{after_one}");
    store
        .mark_corrupt(&key("acme", Environment::Dev), "test")
        .await
        .expect("mark");
    assert!(store.consumed_wcu() > after_one);
    let counts: BTreeMap<String, u64> = counter
        .snapshot()
        .into_iter()
        .filter(|c| c.service == "DynamoDB")
        .map(|c| (c.operation, c.count))
        .collect();
    assert_eq!(counts.get("TransactWriteItems"), Some(&1), "{counts:?}");
    assert_eq!(counts.get("UpdateItem"), Some(&1), "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_follow_pages_past_one_request() {
    let moto = Moto::start().await;
    let (store, counter, _) = store(&moto).await;
    // Pages of at most 7 items a request, so every listing needs several.
    let store = store.with_page_size(7);
    let started = Instant::now();
    let mut keys = Vec::new();
    for i in 0..150 {
        let (_, write) = first_write(&format!("tenant-{i:03}"), Environment::Staging);
        keys.push(write.key.to_string());
        store.write(write).await.expect("write");
    }
    keys.sort();
    eprintln!("150 writes: {:?}", started.elapsed());
    // Pages of 40, following the last key, with and without the state filter.
    for filter in [
        WorkflowFilter::default(),
        WorkflowFilter {
            state: Some(State::Preparing),
            ..WorkflowFilter::default()
        },
        WorkflowFilter {
            env: Some(Environment::Staging),
            ..WorkflowFilter::default()
        },
    ] {
        let mut seen = Vec::new();
        let mut after: Option<WorkflowKey> = None;
        let queries = requests(&counter, "Query");
        loop {
            let page = store
                .workflows(&filter, after.as_ref(), 40)
                .await
                .expect("page");
            assert!(page.len() <= 40);
            let Some(last) = page.last() else { break };
            after = Some(last.key.clone());
            seen.extend(page.into_iter().map(|s| s.key.to_string()));
        }
        assert_eq!(seen, keys, "{filter:?}");
        assert!(
            requests(&counter, "Query") - queries >= 150 / 7,
            "followed LastEvaluatedKey"
        );
    }
    let all = store
        .workflows(&WorkflowFilter::default(), None, 1000)
        .await
        .expect("all");
    assert_eq!(all.len(), 150);
    let none = WorkflowFilter {
        updated_before: Some(Timestamp::from_unix_millis(1)),
        ..WorkflowFilter::default()
    };
    assert!(
        store
            .workflows(&none, None, 10)
            .await
            .expect("none")
            .is_empty()
    );
    let mine = WorkflowFilter {
        tenant: Some(TenantId::new("tenant-007").expect("id")),
        state: Some(State::Preparing),
        ..WorkflowFilter::default()
    };
    let got = store.workflows(&mine, None, 10).await.expect("by tenant");
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].key.to_string(), "tenant-007#staging");
    assert_eq!(
        requests(&counter, "Scan"),
        0,
        "listing workflows never scans"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_follows_pages_past_one_request() {
    let moto = Moto::start().await;
    let (store, counter, _) = store(&moto).await;
    let store = store.with_page_size(7);
    let k = key("acme", Environment::Production);
    let (mut record, first) = first_write("acme", Environment::Production);
    store.write(first).await.expect("v1");
    let started = Instant::now();
    for n in 2..=120 {
        store
            .write(next_write(&mut record, n))
            .await
            .expect("write");
    }
    eprintln!("119 writes: {:?}", started.elapsed());
    let queries = requests(&counter, "Query");
    let all = store.history(&k, 0, 1000).await.expect("all");
    assert!(
        requests(&counter, "Query") - queries >= 120 / 7,
        "followed LastEvaluatedKey"
    );
    assert_eq!(
        all.iter().map(|e| e.version).collect::<Vec<_>>(),
        (1..=120).collect::<Vec<_>>()
    );
    let mut seen = Vec::new();
    let mut after = 0;
    loop {
        let page = store.history(&k, after, 50).await.expect("page");
        let Some(last) = page.last() else { break };
        after = last.version;
        seen.extend(page.iter().map(|e| e.version));
    }
    assert_eq!(seen, (1..=120).collect::<Vec<_>>());
    assert_eq!(store.history(&k, 100, 5).await.expect("range").len(), 5);
    // The oldest entry is many pages back from the newest.
    let oldest = &all[0];
    let found = store
        .history_of_event(&k, &oldest.event.id())
        .await
        .expect("by event")
        .expect("found");
    assert_eq!(found.version, 1);
    let newest = store
        .history_of_event(&k, &EventId::new("sig-120").expect("id"))
        .await
        .expect("by event")
        .expect("found");
    assert_eq!(newest.version, 120);
    assert!(
        store
            .history_of_event(&k, &EventId::new("never").expect("id"))
            .await
            .expect("by event")
            .is_none()
    );
}

#[tokio::test]
async fn tenants_move_their_projects_and_list_past_one_page() {
    let moto = Moto::start().await;
    let (store, counter, _) = store(&moto).await;
    let store = store.with_page_size(7);
    let acme = tenant("acme", 11, 12);
    store.put_tenant(&acme, true).await.expect("create");
    // acme moves its app repository to project 13: 12 is free again.
    let mut moved = acme.clone();
    moved.app_project = 13;
    store.put_tenant(&moved, false).await.expect("update");
    assert!(store.tenant_by_project(12).await.expect("get").is_none());
    assert_eq!(
        store
            .tenant_by_project(13)
            .await
            .expect("get")
            .map(|t| t.id.to_string()),
        Some("acme".to_owned())
    );
    store
        .put_tenant(&tenant("globex", 12, 21), true)
        .await
        .expect("12 is free");
    match store.put_tenant(&tenant("initech", 31, 13), true).await {
        Err(Error::AlreadyExists(what)) => {
            assert!(what.contains("13") && what.contains("acme"), "{what}")
        }
        other => panic!("expected AlreadyExists, got {other:?}"),
    }
    assert!(matches!(
        store.put_tenant(&tenant("same", 40, 40), true).await,
        Err(Error::Invalid { .. })
    ));
    // A failed create left nothing behind.
    assert!(store.tenant_by_project(31).await.expect("get").is_none());
    for i in 0..30 {
        store
            .put_tenant(
                &tenant(&format!("t{i:02}"), 1000 + 2 * i, 1001 + 2 * i),
                true,
            )
            .await
            .expect("create");
    }
    let ids: Vec<String> = store
        .tenants()
        .await
        .expect("list")
        .into_iter()
        .map(|t| t.id.to_string())
        .collect();
    assert_eq!(ids.len(), 32);
    assert!(
        requests(&counter, "Scan") > 32 / 7,
        "followed LastEvaluatedKey"
    );
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
}

#[tokio::test]
async fn allocations_are_one_value_per_owner() {
    let moto = Moto::start().await;
    let (store, _, _) = store(&moto).await;
    assert!(
        store
            .allocate("priority", 7, "acme#dev")
            .await
            .expect("take")
    );
    assert!(
        !store
            .allocate("priority", 8, "acme#dev")
            .await
            .expect("second"),
        "an owner holds one value of a pool"
    );
    assert!(
        store
            .allocate("other-pool", 8, "acme#dev")
            .await
            .expect("other pool"),
        "pools are separate"
    );
    assert!(
        store
            .allocate("priority", 8, "globex#dev")
            .await
            .expect("8 is free")
    );
    store
        .release("priority", 8, "acme#dev")
        .await
        .expect("not its own");
    assert_eq!(
        store
            .allocation_of("priority", "globex#dev")
            .await
            .expect("of"),
        Some(8)
    );
    store
        .release("priority", 7, "acme#dev")
        .await
        .expect("release");
    assert!(
        store
            .allocate("priority", 9, "acme#dev")
            .await
            .expect("free to move")
    );
    assert_eq!(
        store
            .allocation_of("priority", "acme#dev")
            .await
            .expect("of"),
        Some(9)
    );
}

/// A tenant written before domains had pointer items (a tenant item alone) still holds its
/// domain: a new tenant with it is refused, naming the holder.
#[tokio::test]
async fn a_tenant_from_before_domain_pointers_keeps_its_domain() {
    use aws_sdk_dynamodb::types::AttributeValue;
    let moto = Moto::start().await;
    let (store, counter, names) = store(&moto).await;
    let acme = tenant("acme", 11, 12);
    let client = dynamo::client(&moto.sdk_config(), &counter);
    client
        .put_item()
        .table_name(&names.tenants_table)
        .item("pk", AttributeValue::S("tenant#acme".into()))
        .item(
            "record",
            AttributeValue::S(String::from_utf8(workflows::encode(&acme)).expect("utf-8")),
        )
        .item("infra_project", AttributeValue::N("11".into()))
        .item("app_project", AttributeValue::N("12".into()))
        .send()
        .await
        .expect("an old-style tenant item");
    let mut umbrella = tenant("umbrella", 21, 22);
    umbrella.domain = acme.domain.clone();
    match store.put_tenant(&umbrella, true).await {
        Err(Error::AlreadyExists(what)) => assert!(what.contains("tenant acme"), "{what}"),
        other => panic!("the old tenant's domain was taken: {other:?}"),
    }
    // Rewriting the old tenant gives it its pointer.
    store.put_tenant(&acme, false).await.expect("rewrite");
    let owner = store.tenant_by_domain(&acme.domain).await.expect("get");
    assert_eq!(owner.map(|t| t.id.to_string()), Some("acme".to_owned()));
}
