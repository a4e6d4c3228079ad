//! Where the control plane keeps its data: embedded SQLite files in the data dir (`serve`,
//! and `control` by default) or one PostgreSQL database shared by any number of `control`
//! replicas (`--database-url`, SPEC §1). Parsed once at start; the URL's password never
//! reaches a log line or a `Debug` print.

use anyhow::{bail, Result};
use std::fmt;
use std::path::PathBuf;

/// The control plane's storage, chosen at start.
#[derive(Debug, Clone)]
pub enum Database {
    /// `keybrake.db` in this directory.
    Sqlite { data_dir: PathBuf },
    /// A PostgreSQL database (`postgres://` or `postgresql://`).
    Postgres { url: DatabaseUrl },
}

impl Database {
    /// A short description for logs: the file, or the URL without its password.
    pub fn describe(&self) -> String {
        match self {
            Database::Sqlite { data_dir } => {
                let shown = std::path::absolute(data_dir).unwrap_or(data_dir.clone());
                format!("SQLite in {}", shown.display())
            }
            Database::Postgres { url } => format!("PostgreSQL at {url}"),
        }
    }
}

/// A PostgreSQL connection URL. Holds the password, so `Debug` and `Display` show the URL
/// with the password replaced; `expose` is for the driver only.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    /// Checks the scheme and that the URL parses; nothing is connected here.
    pub fn parse(text: &str) -> Result<DatabaseUrl> {
        let text = text.trim();
        let Ok(url) = url::Url::parse(text) else {
            bail!("database URL is not a URL (expected postgres://user:password@host:port/db)");
        };
        if !matches!(url.scheme(), "postgres" | "postgresql") {
            bail!(
                "database URL scheme {:?} is not supported: only postgres:// (SQLite is the \
                 default, in --data-dir)",
                url.scheme()
            );
        }
        if url.host_str().is_none_or(str::is_empty) && !text.contains("host=") {
            bail!("database URL has no host");
        }
        Ok(DatabaseUrl(text.to_string()))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// `database_url` in the config file: checked when the file is read.
impl<'de> serde::Deserialize<'de> for DatabaseUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<DatabaseUrl, D::Error> {
        let text = String::deserialize(d)?;
        DatabaseUrl::parse(&text).map_err(|e| serde::de::Error::custom(format!("{e:#}")))
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match url::Url::parse(&self.0) {
            Ok(mut url) => {
                if url.password().is_some() {
                    let _ = url.set_password(Some("***"));
                }
                // A password may also ride in the query (`?password=`).
                let pairs: Vec<(String, String)> = url
                    .query_pairs()
                    .map(|(k, v)| {
                        let v = if k.eq_ignore_ascii_case("password") {
                            "***".to_string()
                        } else {
                            v.into_owned()
                        };
                        (k.into_owned(), v)
                    })
                    .collect();
                if !pairs.is_empty() {
                    url.query_pairs_mut().clear().extend_pairs(pairs);
                }
                f.write_str(url.as_str())
            }
            Err(_) => f.write_str("[unparseable database URL]"),
        }
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DatabaseUrl({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_never_shows() {
        let url =
            DatabaseUrl::parse("postgres://kb:s3cr%21t@db.internal:5432/kb?password=other&x=1")
                .unwrap();
        for shown in [
            url.to_string(),
            format!("{url:?}"),
            format!("{:?}", Database::Postgres { url: url.clone() }),
            Database::Postgres { url: url.clone() }.describe(),
        ] {
            assert!(!shown.contains("s3cr"), "{shown}");
            assert!(!shown.contains("other"), "{shown}");
            assert!(shown.contains("db.internal:5432/kb"), "{shown}");
        }
        assert!(url.expose().contains("s3cr%21t"));
    }

    #[test]
    fn only_postgres_urls_are_taken() {
        assert!(DatabaseUrl::parse("postgresql://kb@127.0.0.1/kb").is_ok());
        for bad in [
            "mysql://kb@h/db",
            "sqlite:/tmp/x.db",
            "not a url",
            "postgres:///kb",
        ] {
            assert!(DatabaseUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
