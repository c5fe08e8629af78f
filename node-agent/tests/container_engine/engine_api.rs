//! Just enough of the Engine API, apart from the runtime under test, to build the test image and
//! to look at containers from the outside (what is left, what is running).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// The repository the test image is tagged with (Podman prefixes local names with `localhost/`).
const TEST_IMAGE: &str = "kommune-test-busybox";

/// The engine behind `KOMMUNE_TEST_CONTAINER_SOCKET`, seen from the test.
pub struct EngineApi {
    pub socket: PathBuf,
}

impl EngineApi {
    /// One request over HTTP/1.0 (the engine closes the connection after the reply, so no
    /// chunked bodies to decode): status and body.
    pub async fn request(&self, method: &str, path: &str, content_type: &str, body: &[u8]) -> (u16, Vec<u8>) {
        let mut stream = UnixStream::connect(&self.socket).await.unwrap_or_else(|e| panic!("cannot connect to {}: {e}", self.socket.display()));
        let head = format!("{method} /v1.41{path} HTTP/1.0\r\nHost: docker\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n", body.len());
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(body).await.unwrap();
        let mut reply = Vec::new();
        tokio::time::timeout(Duration::from_secs(120), stream.read_to_end(&mut reply)).await.expect("the engine answers within 120 s").unwrap();
        let split = reply.windows(4).position(|w| w == b"\r\n\r\n").expect("an HTTP reply");
        let status = std::str::from_utf8(&reply[9..12]).unwrap().parse().unwrap();
        (status, reply[split + 4..].to_vec())
    }

    pub async fn json(&self, method: &str, path: &str) -> Value {
        let (status, body) = self.request(method, path, "application/json", b"").await;
        assert!((200..300).contains(&status), "{method} {path}: HTTP {status}: {}", String::from_utf8_lossy(&body));
        serde_json::from_slice(&body).unwrap_or(Value::Null)
    }

    /// Ids of every container (running or not) carrying `label` (`key` or `key=value`).
    pub async fn containers_labelled(&self, label: &str) -> Vec<String> {
        let filters = serde_json::json!({ "label": [label] }).to_string();
        let list = self.json("GET", &format!("/containers/json?all=true&filters={}", encode(&filters))).await;
        list.as_array().into_iter().flatten().filter_map(|c| c["Id"].as_str().map(str::to_owned)).collect()
    }

    /// Builds a `FROM scratch` image holding the static busybox at `/bin/busybox` (with `sh`
    /// beside it) and returns it pinned by digest, as the runtime requires. The engine caches
    /// the layer, so every test after the first gets the same image at once.
    pub async fn busybox_image(&self, busybox: &Path) -> String {
        let binary = std::fs::read(busybox).unwrap_or_else(|e| panic!("cannot read {}: {e}", busybox.display()));
        assert!(is_static_elf(&binary), "{} is not a static executable; install busybox-static (hack/podman.sh does)", busybox.display());
        let dockerfile = b"FROM scratch\nCOPY rootfs/ /\n";
        let context = tar(&[
            ("Dockerfile", Entry::File(dockerfile, 0o644)),
            ("rootfs/bin/busybox", Entry::File(&binary, 0o755)),
            ("rootfs/bin/sh", Entry::Symlink("busybox")),
        ]);
        let (status, body) = self.request("POST", &format!("/build?t={TEST_IMAGE}&rm=1"), "application/x-tar", &context).await;
        let text = String::from_utf8_lossy(&body);
        assert!(status == 200 && !text.contains("\"error"), "cannot build the test image: HTTP {status}: {text}");
        let image = self.json("GET", &format!("/images/{TEST_IMAGE}/json")).await;
        let pinned = image["RepoDigests"].as_array().into_iter().flatten().filter_map(Value::as_str).find(|d| d.contains("@sha256:"));
        pinned.unwrap_or_else(|| panic!("the engine gave the local test image no digest (Docker only does after a push): {image}")).to_owned()
    }
}

/// A static ELF has no program interpreter (PT_INTERP, type 3) among its program headers.
fn is_static_elf(elf: &[u8]) -> bool {
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" || elf[4] != 2 {
        return false;
    }
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(elf[32..40].try_into().unwrap()) as usize;
    let (size, count) = (u16_at(54), u16_at(56));
    (0..count).all(|i| elf.get(phoff + i * size..phoff + i * size + 4).is_some_and(|t| t != [3, 0, 0, 0]))
}

enum Entry<'a> {
    File(&'a [u8], u32),
    Symlink(&'a str),
}

/// A ustar archive: the build context the engine expects.
fn tar(entries: &[(&str, Entry)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, entry) in entries {
        let mut header = [0u8; 512];
        header[..name.len()].copy_from_slice(name.as_bytes());
        let (mode, size, kind, link) = match entry {
            Entry::File(data, mode) => (*mode, data.len(), b'0', ""),
            Entry::Symlink(target) => (0o777, 0, b'2', *target),
        };
        header[100..108].copy_from_slice(format!("{mode:07o}\0").as_bytes());
        header[108..116].copy_from_slice(b"0000000\0");
        header[116..124].copy_from_slice(b"0000000\0");
        header[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
        header[136..148].copy_from_slice(b"00000000000\0");
        header[156] = kind;
        header[157..157 + link.len()].copy_from_slice(link.as_bytes());
        header[257..263].copy_from_slice(b"ustar\0");
        header[263..265].copy_from_slice(b"00");
        // The checksum is computed with its own field as spaces.
        header[148..156].copy_from_slice(b"        ");
        let sum: u32 = header.iter().map(|&b| u32::from(b)).sum();
        header[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        out.extend_from_slice(&header);
        if let Entry::File(data, _) = entry {
            out.extend_from_slice(data);
            out.resize(out.len().div_ceil(512) * 512, 0);
        }
    }
    out.resize(out.len() + 1024, 0);
    out
}

/// Percent-encodes a query value.
pub fn encode(value: &str) -> String {
    value.bytes().map(|b| if b.is_ascii_alphanumeric() || b"-._~".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") }).collect()
}
