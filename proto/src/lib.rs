//! The Kommune agent protocol (`kommune.agent.v1`) and the pieces of it both ends must agree on:
//! the join token format, the CA pin, and the TLS server name agents verify.

pub mod quantity;
pub mod receipt;
pub mod token;

/// Generated tonic/prost bindings for `proto/kommune/agent/v1/agent.proto`.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("kommune.agent.v1");
}

use sha2::{Digest, Sha256};

/// The tracing target of the events that mark one attempt's way through the hot path (assign
/// queued, received, task started and ended, result spooled, sent, received, stored, receipt
/// recorded, ...), each with an `attempt` field. They are `trace` events: off unless a
/// subscriber asks for this target (`RUST_LOG=kommune::stage=trace`, or the dispatch bench's
/// stage breakdown).
pub const STAGE_TARGET: &str = "kommune::stage";

/// The DNS name every gateway certificate carries and every agent verifies, whatever address
/// it dialled: trust comes from the pinned operator CA, not from DNS, so NAT, port forwards and
/// changing addresses do not break TLS.
pub const GATEWAY_SERVER_NAME: &str = "gateway.kommune.internal";

/// Name of the runtimes, as advertised in `Capacity.runtimes` and used in ComputeJob specs.
/// Limits both sides of the protocol rely on.
pub mod limits {
    /// Most stdout one attempt may write: past it the agent fails the attempt rather than report
    /// a digest of a prefix, and the operator refuses a receipt claiming more output.
    pub const MAX_STDOUT_BYTES: u64 = 16 << 20;
    /// Most bytes a job may let one attempt upload as outputs (`spec.outputs.maxAttemptSize`).
    pub const MAX_ATTEMPT_OUTPUTS: u64 = 4 << 30;
    /// Most stderr one attempt may write (not metered as output).
    pub const MAX_STDERR_BYTES: u64 = 1 << 20;
    /// Largest LogChunk (live stdout or stderr of a running attempt).
    pub const MAX_LOG_CHUNK_BYTES: usize = 16 << 10;
    /// How far into each stream of an attempt live chunks go: past it, followers wait for the
    /// logs stored at the attempt's end.
    pub const MAX_LIVE_LOG_BYTES: u64 = 1 << 20;
}

pub mod runtime {
    pub const WASM: &str = "wasm";
    pub const EXEC: &str = "exec";
    pub const CONTAINER: &str = "container";
}

/// The CA pin carried in join tokens: lowercase hex sha256 of the CA certificate's DER bytes.
pub fn ca_pin(ca_der: &[u8]) -> String {
    hex::encode(Sha256::digest(ca_der))
}

/// Milliseconds since the Unix epoch: the one wall clock the operator, its store and the
/// agent read (0 if the clock is before 1970). Pure code takes the time as an argument instead.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Lowercase hex sha256 of arbitrary bytes (module digests, output digests).
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// True when `s` is 64 lowercase hex digits, the form of every digest in the protocol.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// True when `path` is a relative path of plain components (no `..`, no `.`, no empty ones, no
/// leading `/`, at most 1024 bytes): what may be joined under an attempt's scratch directory,
/// for input and output paths alike.
pub fn is_plain_relative_path(path: &str) -> bool {
    !path.is_empty() && path.len() <= 1024 && !path.contains('\0') && path.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
}

/// True when `image` is pinned by digest, `name@sha256:<64 lowercase hex>`, with a plausible
/// name (lowercase letters, digits and `._-/:`; a tag before the digest is allowed). Both ends
/// check it: a tag can be moved to other content, a digest cannot, so results stay reproducible.
/// [`is_pinned_image`] as a regular expression, for the CRD schema: the API server refuses an
/// unpinned image at `kubectl apply`, before the operator sees it.
pub const PINNED_IMAGE_PATTERN: &str = r"^[a-z0-9][a-z0-9._/:-]{0,511}@sha256:[0-9a-f]{64}$";

pub fn is_pinned_image(image: &str) -> bool {
    let Some((name, digest)) = image.rsplit_once('@') else { return false };
    let name_ok = !name.is_empty()
        && name.len() <= 512
        && !name.starts_with(['/', ':', '.', '-'])
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-/:".contains(&b));
    name_ok && digest.strip_prefix("sha256:").is_some_and(is_sha256_hex)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_images_pinned_by_sha256_digest_count_as_pinned() {
        let hex = "0123456789abcdef".repeat(4);
        for good in [format!("busybox@sha256:{hex}"), format!("docker.io/library/busybox:1.36@sha256:{hex}"), format!("localhost:5000/a/b@sha256:{hex}")] {
            assert!(is_pinned_image(&good), "{good}");
        }
        for bad in [
            "busybox".to_owned(),
            "busybox:latest".to_owned(),
            format!("@sha256:{hex}"),
            format!("busybox@sha512:{hex}"),
            format!("busybox@sha256:{}", hex.to_uppercase()),
            format!("busybox@sha256:{}", &hex[1..]),
            format!("Busybox@sha256:{hex}"),
            format!("busy box@sha256:{hex}"),
            format!("/busybox@sha256:{hex}"),
        ] {
            assert!(!is_pinned_image(&bad), "{bad}");
        }
    }

    #[test]
    fn the_schema_pattern_agrees_with_the_check() {
        let re = regex::Regex::new(PINNED_IMAGE_PATTERN).unwrap();
        let hex = "0123456789abcdef".repeat(4);
        let names = ["busybox", "docker.io/library/busybox:1.36", "localhost:5000/a/b", "a", "", "Busybox", "busy box", "/b", ".b", "-b", ":b", "b.", "ü"];
        let digests =
            [format!("sha256:{hex}"), format!("sha512:{hex}"), format!("sha256:{}", &hex[1..]), format!("sha256:{}", hex.to_uppercase()), String::new()];
        for name in names {
            for digest in &digests {
                for image in [format!("{name}@{digest}"), format!("{name}{digest}"), format!("{name}@{digest}@{digest}")] {
                    assert_eq!(re.is_match(&image), is_pinned_image(&image), "{image}");
                }
            }
        }
        let long = format!("{}@sha256:{hex}", "a".repeat(512));
        assert_eq!(re.is_match(&long), is_pinned_image(&long));
        let too_long = format!("{}@sha256:{hex}", "a".repeat(513));
        assert_eq!(re.is_match(&too_long), is_pinned_image(&too_long));
    }
}
