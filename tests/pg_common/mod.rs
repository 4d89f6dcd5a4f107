//! Helpers shared by the PostgreSQL tests (tests/pg_*.rs, each with `mod pg_common;`):
//! the server's URL from `SGW_TEST_POSTGRES_URL` (skip with a printed reason when
//! unset), a fresh database per test, dropped when the test passes, and a dump of
//! every table for looking for clear text.

// Each test crate compiles its own copy and not every one uses every helper.
#![allow(dead_code)]

use std::time::Duration;

use sgw::pg::PgConfig;
use tokio_postgres::NoTls;

pub const URL_VAR: &str = "SGW_TEST_POSTGRES_URL";

/// The server's URL, or `None` after printing why the test is skipped.
pub fn server_url(test: &str) -> Option<String> {
    match std::env::var(URL_VAR) {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            println!("{test}: skipped: {URL_VAR} is unset (no PostgreSQL server to test against; .ci/run starts one)");
            None
        }
    }
}

/// `url` with its database name replaced by `db`.
pub fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let authority_end = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |i| scheme_end + i);
    format!("{}/{db}{query}", &base[..authority_end])
}

/// A fresh, empty database for one test; dropped by [`TestDb::drop_database`].
pub struct TestDb {
    admin_url: String,
    name: String,
    url: String,
}

impl TestDb {
    pub async fn create(admin_url: &str, test: &str) -> TestDb {
        let name = format!("sgw_{test}_{}", std::process::id());
        let admin = admin(admin_url).await;
        // One statement per call: DROP/CREATE DATABASE refuse to run in the implicit
        // transaction of a multi-statement query.
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await
            .expect("drop a leftover test database");
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create the test database");
        TestDb {
            admin_url: admin_url.to_owned(),
            url: with_database(admin_url, &name),
            name,
        }
    }

    pub fn config(&self, pool_size: usize) -> PgConfig {
        let mut c = PgConfig::new(self.url.clone());
        c.pool_size = pool_size;
        c.statement_timeout = Duration::from_secs(20);
        c
    }

    /// This database's URL (for handing to a child process).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A plain connection to this database, for looking at (and tampering with) rows.
    pub async fn sql(&self) -> tokio_postgres::Client {
        admin(&self.url).await
    }

    pub async fn drop_database(self) {
        let admin = admin(&self.admin_url).await;
        admin
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .await
            .expect("drop the test database");
    }
}

pub async fn admin(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect to {URL_VAR}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// Every column of every row of every table in the `public` schema, as the bytes
/// the server holds (bytea as raw bytes, anything else as its text form), each
/// value followed by a 0 byte: for looking for clear text.
pub async fn dump_public_tables(sql: &tokio_postgres::Client) -> (Vec<String>, Vec<u8>) {
    let tables: Vec<String> = sql
        .query(
            "SELECT table_name::text FROM information_schema.tables \
             WHERE table_schema = 'public' AND table_type = 'BASE TABLE'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    let mut dump: Vec<u8> = Vec::new();
    for table in &tables {
        let columns: Vec<String> = sql
            .query(
                "SELECT column_name::text FROM information_schema.columns \
                 WHERE table_schema = 'public' AND table_name = $1",
                &[table],
            )
            .await
            .unwrap()
            .iter()
            .map(|row| row.get(0))
            .collect();
        for column in &columns {
            let raw = format!("SELECT \"{column}\" FROM \"{table}\"");
            let rows = sql.query(&raw, &[]).await.unwrap();
            let is_bytea = rows
                .first()
                .is_some_and(|r| r.columns()[0].type_() == &tokio_postgres::types::Type::BYTEA);
            if is_bytea {
                for r in rows {
                    if let Some(v) = r.get::<_, Option<Vec<u8>>>(0) {
                        dump.extend_from_slice(&v);
                        dump.push(0);
                    }
                }
            } else {
                let text = format!("SELECT \"{column}\"::text FROM \"{table}\"");
                for r in sql.query(&text, &[]).await.unwrap() {
                    if let Some(v) = r.get::<_, Option<String>>(0) {
                        dump.extend_from_slice(v.as_bytes());
                        dump.push(0);
                    }
                }
            }
        }
    }
    (tables, dump)
}
