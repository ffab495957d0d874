//! What moto cannot show: AWS answering with throttling, server errors and denied access. A
//! small HTTP proxy of the test's own stands between the SDK and moto and answers chosen
//! operations with an error a chosen number of times (or at random) before forwarding them;
//! everything else reaches moto. The SDK's standard retry mode, with its exponential backoff
//! and jitter, is what the adapters run with in production, and what these tests exercise.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::conformance::{first_write, step_message};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use orchestrator::aws::dynamo::DynamoStore;
use orchestrator::aws::sqs::SqsQueue;
use orchestrator::aws::{Names, RequestCounter};
use orchestrator::ports::{Error, Queue, QueueKind, Store, WriteError};
use testkit::moto::Moto;
use workflows::Environment;

/// An error answer: HTTP status and the JSON error type.
#[derive(Clone, Copy)]
struct Fault {
    status: u16,
    code: &'static str,
}

const THROTTLED: Fault = Fault {
    status: 400,
    code: "ThrottlingException",
};
const UNAVAILABLE: Fault = Fault {
    status: 503,
    code: "ServiceUnavailable",
};
const INTERNAL: Fault = Fault {
    status: 500,
    code: "InternalServerError",
};
const UNKNOWN_500: Fault = Fault {
    status: 500,
    code: "SomethingNew",
};
const DENIED: Fault = Fault {
    status: 400,
    code: "AccessDeniedException",
};

#[derive(Default)]
struct Rules {
    /// Operation (`TransactWriteItems`, `SendMessageBatch`, ...) -> faults still to answer.
    scripted: HashMap<String, Vec<Fault>>,
    /// Every request of any operation fails with this probability (seeded).
    random: Option<(f64, Fault, fastrand::Rng)>,
    /// Requests seen per operation, failed ones included.
    seen: HashMap<String, u32>,
    /// Requests answered with a fault.
    injected: u32,
}

struct Proxy {
    moto: String,
    client: reqwest::Client,
    rules: Mutex<Rules>,
}

async fn forward(
    State(proxy): State<Arc<Proxy>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    // The JSON protocols of DynamoDB and SQS name the operation in `X-Amz-Target`.
    let operation = headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .and_then(|t| t.rsplit('.').next())
        .unwrap_or("unknown")
        .to_owned();
    let fault = match proxy.rules.lock() {
        Ok(mut rules) => {
            *rules.seen.entry(operation.clone()).or_default() += 1;
            let scripted = rules.scripted.get_mut(&operation).and_then(|f| {
                if f.is_empty() {
                    None
                } else {
                    Some(f.remove(0))
                }
            });
            scripted.or_else(|| {
                let (p, fault, rng) = rules.random.as_mut()?;
                (rng.f64() < *p).then_some(*fault)
            })
        }
        Err(_) => None,
    };
    if let Some(f) = fault {
        if let Ok(mut rules) = proxy.rules.lock() {
            rules.injected += 1;
        }
        let body = format!(
            r#"{{"__type":"{}","message":"injected by the test"}}"#,
            f.code
        );
        let mut response = (
            StatusCode::from_u16(f.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            body,
        )
            .into_response();
        response.headers_mut().insert(
            "content-type",
            axum::http::HeaderValue::from_static("application/x-amz-json-1.0"),
        );
        return response;
    }
    let url = format!(
        "{}{}",
        proxy.moto,
        uri.path_and_query().map_or("/", |p| p.as_str())
    );
    let mut request = proxy.client.request(method, url).body(body);
    for (name, value) in &headers {
        if name != "host" && name != "content-length" {
            request = request.header(name, value);
        }
    }
    match request.send().await {
        Ok(r) => {
            let status = r.status();
            let headers = r.headers().clone();
            let body = r.bytes().await.unwrap_or_default();
            let mut response = (status, body).into_response();
            for (name, value) in &headers {
                if name != "content-length" && name != "transfer-encoding" {
                    response.headers_mut().insert(name, value.clone());
                }
            }
            response
        }
        Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    }
}

/// moto behind the fault proxy, with its queues and tables created.
struct Faulty {
    _moto: Moto,
    proxy: Arc<Proxy>,
    sdk: aws_config::SdkConfig,
    names: Names,
}

impl Faulty {
    async fn start() -> Self {
        let moto = Moto::start().await;
        let names = Names::new("faults");
        orchestrator::aws::init::create_all(&moto.sdk_config(), &names, 5)
            .await
            .expect("init");
        let proxy = Arc::new(Proxy {
            moto: moto.endpoint.clone(),
            client: reqwest::Client::new(),
            rules: Mutex::new(Rules::default()),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let app = axum::Router::new()
            .fallback(forward)
            .with_state(proxy.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let sdk = moto
            .sdk_config()
            .into_builder()
            .endpoint_url(format!("http://{addr}"))
            .build();
        Self {
            _moto: moto,
            proxy,
            sdk,
            names,
        }
    }

    fn script(&self, operation: &str, faults: &[Fault]) {
        if let Ok(mut r) = self.proxy.rules.lock() {
            r.scripted.insert(operation.to_owned(), faults.to_vec());
        }
    }

    fn seen(&self, operation: &str) -> u32 {
        self.proxy
            .rules
            .lock()
            .map(|r| r.seen.get(operation).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    async fn store(&self) -> DynamoStore {
        DynamoStore::connect(&self.sdk, &self.names, &RequestCounter::new())
            .await
            .expect("dynamo")
    }

    async fn queue(&self) -> SqsQueue {
        SqsQueue::connect(&self.sdk, &self.names, &RequestCounter::new())
            .await
            .expect("sqs")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_and_server_errors_are_retried_with_backoff() {
    let aws = Faulty::start().await;
    let store = aws.store().await;
    let queue = aws.queue().await;

    aws.script("TransactWriteItems", &[THROTTLED, THROTTLED]);
    let (record, write) = first_write("acme", Environment::Dev);
    store.write(write).await.expect("written on the third try");
    assert_eq!(aws.seen("TransactWriteItems"), 3);
    let stored = store
        .workflow(&record.key)
        .await
        .expect("read")
        .expect("exists");
    assert_eq!(stored, record);

    aws.script("SendMessageBatch", &[UNAVAILABLE, INTERNAL]);
    queue.send(vec![step_message("m")]).await.expect("sent");
    assert_eq!(aws.seen("SendMessageBatch"), 3);
    let got = queue
        .receive(
            QueueKind::Steps,
            10,
            Duration::from_secs(30),
            Duration::from_secs(1),
        )
        .await
        .expect("receive");
    assert_eq!(got.len(), 1, "sent once, not once per attempt");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_that_outlast_the_retries_are_retryable_port_errors() {
    let aws = Faulty::start().await;
    let store = aws.store().await;
    let queue = aws.queue().await;

    aws.script("ReceiveMessage", &[UNAVAILABLE; 10]);
    let e = queue
        .receive(
            QueueKind::Steps,
            10,
            Duration::from_secs(30),
            Duration::ZERO,
        )
        .await
        .expect_err("every attempt fails");
    assert!(e.is_retryable(), "{e}");
    assert_eq!(
        aws.seen("ReceiveMessage"),
        3,
        "the SDK's standard three attempts"
    );

    // A server error with a code nobody listed is the service's failure all the same.
    aws.script("GetItem", &[UNKNOWN_500; 10]);
    let e = store
        .workflow(&crate::conformance::key("acme", Environment::Dev))
        .await
        .expect_err("every attempt fails");
    assert!(e.is_retryable(), "{e:?}");
    assert!(
        orchestrator::ports::chain(&e).contains("SomethingNew"),
        "{e:?}"
    );

    aws.script("TransactWriteItems", &[THROTTLED; 10]);
    let (_, write) = first_write("acme", Environment::Dev);
    match store.write(write).await {
        Err(WriteError::Store(e)) => {
            assert!(e.is_retryable(), "{e}");
            assert!(e.to_string().contains("TransactWriteItems"), "{e}");
        }
        other => panic!("expected a store error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_access_is_not_retried_and_names_the_permission() {
    let aws = Faulty::start().await;
    let store = aws.store().await;
    aws.script("TransactWriteItems", &[DENIED]);
    let (_, write) = first_write("acme", Environment::Dev);
    match store.write(write).await {
        Err(WriteError::Store(e @ Error::Invalid { .. })) => {
            assert!(!e.is_retryable());
            let text = e.to_string();
            assert!(text.contains("access denied"), "{text}");
            assert!(text.contains("TransactWriteItems"), "{text}");
            assert!(text.contains("dynamodb:PutItem"), "{text}");
            assert!(text.contains("faults-workflows"), "{text}");
        }
        other => panic!("expected access denied, got {other:?}"),
    }
    assert_eq!(aws.seen("TransactWriteItems"), 1, "not retried");

    // At start-up, denied access stops the worker with one line naming what to grant.
    aws.script("DescribeTable", &[DENIED; 8]);
    let e = DynamoStore::connect(&aws.sdk, &aws.names, &RequestCounter::new())
        .await
        .expect_err("denied");
    let text = e.to_string();
    assert!(!text.contains('\n'), "{text}");
    assert!(
        text.contains("access denied") && text.contains("dynamodb:DescribeTable"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_reaches_live_while_a_fifth_of_all_requests_fail() {
    let aws = Faulty::start().await;
    let stack = Arc::new(
        orchestrator::aws::connect(&aws.sdk, &aws.names, &RequestCounter::new(), 64)
            .await
            .expect("connect"),
    );
    if let Ok(mut r) = aws.proxy.rules.lock() {
        r.random = Some((0.2, THROTTLED, fastrand::Rng::with_seed(5)));
    }
    let transitions = testkit::live::pushes_reach_live(stack).await;
    let (seen, injected): (u32, u32) = aws
        .proxy
        .rules
        .lock()
        .map(|r| (r.seen.values().sum(), r.injected))
        .unwrap_or_default();
    eprintln!("{transitions} transitions; {injected} of {seen} requests failed");
    assert!(transitions > 0);
    assert!(
        injected > 10,
        "the faults were injected: {injected} of {seen}"
    );
}
