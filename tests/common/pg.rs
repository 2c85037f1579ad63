//! A PostgreSQL server of a test's own: `initdb` into a temporary directory, `postgres` on a
//! free loopback port, trust authentication for the user `tlp`, stopped when dropped.
//!
//! The server binaries are found in `PG_BIN` (a directory), else on the `PATH`, else in
//! `/usr/lib/postgresql/<version>/bin` (Debian's packages). PostgreSQL refuses to run as root:
//! as root, the data directory is given to the `postgres` user (or `PG_USER`) and the
//! binaries run as that user (with `setpriv`). `.ci/run` installs the binaries when missing;
//! without them these tests fail, they do not skip.
#![allow(dead_code, unreachable_pub)]

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running PostgreSQL server.
pub struct PgServer {
    child: Option<Child>,
    port: u16,
    data: PathBuf,
    bin: PathBuf,
    run_as: Option<String>,
    _dir: tempfile::TempDir,
}

fn find_bin() -> PathBuf {
    if let Ok(dir) = std::env::var("PG_BIN") {
        return PathBuf::from(dir);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if dir.join("initdb").is_file() && dir.join("postgres").is_file() {
                return dir;
            }
        }
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
                .filter(|bin| bin.join("initdb").is_file())
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    versions.pop().unwrap_or_else(|| {
        panic!(
            "PostgreSQL's server binaries (initdb, postgres) were not found: install them \
             (`apt-get install -y postgresql`) or set PG_BIN"
        )
    })
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

impl PgServer {
    /// Starts a fresh server (a new data directory) on a free port.
    pub fn start() -> Self {
        let bin = find_bin();
        let dir = tempfile::tempdir().expect("a temporary directory");
        let data = dir.path().join("data");
        let run_as = is_root().then(|| std::env::var("PG_USER").unwrap_or("postgres".into()));
        if let Some(user) = &run_as {
            let status = Command::new("chown")
                .args(["-R", user])
                .arg(dir.path())
                .status()
                .expect("chown runs");
            assert!(status.success(), "chown of the data directory to {user}");
        }
        let output = Self::command(&bin, run_as.as_deref(), "initdb")
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "tlp",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
                "--locale=C",
            ])
            .output()
            .expect("initdb runs");
        assert!(
            output.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut server = PgServer {
            child: None,
            port,
            data,
            bin,
            run_as,
            _dir: dir,
        };
        server.run();
        server
    }

    fn command(bin: &Path, run_as: Option<&str>, program: &str) -> Command {
        match run_as {
            Some(user) => {
                let mut c = Command::new("setpriv");
                c.arg(format!("--reuid={user}"))
                    .arg(format!("--regid={user}"))
                    .arg("--init-groups")
                    .arg("--")
                    .arg(bin.join(program));
                c
            }
            None => Command::new(bin.join(program)),
        }
    }

    fn run(&mut self) {
        let child = Self::command(&self.bin, self.run_as.as_deref(), "postgres")
            .arg("-D")
            .arg(&self.data)
            .args(["-p", &self.port.to_string(), "-h", "127.0.0.1", "-k"])
            .arg(self.data.parent().unwrap())
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
            .args(["-c", "full_page_writes=off", "-c", "max_connections=200"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("postgres starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        // Accepting connections is not yet accepting queries: wait for `pg_isready`'s
        // equivalent, a completed startup (the server answers a startup packet).
        while !self.ready() {
            assert!(Instant::now() < deadline, "postgres did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether the server accepts a session: a startup message for the user `tlp` is
    /// answered with an authentication message (`R`; trust), not an error (`E`: "the database
    /// system is starting up").
    fn ready(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut conn) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
        let mut body = Vec::new();
        body.extend_from_slice(&196_608u32.to_be_bytes()); // protocol 3.0
        for part in ["user", "tlp", "database", "postgres"] {
            body.extend_from_slice(part.as_bytes());
            body.push(0);
        }
        body.push(0);
        let mut message = ((body.len() + 4) as u32).to_be_bytes().to_vec();
        message.extend_from_slice(&body);
        let mut reply = [0u8; 1];
        let ready = conn.write_all(&message).is_ok()
            && conn.read_exact(&mut reply).is_ok()
            && reply[0] == b'R';
        // Terminate.
        let _ = conn.write_all(&[b'X', 0, 0, 0, 4]);
        ready
    }

    /// `postgres://tlp@127.0.0.1:<port>/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://tlp@127.0.0.1:{}/postgres", self.port)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops the server (a fast shutdown: connections are closed), keeping its data.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-INT", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Starts it again on the same port and data.
    pub fn restart(&mut self) {
        self.stop();
        self.run();
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop();
    }
}
