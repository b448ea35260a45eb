//! SHA-256, computed by the host.
//!
//! WebAssembly cannot use the CPU's SHA instructions; the host can, and
//! hashes a short value several times faster than the same code compiled
//! into a plugin. [`Sha256Batch`] collects many values (a batch's
//! identifiers) and hashes them in one host call; [`sha256`] hashes one.
//!
//! ```
//! use cdp_plugin_sdk::hash::{self, Sha256Batch};
//!
//! let mut batch = Sha256Batch::new();
//! batch.push(b"abc");
//! batch.push(b"");
//! let digests = batch.digests();
//! let mut hex = String::new();
//! hash::push_hex(&digests[0], &mut hex);
//! assert_eq!(hex, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
//! assert_eq!(digests[1], hash::sha256(b""));
//! ```
//!
//! Outside a wasm32 build (native unit tests), and for a value over the
//! host's per-call limit (1 MiB), digests are computed in place with the
//! `sha2` crate; the results are the same.

use sha2::{Digest, Sha256};

/// Largest input of one host call (the `sha256` import's limit).
#[cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]
const HOST_BYTES: usize = 1 << 20;
/// Most values in one host call.
#[cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]
const HOST_VALUES: usize = 1 << 16;

/// A SHA-256 digest.
pub type Digest256 = [u8; 32];

/// The SHA-256 digest of `data`.
pub fn sha256(data: &[u8]) -> Digest256 {
    let mut batch = Sha256Batch::new();
    batch.push(data);
    let mut out = Vec::with_capacity(1);
    batch.digests_into(&mut out);
    out.first().copied().unwrap_or_else(|| Sha256::digest(data).into())
}

/// Values to hash together: push them, then take all digests at once.
/// Reuse one across batches ([`Sha256Batch::clear`]) to keep its buffers.
#[derive(Debug, Default, Clone)]
pub struct Sha256Batch {
    data: Vec<u8>,
    /// Where each value ends in `data`.
    ends: Vec<usize>,
}

impl Sha256Batch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a value; answers its index among the digests.
    pub fn push(&mut self, value: &[u8]) -> usize {
        self.data.extend_from_slice(value);
        self.ends.push(self.data.len());
        self.ends.len() - 1
    }

    /// How many values were pushed.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// Whether no value was pushed.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Forgets the values, keeping the buffers.
    pub fn clear(&mut self) {
        self.data.clear();
        self.ends.clear();
    }

    /// The digests of the pushed values, in push order.
    pub fn digests(&self) -> Vec<Digest256> {
        let mut out = Vec::with_capacity(self.len());
        self.digests_into(&mut out);
        out
    }

    /// Replaces the contents of `out` with the digests of the pushed values,
    /// in push order.
    pub fn digests_into(&self, out: &mut Vec<Digest256>) {
        out.clear();
        out.reserve(self.len());
        let mut first = 0; // index of the first value not yet hashed
        while first < self.ends.len() {
            let start = self.start(first);
            // As many values as fit one host call.
            let mut last = first;
            while last < self.ends.len() && last - first < host_values() && self.ends[last] - start <= host_bytes() {
                last += 1;
            }
            if last == first {
                // One value over the host's limit: hashed here.
                out.push(Sha256::digest(&self.data[start..self.ends[first]]).into());
                first += 1;
                continue;
            }
            self.hash_run(first, last, out);
            first = last;
        }
    }

    fn start(&self, i: usize) -> usize {
        if i == 0 { 0 } else { self.ends[i - 1] }
    }

    /// Hashes values `first..last`, which fit one host call.
    #[cfg(target_arch = "wasm32")]
    fn hash_run(&self, first: usize, last: usize, out: &mut Vec<Digest256>) {
        let start = self.start(first);
        // Within the host's limits, so every end fits a u32.
        let ends: Vec<u32> = self.ends[first..last].iter().map(|&e| (e - start) as u32).collect();
        let digests = crate::bindings::host::sha256(&self.data[start..self.ends[last - 1]], &ends);
        for chunk in digests.chunks_exact(32) {
            let mut d = [0u8; 32];
            d.copy_from_slice(chunk);
            out.push(d);
        }
    }

    #[cfg(not(target_arch = "wasm32"))]
    fn hash_run(&self, first: usize, last: usize, out: &mut Vec<Digest256>) {
        for i in first..last {
            out.push(Sha256::digest(&self.data[self.start(i)..self.ends[i]]).into());
        }
    }
}

#[cfg(target_arch = "wasm32")]
fn host_bytes() -> usize {
    HOST_BYTES
}

#[cfg(target_arch = "wasm32")]
fn host_values() -> usize {
    HOST_VALUES
}

// Natively, small limits exercise the splitting in unit tests.
#[cfg(not(target_arch = "wasm32"))]
fn host_bytes() -> usize {
    64
}

#[cfg(not(target_arch = "wasm32"))]
fn host_values() -> usize {
    3
}

/// Appends `digest` to `out` as 64 lower-case hex digits.
pub fn push_hex(digest: &Digest256, out: &mut String) {
    // Both digits of every byte value, so a byte is one lookup.
    const PAIRS: [[u8; 2]; 256] = {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut t = [[0u8; 2]; 256];
        let mut i = 0;
        while i < 256 {
            t[i] = [HEX[i >> 4], HEX[i & 0xf]];
            i += 1;
        }
        t
    };
    let mut text = [0u8; 64];
    for i in 0..32 {
        let [hi, lo] = PAIRS[usize::from(digest[i])];
        text[2 * i] = hi;
        text[2 * i + 1] = lo;
    }
    // Hex digits are ASCII: always valid UTF-8.
    if let Ok(text) = std::str::from_utf8(&text) {
        out.push_str(text);
    }
}

/// Appends the SHA-256 digest of `data` to `out` as 64 lower-case hex
/// digits.
pub fn push_sha256_hex(data: &[u8], out: &mut String) {
    push_hex(&sha256(data), out);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(data: &[u8]) -> Digest256 {
        Sha256::digest(data).into()
    }

    #[test]
    fn known_vectors() {
        let mut hex = String::new();
        push_sha256_hex(b"", &mut hex);
        assert_eq!(hex, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        hex.clear();
        push_sha256_hex(b"abc", &mut hex);
        assert_eq!(hex, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    #[test]
    fn batches_split_at_the_limits_and_keep_order() {
        // Natively the limits are 64 bytes and 3 values per call.
        let values: Vec<Vec<u8>> = [0usize, 1, 5, 63, 64, 65, 200, 0, 7, 30, 30, 30, 2]
            .iter()
            .enumerate()
            .map(|(i, &n)| vec![b'a' + i as u8; n])
            .collect();
        let mut batch = Sha256Batch::new();
        for (i, v) in values.iter().enumerate() {
            assert_eq!(batch.push(v), i);
        }
        assert_eq!(batch.len(), values.len());
        let digests = batch.digests();
        assert_eq!(digests, values.iter().map(|v| reference(v)).collect::<Vec<_>>());
        batch.clear();
        assert!(batch.is_empty());
        assert!(batch.digests().is_empty());
    }
}
