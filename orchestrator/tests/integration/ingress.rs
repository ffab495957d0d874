//! The GitLab ingress over real HTTP, with GitLab's headers and real payloads
//! (`tests/data/gitlab/`, see its SOURCES.md), rewritten to registered tenants' project ids.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::conformance::tenant;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use orchestrator::clock::{SharedClock, SystemClock};
use orchestrator::ingress::{Ingress, IngressConfig, Rate, RefusalCount};
use orchestrator::ports::{
    DeadLetter, Delivery, Error, Outgoing, Queue, QueueKind, QueueStats, Receipt, Store,
};
use orchestrator::sqlite::{SqliteBackend, SqliteConfig};
use orchestrator::tenants::token_sha256;
use proptest::prelude::*;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use workflows::{Body, Envelope, Event, RepoKind};

const ACME_TOKEN: &str = "acme-secret-token";
const GLOBEX_TOKEN: &str = "globex-secret-token";
const ACME_INFRA: u64 = 15;
const ACME_APP: u64 = 16;
const GLOBEX_INFRA: u64 = 4861503;
const GLOBEX_APP: u64 = 4861504;

fn payload(name: &str) -> Value {
    let path = format!(
        "{}/tests/data/gitlab/{name}.json",
        env!("CARGO_MANIFEST_DIR")
    );
    serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("json")
}

fn with_project(mut p: Value, project: u64) -> Value {
    p["project_id"] = json!(project);
    p
}

struct Server {
    _dir: tempfile::TempDir,
    refusals: Refusals,
    backend: SqliteBackend,
    url: String,
    client: reqwest::Client,
    stop: CancellationToken,
}

/// The ingress's refusal counts, whatever its queue.
type Refusals = Box<dyn Fn() -> BTreeMap<&'static str, RefusalCount> + Send + Sync>;

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn registry(backend: &SqliteBackend) {
    let mut acme = tenant("acme", ACME_INFRA, ACME_APP);
    acme.webhook.token_sha256 = token_sha256(ACME_TOKEN);
    backend.put_tenant(&acme, true).await.expect("acme");
    let mut globex = tenant("globex", GLOBEX_INFRA, GLOBEX_APP);
    globex.webhook.token_sha256 = token_sha256(GLOBEX_TOKEN);
    backend.put_tenant(&globex, true).await.expect("globex");
}

async fn start_with<Q: Queue>(
    backend: SqliteBackend,
    queue: Arc<Q>,
    config: IngressConfig,
    dir: tempfile::TempDir,
) -> Server {
    let clock: SharedClock = Arc::new(SystemClock);
    let ingress = Arc::new(Ingress::new(
        Arc::new(backend.clone()),
        queue,
        clock,
        config,
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!(
        "http://{}/hooks/gitlab",
        listener.local_addr().expect("addr")
    );
    let stop = CancellationToken::new();
    tokio::spawn(ingress.clone().serve(listener, stop.clone()));
    let counted = ingress.clone();
    Server {
        _dir: dir,
        refusals: Box::new(move || counted.refusals()),
        backend,
        url,
        client: reqwest::Client::new(),
        stop,
    }
}

async fn start(config: IngressConfig) -> Server {
    let dir = tempfile::tempdir().expect("tempdir");
    let backend =
        SqliteBackend::open(SqliteConfig::new(dir.path().join("i.sqlite"))).expect("open");
    registry(&backend).await;
    let queue = Arc::new(backend.clone());
    start_with(backend, queue, config, dir).await
}

impl Server {
    /// Gives `acme` a Standard Webhooks signing secret, and returns it. (The tenant cache of a
    /// running ingress trusts what it read for a few seconds: call this before acme's first
    /// delivery.)
    async fn acme_signs(&self) -> String {
        let secret = format!("whsec_{}", "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        let mut acme = self
            .backend
            .tenant(&workflows::TenantId::new("acme").expect("id"))
            .await
            .expect("get")
            .expect("acme");
        acme.webhook.signing_secret = Some(secret.clone());
        self.backend.put_tenant(&acme, false).await.expect("update");
        secret
    }

    /// The server's `host:port`.
    fn addr(&self) -> String {
        let rest = self.url.trim_start_matches("http://");
        rest.split('/').next().expect("address").to_owned()
    }

    async fn post(&self, headers: &[(&str, &str)], body: Vec<u8>) -> (StatusCode, Value) {
        let (status, json, _) = self.post_with_retry_after(headers, body).await;
        (status, json)
    }

    /// As [`Server::post`], with the `Retry-After` header's seconds.
    async fn post_with_retry_after(
        &self,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> (StatusCode, Value, Option<u64>) {
        self.post_at(&self.url, headers, body).await
    }

    /// A push to `/hooks/gitlab/{tenant}`.
    async fn push_as(&self, tenant: &str, token: &str, body: Vec<u8>) -> (StatusCode, Value) {
        let url = format!("{}/{tenant}", self.url);
        let headers = [("x-gitlab-event", "Push Hook"), ("x-gitlab-token", token)];
        let (status, json, _) = self.post_at(&url, &headers, body).await;
        (status, json)
    }

    async fn post_at(
        &self,
        url: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> (StatusCode, Value, Option<u64>) {
        let mut req = self
            .client
            .post(url)
            .header("content-type", "application/json")
            .header("user-agent", "GitLab/17.5.0")
            .header("x-gitlab-instance", "https://gitlab.example.com");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req
            .body(body)
            .send()
            .await
            .expect("the request is answered");
        let status = StatusCode::from_u16(resp.status().as_u16()).expect("status");
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let bytes = resp.bytes().await.expect("body");
        let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, json, retry_after)
    }

    async fn push(&self, token: &str, body: &Value, extra: &[(&str, &str)]) -> (StatusCode, Value) {
        let mut headers = vec![("x-gitlab-event", "Push Hook"), ("x-gitlab-token", token)];
        headers.extend_from_slice(extra);
        self.post(&headers, serde_json::to_vec(body).expect("json"))
            .await
    }

    /// Everything on the events queue, decoded (a FIFO group gives one message at a time).
    async fn queued(&self) -> Vec<Envelope> {
        let mut all = Vec::new();
        loop {
            let got = self
                .backend
                .receive(
                    QueueKind::Events,
                    100,
                    Duration::from_secs(60),
                    Duration::ZERO,
                )
                .await
                .expect("receive");
            if got.is_empty() {
                return all;
            }
            let _ = self
                .backend
                .ack(
                    QueueKind::Events,
                    got.iter().map(|d| d.receipt.clone()).collect(),
                )
                .await;
            all.extend(got.iter().map(|d| {
                workflows::decode::<Envelope>(&d.body).expect("a queued envelope decodes")
            }));
        }
    }
}

fn push_of(e: &Envelope) -> &workflows::Push {
    match &e.body {
        Body::Event(Event::Push(p)) => p,
        other => panic!("expected a push, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_to_a_mapped_branch_is_queued_as_a_small_typed_event() {
    let s = start(IngressConfig::default()).await;
    let body = with_project(payload("gitlab-docs_push"), ACME_INFRA);
    let (status, answer) = s
        .push(
            ACME_TOKEN,
            &body,
            &[
                ("idempotency-key", "4c4f5d2e-5d1b-4b7c-8d0a-3f2b9d1e0a11"),
                (
                    "x-gitlab-event-uuid",
                    "b9a1f0d2-0c1e-4c7a-9f3e-2b8d7c6a5e40",
                ),
            ],
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    assert_eq!(answer["status"], "accepted");
    assert_eq!(
        answer["event_id"], "gitlab:4c4f5d2e-5d1b-4b7c-8d0a-3f2b9d1e0a11",
        "what the caller chose, namespaced"
    );
    assert_eq!(
        answer["workflow"], "acme#production",
        "master maps to production"
    );
    let queued = s.queued().await;
    assert_eq!(queued.len(), 1);
    let e = &queued[0];
    assert_eq!(e.key.to_string(), "acme#production");
    let p = push_of(e);
    assert_eq!(p.repo, RepoKind::Infra);
    assert_eq!(p.sha.as_str(), "da1560886d4f094c3e6c9ef40349f7d38b5d27d7");
    assert_eq!(p.git_ref, "refs/heads/master");
    assert_eq!(
        p.before.as_ref().map(workflows::GitSha::as_str),
        Some("95790bf891e76fee5e1747ab589903a6a1f80f22"),
        "where the branch was, for rollback protection"
    );
    assert_eq!(p.author, "jsmith");
    assert!(!p.message.is_empty() && !p.message.contains('\n'));
    // Small: no raw payload travels.
    let size = workflows::encode(e).len();
    assert!(size < 1024, "{size} bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_idempotency_key_twice_is_one_event() {
    let s = start(IngressConfig::default()).await;
    let body = with_project(payload("gitlab-docs_push"), ACME_APP);
    for delivery in ["w-1", "w-2"] {
        let (status, _) = s
            .push(
                ACME_TOKEN,
                &body,
                &[
                    ("idempotency-key", "same-key"),
                    ("x-gitlab-webhook-uuid", delivery),
                ],
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED);
    }
    let queued = s.queued().await;
    assert_eq!(queued.len(), 1);
    assert_eq!(push_of(&queued[0]).repo, RepoKind::App);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_pushing_too_fast_gets_429_and_others_do_not() {
    let s = start(IngressConfig {
        push_rate: Rate {
            per_second: 0.01,
            burst: 2,
        },
        ..IngressConfig::default()
    })
    .await;
    let acme = with_project(payload("gitlab-docs_push"), ACME_APP);
    let globex = with_project(payload("drone-go-scm_push"), GLOBEX_APP);
    let push = |body: &Value, token: &'static str, n: u32| {
        let body = serde_json::to_vec(body).expect("json");
        let key = format!("k-{token}-{n}");
        let s = &s;
        async move {
            s.post_with_retry_after(
                &[
                    ("x-gitlab-event", "Push Hook"),
                    ("x-gitlab-token", token),
                    ("idempotency-key", &key),
                ],
                body,
            )
            .await
        }
    };
    for n in 0..2 {
        assert_eq!(push(&acme, ACME_TOKEN, n).await.0, StatusCode::ACCEPTED);
    }
    let (status, answer, retry_after) = push(&acme, ACME_TOKEN, 2).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{answer}");
    assert!(
        retry_after.is_some_and(|s| (1..=100).contains(&s)),
        "{retry_after:?}"
    );
    assert_eq!(push(&globex, GLOBEX_TOKEN, 0).await.0, StatusCode::ACCEPTED);
    assert_eq!(s.queued().await.len(), 3, "the refused push is not queued");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_authentications_are_limited_per_address_and_answered_alike() {
    let s = start(IngressConfig {
        auth_failure_rate: Rate {
            per_second: 0.001,
            burst: 3,
        },
        client_address_header: Some("x-forwarded-for".to_owned()),
        ..IngressConfig::default()
    })
    .await;
    let acme =
        serde_json::to_vec(&with_project(payload("gitlab-docs_push"), ACME_APP)).expect("json");
    let unknown =
        serde_json::to_vec(&with_project(payload("gitlab-docs_push"), 424_242)).expect("json");
    let from = |address: &'static str, token: &'static str, body: &Vec<u8>| {
        let body = body.clone();
        let s = &s;
        async move {
            s.post_with_retry_after(
                &[
                    ("x-gitlab-event", "Push Hook"),
                    ("x-gitlab-token", token),
                    ("x-forwarded-for", address),
                ],
                body,
            )
            .await
        }
    };
    let (a, wrong, _) = from("10.0.0.1, 192.0.2.7", "wrong", &acme).await;
    let (b, unregistered, _) = from("192.0.2.7", ACME_TOKEN, &unknown).await;
    let (c, missing, _) = s
        .post_with_retry_after(
            &[
                ("x-gitlab-event", "Push Hook"),
                ("x-forwarded-for", "192.0.2.7"),
            ],
            acme.clone(),
        )
        .await;
    assert_eq!([a, b, c], [StatusCode::UNAUTHORIZED; 3]);
    assert!(
        wrong == unregistered && unregistered == missing,
        "{wrong} {unregistered} {missing}"
    );
    // The burst is used up: even the right token waits, and nothing is read.
    let (d, answer, retry_after) = from("192.0.2.7", ACME_TOKEN, &acme).await;
    assert_eq!(d, StatusCode::TOO_MANY_REQUESTS, "{answer}");
    assert!(retry_after.is_some_and(|s| s >= 1), "{retry_after:?}");
    // Another address is not held back.
    let (e, answer, _) = from("198.51.100.9", ACME_TOKEN, &acme).await;
    assert_eq!(e, StatusCode::ACCEPTED, "{answer}");
    // Every refusal was logged (these few are under the log's rate).
    let refusals = (s.refusals)();
    assert_eq!(refusals["unauthenticated"].logged, 3, "{refusals:?}");
    assert_eq!(refusals["auth-failure-rate"].logged, 1, "{refusals:?}");
    assert!(refusals.values().all(|c| c.skipped == 0), "{refusals:?}");
}

/// A flood of refusals is logged at the log's rate, the rest counted, never lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_refusals_is_logged_at_a_bounded_rate() {
    let s = start(IngressConfig {
        auth_failure_rate: Rate {
            per_second: 1000.0,
            burst: 1000,
        },
        ..IngressConfig::default()
    })
    .await;
    for _ in 0..100 {
        let (status, _) = s
            .post(&[("x-gitlab-event", "Push Hook")], b"{}".to_vec())
            .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    let count = (s.refusals)()["unauthenticated"];
    assert_eq!(count.logged + count.skipped, 100, "{count:?}");
    assert!(count.logged >= 20 && count.skipped > 0, "{count:?}");
}

/// Hundreds of clients that connect and stall (sending nothing, or half their headers) are cut
/// off after the header timeout, at most `max_connections` are held at once, and a real push
/// still gets its 202.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalling_clients_are_cut_off_and_a_real_push_gets_through() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = start(IngressConfig {
        header_timeout: Duration::from_millis(500),
        max_connections: 64,
        ..IngressConfig::default()
    })
    .await;
    let addr = s.addr();
    let mut stalled = Vec::new();
    for i in 0..300 {
        let mut c = tokio::net::TcpStream::connect(&addr)
            .await
            .expect("connect");
        if i % 2 == 0 {
            c.write_all(b"POST /hooks/gitlab HTTP/1.1\r\nHost: x\r\nX-Gitlab-Token: ")
                .await
                .expect("half the headers");
        }
        stalled.push(c);
    }
    let body = with_project(payload("gitlab-docs_push"), ACME_APP);
    let (status, answer) =
        tokio::time::timeout(Duration::from_secs(30), s.push(ACME_TOKEN, &body, &[]))
            .await
            .expect("answered while 300 clients stall");
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    // Every stalled connection has been closed by the server by now (the push waited behind
    // them): a read sees the end (after a 408, for those that sent part of their headers).
    for (i, c) in stalled.iter_mut().enumerate() {
        let mut sink = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut sink)).await;
        assert!(read.is_ok(), "connection {i} is still held open");
    }
}

/// A real-shaped 3.7 MB push (every commit lists its files) is accepted at the tenant's own
/// URL, where the token is checked before the body is read; the shared URL keeps its 1 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_push_is_accepted_at_the_tenants_own_url() {
    let s = start(IngressConfig::default()).await;
    let mut body = with_project(payload("gitlab-docs_push"), ACME_APP);
    let files: Vec<String> = (0..50_000)
        .map(|i| format!("src/module_{i:05}/generated/file_{i:05}.rs"))
        .collect();
    for commit in body["commits"].as_array_mut().expect("commits") {
        commit["added"] = json!(files);
    }
    let bytes = serde_json::to_vec(&body).expect("json");
    assert!(bytes.len() > 3_500_000, "{} bytes", bytes.len());
    let (status, answer) = s.push_as("acme", ACME_TOKEN, bytes.clone()).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    assert_eq!(answer["workflow"], "acme#production");
    // The shared URL reads the body to find the tenant, so it keeps its 1 MiB: a larger body
    // is refused from its Content-Length, before it is sent (a client still writing it may see
    // its write cut off instead of the answer, so only the headers are sent here).
    {
        use tokio::io::AsyncWriteExt;
        let mut c = tokio::net::TcpStream::connect(s.addr())
            .await
            .expect("connect");
        let head = format!(
            "POST /hooks/gitlab HTTP/1.1\r\nHost: x\r\nX-Gitlab-Token: {ACME_TOKEN}\r\n\
             X-Gitlab-Event: Push Hook\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n",
            bytes.len()
        );
        c.write_all(head.as_bytes()).await.expect("headers only");
        let text = first_answer(&mut c, Duration::from_secs(5), "answered at once").await;
        assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    }

    // Another tenant's token, an unknown tenant: the one 401 (small bodies: a large one is
    // refused before it is read, and the client may see its write cut off instead of the
    // answer). A project of someone else: 403.
    let small =
        serde_json::to_vec(&with_project(payload("gitlab-docs_push"), ACME_APP)).expect("json");
    let (wrong, first) = s.push_as("acme", GLOBEX_TOKEN, small.clone()).await;
    let (unknown, second) = s.push_as("nobody", ACME_TOKEN, small).await;
    assert_eq!(
        (wrong, unknown),
        (StatusCode::UNAUTHORIZED, StatusCode::UNAUTHORIZED)
    );
    assert_eq!(first, second);
    let globex =
        serde_json::to_vec(&with_project(payload("drone-go-scm_push"), GLOBEX_APP)).expect("json");
    let (status, answer) = s.push_as("acme", ACME_TOKEN, globex).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{answer}");
    assert_eq!(s.queued().await.len(), 1);
}

/// At the tenant's own URL a wrong token is answered from the headers: a sender announcing
/// 20 MB gets its 401 without sending a byte of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_token_is_refused_before_the_body_is_read() {
    use tokio::io::AsyncWriteExt;
    let s = start(IngressConfig::default()).await;
    let addr = s.addr();
    let mut c = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    c.write_all(
        b"POST /hooks/gitlab/acme HTTP/1.1\r\nHost: x\r\nX-Gitlab-Token: wrong\r\n\
          Content-Type: application/json\r\nContent-Length: 20000000\r\n\r\n",
    )
    .await
    .expect("headers only");
    let text = first_answer(&mut c, Duration::from_secs(5), "answered without the body").await;
    assert!(text.starts_with("HTTP/1.1 401"), "{text}");
}

/// The start of the server's first answer on `c`, read within `within` (else panics with
/// `why`).
async fn first_answer(c: &mut tokio::net::TcpStream, within: Duration, why: &str) -> String {
    use tokio::io::AsyncReadExt;
    let mut answer = vec![0u8; 512];
    let n = tokio::time::timeout(within, c.read(&mut answer))
        .await
        .expect(why)
        .expect("read");
    String::from_utf8_lossy(&answer[..n]).into_owned()
}

/// A body that stops arriving is answered 408 after the body timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_stops_arriving_gets_408() {
    use tokio::io::AsyncWriteExt;
    let s = start(IngressConfig {
        body_timeout: Duration::from_millis(300),
        ..IngressConfig::default()
    })
    .await;
    let addr = s.addr();
    let mut c = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    let head = format!(
        "POST /hooks/gitlab HTTP/1.1\r\nHost: x\r\nX-Gitlab-Token: {ACME_TOKEN}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"object_kind\""
    );
    c.write_all(head.as_bytes())
        .await
        .expect("headers and a little body");
    let text = first_answer(
        &mut c,
        Duration::from_secs(10),
        "answered before the test gives up",
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_free_text_fields_are_cut_not_refused() {
    let s = start(IngressConfig::default()).await;
    let mut body = with_project(payload("gitlab-docs_push"), ACME_APP);
    let huge = "é".repeat(150_000); // 300 KB
    body["user_username"] = json!(huge);
    for commit in body["commits"].as_array_mut().expect("commits") {
        commit["title"] = json!(huge);
    }
    let (status, answer) = s.push(ACME_TOKEN, &body, &[]).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    let queued = s.queued().await;
    let p = push_of(&queued[0]);
    assert_eq!(p.author.chars().count(), 200);
    assert_eq!(p.message.chars().count(), 200);
    assert!(workflows::encode(&queued[0]).len() < 4096);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tenants_idempotency_key_never_suppresses_another_tenants_push() {
    let s = start(IngressConfig::default()).await;
    let key = [("idempotency-key", "K")];
    let acme = with_project(payload("gitlab-docs_push"), ACME_APP);
    let globex = with_project(payload("drone-go-scm_push"), GLOBEX_APP);
    let (a, _) = s.push(ACME_TOKEN, &acme, &key).await;
    let (b, answer) = s.push(GLOBEX_TOKEN, &globex, &key).await;
    assert_eq!((a, b), (StatusCode::ACCEPTED, StatusCode::ACCEPTED));
    let queued = s.queued().await;
    let keys: Vec<String> = queued.iter().map(|e| e.key.to_string()).collect();
    assert_eq!(
        keys.len(),
        2,
        "a 202 means queued, for each tenant: {keys:?}"
    );
    assert!(keys.iter().any(|k| k.starts_with("globex#")), "{answer}");

    // A caller cannot choose the id of an event the system makes (a re-arm, a signal).
    let system = [("idempotency-key", "rearm:acme#production:v1")];
    let (c, answer) = s.push(ACME_TOKEN, &acme, &system).await;
    assert_eq!(c, StatusCode::ACCEPTED);
    assert_eq!(answer["event_id"], "gitlab:rearm:acme#production:v1");
    // A key of the longest allowed length still fits, as a digest.
    let long = "k".repeat(128);
    let (d, answer) = s
        .push(ACME_TOKEN, &acme, &[("idempotency-key", long.as_str())])
        .await;
    assert_eq!(d, StatusCode::ACCEPTED);
    let id = answer["event_id"].as_str().expect("id");
    assert!(id.starts_with("gitlab:sha256:") && id.len() <= 128, "{id}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_headers_the_event_uuid_then_a_digest_deduplicates() {
    let s = start(IngressConfig::default()).await;
    let body = with_project(payload("drone-go-scm_push"), GLOBEX_APP);
    let uuid = [("x-gitlab-event-uuid", "e-1")];
    let (a, first) = s.push(GLOBEX_TOKEN, &body, &uuid).await;
    let (b, second) = s.push(GLOBEX_TOKEN, &body, &uuid).await;
    assert_eq!((a, b), (StatusCode::ACCEPTED, StatusCode::ACCEPTED));
    assert_eq!(first["event_id"], "gitlab:e-1");
    assert_eq!(first["event_id"], second["event_id"]);
    let (c, third) = s.push(GLOBEX_TOKEN, &body, &[]).await;
    let (d, fourth) = s.push(GLOBEX_TOKEN, &body, &[]).await;
    assert_eq!((c, d), (StatusCode::ACCEPTED, StatusCode::ACCEPTED));
    let digest = third["event_id"].as_str().expect("id");
    assert!(digest.starts_with("push:"), "{digest}");
    assert_eq!(third["event_id"], fourth["event_id"]);
    // A force push back to the same commit moves the branch from elsewhere: a new event.
    let mut back = body.clone();
    back["before"] = json!("1111111111111111111111111111111111111111");
    let (e, fifth) = s.push(GLOBEX_TOKEN, &back, &[]).await;
    assert_eq!(e, StatusCode::ACCEPTED);
    assert_ne!(fifth["event_id"], third["event_id"]);
    assert_eq!(s.queued().await.len(), 3, "one per event id");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_is_not_a_mapped_branch_push_is_acknowledged_and_not_queued() {
    let s = start(IngressConfig::default()).await;
    let cases = [
        ("drone-go-scm_branch_create", "Push Hook", "not mapped"),
        ("drone-go-scm_branch_delete", "Push Hook", "branch deletion"),
        ("gitlab-docs_tag_push", "Tag Push Hook", "tag pushes"),
        ("gitlab-docs_push", "Merge Request Hook", "not handled"),
    ];
    for (name, kind, reason) in cases {
        let body = with_project(payload(name), GLOBEX_INFRA);
        let (status, answer) = s
            .post(
                &[("x-gitlab-event", kind), ("x-gitlab-token", GLOBEX_TOKEN)],
                serde_json::to_vec(&body).expect("json"),
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{name}: {answer}");
        assert_eq!(answer["status"], "ignored", "{name}");
        let text = answer["reason"].as_str().expect("reason");
        assert!(text.contains(reason), "{name}: {text}");
    }
    assert!(s.queued().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_to_a_decommissioned_environment_is_answered_as_ignored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let backend =
        SqliteBackend::open(SqliteConfig::new(dir.path().join("i.sqlite"))).expect("open");
    registry(&backend).await;
    let id = workflows::TenantId::new("globex").expect("id");
    let read = backend.tenant(&id).await.expect("read").expect("globex");
    let mut marked = read.clone();
    marked.set_env_settings(
        workflows::Environment::Production,
        workflows::EnvSettings {
            decommissioned: true,
            ..workflows::EnvSettings::default()
        },
    );
    backend.update_tenant(&read, &marked).await.expect("mark");
    let queue = Arc::new(backend.clone());
    let s = start_with(backend, queue, IngressConfig::default(), dir).await;
    // gitlab-docs_push is to master: production.
    let body = with_project(payload("gitlab-docs_push"), GLOBEX_INFRA);
    let (status, answer) = s
        .post(
            &[
                ("x-gitlab-event", "Push Hook"),
                ("x-gitlab-token", GLOBEX_TOKEN),
            ],
            serde_json::to_vec(&body).expect("json"),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    assert_eq!(answer["status"], "ignored");
    assert_eq!(
        answer["reason"],
        "environment production of globex is decommissioned: `wfctl provision globex --env production` provisions it again"
    );
    assert!(s.queued().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_checked_per_tenant() {
    let s = start(IngressConfig::default()).await;
    let acme = with_project(payload("gitlab-docs_push"), ACME_INFRA);
    let (status, answer) = s.push("wrong", &acme, &[]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{answer}");
    let (status, _) = s
        .post(
            &[("x-gitlab-event", "Push Hook")],
            serde_json::to_vec(&acme).expect("json"),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "missing token");
    // Tenant A's token with tenant B's project.
    let globex = with_project(payload("drone-go-scm_push"), GLOBEX_INFRA);
    let (status, answer) = s.push(ACME_TOKEN, &globex, &[]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{answer}");
    assert!(
        !answer.to_string().contains(ACME_TOKEN),
        "the token is not echoed"
    );
    assert!(s.queued().await.is_empty(), "nothing queued");
    // An unknown project: the same answer as a wrong token, so ids cannot be enumerated.
    let (status, unknown) = s.push(ACME_TOKEN, &with_project(acme, 999), &[]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{unknown}");
    assert_eq!(unknown, answer, "the same answer whatever the project");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_bodies_get_400_naming_what_is_wrong() {
    let s = start(IngressConfig::default()).await;
    let headers = [
        ("x-gitlab-event", "Push Hook"),
        ("x-gitlab-token", ACME_TOKEN),
    ];
    let (status, answer) = s
        .post(&headers, b"{\"object_kind\": \"push\",".to_vec())
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        answer["error"]
            .as_str()
            .expect("error")
            .contains("malformed JSON")
    );
    let mut no_after = with_project(payload("gitlab-docs_push"), ACME_INFRA);
    no_after.as_object_mut().expect("object").remove("after");
    let (status, answer) = s.push(ACME_TOKEN, &no_after, &[]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        answer["error"].as_str().expect("error").contains("`after`"),
        "{answer}"
    );
    let mut bad_sha = with_project(payload("gitlab-docs_push"), ACME_INFRA);
    bad_sha["after"] = json!("not-a-sha");
    let (status, answer) = s.push(ACME_TOKEN, &bad_sha, &[]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        answer["error"].as_str().expect("error").contains("git sha"),
        "{answer}"
    );
    let mut bad_before = with_project(payload("gitlab-docs_push"), ACME_INFRA);
    bad_before["before"] = json!("HEAD~1");
    let (status, answer) = s.push(ACME_TOKEN, &bad_before, &[]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        answer["error"]
            .as_str()
            .expect("error")
            .contains("`before`"),
        "{answer}"
    );
    let mut wrong_type = with_project(payload("gitlab-docs_push"), ACME_INFRA);
    wrong_type["commits"] = json!("many");
    let (status, answer) = s.push(ACME_TOKEN, &wrong_type, &[]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        answer["error"].as_str().expect("error").contains("commits"),
        "{answer}"
    );
    let (status, _) = s
        .push(ACME_TOKEN, &json!({"object_kind": "push"}), &[])
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "no project id");
    assert!(s.queued().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_limit_gets_413() {
    let s = start(IngressConfig {
        max_body_bytes: 16 * 1024,
        ..IngressConfig::default()
    })
    .await;
    let mut big = with_project(payload("gitlab-docs_push"), ACME_INFRA);
    big["padding"] = json!("x".repeat(32 * 1024));
    let (status, _) = s.push(ACME_TOKEN, &big, &[]).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(s.queued().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redacted_emails_truncated_commit_lists_and_protected_refs_are_handled() {
    let s = start(IngressConfig::default()).await;
    let mut p = with_project(payload("gitlab-docs_push"), ACME_APP);
    // 45 commits pushed: GitLab lists the newest 20, oldest first, with redacted emails.
    let commits: Vec<Value> = (26..=45)
        .map(|i| {
            json!({
                "id": format!("{i:040x}"),
                "message": format!("change {i}\n\nbody"),
                "title": format!("change {i}"),
                "timestamp": "2026-11-27T10:00:00+00:00",
                "url": "https://gitlab.example.com/c",
                "author": {"name": "Jane", "email": "[REDACTED]"},
                "added": [], "modified": [], "removed": []
            })
        })
        .collect();
    p["commits"] = json!(commits);
    p["total_commits_count"] = json!(45);
    p["after"] = json!(format!("{:040x}", 45));
    p["user_email"] = json!("[REDACTED]");
    p["ref_protected"] = json!(false);
    let (status, answer) = s.push(ACME_TOKEN, &p, &[]).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    let queued = s.queued().await;
    let push = push_of(&queued[0]);
    assert_eq!(push.message, "change 45", "the head commit's title");
    assert_eq!(push.sha.as_str(), format!("{:040x}", 45));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_webhooks_need_a_valid_recent_signature() {
    let s = start(IngressConfig::default()).await;
    let secret = s.acme_signs().await;
    let body =
        serde_json::to_vec(&with_project(payload("gitlab-docs_push"), ACME_INFRA)).expect("json");
    let hook = standardwebhooks::Webhook::new(&secret).expect("secret");
    let now = jiff::Timestamp::now().as_second();
    let sign = |ts: i64| hook.sign("msg_1", ts, &body).expect("sign");
    let good = sign(now);
    let ts = now.to_string();
    let base = [
        ("x-gitlab-event", "Push Hook"),
        ("x-gitlab-token", ACME_TOKEN),
    ];
    let with = |id: &'static str, ts: String, sig: String| {
        let mut h: Vec<(&str, String)> = base.iter().map(|(k, v)| (*k, (*v).to_owned())).collect();
        h.push(("webhook-id", id.to_owned()));
        h.push(("webhook-timestamp", ts));
        h.push(("webhook-signature", sig));
        h
    };
    let post = |h: Vec<(&'static str, String)>| {
        let body = body.clone();
        let s = &s;
        async move {
            let refs: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
            s.post(&refs, body).await
        }
    };
    let (status, answer) = post(base.iter().map(|(k, v)| (*k, (*v).to_owned())).collect()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "unsigned: {answer}");
    let (status, _) = post(with("msg_1", ts.clone(), "v1,AAAA".to_owned())).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "wrong signature");
    let old = (now - 600).to_string();
    let (status, answer) = post(with("msg_1", old, sign(now - 600))).await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "ten minutes old: {answer}"
    );
    let (status, answer) = post(with("msg_1", ts, good)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    assert_eq!(s.queued().await.len(), 1);
}

/// At the tenant's own URL a signed body is verified as it streams in: a 20 MiB push, sent
/// in small chunks, with a valid signature is accepted and one with a changed byte is not;
/// a stale timestamp is refused from the headers, before any of the body is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_signed_push_is_verified_as_it_streams() {
    use tokio::io::AsyncWriteExt;
    let s = start(IngressConfig::default()).await;
    let secret = s.acme_signs().await;
    let mut body = with_project(payload("gitlab-docs_push"), ACME_APP);
    let files: Vec<String> = (0..380_000)
        .map(|i| format!("src/module_{i:06}/generated/file_{i:06}.rs"))
        .collect();
    body["commits"][0]["added"] = json!(files);
    body["commits"][0]["message"] = json!("m".repeat(5_000_000));
    let bytes = serde_json::to_vec(&body).expect("json");
    assert!(bytes.len() > 20 * 1024 * 1024, "{} bytes", bytes.len());
    let hook = standardwebhooks::Webhook::new(&secret).expect("secret");
    let now = jiff::Timestamp::now().as_second();
    let signature = hook.sign("msg_big", now, &bytes).expect("sign");
    // Over a plain connection, the body written in 16 KiB pieces as it would trickle in.
    let send = |body: Vec<u8>, ts: i64, signature: String| {
        let addr = s.addr();
        async move {
            let mut c = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let head = format!(
                "POST /hooks/gitlab/acme HTTP/1.1\r\nHost: x\r\nX-Gitlab-Token: {ACME_TOKEN}\r\n\
                 X-Gitlab-Event: Push Hook\r\nwebhook-id: msg_big\r\nwebhook-timestamp: {ts}\r\n\
                 webhook-signature: {signature}\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            c.write_all(head.as_bytes()).await.expect("headers");
            for piece in body.chunks(16 * 1024) {
                c.write_all(piece).await.expect("body");
            }
            let text = first_answer(&mut c, Duration::from_secs(20), "answered").await;
            text.get(9..12)
                .and_then(|code| code.parse::<u16>().ok())
                .unwrap_or(0)
        }
    };
    assert_eq!(send(bytes.clone(), now, signature.clone()).await, 202);
    let mut changed = bytes.clone();
    let at = changed.len() / 2;
    changed[at] = if changed[at] == b'a' { b'b' } else { b'a' };
    assert_eq!(send(changed, now, signature).await, 401, "a changed byte");
    assert_eq!(s.queued().await.len(), 1);

    let mut c = tokio::net::TcpStream::connect(s.addr())
        .await
        .expect("connect");
    let head = format!(
        "POST /hooks/gitlab/acme HTTP/1.1\r\nHost: x\r\nX-Gitlab-Token: {ACME_TOKEN}\r\n\
         X-Gitlab-Event: Push Hook\r\nwebhook-id: m\r\nwebhook-timestamp: {}\r\n\
         webhook-signature: v1,AAAA\r\nContent-Length: 20000000\r\n\r\n",
        now - 3600
    );
    c.write_all(head.as_bytes()).await.expect("headers only");
    let text = first_answer(&mut c, Duration::from_secs(5), "answered without the body").await;
    assert!(text.starts_with("HTTP/1.1 401"), "{text}");
}

/// A queue that refuses every send, standing for an unavailable queue.
struct Down;

impl Queue for Down {
    async fn send(&self, _: Vec<Outgoing>) -> Result<(), Error> {
        Err(Error::unavailable("test", "down"))
    }
    async fn receive(
        &self,
        _: QueueKind,
        _: usize,
        _: Duration,
        _: Duration,
    ) -> Result<Vec<Delivery>, Error> {
        Ok(Vec::new())
    }
    async fn ack(&self, _: QueueKind, _: Vec<Receipt>) -> Result<Vec<Receipt>, Error> {
        Ok(Vec::new())
    }
    async fn extend(&self, _: QueueKind, _: &Receipt, _: Duration) -> Result<(), Error> {
        Ok(())
    }
    async fn quarantine(&self, _: &Delivery, _: &str) -> Result<(), Error> {
        Ok(())
    }
    async fn dead_letters(&self, _: QueueKind, _: usize) -> Result<Vec<DeadLetter>, Error> {
        Ok(Vec::new())
    }
    async fn redrive(&self, _: QueueKind, _: Option<Vec<String>>) -> Result<Vec<String>, Error> {
        Ok(Vec::new())
    }
    async fn discard(&self, _: QueueKind, _: Vec<String>) -> Result<Vec<String>, Error> {
        Ok(Vec::new())
    }
    async fn stats(&self, _: QueueKind) -> Result<QueueStats, Error> {
        Ok(QueueStats::default())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unavailable_queue_gets_503_and_accepts_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let backend =
        SqliteBackend::open(SqliteConfig::new(dir.path().join("d.sqlite"))).expect("open");
    registry(&backend).await;
    let s = start_with(backend, Arc::new(Down), IngressConfig::default(), dir).await;
    let body = with_project(payload("gitlab-docs_push"), ACME_INFRA);
    let (status, answer) = s.push(ACME_TOKEN, &body, &[]).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .expect("error")
            .contains("nothing was accepted")
    );
}

fn arbitrary_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        ".{0,40}".prop_map(Value::from),
        Just(json!(ACME_INFRA)),
        Just(json!("refs/heads/master")),
        Just(json!("0000000000000000000000000000000000000000")),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            prop::collection::btree_map(
                prop_oneof![
                    Just("project_id".to_owned()),
                    Just("ref".to_owned()),
                    Just("after".to_owned()),
                    Just("commits".to_owned()),
                    Just("object_kind".to_owned()),
                    Just("project".to_owned()),
                    "[a-z_]{1,12}",
                ],
                inner,
                0..8
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_bytes_and_json_never_panic_the_ingress(
        bytes in prop::collection::vec(any::<u8>(), 0..300),
        doc in arbitrary_json(),
        kind in prop_oneof![Just("Push Hook"), Just("Tag Push Hook"), Just("Note Hook")],
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
        rt.block_on(async {
            let dir = tempfile::tempdir().expect("tempdir");
            let backend = SqliteBackend::open(SqliteConfig::new(dir.path().join("p.sqlite"))).expect("open");
            registry(&backend).await;
            let clock: SharedClock = Arc::new(SystemClock);
            let ingress = Ingress::new(Arc::new(backend.clone()), Arc::new(backend), clock, IngressConfig::default());
            let mut headers = HeaderMap::new();
            headers.insert("x-gitlab-event", HeaderValue::from_static(kind));
            headers.insert("x-gitlab-token", HeaderValue::from_static(ACME_TOKEN));
            for body in [bytes.clone(), serde_json::to_vec(&doc).expect("json")] {
                let (status, answer) = ingress.answer(None, &headers, &body).await;
                prop_assert!(
                    [202, 400, 401].contains(&status.as_u16()),
                    "{} {}", status, answer
                );
            }
            Ok(())
        })?;
    }
}
