//! What moto does not do: run an instance's user data. [`Moto::run_user_data`] starts a task
//! that runs the user data of each new instance once, on this machine, as the instance would
//! (builders and app instances alike), so that the reconcilers see what they see on AWS: script
//! reports in the artifact bucket, and builders that power off.
//!
//! The script runs in bash in a temporary directory: its absolute paths (`/var/log/`,
//! `/opt/tenant/`, `/etc/tenant/`, `/tmp/`) are moved under that directory, and a few commands
//! are stand-ins: `aws s3 cp` copies between moto's S3 and local files (through a local mirror
//! of the keys the script names), `aws secretsmanager get-secret-value` answers
//! `value-of-<arn>`, `shutdown` marks the instance to be stopped, `curl` answers
//! the instance id for the metadata service, `id`, `useradd` and `chown` succeed. The
//! tenant's scripts (`provision/*.sh`, `install.sh`) run for real: tests give them commands
//! this machine has.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use aws_sdk_ec2::types::{Filter, InstanceAttributeName};
use base64::Engine as _;

use crate::moto::Moto;

impl Moto {
    /// Runs the user data of every new running instance once, every 200 ms (see the module
    /// docs); a builder whose script powers off is stopped. Abort the task to stop.
    pub fn run_user_data(&self) -> tokio::task::JoinHandle<()> {
        let sdk = self.sdk_config();
        let ec2 = aws_sdk_ec2::Client::new(&sdk);
        let s3 = aws_sdk_s3::Client::from_conf(
            aws_sdk_s3::config::Builder::from(&sdk)
                .force_path_style(true)
                .build(),
        );
        tokio::spawn(async move {
            let mut seen = HashSet::new();
            loop {
                for id in running(&ec2).await {
                    if seen.insert(id.clone()) {
                        start(&ec2, &s3, &id).await;
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    }
}

/// The ids of the running instances.
async fn running(ec2: &aws_sdk_ec2::Client) -> Vec<String> {
    let filter = Filter::builder()
        .name("instance-state-name")
        .values("running")
        .build();
    match ec2.describe_instances().filters(filter).send().await {
        Ok(out) => out
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .filter_map(|i| i.instance_id().map(str::to_owned))
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Runs instance `id`'s user data; stops it if it powered off.
async fn start(ec2: &aws_sdk_ec2::Client, s3: &aws_sdk_s3::Client, id: &str) {
    let Ok(out) = ec2
        .describe_instance_attribute()
        .instance_id(id)
        .attribute(InstanceAttributeName::UserData)
        .send()
        .await
    else {
        return;
    };
    let Some(script) = out
        .user_data()
        .and_then(|v| v.value())
        .and_then(|v| base64::engine::general_purpose::STANDARD.decode(v).ok())
        .map(|b| String::from_utf8_lossy(&b).into_owned())
    else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().to_owned();
    let Some(bucket) = bucket_of(&script) else {
        return;
    };
    // The objects the script fetches: mirrored before it runs.
    let fetched: Vec<String> = script
        .split(&format!("'s3://{bucket}/"))
        .skip(1)
        .filter_map(|rest| rest.split_once('\'').map(|(key, _)| key.to_owned()))
        .collect();
    for key in &fetched {
        if let Ok(object) = s3.get_object().bucket(&bucket).key(key).send().await
            && let Ok(data) = object.body.collect().await
        {
            let path = root.join("bucket").join(key);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(&path, data.into_bytes()).expect("write");
        }
    }
    let id_owned = id.to_owned();
    let bucket_owned = bucket.clone();
    let run_root = root.clone();
    let ran =
        tokio::task::spawn_blocking(move || run(&run_root, &bucket_owned, &id_owned, &script))
            .await
            .unwrap_or(false);
    // What it uploaded: every file of the mirror it did not fetch.
    for path in files(&root.join("bucket")) {
        let key = path
            .strip_prefix(root.join("bucket"))
            .expect("under the mirror")
            .to_string_lossy()
            .into_owned();
        if fetched.contains(&key) {
            continue;
        }
        let body = std::fs::read(&path).expect("read");
        let _ = s3
            .put_object()
            .bucket(&bucket)
            .key(&key)
            .body(body.into())
            .send()
            .await;
    }
    if ran && root.join("powered-off").exists() {
        let _ = ec2.stop_instances().instance_ids(id).send().await;
    }
}

/// The bucket the script's first `s3://` URL names.
fn bucket_of(script: &str) -> Option<String> {
    let rest = script.split_once("s3://")?.1;
    Some(rest.split('/').next()?.to_owned())
}

/// Runs `script` under `root` (see the module docs); whether bash could run it.
fn run(root: &Path, bucket: &str, id: &str, script: &str) -> bool {
    let r = root.display();
    let moved = script
        .replace("/tmp/", &format!("{r}/tmp/"))
        .replace("/var/log/", &format!("{r}/log/"))
        .replace("/opt/tenant/", &format!("{r}/opt/"))
        .replace("/etc/tenant/", &format!("{r}/etc/"));
    for sub in ["tmp", "log", "opt", "etc"] {
        std::fs::create_dir_all(root.join(sub)).expect("mkdir");
    }
    let fakes = format!(
        "aws() {{ if [ \"$1\" = secretsmanager ]; then printf 'value-of-%s' \"$4\"; return 0; fi; local from=\"${{3/s3:\\/\\/{bucket}\\//{r}/bucket/}}\" to=\"${{4/s3:\\/\\/{bucket}\\//{r}/bucket/}}\"; mkdir -p \"$(dirname \"$to\")\"; cp \"$from\" \"$to\"; }}\n\
         shutdown() {{ touch {r}/powered-off; }}\n\
         curl() {{ echo {id}; }}\n\
         id() {{ return 0; }}\n\
         useradd() {{ return 0; }}\n\
         chown() {{ return 0; }}\n"
    );
    std::process::Command::new("bash")
        .arg("-c")
        .arg(format!("{fakes}{moved}"))
        .current_dir(root)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok()
}

/// Every file under `dir`, recursively.
fn files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(files(&path));
        } else {
            found.push(path);
        }
    }
    found
}
