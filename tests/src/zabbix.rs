//! A throwaway Zabbix server for tests: the one place that installs, configures, starts and
//! removes it (issue 13, "Zabbix for real").
//!
//! What runs, all of it on loopback and under one scratch directory:
//! - a private PostgreSQL cluster (`initdb` of the installed PostgreSQL, run as `postgres`, TCP on
//!   127.0.0.1 only, `fsync=off`), with the Zabbix schema loaded from the package's
//!   `/usr/share/zabbix-server-pgsql/{schema,images,data}.sql.gz`;
//! - `zabbix_server -f` with a private configuration (own PID, log and socket files, loopback
//!   trapper, few processes, the configuration cache refreshed every
//!   [`CACHE_UPDATE_FREQUENCY_S`] seconds so that new hosts and discovered items are polled
//!   quickly);
//! - the PHP frontend, which carries the JSON-RPC API, served by PHP's built-in web server from a
//!   hard-linked copy of `/usr/share/zabbix` whose `CConfigFile.php` points at a generated
//!   `zabbix.conf.php` (Debian's frontend reads `/etc/zabbix/zabbix.conf.php`, which is left
//!   alone).
//!
//! Versions: Debian 12 (bookworm) ships Zabbix 6.0 LTS (6.0.14: `zabbix-server-pgsql`,
//! `zabbix-frontend-php`) and PostgreSQL 15; [`PACKAGES`] lists what [`ensure_installed`] adds.
//!
//! Every wait has a deadline. [`Zabbix`]'s `Drop` stops the web server and the Zabbix server,
//! drops the database, stops PostgreSQL and removes the scratch directory, also when the test
//! panics (then it prints the tail of the server's log first).
//!
//! ```no_run
//! use std::time::Duration;
//! tests::zabbix::ensure_installed(Duration::from_secs(600))?;
//! let zbx = tests::zabbix::Zabbix::start()?;
//! let template = zbx.import_template(&std::fs::read_to_string("stallmon_template.yaml")?)?;
//! let host = zbx.create_host("node-1", &template, &[("{$STALLMON.PORT}", "19435")])?;
//! # anyhow::Ok(())
//! ```

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};

/// Debian packages: the server (PostgreSQL flavour), its database, the frontend (which carries
/// the JSON-RPC API) and PHP's command-line interpreter with the PostgreSQL driver (its built-in
/// web server serves the frontend, no Apache).
pub const PACKAGES: &[&str] = &[
    "postgresql",
    "zabbix-server-pgsql",
    "zabbix-frontend-php",
    "php-cli",
    "php-pgsql",
];

/// The package's SQL scripts, loaded in this order.
const SQL_DIR: &str = "/usr/share/zabbix-server-pgsql";
const SQL_FILES: &[&str] = &["schema.sql.gz", "images.sql.gz", "data.sql.gz"];
const FRONTEND_DIR: &str = "/usr/share/zabbix";
const SERVER_BIN: &str = "/usr/sbin/zabbix_server";
/// Where Debian's frontend looks for its configuration (patched in the private copy).
const DEBIAN_FRONTEND_CONF: &str = "/etc/zabbix/zabbix.conf.php";

/// Seconds between two refreshes of the server's configuration cache (`CacheUpdateFrequency`;
/// the default is 60): new hosts, macros and discovered items are polled this soon.
pub const CACHE_UPDATE_FREQUENCY_S: u32 = 2;

/// Deadlines.
const APT_TIMEOUT: Duration = Duration::from_secs(600);
const STEP_TIMEOUT: Duration = Duration::from_secs(60);
const SCHEMA_TIMEOUT: Duration = Duration::from_secs(300);
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// What [`ensure_installed`] did.
#[derive(Debug)]
pub struct Install {
    /// Packages it installed (empty when everything was there).
    pub installed: Vec<String>,
    /// Time spent, checking included.
    pub elapsed: Duration,
}

fn package_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f", "${db:Status-Status}", pkg])
        .output()
        .is_ok_and(|o| o.status.success() && o.stdout == b"installed")
}

/// Installs the missing [`PACKAGES`] with apt-get (time-bounded: `timeout` in all). Services are
/// not started by the packages' scripts: a `policy-rc.d` that denies them is put in place for the
/// install when the machine has none (and removed after).
pub fn ensure_installed(timeout: Duration) -> Result<Install> {
    let started = Instant::now();
    let deadline = started + timeout.min(APT_TIMEOUT);
    let missing: Vec<String> = PACKAGES
        .iter()
        .filter(|p| !package_installed(p))
        .map(|p| p.to_string())
        .collect();
    if !missing.is_empty() {
        let _guard = PolicyRcGuard::install()?;
        let left = || deadline.saturating_duration_since(Instant::now());
        run_bounded(
            Command::new("apt-get")
                .args(["update", "-qq"])
                .stdin(Stdio::null()),
            left(),
            "apt-get update",
        )?;
        run_bounded(
            Command::new("apt-get")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&missing)
                .stdin(Stdio::null()),
            left(),
            "apt-get install",
        )?;
        let still: Vec<&String> = missing.iter().filter(|p| !package_installed(p)).collect();
        if !still.is_empty() {
            bail!("apt-get did not install {still:?}");
        }
    }
    for path in [SERVER_BIN, FRONTEND_DIR, SQL_DIR] {
        if !Path::new(path).exists() {
            bail!("{path} is missing although {PACKAGES:?} are installed");
        }
    }
    postgres_bin_dir()?;
    Ok(Install {
        installed: missing,
        elapsed: started.elapsed(),
    })
}

/// `/usr/sbin/policy-rc.d` answering 101 ("action forbidden") for the time of an install, so that
/// packages do not start services (PostgreSQL's main cluster, zabbix-server) on the machine.
struct PolicyRcGuard {
    created: Option<PathBuf>,
}

impl PolicyRcGuard {
    fn install() -> Result<Self> {
        let path = PathBuf::from("/usr/sbin/policy-rc.d");
        if path.exists() {
            return Ok(Self { created: None });
        }
        std::fs::write(
            &path,
            "#!/bin/sh\n# stallmon tests: no service starts during apt-get\nexit 101\n",
        )
        .with_context(|| format!("writing {}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
        Ok(Self {
            created: Some(path),
        })
    }
}

impl Drop for PolicyRcGuard {
    fn drop(&mut self) {
        if let Some(p) = &self.created {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The newest `/usr/lib/postgresql/<major>/bin`.
fn postgres_bin_dir() -> Result<PathBuf> {
    let mut best: Option<(u32, PathBuf)> = None;
    for entry in std::fs::read_dir("/usr/lib/postgresql").context("PostgreSQL is not installed")? {
        let entry = entry?;
        let Ok(major) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let bin = entry.path().join("bin");
        if bin.join("postgres").exists() && best.as_ref().is_none_or(|(m, _)| major > *m) {
            best = Some((major, bin));
        }
    }
    best.map(|(_, p)| p)
        .ok_or_else(|| anyhow!("no /usr/lib/postgresql/*/bin/postgres"))
}

/// Runs `cmd` to completion within `timeout` (killing its process group past it); its combined
/// output, or an error with the output's tail when it fails. Its stdin is the caller's choice.
pub fn run_bounded(cmd: &mut Command, timeout: Duration, what: &str) -> Result<String> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    let readers: Vec<_> = [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    .map(|mut r| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            buf
        })
    })
    .collect();
    let status = wait_child(&mut child, timeout);
    let output: String = readers
        .into_iter()
        .map(|h| String::from_utf8_lossy(&h.join().unwrap_or_default()).into_owned())
        .collect::<Vec<_>>()
        .join("");
    match status {
        Some(s) if s.success() => Ok(output),
        Some(s) => bail!("{what} failed ({s}):\n{}", tail(&output, 40)),
        None => bail!(
            "{what} did not finish within {timeout:?} (killed):\n{}",
            tail(&output, 40)
        ),
    }
}

/// Waits for `child` up to `timeout`; on timeout kills its process group (it must lead one) and
/// returns None.
fn wait_child(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        if Instant::now() >= deadline {
            // SAFETY: signalling the process group we created for this child.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Stops a child: `signal`, then SIGKILL to its process group after [`STOP_TIMEOUT`].
fn stop_child(child: &mut Child, signal: i32) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, signal) };
    wait_child(child, STOP_TIMEOUT);
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Polls `probe` every `period` until it returns `Some`, for at most `timeout`; the error names
/// `what` and the probe's last error.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    period: Duration,
    mut probe: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    let mut last_err = None;
    loop {
        match probe() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if Instant::now() >= deadline {
            match last_err {
                Some(e) => bail!("timed out after {timeout:?} waiting for {what}: {e:#}"),
                None => bail!("timed out after {timeout:?} waiting for {what}"),
            }
        }
        std::thread::sleep(period);
    }
}

fn free_port_in(range: std::ops::Range<u16>) -> Result<u16> {
    // Zabbix's ListenPort must lie in 1024-32767, below the kernel's ephemeral range: probe.
    let span = (range.end - range.start) as u32;
    let start = (std::process::id().wrapping_mul(7919) % span) as u16;
    for i in 0..span as u16 {
        let port = range.start + (start + i) % span as u16;
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port in {range:?}")
}

fn free_port() -> Result<u16> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding a free port")?;
    Ok(l.local_addr()?.port())
}

/// uid and gid of a system user.
fn user_ids(name: &str) -> Result<(u32, u32)> {
    let c = std::ffi::CString::new(name)?;
    // SAFETY: getpwnam returns a pointer to static storage or NULL; read at once.
    let pw = unsafe { libc::getpwnam(c.as_ptr()) };
    if pw.is_null() {
        bail!("no user {name:?} (is PostgreSQL installed?)");
    }
    // SAFETY: non-null pointer from getpwnam.
    Ok(unsafe { ((*pw).pw_uid, (*pw).pw_gid) })
}

fn chown(path: &Path, (uid, gid): (u32, u32)) -> Result<()> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .with_context(|| format!("chown {}", path.display()))
}

/// POST `body` (JSON) to `path` with HTTP/1.0; (status, body).
fn http_post_json(addr: SocketAddr, path: &str, body: &[u8]) -> Result<(u16, Vec<u8>)> {
    let timeout = Duration::from_secs(60);
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    // One write: PHP's built-in server rejects some requests whose head arrives in pieces
    // ("Malformed HTTP request").
    let mut request = format!(
        "POST {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json-rpc\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    stream.write_all(&request)?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow!("POST {path}: malformed HTTP answer"))?;
    let head = String::from_utf8_lossy(&response[..split]);
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("POST {path}: bad status line: {head}"))?;
    Ok((status, response[split + 4..].to_vec()))
}

/// A JSON-RPC client of the Zabbix API (`api_jsonrpc.php`).
pub struct Api {
    addr: SocketAddr,
    token: Mutex<Option<String>>,
    id: AtomicU32,
}

impl Api {
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            token: Mutex::new(None),
            id: AtomicU32::new(1),
        }
    }

    /// Calls `method`; its `result`, or an error with the API's message and data.
    pub fn call(&self, method: &str, params: Value) -> Result<Value> {
        let mut req = json!({
            "jsonrpc": "2.0",
            "method": method,
            "params": params,
            "id": self.id.fetch_add(1, Ordering::Relaxed),
        });
        if !matches!(method, "user.login" | "apiinfo.version")
            && let Some(t) = self.token.lock().unwrap().as_ref()
        {
            req["auth"] = json!(t);
        }
        // Reads are retried on transport errors; changes are not (they may have happened).
        let attempts = if method.ends_with(".get") { 3 } else { 1 };
        let mut answer = Err(anyhow!("not called"));
        for _ in 0..attempts {
            answer = http_post_json(self.addr, "/api_jsonrpc.php", req.to_string().as_bytes());
            if answer.is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let (code, body) = answer.with_context(|| format!("Zabbix API {method}"))?;
        let text = String::from_utf8_lossy(&body);
        if code != 200 {
            bail!("Zabbix API {method}: HTTP {code}: {}", tail(&text, 20));
        }
        let v: Value = serde_json::from_str(&text)
            .with_context(|| format!("Zabbix API {method}: not JSON: {}", tail(&text, 20)))?;
        if let Some(e) = v.get("error") {
            bail!(
                "Zabbix API {method}: {} {}",
                e["message"].as_str().unwrap_or("?"),
                e["data"].as_str().unwrap_or("")
            );
        }
        Ok(v["result"].clone())
    }

    /// Logs in (the default super administrator of a fresh database).
    pub fn login(&self, user: &str, password: &str) -> Result<()> {
        let token = self.call(
            "user.login",
            json!({"username": user, "password": password}),
        )?;
        let token = token
            .as_str()
            .ok_or_else(|| anyhow!("user.login answered {token}"))?;
        *self.token.lock().unwrap() = Some(token.to_string());
        Ok(())
    }
}

/// A trigger of a host as the API reports it.
#[derive(Clone, Debug)]
pub struct Trigger {
    pub id: String,
    /// Name with macros expanded.
    pub name: String,
    /// 1 while in problem state.
    pub value: u8,
    /// 1 when Zabbix cannot evaluate it ("unknown"); `error` says why.
    pub state: u8,
    pub error: String,
}

/// One value of an item's history.
#[derive(Clone, Copy, Debug)]
pub struct HistoryValue {
    /// Unix time of collection, in seconds (clock + ns).
    pub t: f64,
    pub value: f64,
}

/// A running throwaway Zabbix; stopped and removed on drop.
pub struct Zabbix {
    dir: PathBuf,
    pg_bin: PathBuf,
    pg_port: u16,
    postgres: Option<Child>,
    server: Option<Child>,
    web: Option<Child>,
    /// The frontend (API) address.
    pub web_addr: SocketAddr,
    /// The server's trapper port.
    pub server_port: u16,
    api: Api,
    /// `apiinfo.version`, e.g. "6.0.14".
    pub version: String,
    /// How long each start-up step took.
    pub timings: Vec<(&'static str, Duration)>,
    group_id: Mutex<Option<String>>,
}

impl Zabbix {
    /// Creates the database, starts the server and the frontend, logs in to the API and disables
    /// the "Zabbix server" host of the default data (it would poll an agent that is not there).
    pub fn start() -> Result<Self> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        // Short: Unix socket paths (SocketDir) are limited to 107 bytes.
        let dir = std::env::temp_dir().join(format!(
            "smzbx-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
        let web_port = free_port()?;
        let mut z = Zabbix {
            dir,
            pg_bin: postgres_bin_dir()?,
            pg_port: free_port()?,
            postgres: None,
            server: None,
            web: None,
            web_addr: SocketAddr::from((Ipv4Addr::LOCALHOST, web_port)),
            server_port: free_port_in(10051..32767)?,
            api: Api::new(SocketAddr::from((Ipv4Addr::LOCALHOST, web_port))),
            version: String::new(),
            timings: Vec::new(),
            group_id: Mutex::new(None),
        };
        z.step("PostgreSQL cluster (initdb, start)", Self::start_postgres)?;
        z.step(
            "Zabbix schema and data (SQL scripts)",
            Self::create_database,
        )?;
        z.step("zabbix_server start", Self::start_server)?;
        z.step("frontend (php -S) and API login", Self::start_frontend)?;
        Ok(z)
    }

    fn step(&mut self, name: &'static str, f: fn(&mut Self) -> Result<()>) -> Result<()> {
        let t = Instant::now();
        f(self).with_context(|| format!("Zabbix set-up: {name}"))?;
        self.timings.push((name, t.elapsed()));
        Ok(())
    }

    /// The scratch directory (configuration, logs, database cluster).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn api(&self) -> &Api {
        &self.api
    }

    fn pg_dir(&self) -> PathBuf {
        self.dir.join("pg")
    }

    fn psql(&self, user: &str, db: &str) -> Command {
        let mut c = Command::new(self.pg_bin.join("psql"));
        c.args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1"])
            .args(["-p", &self.pg_port.to_string(), "-U", user, "-d", db])
            .env("PGCONNECT_TIMEOUT", "5")
            .stdin(Stdio::null());
        c
    }

    fn start_postgres(&mut self) -> Result<()> {
        let ids = user_ids("postgres")?;
        let pg = self.pg_dir();
        std::fs::create_dir_all(&pg)?;
        chown(&pg, ids)?;
        let as_postgres = |bin: &str| {
            let mut c = Command::new(self.pg_bin.join(bin));
            c.uid(ids.0)
                .gid(ids.1)
                .current_dir(&pg)
                .env("LC_ALL", "C")
                .env_remove("PGDATA")
                .stdin(Stdio::null());
            c
        };
        run_bounded(
            as_postgres("initdb")
                .args(["-D", "data", "-A", "trust", "-U", "postgres", "-E", "UTF8"])
                .args(["--locale=C", "--no-sync", "--no-instructions"]),
            STEP_TIMEOUT,
            "initdb",
        )?;
        let log = std::fs::File::create(pg.join("postgres.log"))?;
        let child = as_postgres("postgres")
            .args(["-D", "data", "-p", &self.pg_port.to_string()])
            .arg("-k")
            .arg(&pg)
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
            .args(["-c", "synchronous_commit=off", "-c", "full_page_writes=off"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .context("starting postgres")?;
        self.postgres = Some(child);
        let port = self.pg_port.to_string();
        let isready = self.pg_bin.join("pg_isready");
        wait_for(
            "PostgreSQL to accept connections",
            STEP_TIMEOUT,
            Duration::from_millis(200),
            || {
                if let Some(s) = self.postgres.as_mut().unwrap().try_wait()? {
                    bail!(
                        "postgres exited ({s}): {}",
                        tail(&read_lossy(&self.pg_dir().join("postgres.log")), 20)
                    );
                }
                let ok = Command::new(&isready)
                    .args(["-q", "-h", "127.0.0.1", "-p", &port, "-t", "1"])
                    .status()?
                    .success();
                Ok(ok.then_some(()))
            },
        )
    }

    fn create_database(&mut self) -> Result<()> {
        run_bounded(
            self.psql("postgres", "postgres")
                .args(["-c", "CREATE ROLE zabbix LOGIN"])
                .args([
                    "-c",
                    "CREATE DATABASE zabbix OWNER zabbix ENCODING 'UTF8' TEMPLATE template0",
                ]),
            STEP_TIMEOUT,
            "creating the zabbix database",
        )?;
        let mut zcat = Command::new("zcat")
            .args(SQL_FILES.iter().map(|f| Path::new(SQL_DIR).join(f)))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .context("starting zcat")?;
        let sql = zcat.stdout.take().unwrap();
        let out = run_bounded(
            self.psql("zabbix", "zabbix").stdin(sql),
            SCHEMA_TIMEOUT,
            "loading the Zabbix SQL scripts",
        );
        let zcat_status = wait_child(&mut zcat, STEP_TIMEOUT);
        out?;
        if !zcat_status.is_some_and(|s| s.success()) {
            bail!("zcat of {SQL_DIR}/{SQL_FILES:?} failed: {zcat_status:?}");
        }
        Ok(())
    }

    fn server_conf(&self) -> String {
        let d = self.dir.display();
        let run = self.dir.join("run");
        format!(
            "# stallmon tests: throwaway server, loopback only, everything under {d}\n\
             ListenIP=127.0.0.1\n\
             ListenPort={port}\n\
             PidFile={d}/zabbix_server.pid\n\
             LogType=file\n\
             LogFile={d}/zabbix_server.log\n\
             LogFileSize=0\n\
             DebugLevel=3\n\
             SocketDir={run}\n\
             TmpDir={run}\n\
             DBHost=127.0.0.1\n\
             DBPort={pg}\n\
             DBName=zabbix\n\
             DBUser=zabbix\n\
             AllowRoot=1\n\
             CacheUpdateFrequency={CACHE_UPDATE_FREQUENCY_S}\n\
             StartPollers=2\n\
             StartPollersUnreachable=1\n\
             StartPreprocessors=2\n\
             StartHistoryPollers=1\n\
             StartLLDProcessors=1\n\
             StartDBSyncers=1\n\
             StartTrappers=1\n\
             StartTimers=1\n\
             StartEscalators=1\n\
             StartAlerters=1\n\
             StartPingers=0\n\
             StartDiscoverers=0\n\
             StartHTTPPollers=0\n\
             StartProxyPollers=0\n\
             StartODBCPollers=0\n\
             StartReportWriters=0\n\
             HousekeepingFrequency=0\n\
             Timeout=4\n",
            port = self.server_port,
            pg = self.pg_port,
            run = run.display(),
        )
    }

    fn start_server(&mut self) -> Result<()> {
        std::fs::create_dir_all(self.dir.join("run"))?;
        let conf = self.dir.join("zabbix_server.conf");
        std::fs::write(&conf, self.server_conf())?;
        let out = std::fs::File::create(self.dir.join("zabbix_server.out"))?;
        let child = Command::new(SERVER_BIN)
            .arg("-f")
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {SERVER_BIN}"))?;
        self.server = Some(child);
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.server_port));
        wait_for(
            "zabbix_server's trapper to listen",
            STEP_TIMEOUT,
            Duration::from_millis(200),
            || {
                if let Some(s) = self.server.as_mut().unwrap().try_wait()? {
                    bail!("zabbix_server exited ({s}):\n{}", self.server_log(30));
                }
                Ok(
                    TcpStream::connect_timeout(&addr, Duration::from_millis(500))
                        .is_ok()
                        .then_some(()),
                )
            },
        )
    }

    fn frontend_conf(&self) -> String {
        format!(
            "<?php\n// stallmon tests: generated, throwaway\n\
             $DB['TYPE'] = 'POSTGRESQL';\n\
             $DB['SERVER'] = '127.0.0.1';\n\
             $DB['PORT'] = '{pg}';\n\
             $DB['DATABASE'] = 'zabbix';\n\
             $DB['USER'] = 'zabbix';\n\
             $DB['PASSWORD'] = '';\n\
             $DB['SCHEMA'] = '';\n\
             $DB['ENCRYPTION'] = false;\n\
             $DB['KEY_FILE'] = '';\n\
             $DB['CERT_FILE'] = '';\n\
             $DB['CA_FILE'] = '';\n\
             $DB['VERIFY_HOST'] = false;\n\
             $DB['CIPHER_LIST'] = '';\n\
             $DB['VAULT_URL'] = '';\n\
             $DB['VAULT_DB_PATH'] = '';\n\
             $DB['VAULT_TOKEN'] = '';\n\
             $DB['DOUBLE_IEEE754'] = true;\n\
             $ZBX_SERVER = '127.0.0.1';\n\
             $ZBX_SERVER_PORT = '{port}';\n\
             $ZBX_SERVER_NAME = 'stallmon tests';\n\
             $IMAGE_FORMAT_DEFAULT = IMAGE_FORMAT_PNG;\n",
            pg = self.pg_port,
            port = self.server_port,
        )
    }

    fn start_frontend(&mut self) -> Result<()> {
        // A private copy of the frontend (hard links: instant, no space), so that its
        // configuration file can be ours.
        let web = self.dir.join("web");
        let linked = Command::new("cp")
            .arg("-al")
            .arg(FRONTEND_DIR)
            .arg(&web)
            .status()?
            .success();
        if !linked {
            let _ = std::fs::remove_dir_all(&web);
            run_bounded(
                Command::new("cp")
                    .arg("-a")
                    .arg(FRONTEND_DIR)
                    .arg(&web)
                    .stdin(Stdio::null()),
                STEP_TIMEOUT,
                "copying the frontend",
            )?;
        }
        let conf = self.dir.join("zabbix.conf.php");
        std::fs::write(&conf, self.frontend_conf())?;
        // Debian's CConfigFile reads /etc/zabbix/zabbix.conf.php; upstream's reads
        // conf/zabbix.conf.php under the frontend. Replace files, never write through a link.
        let rel = "include/classes/core/CConfigFile.php";
        let original = std::fs::read_to_string(Path::new(FRONTEND_DIR).join(rel))?;
        let patched = original.replace(
            &format!("'{DEBIAN_FRONTEND_CONF}'"),
            &format!("'{}'", conf.display()),
        );
        std::fs::remove_file(web.join(rel))?;
        std::fs::write(web.join(rel), patched)?;
        let local_conf = web.join("conf/zabbix.conf.php");
        let _ = std::fs::remove_file(&local_conf);
        std::fs::write(&local_conf, self.frontend_conf())?;

        let log = std::fs::File::create(self.dir.join("php.log"))?;
        let child = Command::new("php")
            .args(["-d", "memory_limit=1G", "-d", "max_execution_time=300"])
            .args(["-d", "post_max_size=32M", "-d", "date.timezone=UTC"])
            .arg("-S")
            .arg(self.web_addr.to_string())
            .arg("-t")
            .arg(&web)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .context("starting php -S")?;
        self.web = Some(child);
        self.version = wait_for(
            "the Zabbix API to answer",
            STEP_TIMEOUT,
            Duration::from_millis(200),
            || {
                if let Some(s) = self.web.as_mut().unwrap().try_wait()? {
                    bail!(
                        "php -S exited ({s}): {}",
                        tail(&read_lossy(&self.dir.join("php.log")), 20)
                    );
                }
                Ok(self
                    .api
                    .call("apiinfo.version", json!([]))
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string)))
            },
        )?;
        self.api.login("Admin", "zabbix")?;
        let hosts = self.api.call(
            "host.get",
            json!({"filter": {"host": ["Zabbix server"]}, "output": ["hostid"]}),
        )?;
        for h in hosts.as_array().into_iter().flatten() {
            self.api
                .call("host.update", json!({"hostid": h["hostid"], "status": 1}))?;
        }
        Ok(())
    }

    /// The last `n` lines of the server's log.
    pub fn server_log(&self, n: usize) -> String {
        tail(&read_lossy(&self.dir.join("zabbix_server.log")), n)
    }

    /// Imports a template (YAML export) with `configuration.import`; the id of the (first)
    /// template it defines.
    pub fn import_template(&self, yaml: &str) -> Result<String> {
        let doc: serde_yaml::Value = serde_yaml::from_str(yaml).context("template YAML")?;
        let name = doc["zabbix_export"]["templates"][0]["template"]
            .as_str()
            .ok_or_else(|| anyhow!("no zabbix_export.templates[0].template"))?
            .to_string();
        let all = json!({"createMissing": true, "updateExisting": true, "deleteMissing": true});
        let add = json!({"createMissing": true, "updateExisting": true});
        self.api.call(
            "configuration.import",
            json!({
                "format": "yaml",
                "source": yaml,
                "rules": {
                    "groups": {"createMissing": true},
                    "templates": add,
                    "valueMaps": all,
                    "items": all,
                    "discoveryRules": all,
                    "triggers": all,
                    "graphs": all,
                    "templateLinkage": {"createMissing": true},
                },
            }),
        )?;
        let t = self.api.call(
            "template.get",
            json!({"filter": {"host": [name.as_str()]}, "output": ["templateid"]}),
        )?;
        t[0]["templateid"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("template {name:?} not found after the import: {t}"))
    }

    /// Creates a host (group "stallmon tests", agent interface on 127.0.0.1, which the
    /// template's `{HOST.CONN}` resolves to) linked to `template_id`, with user macros.
    pub fn create_host(
        &self,
        name: &str,
        template_id: &str,
        macros: &[(&str, &str)],
    ) -> Result<String> {
        let group = {
            let mut g = self.group_id.lock().unwrap();
            if g.is_none() {
                let r = self
                    .api
                    .call("hostgroup.create", json!({"name": "stallmon tests"}))?;
                *g = r["groupids"][0].as_str().map(str::to_string);
            }
            g.clone().ok_or_else(|| anyhow!("hostgroup.create"))?
        };
        let macros: Vec<Value> = macros
            .iter()
            .map(|(m, v)| json!({"macro": m, "value": v}))
            .collect();
        let r = self.api.call(
            "host.create",
            json!({
                "host": name,
                "groups": [{"groupid": group}],
                "templates": [{"templateid": template_id}],
                "interfaces": [{"type": 1, "main": 1, "useip": 1, "ip": "127.0.0.1",
                                "dns": "", "port": "10050"}],
                "macros": macros,
            }),
        )?;
        r["hostids"][0]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("host.create answered {r}"))
    }

    /// The host's items (key_, lastvalue, lastclock, state, error, value_type, type,
    /// description), by key.
    pub fn items(&self, host_id: &str) -> Result<std::collections::BTreeMap<String, Value>> {
        let r = self.api.call(
            "item.get",
            json!({
                "hostids": [host_id],
                "output": ["itemid", "key_", "lastvalue", "lastclock", "state", "error",
                           "value_type", "type", "description"],
            }),
        )?;
        Ok(r.as_array()
            .into_iter()
            .flatten()
            .map(|i| (i["key_"].as_str().unwrap_or("").to_string(), i.clone()))
            .collect())
    }

    /// The item's numeric history (newest first, at most `limit` values).
    pub fn history(&self, item: &Value, limit: usize) -> Result<Vec<HistoryValue>> {
        let r = self.api.call(
            "history.get",
            json!({
                "itemids": [item["itemid"]],
                "history": item["value_type"].as_str().unwrap_or("0").parse::<u32>()?,
                "sortfield": "clock",
                "sortorder": "DESC",
                "limit": limit,
            }),
        )?;
        let num = |v: &Value| -> Result<f64> {
            v.as_str()
                .ok_or_else(|| anyhow!("not a string: {v}"))?
                .parse::<f64>()
                .map_err(|e| anyhow!("{v}: {e}"))
        };
        let mut out = Vec::new();
        for h in r.as_array().into_iter().flatten() {
            // Sorting by clock alone leaves values of the same second unordered.
            out.push(HistoryValue {
                t: num(&h["clock"])? + num(&h["ns"])? * 1e-9,
                value: num(&h["value"])?,
            });
        }
        out.sort_by(|a, b| b.t.total_cmp(&a.t));
        Ok(out)
    }

    /// The host's triggers (names expanded).
    pub fn triggers(&self, host_id: &str) -> Result<Vec<Trigger>> {
        let r = self.api.call(
            "trigger.get",
            json!({
                "hostids": [host_id],
                "output": ["triggerid", "description", "value", "state", "error"],
                "expandDescription": true,
            }),
        )?;
        let num = |v: &Value| v.as_str().and_then(|s| s.parse().ok()).unwrap_or(0);
        Ok(r.as_array()
            .into_iter()
            .flatten()
            .map(|t| Trigger {
                id: t["triggerid"].as_str().unwrap_or("").to_string(),
                name: t["description"].as_str().unwrap_or("").to_string(),
                value: num(&t["value"]),
                state: num(&t["state"]),
                error: t["error"].as_str().unwrap_or("").to_string(),
            })
            .collect())
    }

    /// Names of the triggers of the host that went to problem state at least once (trigger
    /// events with value 1: `event.get`), with the time of the first such event.
    pub fn fired(&self, host_id: &str) -> Result<std::collections::BTreeMap<String, f64>> {
        let triggers = self.triggers(host_id)?;
        let r = self.api.call(
            "event.get",
            json!({
                "hostids": [host_id],
                "source": 0,
                "object": 0,
                "value": 1,
                "output": ["objectid", "clock"],
                "sortfield": ["clock"],
            }),
        )?;
        let mut out = std::collections::BTreeMap::new();
        for e in r.as_array().into_iter().flatten() {
            let id = e["objectid"].as_str().unwrap_or("");
            let clock: f64 = e["clock"]
                .as_str()
                .and_then(|c| c.parse().ok())
                .unwrap_or(0.0);
            if let Some(t) = triggers.iter().find(|t| t.id == id) {
                out.entry(t.name.clone()).or_insert(clock);
            }
        }
        Ok(out)
    }

    /// Current problems of the host (`problem.get`): names.
    pub fn problems(&self, host_id: &str) -> Result<Vec<String>> {
        let r = self.api.call(
            "problem.get",
            json!({"hostids": [host_id], "output": ["name"], "source": 0, "object": 0}),
        )?;
        Ok(r.as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["name"].as_str().map(str::to_string))
            .collect())
    }

    /// The host's discovery rules: (key, error) for those in error.
    pub fn discovery_errors(&self, host_id: &str) -> Result<Vec<(String, String)>> {
        let r = self.api.call(
            "discoveryrule.get",
            json!({"hostids": [host_id], "output": ["key_", "state", "error"]}),
        )?;
        Ok(r.as_array()
            .into_iter()
            .flatten()
            .filter(|d| d["state"] != "0" || d["error"] != "")
            .map(|d| {
                (
                    d["key_"].as_str().unwrap_or("").to_string(),
                    d["error"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect())
    }
}

fn read_lossy(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

impl Drop for Zabbix {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- zabbix_server.log (last 60 lines) ----\n{}\n---- php.log ----\n{}",
                self.server_log(60),
                tail(&read_lossy(&self.dir.join("php.log")), 20)
            );
        }
        if let Some(mut c) = self.web.take() {
            stop_child(&mut c, libc::SIGTERM);
        }
        if let Some(mut c) = self.server.take() {
            stop_child(&mut c, libc::SIGTERM);
        }
        if let Some(mut c) = self.postgres.take() {
            if let Err(e) = run_bounded(
                self.psql("postgres", "postgres")
                    .args(["-c", "DROP DATABASE IF EXISTS zabbix WITH (FORCE)"]),
                STOP_TIMEOUT,
                "dropping the zabbix database",
            ) {
                eprintln!("zabbix tests: {e:#}");
            }
            // SIGINT: PostgreSQL's fast shutdown.
            stop_child(&mut c, libc::SIGINT);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
