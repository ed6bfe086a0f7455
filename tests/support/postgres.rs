//! PostgreSQL for the tests: a throwaway cluster per test, for the store
//! shared by several hosts; and, when `scripts/test` runs the
//! store-behaviour tests a second time, a fresh database per server on the
//! cluster it started (`STATESET_TEST_POSTGRES`).

use std::path::PathBuf;
use std::process::Command;

/// A throwaway PostgreSQL cluster on loopback, in a temporary directory,
/// stopped and removed when dropped. Needs the Debian `postgresql`
/// package and root (it runs the server as `postgres`).
pub struct Cluster {
    bin: PathBuf,
    dir: PathBuf,
    pub url: String,
    options: String,
}

impl Cluster {
    pub fn start() -> Self {
        Self::start_with(false)
    }

    /// A cluster that speaks TLS, with a certificate for 127.0.0.1 signed by
    /// a CA of its own ([`Cluster::ca`]).
    pub fn start_tls() -> Self {
        Self::start_with(true)
    }

    /// The CA certificate (PEM) that signed a TLS cluster's certificate.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    fn start_with(tls: bool) -> Self {
        let bin = bin();
        static STARTED: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
        let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = format!("{}-{n}", std::process::id());
        let dir = std::env::temp_dir().join(format!("hooks-pg-{id}"));
        std::fs::create_dir_all(&dir).unwrap();
        let as_postgres = |args: &[&str]| {
            let status = Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .args(args)
                .stdout(std::process::Stdio::null())
                .status()
                .unwrap();
            assert!(status.success(), "{args:?}");
        };
        Command::new("chown")
            .args(["postgres:postgres"])
            .arg(&dir)
            .status()
            .unwrap();
        let port = 20000 + (std::process::id() % 2000) as u16 * 10 + n;
        let data = dir.join("data");
        let (data, log) = (data.to_str().unwrap(), dir.join("log"));
        let initdb = bin.join("initdb");
        as_postgres(&[
            initdb.to_str().unwrap(),
            "-D",
            data,
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
            "--no-locale",
        ]);
        let mut options = format!(
            "-c listen_addresses=127.0.0.1 -p {port} -k {} -c fsync=off",
            dir.display()
        );
        if tls {
            certify(&dir);
            options += &format!(
                " -c ssl=on -c ssl_cert_file={0}/server.pem -c ssl_key_file={0}/server.key",
                dir.display()
            );
        }
        let pg_ctl = bin.join("pg_ctl");
        as_postgres(&[
            pg_ctl.to_str().unwrap(),
            "-D",
            data,
            "-l",
            log.to_str().unwrap(),
            "-w",
            "-o",
            &options,
            "start",
        ]);
        Self {
            options,
            bin,
            dir,
            url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
        }
    }
}

impl Cluster {
    /// How a store reaches this cluster, every option at its default.
    pub fn options(&self) -> stateset_hooks::store::PgOptions {
        stateset_hooks::store::PgOptions::new(&self.url).unwrap()
    }

    /// `pg_ctl stop` or `start` again: the server goes away and comes back,
    /// with its data.
    pub fn ctl(&self, action: &str) {
        let pg_ctl = self.bin.join("pg_ctl");
        let status = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(pg_ctl)
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-l"])
            .arg(self.dir.join("log"))
            .args(["-m", "fast", "-w"])
            .args(["-o", &self.options, action])
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "pg_ctl {action}");
    }
}

impl Cluster {
    /// What `sql` answers, unaligned, run with `psql` as the superuser.
    pub fn query(&self, sql: &str) -> String {
        let output = Command::new(self.bin.join("psql"))
            .args(["-qtA", "-v", "ON_ERROR_STOP=1", &self.url, "-c", sql])
            .output()
            .unwrap();
        assert!(output.status.success(), "psql -c {sql}");
        String::from_utf8(output.stdout).unwrap().trim().to_owned()
    }

    /// A `psql` session as the superuser, running what is written to its
    /// stdin; it ends (and its locks go) when its stdin is dropped.
    pub fn session(&self) -> std::process::Child {
        Command::new(self.bin.join("psql"))
            .args(["-q", "-v", "ON_ERROR_STOP=1", &self.url])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap()
    }

    /// Run `sql` with `psql` as the superuser.
    pub fn psql(&self, sql: &str) {
        let status = Command::new(self.bin.join("psql"))
            .args(["-q", "-v", "ON_ERROR_STOP=1", &self.url, "-c", sql])
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "psql -c {sql}");
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let pg_ctl = self.bin.join("pg_ctl");
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(pg_ctl)
            .args(["-D"])
            .arg(self.dir.join("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(std::process::Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A CA (`ca.pem`) and a server certificate it signed for 127.0.0.1
/// (`server.pem`, `server.key`, the key readable by `postgres` alone), in
/// `dir`.
fn certify(dir: &std::path::Path) {
    let openssl = |args: &str| {
        let status = Command::new("openssl")
            .current_dir(dir)
            .args(args.split_whitespace())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "openssl {args}");
    };
    let new_key = "-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes";
    openssl(&format!(
        "req -x509 {new_key} -keyout ca.key -out ca.pem -days 2 -subj /CN=hooks-test-ca"
    ));
    openssl(&format!(
        "req {new_key} -keyout server.key -out server.csr -subj /CN=127.0.0.1"
    ));
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName = IP:127.0.0.1\nbasicConstraints = CA:FALSE\n\
         extendedKeyUsage = serverAuth\n",
    )
    .unwrap();
    openssl(
        "x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
         -out server.pem -days 2 -extfile server.ext",
    );
    let key = dir.join("server.key");
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let status = Command::new("chown")
        .arg("postgres:postgres")
        .arg(&key)
        .arg(dir.join("server.pem"))
        .status()
        .unwrap();
    assert!(status.success());
}

/// The server `scripts/test` started for the second run of the
/// store-behaviour tests (`postgres://…/postgres`), if any.
pub fn shared_server() -> Option<String> {
    std::env::var("STATESET_TEST_POSTGRES").ok()
}

/// The database on `server` for the plugin directory `dir`, created empty
/// the first time: each test its own, and a test restarting its server on
/// the same directory finds its data again.
pub fn database_for(server: &str, dir: &std::path::Path) -> String {
    use sha2::Digest as _;
    let digest = hex::encode(sha2::Sha256::digest(dir.as_os_str().as_encoded_bytes()));
    let name = format!("hooks_{}", &digest[..16]);
    let psql = |sql: &str| {
        Command::new(bin().join("psql"))
            .args(["-qtA", "-v", "ON_ERROR_STOP=1", server, "-c", sql])
            .output()
            .unwrap()
    };
    let exists = psql(&format!(
        "SELECT 1 FROM pg_database WHERE datname = '{name}'"
    ));
    if String::from_utf8_lossy(&exists.stdout).trim() != "1" {
        let created = psql(&format!("CREATE DATABASE {name}"));
        assert!(created.status.success(), "CREATE DATABASE {name}");
    }
    let (base, _) = server.rsplit_once('/').expect("a URL ending in /database");
    format!("{base}/{name}")
}

/// The newest installed PostgreSQL's binaries.
fn bin() -> PathBuf {
    std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is installed (scripts/test installs it)")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .max()
        .expect("a PostgreSQL version")
}
