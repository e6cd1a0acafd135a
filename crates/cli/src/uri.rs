//! Migration URIs as QEMU writes them (`migrate URI`, `-incoming URI`):
//! `tcp:HOST:PORT`, `tcp::PORT` (all interfaces / localhost),
//! `tcp:[IPv6]:PORT`, `unix:PATH`, `file:PATH` and `exec:CMD`.
//!
//! QEMU's socket options after a comma (`,ipv4=on`...) are not supported:
//! they make the port part invalid and the error says so.

use std::fmt;
use std::net::Ipv6Addr;
use std::path::PathBuf;

/// A parsed migration URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigUri {
    /// `tcp:HOST:PORT`; `host` is empty for `tcp::PORT` and holds an IPv6
    /// address without its brackets.
    Tcp {
        /// Host name or address ("" = every interface when listening,
        /// localhost when connecting).
        host: String,
        /// TCP port.
        port: u16,
    },
    /// `unix:PATH`, a Unix stream socket.
    Unix(PathBuf),
    /// `file:PATH`.
    File(PathBuf),
    /// `exec:CMD`, run by `/bin/sh -c`.
    Exec(String),
}

/// Why a URI does not parse; each variant names the part that is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UriError {
    /// The part before the first `:` is not a known transport.
    #[error("{uri}: unknown transport \"{scheme}\": expected tcp:HOST:PORT, tcp::PORT, tcp:[IPv6]:PORT, unix:PATH, file:PATH or exec:CMD")]
    Transport {
        /// The whole URI.
        uri: String,
        /// The transport part.
        scheme: String,
    },
    /// No `:PORT` after the host.
    #[error("{uri}: missing port: expected tcp:HOST:PORT or tcp::PORT")]
    MissingPort {
        /// The whole URI.
        uri: String,
    },
    /// The port part is not a number in 0..=65535.
    #[error("{uri}: port \"{port}\" is not a number from 0 to 65535")]
    BadPort {
        /// The whole URI.
        uri: String,
        /// The port part.
        port: String,
    },
    /// The host part is wrong (unbalanced brackets, a bare IPv6 address,
    /// a bracketed non-IPv6 address).
    #[error("{uri}: host \"{host}\": {why}")]
    BadHost {
        /// The whole URI.
        uri: String,
        /// The host part.
        host: String,
        /// What is wrong.
        why: &'static str,
    },
    /// `unix:`, `file:` or `exec:` with nothing after it.
    #[error("{uri}: empty {what} after \"{scheme}:\"")]
    Empty {
        /// The whole URI.
        uri: String,
        /// The transport.
        scheme: &'static str,
        /// "path" or "command".
        what: &'static str,
    },
}

impl MigUri {
    /// Parses a migration URI.
    ///
    /// # Errors
    /// [`UriError`], naming the wrong part.
    pub fn parse(uri: &str) -> Result<MigUri, UriError> {
        let Some((scheme, rest)) = uri.split_once(':') else {
            return Err(UriError::Transport {
                uri: uri.into(),
                scheme: uri.into(),
            });
        };
        let empty = |scheme, what| UriError::Empty {
            uri: uri.into(),
            scheme,
            what,
        };
        match scheme {
            "tcp" => parse_tcp(uri, rest),
            "unix" if rest.is_empty() => Err(empty("unix", "path")),
            "unix" => Ok(MigUri::Unix(rest.into())),
            "file" if rest.is_empty() => Err(empty("file", "path")),
            "file" => Ok(MigUri::File(rest.into())),
            "exec" if rest.trim().is_empty() => Err(empty("exec", "command")),
            "exec" => Ok(MigUri::Exec(rest.into())),
            _ => Err(UriError::Transport {
                uri: uri.into(),
                scheme: scheme.into(),
            }),
        }
    }

    /// `HOST:PORT` for the socket APIs (brackets around IPv6; `host_if_empty`
    /// when the URI left the host out).
    pub fn socket_addr(host: &str, port: u16, host_if_empty: &str) -> String {
        let h = if host.is_empty() { host_if_empty } else { host };
        if h.contains(':') {
            format!("[{h}]:{port}")
        } else {
            format!("{h}:{port}")
        }
    }
}

fn parse_tcp(uri: &str, rest: &str) -> Result<MigUri, UriError> {
    let bad_host = |host: &str, why| UriError::BadHost {
        uri: uri.into(),
        host: host.into(),
        why,
    };
    let (host, port) = if let Some(inner) = rest.strip_prefix('[') {
        let Some((h, after)) = inner.split_once(']') else {
            return Err(bad_host(rest, "\"[\" without \"]\""));
        };
        if h.parse::<Ipv6Addr>().is_err() {
            return Err(bad_host(h, "not an IPv6 address"));
        }
        let Some(port) = after.strip_prefix(':') else {
            return Err(UriError::MissingPort { uri: uri.into() });
        };
        (h, port)
    } else {
        let Some((h, port)) = rest.rsplit_once(':') else {
            return Err(UriError::MissingPort { uri: uri.into() });
        };
        if h.contains(':') {
            return Err(bad_host(
                h,
                "an IPv6 address needs brackets: tcp:[ADDR]:PORT",
            ));
        }
        if h.contains(['[', ']', '/', ' ']) {
            return Err(bad_host(h, "not a host name or address"));
        }
        (h, port)
    };
    let Ok(port_n) = port.parse::<u16>() else {
        return Err(UriError::BadPort {
            uri: uri.into(),
            port: port.into(),
        });
    };
    if port.starts_with('+') {
        return Err(UriError::BadPort {
            uri: uri.into(),
            port: port.into(),
        });
    }
    Ok(MigUri::Tcp {
        host: host.into(),
        port: port_n,
    })
}

impl fmt::Display for MigUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MigUri::Tcp { host, port } if host.contains(':') => write!(f, "tcp:[{host}]:{port}"),
            MigUri::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
            MigUri::Unix(p) => write!(f, "unix:{}", p.display()),
            MigUri::File(p) => write!(f, "file:{}", p.display()),
            MigUri::Exec(c) => write!(f, "exec:{c}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tcp(h: &str, p: u16) -> MigUri {
        MigUri::Tcp {
            host: h.into(),
            port: p,
        }
    }

    #[test]
    fn qemu_forms() {
        assert_eq!(
            MigUri::parse("tcp:127.0.0.1:4444"),
            Ok(tcp("127.0.0.1", 4444))
        );
        assert_eq!(MigUri::parse("tcp::4444"), Ok(tcp("", 4444)));
        assert_eq!(MigUri::parse("tcp:[::1]:4444"), Ok(tcp("::1", 4444)));
        assert_eq!(MigUri::parse("tcp:localhost:0"), Ok(tcp("localhost", 0)));
        assert_eq!(
            MigUri::parse("unix:/run/mig.sock"),
            Ok(MigUri::Unix("/run/mig.sock".into()))
        );
        assert_eq!(
            MigUri::parse("file:/tmp/a:b"),
            Ok(MigUri::File("/tmp/a:b".into()))
        );
        assert_eq!(
            MigUri::parse("exec:cat > x"),
            Ok(MigUri::Exec("cat > x".into()))
        );
    }

    #[test]
    fn errors_name_the_wrong_part() {
        let e = MigUri::parse("udp:1.2.3.4:5").unwrap_err();
        assert!(
            matches!(&e, UriError::Transport { scheme, .. } if scheme == "udp"),
            "{e}"
        );
        assert!(e.to_string().contains("\"udp\""));
        let e = MigUri::parse("tcp:127.0.0.1").unwrap_err();
        assert!(matches!(e, UriError::MissingPort { .. }), "{e}");
        let e = MigUri::parse("tcp:127.0.0.1:99999").unwrap_err();
        assert!(
            matches!(&e, UriError::BadPort { port, .. } if port == "99999"),
            "{e}"
        );
        let e = MigUri::parse("tcp:h:4444,ipv4=on").unwrap_err();
        assert!(
            matches!(&e, UriError::BadPort { port, .. } if port == "4444,ipv4=on"),
            "{e}"
        );
        let e = MigUri::parse("tcp:::1:4444").unwrap_err();
        assert!(matches!(&e, UriError::BadHost { .. }), "{e}");
        assert!(e.to_string().contains("brackets"), "{e}");
        let e = MigUri::parse("tcp:[::1:4444").unwrap_err();
        assert!(matches!(&e, UriError::BadHost { .. }), "{e}");
        let e = MigUri::parse("tcp:[nothost]:4444").unwrap_err();
        assert!(
            matches!(&e, UriError::BadHost { host, .. } if host == "nothost"),
            "{e}"
        );
        let e = MigUri::parse("tcp:[::1]4444").unwrap_err();
        assert!(matches!(e, UriError::MissingPort { .. }), "{e}");
        for (u, what) in [("unix:", "path"), ("file:", "path"), ("exec:", "command")] {
            let e = MigUri::parse(u).unwrap_err();
            assert!(
                matches!(e, UriError::Empty { what: w, .. } if w == what),
                "{u}"
            );
        }
        assert!(matches!(
            MigUri::parse("nocolon"),
            Err(UriError::Transport { .. })
        ));
    }

    #[test]
    fn socket_addresses() {
        assert_eq!(MigUri::socket_addr("", 1, "0.0.0.0"), "0.0.0.0:1");
        assert_eq!(MigUri::socket_addr("::1", 2, "x"), "[::1]:2");
        assert_eq!(MigUri::socket_addr("h", 3, "x"), "h:3");
    }

    fn any_uri() -> impl Strategy<Value = MigUri> {
        prop_oneof![
            ("[a-z0-9.-]{0,20}", any::<u16>()).prop_map(|(h, p)| tcp(&h, p)),
            any::<[u16; 8]>().prop_map(|s| tcp(&Ipv6Addr::from(s).to_string(), 4444)),
            "/[ -~]{1,30}".prop_map(|p| MigUri::Unix(p.into())),
            "[ -~]{1,30}".prop_map(|p| MigUri::File(p.into())),
            "[!-~][ -~]{0,30}".prop_map(MigUri::Exec),
        ]
    }

    proptest! {
        #[test]
        fn display_parses_back(u in any_uri()) {
            prop_assert_eq!(MigUri::parse(&u.to_string()), Ok(u));
        }

        #[test]
        fn never_panics(s in "[ -~]{0,40}") {
            let _ = MigUri::parse(&s);
        }
    }
}
