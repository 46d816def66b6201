//! Migration URIs: `tcp:HOST:PORT`, `unix:PATH`, `file:PATH`, `mem:NAME`.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::error::Error;

/// Where a migration stream goes or comes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Uri {
    /// `tcp:HOST:PORT`; an IPv6 host is written in brackets, `tcp:[::1]:4444`.
    Tcp {
        /// Host name or address (brackets kept for IPv6).
        host: String,
        /// TCP port; 0 on a listener picks a free port.
        port: u16,
    },
    /// `unix:PATH`: a Unix stream socket.
    Unix(PathBuf),
    /// `file:PATH`: a migration to a file is a snapshot, reading it back a restore.
    File(PathBuf),
    /// `mem:NAME`: an in-process channel (crossbeam), for embedding and tests.
    Mem(String),
}

impl FromStr for Uri {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = || Error::BadUri { uri: s.to_string() };
        let (scheme, rest) = s.split_once(':').ok_or_else(bad)?;
        if rest.is_empty() {
            return Err(bad());
        }
        match scheme {
            "tcp" => {
                let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
                let port = port.parse::<u16>().map_err(|_| bad())?;
                let inner = host.trim_start_matches('[').trim_end_matches(']');
                if inner.is_empty() || (inner.contains(':') && !host.starts_with('[')) {
                    return Err(bad());
                }
                Ok(Uri::Tcp {
                    host: host.to_string(),
                    port,
                })
            }
            "unix" => Ok(Uri::Unix(PathBuf::from(rest))),
            "file" => Ok(Uri::File(PathBuf::from(rest))),
            "mem" => Ok(Uri::Mem(rest.to_string())),
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for Uri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Uri::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
            Uri::Unix(p) => write!(f, "unix:{}", p.display()),
            Uri::File(p) => write!(f, "file:{}", p.display()),
            Uri::Mem(n) => write!(f, "mem:{n}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_every_form() {
        for s in [
            "tcp:127.0.0.1:4444",
            "tcp:[::1]:0",
            "tcp:localhost:1",
            "unix:/tmp/x.sock",
            "file:/tmp/snap",
            "mem:a",
        ] {
            let u: Uri = s.parse().unwrap();
            assert_eq!(u.to_string(), s);
        }
    }

    #[test]
    fn rejects_bad_forms_with_the_accepted_list() {
        for s in [
            "",
            "tcp",
            "tcp:",
            "tcp:host",
            "tcp::80",
            "tcp:h:99999",
            "tcp:::1:80",
            "udp:h:1",
            "unix:",
            "file:",
            "mem:",
            "/tmp/x",
        ] {
            let e = s.parse::<Uri>().unwrap_err();
            let msg = e.to_string();
            assert!(
                msg.contains("tcp:HOST:PORT") && msg.contains("mem:NAME"),
                "{s}: {msg}"
            );
        }
    }
}
