//! A real etcd cluster on loopback ports (Debian's `etcd-server`), started by the tests: members
//! can be killed and restarted to take quorum away and give it back.

use super::{free_port, tool};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Member {
    name: String,
    client: u16,
    /// A plain-HTTP client listener beside a TLS one, for the tests' status checks.
    status: u16,
    peer: u16,
    data: PathBuf,
    child: Option<Child>,
}

/// The files of members that serve clients over TLS and require client certificates.
pub struct EtcdTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA client certificates must be signed by.
    pub client_ca: PathBuf,
}

/// A running etcd cluster; every member is killed on drop.
pub struct EtcdCluster {
    binary: PathBuf,
    members: Vec<Member>,
    initial: String,
    tls: Option<EtcdTls>,
    _dir: tempfile::TempDir,
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

impl EtcdCluster {
    /// Starts `n` members and waits until the cluster has a leader. `None` (skipped, saying
    /// so) when `etcd` is not installed, unless CI requires it.
    pub fn start(n: usize) -> Option<EtcdCluster> {
        EtcdCluster::start_with(n, None)
    }

    /// Starts `n` members whose clients must speak TLS and present a certificate signed by
    /// `tls.client_ca` (etcd's `--client-cert-auth`).
    pub fn start_tls(n: usize, tls: EtcdTls) -> Option<EtcdCluster> {
        EtcdCluster::start_with(n, Some(tls))
    }

    fn start_with(n: usize, tls: Option<EtcdTls>) -> Option<EtcdCluster> {
        let binary = tool("SWITCHYARD_ETCD", "etcd")?;
        let dir = tempfile::tempdir().expect("etcd dir");
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client: free_port(),
                status: free_port(),
                peer: free_port(),
                data: dir.path().join(format!("m{i}")),
                child: None,
            })
            .collect();
        let initial =
            members.iter().map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer)).collect::<Vec<_>>().join(",");
        let mut cluster = EtcdCluster { binary, members, initial, tls, _dir: dir };
        for i in 0..n {
            cluster.spawn(i);
        }
        cluster.wait_healthy(Duration::from_secs(30));
        Some(cluster)
    }

    fn spawn(&mut self, i: usize) {
        let m = &self.members[i];
        let peer = format!("http://127.0.0.1:{}", m.peer);
        let mut command = Command::new(&self.binary);
        match &self.tls {
            None => {
                let client = format!("http://127.0.0.1:{}", m.client);
                command.args(["--listen-client-urls", &client, "--advertise-client-urls", &client]);
            }
            Some(tls) => {
                let client = format!("https://127.0.0.1:{}", m.client);
                let listen = format!("{client},http://127.0.0.1:{}", m.status);
                command.args(["--listen-client-urls", &listen, "--advertise-client-urls", &client]);
                command.arg("--cert-file").arg(&tls.cert).arg("--key-file").arg(&tls.key);
                command.arg("--client-cert-auth").arg("--trusted-ca-file").arg(&tls.client_ca);
            }
        }
        let child = command
            .args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&m.data)
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial, "--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", "switchyard-test"])
            // Fast elections, so a killed leader is replaced within a second.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--log-level", "error"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd starts");
        self.members[i].child = Some(child);
    }

    /// Kills member `i` (SIGKILL: no goodbye to the others).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts member `i` again on its data.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
    }

    /// `host:port` of every member's client URL.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| format!("127.0.0.1:{}", m.client)).collect()
    }

    /// The `--store` value for this cluster with `prefix`.
    pub fn url(&self, prefix: &str) -> String {
        let scheme = if self.tls.is_some() { "etcds" } else { "etcd" };
        format!("{scheme}://{}/{prefix}", self.endpoints().join(","))
    }

    /// Member status through etcd's JSON gateway: `(member id, leader id)`, when it answers.
    fn status(&self, i: usize) -> Option<(String, String)> {
        use std::io::{Read, Write};
        let m = &self.members[i];
        let port = if self.tls.is_some() { m.status } else { m.client };
        let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        conn.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
        conn.write_all(b"POST /v3/maintenance/status HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}").ok()?;
        let mut answer = Vec::new();
        conn.read_to_end(&mut answer).ok()?;
        let body = answer.windows(4).position(|w| w == b"\r\n\r\n").map(|at| &answer[at + 4..])?;
        let v: serde_json::Value = serde_json::from_slice(body).ok()?;
        let id = v["header"]["member_id"].as_str()?.to_string();
        let leader = v["leader"].as_str()?.to_string();
        Some((id, leader))
    }

    /// The index of the current leader.
    pub fn leader(&self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let statuses: Vec<Option<(String, String)>> =
                (0..self.members.len()).map(|i| self.members[i].child.as_ref().and_then(|_| self.status(i))).collect();
            for (i, s) in statuses.iter().enumerate() {
                if let Some((id, leader)) = s
                    && id == leader
                {
                    return i;
                }
            }
            assert!(Instant::now() < deadline, "the etcd cluster has no leader");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until a leader is elected among the running members.
    pub fn wait_healthy(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let live: Vec<usize> = (0..self.members.len()).filter(|&i| self.members[i].child.is_some()).collect();
            let led = live.iter().any(|&i| self.status(i).is_some_and(|(id, leader)| leader != "0" && !id.is_empty()));
            if led {
                return;
            }
            assert!(Instant::now() < deadline, "the etcd cluster did not elect a leader");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
