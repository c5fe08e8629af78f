//! Where a backend test keeps its data: a temporary directory (SQLite), and a fresh PostgreSQL
//! database of its own on the server `KOMMUNE_TEST_DATABASE_URL` names, dropped afterwards.

use std::sync::Once;

static SKIP_NOTICE: Once = Once::new();

pub(crate) struct TestDb {
    pub dir: tempfile::TempDir,
    /// The fresh database's URL (PostgreSQL), or None (SQLite in `dir`).
    pub url: Option<String>,
    /// The server's URL and the database's name, to drop it.
    pub admin: Option<(String, String)>,
}

impl TestDb {
    pub fn sqlite() -> TestDb {
        TestDb { dir: tempfile::tempdir().unwrap(), url: None, admin: None }
    }

    /// A fresh database named `<prefix>_<pid>_<random>`, or None (after one notice line) when
    /// KOMMUNE_TEST_DATABASE_URL is not set.
    pub fn postgres(prefix: &str) -> Option<TestDb> {
        let Ok(base) = std::env::var("KOMMUNE_TEST_DATABASE_URL") else {
            SKIP_NOTICE.call_once(|| println!("skipped: no PostgreSQL (set KOMMUNE_TEST_DATABASE_URL)"));
            return None;
        };
        let name = format!("{prefix}_{}_{}", std::process::id(), rand::random::<u32>());
        let mut admin = ::postgres::Client::connect(&base, ::postgres::NoTls).expect("connect to KOMMUNE_TEST_DATABASE_URL");
        admin.batch_execute(&format!("CREATE DATABASE {name}")).expect("create a test database");
        Some(TestDb { dir: tempfile::tempdir().unwrap(), url: Some(with_database(&base, &name)), admin: Some((base, name)) })
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some((base, name)) = &self.admin
            && let Ok(mut c) = ::postgres::Client::connect(base, ::postgres::NoTls)
        {
            let _ = c.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
        }
    }
}

/// `base` with its database name replaced by `db`.
pub(crate) fn with_database(base: &str, db: &str) -> String {
    let (main, query) = base.split_once('?').map_or((base, None), |(m, q)| (m, Some(q)));
    let authority_start = main.find("://").map_or(0, |i| i + 3);
    let path_start = main[authority_start..].find('/').map_or(main.len(), |i| authority_start + i);
    let mut url = format!("{}/{db}", &main[..path_start]);
    if let Some(q) = query {
        url = format!("{url}?{q}");
    }
    url
}
