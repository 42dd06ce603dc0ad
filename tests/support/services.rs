//! Throwaway PostgreSQL and Redis servers for the tests: real servers from the distribution's
//! packages (`postgresql`, `redis-server`), started on loopback in a temporary directory and
//! stopped when dropped. A machine without them fails the test naming the package to install.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use std::os::unix::process::CommandExt;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The newest `/usr/lib/postgresql/<version>/bin`.
fn pg_bin() -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    match versions.pop() {
        Some((_, bin)) => bin,
        None => panic!(
            "PostgreSQL is not installed: these tests start a throwaway server; install the Debian package `postgresql` (apt-get install postgresql)"
        ),
    }
}

/// The uid and gid of the `postgres` user (initdb and postgres refuse to run as root).
fn postgres_user() -> Option<(u32, u32)> {
    if rustix_is_root() {
        let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
        let line = passwd.lines().find(|l| l.starts_with("postgres:"))?;
        let f: Vec<&str> = line.split(':').collect();
        Some((f[2].parse().ok()?, f[3].parse().ok()?))
    } else {
        None
    }
}

fn rustix_is_root() -> bool {
    // The owner of /proc/self is this process's uid.
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

fn as_postgres(cmd: &mut Command) -> &mut Command {
    if let Some((uid, gid)) = postgres_user() {
        cmd.uid(uid).gid(gid);
    }
    cmd
}

fn chown_to_postgres(path: &Path) {
    if let Some((uid, gid)) = postgres_user() {
        let st = Command::new("chown")
            .arg("-R")
            .arg(format!("{uid}:{gid}"))
            .arg(path)
            .status()
            .unwrap();
        assert!(st.success(), "chown {}", path.display());
    }
}

/// A data directory made by initdb once per test process, copied for each server.
fn template() -> &'static Path {
    static T: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &T.get_or_init(|| {
        let bin = pg_bin();
        let dir = tempfile::Builder::new()
            .prefix("midcall-pg-template")
            .tempdir()
            .unwrap();
        chown_to_postgres(dir.path());
        let data = dir.path().join("data");
        let out = as_postgres(Command::new(bin.join("initdb")).args([
            "-D",
            data.to_str().unwrap(),
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
        ]))
        .stdout(Stdio::null())
        .output()
        .unwrap();
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        (dir, data)
    })
    .1
}

/// A running PostgreSQL server on 127.0.0.1.
pub(crate) struct Postgres {
    _dir: tempfile::TempDir,
    data: PathBuf,
    pub(crate) port: u16,
    child: Option<Child>,
    durable: bool,
}

impl Postgres {
    /// A fresh server (fsync off: the tests kill midcall, never the machine).
    pub(crate) fn start() -> Postgres {
        Self::start_with(false)
    }

    /// A fresh server with fsync on (benchmarks compare it with SQLite's synchronous=FULL).
    pub(crate) fn start_durable() -> Postgres {
        Self::start_with(true)
    }

    fn start_with(durable: bool) -> Postgres {
        let template = template();
        let dir = tempfile::Builder::new()
            .prefix("midcall-pg")
            .tempdir()
            .unwrap();
        let data = dir.path().join("data");
        let st = Command::new("cp")
            .arg("-a")
            .arg(template)
            .arg(&data)
            .status()
            .unwrap();
        assert!(st.success());
        chown_to_postgres(dir.path());
        let mut pg = Postgres {
            _dir: dir,
            data,
            port: free_port(),
            child: None,
            durable,
        };
        pg.run();
        pg
    }

    fn run(&mut self) {
        let bin = pg_bin();
        let mut cmd = Command::new(bin.join("postgres"));
        cmd.arg("-D")
            .arg(&self.data)
            .args(["-p", &self.port.to_string(), "-k"])
            .arg(&self.data)
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "max_connections=200",
                "-c",
                "shared_buffers=32MB",
            ]);
        if !self.durable {
            cmd.args(["-c", "fsync=off", "-c", "synchronous_commit=off"]);
        }
        let child = as_postgres(&mut cmd)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start postgres");
        self.child = Some(child);
        // Up to 30 s (600 polls 50 ms apart).
        for _ in 0..600 {
            let ok = Command::new(bin.join("pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-q"])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("postgres did not start within 30 s");
    }

    /// Stops the server (fast shutdown) and waits for it.
    pub(crate) fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-INT", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }

    /// Stops and starts again on the same port and data.
    pub(crate) fn restart(&mut self) {
        self.stop();
        self.run();
    }

    /// Runs SQL with psql on the `postgres` database (or `db`); returns its output.
    pub(crate) fn psql(&self, db: &str, sql: &str) -> String {
        let out = Command::new(pg_bin().join("psql"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                db,
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "psql {sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// A new empty database; its URL.
    pub(crate) fn database(&self) -> String {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "t{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        self.psql("postgres", &format!("CREATE DATABASE {name}"));
        self.url(&name)
    }

    pub(crate) fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // Immediate shutdown: the data directory goes with the test.
            let _ = Command::new("kill")
                .args(["-QUIT", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }
}

/// One PostgreSQL server shared by the tests of this process that only need a database each.
pub(crate) fn shared_postgres() -> &'static Postgres {
    static S: OnceLock<Postgres> = OnceLock::new();
    S.get_or_init(|| {
        let pg = Postgres::start();
        // A static is never dropped: a watchdog stops the server once this process is gone.
        if let Some(c) = &pg.child {
            let _ = Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "while kill -0 {} 2>/dev/null; do sleep 0.5; done; kill -QUIT {}",
                    std::process::id(),
                    c.id()
                ))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn();
        }
        pg
    })
}

/// A running Redis server on 127.0.0.1 (no persistence).
pub(crate) struct Redis {
    dir: tempfile::TempDir,
    pub(crate) port: u16,
    child: Option<Child>,
}

impl Redis {
    pub(crate) fn start() -> Redis {
        let mut r = Redis {
            dir: tempfile::Builder::new()
                .prefix("midcall-redis")
                .tempdir()
                .unwrap(),
            port: free_port(),
            child: None,
        };
        r.run();
        r
    }

    fn run(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
            ])
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("redis-server could not start ({e}): these tests start a throwaway server; install the Debian package `redis-server` (apt-get install redis-server)")
            });
        self.child = Some(child);
        // Up to 10 s (500 polls 20 ms apart).
        for _ in 0..500 {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
                use std::io::{Read, Write};
                let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
                if s.write_all(b"PING\r\n").is_ok() {
                    let mut buf = [0u8; 7];
                    if s.read(&mut buf).is_ok() && buf.starts_with(b"+PONG") {
                        return;
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server did not start within 10 s");
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Stops the server (the port stays this test's).
    pub(crate) fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub(crate) fn restart(&mut self) {
        self.stop();
        self.run();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}
