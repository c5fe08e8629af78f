//! Downloads a submitter names (a wasm module's `url`), made safe for the provider: a job must
//! not turn a provider's agent into a client of the provider's own network. Addresses that are
//! not public (loopback, private, link-local such as cloud metadata at 169.254.169.254, shared,
//! multicast, reserved) are refused after every name resolution, redirects included, unless
//! the provider allows them; connects and the whole download are bounded in time and size; and
//! errors name the host and the kind of failure, never what the server sent.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::{DefaultConnector, NextTimeout};

/// Largest download accepted.
pub const MAX_DOWNLOAD_BYTES: u64 = 64 << 20;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The whole download, redirects included.
const TOTAL_TIMEOUT: Duration = Duration::from_secs(120);
const MAX_REDIRECTS: u32 = 3;

/// What downloads may reach.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UrlPolicy {
    /// Also loopback, private and link-local addresses (`--allow-private-urls`: for a pool on
    /// one private network, or tests).
    pub allow_private: bool,
}

/// Whether `ip` is an address on the public internet: what a job's URL may resolve to.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public_v4(v4);
            }
            let s = v6.segments();
            let nat64 = s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0];
            if nat64 {
                let o = v6.octets();
                return is_public_v4(Ipv4Addr::new(o[12], o[13], o[14], o[15]));
            }
            !(v6.is_unspecified()
                || v6.is_loopback()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local fc00::/7
                || (s[0] & 0xffc0) == 0xfe80 // link-local fe80::/10
                || (s[0] & 0xffc0) == 0xfec0 // site-local (deprecated) fec0::/10
                || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
                || s[0..6] == [0, 0, 0, 0, 0, 0]) // IPv4-compatible, deprecated
        }
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(a == 0 // "this network"
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local() // 169.254/16: cloud metadata services
        || (a == 100 && (64..128).contains(&b)) // shared address space (carrier NAT)
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
        || ip.is_documentation()
        || (a == 198 && (b == 18 || b == 19)) // benchmarking
        || ip.is_multicast()
        || a >= 240) // reserved, broadcast
}

/// Resolves with the system resolver, then keeps only the addresses the policy allows.
#[derive(Debug)]
struct GuardedResolver {
    policy: UrlPolicy,
    inner: DefaultResolver,
}

impl Resolver for GuardedResolver {
    fn resolve(&self, uri: &ureq::http::Uri, config: &ureq::config::Config, timeout: NextTimeout) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let found = self.inner.resolve(uri, config, timeout)?;
        if self.policy.allow_private {
            return Ok(found);
        }
        let mut kept = self.empty();
        for addr in found.iter().filter(|a: &&SocketAddr| is_public(a.ip())) {
            kept.push(*addr);
        }
        if kept.is_empty() {
            let host = uri.host().unwrap_or("?");
            return Err(ureq::Error::Io(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!("{host} resolves only to non-public addresses, which tasks may not reach on this provider"),
            )));
        }
        Ok(kept)
    }
}

/// Downloads `url` (http or https) under `policy`, bounded in size and time. Runs on a
/// blocking thread; the caller checks the digest.
pub async fn download(url: &str, policy: UrlPolicy) -> Result<Vec<u8>, String> {
    download_what(url, policy, "module").await
}

/// Like [`download`], naming `what` is downloaded (an input's path) in its errors.
pub async fn download_what(url: &str, policy: UrlPolicy, what: &str) -> Result<Vec<u8>, String> {
    let (url, what) = (url.to_string(), what.to_string());
    tokio::task::spawn_blocking(move || download_blocking(&url, policy, &what)).await.map_err(|e| format!("download task failed: {e}"))?
}

fn download_blocking(url: &str, policy: UrlPolicy, what: &str) -> Result<Vec<u8>, String> {
    let uri: ureq::http::Uri = url.parse().map_err(|_| format!("the {what} URL is not a valid URL"))?;
    let host = uri.host().unwrap_or("?").to_string();
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(format!("cannot download {what} from {host}: only http and https URLs are fetched"));
    }
    let config = ureq::Agent::config_builder()
        .timeout_connect(Some(CONNECT_TIMEOUT))
        .timeout_global(Some(TOTAL_TIMEOUT))
        .max_redirects(MAX_REDIRECTS)
        .http_status_as_error(true)
        // Direct connections only: through a proxy from the environment the proxy would
        // resolve the job's host, past the address check.
        .proxy(None)
        .build();
    let agent = ureq::Agent::with_parts(config, DefaultConnector::default(), GuardedResolver { policy, inner: DefaultResolver::default() });
    let fail = |e: ureq::Error| format!("cannot download {what} from {host}: {}", describe(&e, what));
    let mut resp = agent.get(&uri).call().map_err(fail)?;
    resp.body_mut().with_config().limit(MAX_DOWNLOAD_BYTES).read_to_vec().map_err(fail)
}

/// The kind of failure, in words that carry nothing the server chose to send.
fn describe(e: &ureq::Error, what: &str) -> String {
    match e {
        ureq::Error::StatusCode(code) => format!("the server answered HTTP {code}"),
        ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::PermissionDenied => io.to_string(),
        ureq::Error::Timeout(_) => "timed out".into(),
        ureq::Error::HostNotFound => "host not found".into(),
        ureq::Error::BodyExceedsLimit(_) => format!("the {what} is larger than {} MiB", MAX_DOWNLOAD_BYTES >> 20),
        ureq::Error::TooManyRedirects => format!("more than {MAX_REDIRECTS} redirects"),
        ureq::Error::Io(io) => format!("connection failed ({:?})", io.kind()),
        _ => "the request failed".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_public_addresses_are_public() {
        let private = [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "192.0.0.1",
            "198.18.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "240.0.0.1",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "2001:db8::1",
            "::127.0.0.1",
        ];
        for ip in private {
            assert!(!is_public(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["1.1.1.1", "8.8.8.8", "151.101.1.1", "2606:4700::1111", "::ffff:1.1.1.1", "64:ff9b::101:101"] {
            assert!(is_public(ip.parse().unwrap()), "{ip}");
        }
    }

    /// A listener that records whether anything connected.
    fn listener() -> (std::net::TcpListener, u16) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let port = l.local_addr().unwrap().port();
        (l, port)
    }

    #[tokio::test]
    async fn loopback_and_metadata_addresses_are_refused_and_nothing_connects() {
        let (l, port) = listener();
        for url in [format!("http://127.0.0.1:{port}/m.wasm"), format!("http://localhost:{port}/m.wasm"), "http://169.254.169.254/latest/meta-data/".into()] {
            let err = download(&url, UrlPolicy::default()).await.unwrap_err();
            assert!(err.contains("non-public addresses"), "{url}: {err}");
        }
        assert!(l.accept().is_err(), "no request reached the local listener");
    }

    #[tokio::test]
    async fn errors_say_what_failed_without_echoing_the_server() {
        use std::io::{Read, Write};
        let (l, port) = listener();
        l.set_nonblocking(false).unwrap();
        std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let mut buf = [0u8; 1024];
            let _ = c.read(&mut buf);
            let _ = c.write_all(b"HTTP/1.1 500 secret-router-admin-page\r\ncontent-length: 14\r\n\r\nadmin password");
        });
        let err = download(&format!("http://127.0.0.1:{port}/x"), UrlPolicy { allow_private: true }).await.unwrap_err();
        assert_eq!(err, "cannot download module from 127.0.0.1: the server answered HTTP 500");
        let err = download("ftp://example.com/m.wasm", UrlPolicy::default()).await.unwrap_err();
        assert!(err.contains("only http and https"), "{err}");
    }
}
