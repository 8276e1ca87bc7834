//! TLS to PostgreSQL: servers that take the replication role over TLS only,
//! with a certificate authority made here; every check of libpq's `sslmode`
//! against them.

mod support;

use pgreplica::db;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use support::{Setup, count, text};

/// A certificate authority and what it signed, as PEM.
struct Authority {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Authority {
    fn new(name: &str) -> Authority {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Authority { cert, key }
    }

    /// A certificate for `common_name`, valid for these host names and
    /// addresses; its PEM and its key's.
    fn sign(&self, common_name: &str, names: &[&str], addresses: &[IpAddr]) -> (String, String) {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params
            .subject_alt_names
            .extend(addresses.iter().map(|a| SanType::IpAddress(*a)));
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn save(&self, dir: &Path, name: &str) -> PathBuf {
        write(dir, name, &self.cert.pem())
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// The test's own sessions (`postgres`) connect as before; the roles that
/// replicate get in over TLS only, `certuser` by its certificate alone.
const HBA: &str = "
local all all trust
hostssl all replicator 127.0.0.1/32 trust
hostssl all certuser 127.0.0.1/32 cert
host all postgres 127.0.0.1/32 trust
";

/// Two servers (master, slave) that take TLS with `server_names` in their
/// certificate; their CA, and its certificate's file.
async fn setup(server_names: &[&str], addresses: &[IpAddr]) -> (Setup, Authority, PathBuf) {
    let s = Setup::with_schemas(
        1,
        "CREATE TABLE t (id int PRIMARY KEY, v text);
         CREATE TABLE later (id int PRIMARY KEY, v text)",
        "CREATE TABLE t (id int PRIMARY KEY, v text)",
    )
    .await;
    secure(s, server_names, addresses, HBA).await
}

/// Puts `s`'s servers behind TLS, with `server_names` and `addresses` in
/// their certificate, and `hba` as their `pg_hba.conf`.
async fn secure(
    s: Setup,
    server_names: &[&str],
    addresses: &[IpAddr],
    hba: &str,
) -> (Setup, Authority, PathBuf) {
    let ca = Authority::new("pgreplica test CA");
    let (cert, key) = ca.sign("server", server_names, addresses);
    for server in std::iter::once(&s.master).chain(&s.slaves) {
        server
            .put_files(&[
                ("server.crt", &cert),
                ("server.key", &key),
                ("ca.crt", &ca.cert.pem()),
            ])
            .unwrap();
        server
            .reconfigure(
                "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n\
                 ssl_ca_file = 'ca.crt'",
                hba,
            )
            .unwrap();
        support::connect(&server.dsn("postgres"))
            .await
            .batch_execute(
                "CREATE ROLE replicator LOGIN SUPERUSER; CREATE ROLE certuser LOGIN SUPERUSER",
            )
            .await
            .unwrap();
    }
    let file = ca.save(&s.dir, "ca.crt");
    (s, ca, file)
}

/// Points the set's connections at `user` with these TLS settings.
fn connect_as(s: &Setup, user: &str, tls: &str) {
    let text = std::fs::read_to_string(&s.conf).unwrap();
    let lines: Vec<String> = text
        .lines()
        .map(|l| {
            let l = l.replace("user=postgres", &format!("user={user} {tls}"));
            l.to_string()
        })
        .collect();
    std::fs::write(&s.conf, lines.join("\n") + "\n").unwrap();
}

/// `host=127.0.0.1 port=… dbname=app` of the master, with `extra` settings.
fn master_dsn(s: &Setup, extra: &str) -> String {
    format!("host=127.0.0.1 port={} dbname=app {extra}", s.master.port)
}

#[tokio::test(flavor = "multi_thread")]
async fn replication_and_clone_run_over_verify_full() {
    let (s, _, ca) = setup(&["localhost"], &[LOOPBACK]).await;
    connect_as(
        &s,
        "replicator",
        &format!("sslmode=verify-full sslrootcert={}", ca.display()),
    );
    s.replicate(
        "INSERT INTO t SELECT g, 'row ' || g FROM generate_series(1, 100) g",
        "SELECT * FROM t ORDER BY id",
    )
    .await;
    // pg_dump, which clone runs for a table the slave lacks, goes over TLS too.
    s.master()
        .await
        .batch_execute("INSERT INTO later VALUES (1, 'one')")
        .await
        .unwrap();
    let conf = s.conf.to_str().unwrap();
    let out = support::pgreplica(&["clone", conf, "--table", "later"]);
    assert!(out.status.success(), "{}", text(&out));
    s.assert_same(0, "SELECT * FROM later ORDER BY id").await;
    // Every session of the role was encrypted.
    let plain: i64 = s
        .master()
        .await
        .query_one(
            "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid)
              WHERE usename = 'replicator' AND NOT ssl",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(plain, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_ca_or_host_name_is_refused_and_says_which() {
    let (s, _, ca) = setup(&["db.example"], &[]).await;
    let other = Authority::new("someone else").save(&s.dir, "other.crt");
    let master = s.master().await;
    master
        .batch_execute("INSERT INTO t VALUES (1, 'a')")
        .await
        .unwrap();

    // A CA that did not sign the server's certificate.
    connect_as(
        &s,
        "replicator",
        &format!("sslmode=verify-ca sslrootcert={}", other.display()),
    );
    let out = s.run_once();
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("not signed by a CA in sslrootcert"),
        "{}",
        text(&out)
    );
    assert_eq!(count(&s.slave(0).await, "t").await, 0, "nothing applied");

    // The right CA, but the certificate names another host: verify-full
    // refuses, verify-ca (which checks no name) connects.
    let full = master_dsn(
        &s,
        &format!(
            "user=replicator sslmode=verify-full sslrootcert={}",
            ca.display()
        ),
    );
    let e = db::connect(&full, None).await.unwrap_err().to_string();
    assert!(e.contains("does not name the host"), "{e}");
    let ca_only = full.replace("verify-full", "verify-ca");
    db::connect(&ca_only, None).await.unwrap();

    // Without TLS the role gets no entry; verify-* without a CA file says what to give.
    let plain = master_dsn(&s, "user=replicator sslmode=disable");
    let e = db::connect(&plain, None).await.unwrap_err().to_string();
    assert!(e.contains("no encryption"), "{e}");
    let no_ca = master_dsn(&s, "user=replicator sslmode=verify-full");
    let e = db::connect(&no_ca, None).await.unwrap_err().to_string();
    assert!(e.contains("sslrootcert"), "{e}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_certificate_logs_in() {
    let (s, authority, ca) = setup(&["localhost"], &[LOOPBACK]).await;
    // The servers take a certificate of their CA naming the role as its login.
    let (cert, key) = authority.sign("certuser", &[], &[]);
    let cert = write(&s.dir, "client.crt", &cert);
    let key = write(&s.dir, "client.key", &key);
    let with_cert = master_dsn(
        &s,
        &format!(
            "user=certuser sslmode=verify-full sslrootcert={} sslcert={} sslkey={}",
            ca.display(),
            cert.display(),
            key.display()
        ),
    );
    let client = db::connect(&with_cert, None).await.unwrap();
    let who: String = client
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(who, "certuser");
    let without = master_dsn(
        &s,
        &format!(
            "user=certuser sslmode=verify-full sslrootcert={}",
            ca.display()
        ),
    );
    let e = db::connect(&without, None).await.unwrap_err().to_string();
    assert!(e.contains("certificate"), "{e}");
}

/// Puts `s`'s servers behind TLS, where `replicator` logs in with a password
/// through SCRAM bound to the server's certificate (tls-server-end-point), as
/// libpq's `channel_binding=require` asks: a server in the middle fails it.
async fn bound_password(s: Setup) -> Setup {
    let hba = HBA.replace(
        "hostssl all replicator 127.0.0.1/32 trust",
        "hostssl all replicator 127.0.0.1/32 scram-sha-256",
    );
    let (s, _, ca) = secure(s, &["localhost"], &[LOOPBACK], &hba).await;
    for dsn in [s.master.dsn("app"), s.slaves[0].dsn("app")] {
        support::connect(&dsn)
            .await
            .batch_execute("ALTER ROLE replicator PASSWORD 'bound-secret'")
            .await
            .unwrap();
    }
    connect_as(
        &s,
        "replicator",
        &format!(
            "password=bound-secret channel_binding=require sslmode=verify-full sslrootcert={}",
            ca.display()
        ),
    );
    s
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wal_set_streams_its_slot_over_tls_with_a_bound_password() {
    let s = Setup::wal(1, "CREATE TABLE t (id int PRIMARY KEY, v text)").await;
    let s = bound_password(s).await;
    let _daemon = s.spawn();
    s.arrives(
        "INSERT INTO t SELECT g, 'row ' || g FROM generate_series(1, 100) g",
        "SELECT * FROM t ORDER BY id",
    )
    .await;
    // The slot's WAL sender is the role's, over TLS.
    let streams: i64 = s
        .master()
        .await
        .query_one(
            "SELECT count(*) FROM pg_stat_replication r JOIN pg_stat_ssl l USING (pid)
              WHERE r.usename = 'replicator' AND l.ssl",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(streams, 1, "{}", s.daemon_log());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_trigger_set_logs_in_with_a_bound_password() {
    let s = Setup::new(1, "CREATE TABLE t (id int PRIMARY KEY, v text)").await;
    let s = bound_password(s).await;
    s.replicate(
        "INSERT INTO t SELECT g, 'row ' || g FROM generate_series(1, 10) g",
        "SELECT * FROM t ORDER BY id",
    )
    .await;
}
