//! Shared test harness: a development PKI generated in a temporary folder by the
//! tool itself, a real gateway on a loopback port, and real mTLS clients.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sgw::domain::Role;
use sgw::pki::{Ca, CertSpec, Issued};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// The trust domain of the development set-up, which tests reuse.
pub const TD: &str = sgw::cli::serve::DEV_TRUST_DOMAIN;

/// A test environment: the dev PKI and config in a temporary folder.
pub struct Env {
    pub dir: tempfile::TempDir,
}

impl Env {
    /// Makes the dev PKI and config (the same code `sgw serve --dev` runs) in a fresh
    /// temporary folder, with the listen port set to 0.
    pub fn new() -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = sgw::cli::serve::prepare_dev(dir.path()).expect("dev set-up");
        let text = std::fs::read_to_string(&config).expect("read config");
        let text = text.replace("listen = \"127.0.0.1:50051\"", "listen = \"127.0.0.1:0\"");
        std::fs::write(&config, text).expect("write config");
        Env { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn config_path(&self) -> PathBuf {
        self.path().join(sgw::cli::serve::DEV_CONFIG)
    }

    pub fn pki_dir(&self) -> PathBuf {
        self.path().join(sgw::cli::serve::DEV_PKI_DIR)
    }

    /// Appends TOML to the config (e.g. a `[limits]` section).
    pub fn append_config(&self, extra: &str) {
        let mut text = std::fs::read_to_string(self.config_path()).expect("read config");
        text.push('\n');
        text.push_str(extra);
        std::fs::write(self.config_path(), text).expect("write config");
    }

    /// The development CA, to issue any certificate a test needs.
    pub fn ca(&self) -> Ca {
        Ca::load_from_dir(&self.pki_dir()).expect("load dev CA")
    }

    pub fn ca_pem(&self) -> String {
        std::fs::read_to_string(self.pki_dir().join("ca.pem")).expect("ca.pem")
    }

    /// The PEM certificate and key of a sample dev identity, e.g. `("agency", "police-met")`.
    pub fn identity(&self, role: Role, id: &str) -> (String, String) {
        let stem = format!("{}-{id}", role.as_str());
        let cert =
            std::fs::read_to_string(self.pki_dir().join(format!("{stem}.pem"))).expect("cert");
        let key = std::fs::read_to_string(self.pki_dir().join(format!("{stem}.key"))).expect("key");
        (cert, key)
    }

    /// Issues a fresh client certificate from the dev CA.
    pub fn issue(&self, spec: &CertSpec) -> Issued {
        self.ca().issue(spec).expect("issue")
    }

    /// Starts the gateway in this process on a loopback port.
    pub async fn start(&self) -> Gateway {
        let config = sgw::config::Config::load(&self.config_path()).expect("config loads");
        let bound = sgw::server::bind(config).await.expect("server binds");
        let addr = bound.local_addr();
        let metrics = bound.metrics_addr();
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(async move {
            bound
                .serve(async {
                    let _ = stopped.await;
                })
                .await
                .map_err(|e| e.to_string())
        });
        Gateway {
            addr,
            metrics,
            stop: Some(stop),
            handle: Some(handle),
            ca_pem: self.ca_pem(),
        }
    }
}

/// A running in-process gateway.
pub struct Gateway {
    pub addr: SocketAddr,
    /// Where `/metrics` is served, when the config sets `[metrics] listen`.
    pub metrics: Option<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<Result<(), String>>>,
    ca_pem: String,
}

impl Gateway {
    /// A channel presenting the given client certificate.
    pub async fn connect(
        &self,
        cert_pem: &str,
        key_pem: &str,
    ) -> Result<Channel, tonic::transport::Error> {
        connect(self.addr, &self.ca_pem, Some((cert_pem, key_pem))).await
    }

    /// A channel for a sample dev identity.
    pub async fn connect_as(&self, env: &Env, role: Role, id: &str) -> Channel {
        let (cert, key) = env.identity(role, id);
        self.connect(&cert, &key).await.expect("connect")
    }

    /// Stops the gateway and waits for it.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(handle) = self.handle.take() {
            let result = tokio::time::timeout(Duration::from_secs(30), handle)
                .await
                .expect("gateway stops within 30 s")
                .expect("gateway task");
            result.expect("gateway ran cleanly");
        }
    }
}

/// Connects over mTLS (or TLS without a client certificate when `identity` is None).
pub async fn connect(
    addr: SocketAddr,
    ca_pem: &str,
    identity: Option<(&str, &str)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Endpoint::from_shared(format!("https://{addr}"))
        .expect("endpoint")
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
}

/// A health check over `channel`: the status code, or OK with the serving status.
pub async fn health(channel: Channel) -> Result<i32, tonic::Status> {
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    let resp = client
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await?;
    Ok(resp.into_inner().status)
}

/// Builds a client spec for `role`/`id` in the dev trust domain.
pub fn client_spec(role: Role, id: &str) -> CertSpec {
    CertSpec::client(TD, role, id, 30)
}

/// Reads a child's stderr until the gateway says where it listens; keeps draining
/// the rest in the background so the child never blocks on a full pipe.
pub async fn wait_for_listen_line(
    stderr: tokio::process::ChildStderr,
    within: Duration,
) -> SocketAddr {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut lines = BufReader::new(stderr).lines();
    let found = tokio::time::timeout(within, async {
        while let Some(line) = lines.next_line().await.expect("read stderr") {
            eprintln!("[sgw] {line}");
            if let Some(rest) = line.split("listening on ").nth(1) {
                let addr = rest.split_whitespace().next().unwrap_or_default();
                if let Ok(addr) = addr.parse() {
                    return addr;
                }
            }
        }
        panic!("sgw exited before listening");
    })
    .await
    .expect("sgw starts listening in time");
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            eprintln!("[sgw] {line}");
        }
    });
    found
}

/// Sends SIGTERM to a child process.
pub async fn terminate(child: &mut tokio::process::Child) {
    if let Some(pid) = child.id() {
        let _ = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status();
    }
}

/// Sends SIGKILL to a child process.
pub async fn kill9(child: &mut tokio::process::Child) {
    let _ = child.start_kill();
    let _ = child.wait().await;
}

/// Every file under a folder, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files_under(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// The gateway as a separate process (`sgw serve --config`), for crash tests.
pub struct Process {
    pub addr: SocketAddr,
    pub child: tokio::process::Child,
}

/// Starts `sgw serve --config` on the env's config, on a free port.
pub async fn spawn_gateway(env: &Env) -> Process {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sgw"))
        .args(["serve", "--config"])
        .arg(env.config_path())
        .current_dir(env.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn sgw");
    let addr = wait_for_listen_line(
        child.stderr.take().expect("stderr"),
        Duration::from_secs(60),
    )
    .await;
    Process { addr, child }
}

impl Process {
    /// SIGKILL: no shutdown, no flush.
    pub async fn kill9(&mut self) {
        kill9(&mut self.child).await;
    }

    /// SIGTERM, then wait for a clean exit.
    pub async fn stop(mut self) {
        terminate(&mut self.child).await;
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("exits after SIGTERM")
            .expect("wait");
        assert!(status.success(), "{status:?}");
    }
}

/// Sets a process's file-size limit (RLIMIT_FSIZE, `soft:hard`) with util-linux
/// prlimit: `"1:unlimited"` makes every write past byte 1 of any file fail with
/// EFBIG, as on a full disk. Only the soft limit moves, so no capability is needed
/// to raise it again.
pub fn set_fsize_limit(pid: u32, limit: &str) {
    let status = std::process::Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &format!("--fsize={limit}")])
        .status()
        .expect("run prlimit");
    assert!(status.success(), "prlimit failed");
}

impl Env {
    /// Sets `[tls] watch` in the config.
    pub fn set_tls_watch(&self, watch: bool) {
        let text = std::fs::read_to_string(self.config_path()).expect("read config");
        let text = text.replace(
            "crl = [\"certs/dev/crl.pem\"]",
            &format!("crl = [\"certs/dev/crl.pem\"]\nwatch = {watch}"),
        );
        std::fs::write(self.config_path(), text).expect("write config");
    }
}

/// Reads a server stream until it ends, for at most `within`, and returns the status
/// it ended with (panics with `what` if it does not end in time, or ends cleanly).
pub async fn stream_end_status<T>(
    stream: &mut tonic::Streaming<T>,
    within: Duration,
    what: &str,
) -> tonic::Status {
    let end = tokio::time::timeout(within, async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return None,
                Err(status) => return Some(status),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what}: the stream did not end within {within:?}"));
    end.unwrap_or_else(|| panic!("{what}: the stream ended without an error status"))
}

/// A TCP connection to `to` from the loopback address `from` (any of 127/8 on
/// Linux), so that a test can be several hosts at once. It sends nothing itself.
pub async fn tcp_from(from: std::net::IpAddr, to: SocketAddr) -> tokio::net::TcpStream {
    let socket = match from {
        std::net::IpAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        std::net::IpAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }
    .expect("socket");
    socket.bind(SocketAddr::new(from, 0)).expect("bind");
    socket.connect(to).await.expect("connect")
}

/// A mutual-TLS connection (ALPN `h2`) the test builds itself from `from` to `to`,
/// presenting the given client certificate, that sends nothing after the handshake:
/// not even the HTTP/2 preface.
pub async fn silent_tls(
    from: std::net::IpAddr,
    to: SocketAddr,
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(ca.expect("CA PEM")).expect("CA");
    }
    let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .expect("certificate PEM");
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).expect("key PEM");
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .expect("client certificate");
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tcp_from(from, to).await;
    let name = ServerName::try_from("localhost").expect("server name");
    connector.connect(name, tcp).await
}

/// Whether the gateway closes `conn` (end of stream or a reset) within `within`,
/// reading and discarding whatever it sends first (an HTTP/2 server's SETTINGS,
/// for one). `within` only stops a test from hanging on a connection left open.
pub async fn closed_by_server(
    conn: &mut (impl tokio::io::AsyncRead + Unpin),
    within: Duration,
) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 1024];
    tokio::time::timeout(within, async {
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await
    .is_ok()
}

/// Tries to be served a health check as `cert` until it is, for ten seconds at
/// most: for a slot that the gateway frees when it notices a closed connection.
pub async fn served_soon(gw: &Gateway, cert_pem: &str, key_pem: &str) -> bool {
    served_channel(gw, cert_pem, key_pem).await.is_some()
}

/// A channel of this identity that has been served a health check, trying for
/// ten seconds at most (a connection the gateway has no slot for waits unserved).
pub async fn served_channel(gw: &Gateway, cert_pem: &str, key_pem: &str) -> Option<Channel> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::time::Instant::now() < deadline {
        let served = tokio::time::timeout_at(deadline, async {
            let channel = gw.connect(cert_pem, key_pem).await.ok()?;
            health(channel.clone()).await.ok().map(|_| channel)
        })
        .await;
        match served {
            Ok(Some(channel)) => return Some(channel),
            Ok(None) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(_) => break,
        }
    }
    None
}
