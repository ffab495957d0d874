//! A `moto_server` of the test's own, on a free 127.0.0.1 port, killed when dropped: each
//! test (or conformance check) gets fresh AWS state. `.ci/run` installs moto when missing.

#![allow(dead_code, unreachable_pub)]

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws_config::{BehaviorVersion, Region, SdkConfig};

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

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl Moto {
    /// Starts `moto_server` and waits until it answers.
    pub async fn start() -> Self {
        for _ in 0..5 {
            let port = free_port();
            let child = Command::new("moto_server")
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("moto_server starts (pip install 'moto[server]')");
            let moto = Moto {
                child,
                endpoint: format!("http://127.0.0.1:{port}"),
            };
            if moto.ready().await {
                return moto;
            }
        }
        panic!("moto_server did not start");
    }

    async fn ready(&self) -> bool {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(30) {
            if std::net::TcpStream::connect(self.endpoint.trim_start_matches("http://")).is_ok() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    /// SDK configuration pointing at this server, with dummy credentials.
    pub fn sdk_config(&self) -> SdkConfig {
        aws_config::SdkConfig::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .endpoint_url(&self.endpoint)
            .credentials_provider(aws_sdk_sqs::config::SharedCredentialsProvider::new(
                aws_sdk_sqs::config::Credentials::new("test", "test", None, None, "moto"),
            ))
            .build()
    }
}
