//! A `moto_server` of the test's own, on a free 127.0.0.1 port, killed when dropped: each
//! test (or conformance check) gets fresh AWS state. `.ci/run` installs moto when missing.
//! [`Moto::stack`] creates the orchestrator's queues and tables on it and connects to them.
//!
//! moto's DynamoDB is not safe under concurrent writes: `TransactWriteItems` deep-copies the
//! tables it touches, applies its items one by one and, when a condition fails, puts the
//! copies back, undoing any write another request made in between (seen in the crash test: a
//! history entry v6 whose record stayed at v5, after which the workflow could never be written
//! again). DynamoDB itself serializes transactions. So the server runs with moto's DynamoDB
//! write operations behind one re-entrant lock ([`SERVER`], `tools/moto_server.py`: a
//! transaction calls the others); everything else is moto as installed.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use aws_config::{BehaviorVersion, Region, SdkConfig};
use orchestrator::aws::{AwsStack, Names, RequestCounter};

/// `moto_server`, with DynamoDB's write operations serialized (see the module docs); the same
/// script users run for `loadgen --backend aws`.
const SERVER: &str = include_str!("../../tools/moto_server.py");

/// A running moto server.
pub struct Moto {
    child: Child,
    /// `http://127.0.0.1:<port>`.
    pub endpoint: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port no other server of this process was given, free when checked. Ports are handed out
/// from a counter, not by the system's port 0: a port the system just handed out can be handed
/// out again at once, and then a second server fails to bind while the readiness check
/// connects to the first one, so two tests share one server (and its state).
fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let base = 20_000 + std::process::id() % 20_000;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = u16::try_from(base + n % 20_000).unwrap_or(20_000);
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

impl Moto {
    /// Starts `moto_server` and waits until it answers (on the blocking pool).
    pub async fn start() -> Self {
        tokio::task::spawn_blocking(Self::start_blocking)
            .await
            .expect("moto starts")
    }

    /// Starts `moto_server` and waits until it answers, blocking the thread.
    pub fn start_blocking() -> Self {
        for _ in 0..5 {
            let port = free_port();
            let child = Command::new("python3")
                .args(["-c", SERVER, "-H", "127.0.0.1", "-p", &port.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                // MOTO_LOG=<file> keeps the server's log (tracebacks of its 500s).
                .stderr(
                    std::env::var_os("MOTO_LOG")
                        .and_then(|p| {
                            std::fs::OpenOptions::new()
                                .create(true)
                                .append(true)
                                .open(p)
                                .ok()
                        })
                        .map_or_else(Stdio::null, Stdio::from),
                )
                .spawn()
                .expect("python3 with moto starts (pip install 'moto[server]')");
            let moto = Moto {
                child,
                endpoint: format!("http://127.0.0.1:{port}"),
            };
            if moto.ready() {
                return moto;
            }
        }
        panic!("moto_server did not start");
    }

    fn ready(&self) -> bool {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(30) {
            if std::net::TcpStream::connect(self.endpoint.trim_start_matches("http://")).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// SDK configuration pointing at this server, with dummy credentials.
    pub fn sdk_config(&self) -> SdkConfig {
        aws_config::SdkConfig::builder()
            .http_client(aws_common::http_client())
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .endpoint_url(&self.endpoint)
            .credentials_provider(aws_sdk_sqs::config::SharedCredentialsProvider::new(
                aws_sdk_sqs::config::Credentials::new("test", "test", None, None, "moto"),
            ))
            .build()
    }
}

impl Moto {
    /// Creates the orchestrator's queues and tables named from `prefix` (dead-lettering after
    /// `max_receives`) and connects to them, every request counted on the returned counter.
    pub async fn stack(&self, prefix: &str, max_receives: u32) -> (AwsStack, RequestCounter) {
        let sdk = self.sdk_config();
        let names = Names::new(prefix);
        orchestrator::aws::init::create_all(&sdk, &names, max_receives)
            .await
            .expect("init");
        let counter = RequestCounter::new();
        let stack = orchestrator::aws::connect(&sdk, &names, &counter, 64)
            .await
            .expect("connect");
        (stack, counter)
    }
}
