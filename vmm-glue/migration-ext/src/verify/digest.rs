// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Keyed page digests.
//!
//! Two functions, both keyed by a fresh random key per migration:
//!
//! - [`DigestFunction::Nh128`]: UMAC's NH universal hash (32-bit words,
//!   pairs of adjacent words, sums mod 2^64), twice with the Toeplitz key
//!   shift, 128 bits out. For any two different pages fixed without
//!   knowledge of the key, the chance that their digests agree is at most
//!   2^-64 (NH is 2^-32-almost-universal on equal-length inputs, and the
//!   Toeplitz iterations multiply). The guest never sees key or digests,
//!   so it cannot adapt; over 2^24 pages (64 GiB) the chance of missing a
//!   single changed page stays below 2^-40. It needs a multiply-add per 8
//!   bytes and vectorizes, so it runs at memory speed.
//! - [`DigestFunction::SipHash24`]: SipHash-2-4 with a 128-bit output, a
//!   PRF (secure even if digests were seen), slower.
//!
//! [`super::rates::measure_functions`] times both on this machine; the
//! faster is used. Both are implemented here because the crate must not
//! grow dependencies (Cloud Hypervisor builds it with a locked lockfile).

use std::io;

/// Bytes of guest memory one digest covers.
pub const PAGE_SIZE: usize = 4096;
/// Bytes of one digest.
pub const DIGEST_LEN: usize = 16;
/// Bytes of a key as it travels.
pub const KEY_LEN: usize = 32;

/// One page's digest.
pub type Digest = [u8; DIGEST_LEN];

/// The digest functions a migration may use; the value travels on the
/// wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
#[repr(u16)]
pub enum DigestFunction {
    Nh128 = 1,
    SipHash24 = 2,
}

impl DigestFunction {
    pub const ALL: [DigestFunction; 2] = [DigestFunction::Nh128, DigestFunction::SipHash24];

    pub fn from_wire(v: u16) -> Option<Self> {
        match v {
            1 => Some(DigestFunction::Nh128),
            2 => Some(DigestFunction::SipHash24),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DigestFunction::Nh128 => "nh-128",
            DigestFunction::SipHash24 => "siphash-2-4-128",
        }
    }
}

/// The per-migration secret: drawn by the source, sent to the
/// destination over the migration connection, never reused.
#[derive(Clone, PartialEq, Eq)]
pub struct DigestKey(pub [u8; KEY_LEN]);

impl std::fmt::Debug for DigestKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DigestKey(..)")
    }
}

impl DigestKey {
    /// A fresh key from the kernel's CSPRNG.
    pub fn random() -> io::Result<Self> {
        let mut key = [0u8; KEY_LEN];
        let mut filled = 0;
        while filled < KEY_LEN {
            let rest = &mut key[filled..];
            // SAFETY: getrandom writes at most `rest.len()` bytes into
            // `rest`, which we own for the duration of the call.
            let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            filled += n as usize;
        }
        Ok(DigestKey(key))
    }
}

/// Words of NH key: one per 32-bit word of the page, plus the Toeplitz
/// shift of one pair.
const NH_KEY_WORDS: usize = PAGE_SIZE / 4 + 2;

/// A digest function instantiated with its key; cheap to share between
/// threads.
#[derive(Clone)]
pub struct PageDigester {
    function: DigestFunction,
    inner: Inner,
}

#[derive(Clone)]
enum Inner {
    Nh(Box<[u32; NH_KEY_WORDS]>),
    Sip { k0: u64, k1: u64 },
}

impl std::fmt::Debug for PageDigester {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PageDigester({})", self.function.name())
    }
}

fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

impl PageDigester {
    pub fn new(function: DigestFunction, key: &DigestKey) -> Self {
        let inner = match function {
            DigestFunction::Nh128 => {
                // The NH key is the SipHash keystream of the secret:
                // SipHash is a PRF, so these words are as unpredictable
                // as the key itself.
                let (k0, k1) = (le64(&key.0[..8]), le64(&key.0[8..16]));
                let salt = le64(&key.0[16..24]) ^ le64(&key.0[24..32]).rotate_left(17);
                let mut words = Box::new([0u32; NH_KEY_WORDS]);
                for (i, pair) in words.chunks_mut(4).enumerate() {
                    let (a, b) = siphash24_128(k0, k1, &(salt ^ i as u64).to_le_bytes());
                    let parts = [a as u32, (a >> 32) as u32, b as u32, (b >> 32) as u32];
                    pair.copy_from_slice(&parts[..pair.len()]);
                }
                Inner::Nh(words)
            }
            DigestFunction::SipHash24 => Inner::Sip {
                k0: le64(&key.0[..8]) ^ le64(&key.0[16..24]),
                k1: le64(&key.0[8..16]) ^ le64(&key.0[24..32]),
            },
        };
        PageDigester { function, inner }
    }

    pub fn function(&self) -> DigestFunction {
        self.function
    }

    /// The digest of one page of [`PAGE_SIZE`] bytes. A shorter tail
    /// (only a range that does not end on a page boundary has one) is
    /// zero-padded by NH and hashed with its length by SipHash.
    pub fn digest(&self, page: &[u8]) -> Digest {
        let (a, b) = match &self.inner {
            Inner::Nh(key) => match <&[u8; PAGE_SIZE]>::try_from(page) {
                Ok(full) => nh2(key, full),
                Err(_) => {
                    let mut padded = [0u8; PAGE_SIZE];
                    let n = page.len().min(PAGE_SIZE);
                    padded[..n].copy_from_slice(&page[..n]);
                    nh2(key, &padded)
                }
            },
            Inner::Sip { k0, k1 } => siphash24_128(*k0, *k1, page),
        };
        let mut out = [0u8; DIGEST_LEN];
        out[..8].copy_from_slice(&a.to_le_bytes());
        out[8..].copy_from_slice(&b.to_le_bytes());
        out
    }

    /// Digests of consecutive pages of `data` into `out` (one per page).
    pub fn digest_pages(&self, data: &[u8], out: &mut Vec<Digest>) {
        for page in data.chunks(PAGE_SIZE) {
            out.push(self.digest(page));
        }
    }
}

/// NH with two Toeplitz iterations over one page of 32-bit words.
///
/// Indexed over fixed-size arrays so the bounds are known and the loop
/// vectorizes (a multiply-add per 8 bytes and iteration).
fn nh2(key: &[u32; NH_KEY_WORDS], page: &[u8; PAGE_SIZE]) -> (u64, u64) {
    let (mut a, mut b) = (0u64, 0u64);
    for i in 0..PAGE_SIZE / 8 {
        let at = i * 8;
        let m0 = u32::from_le_bytes([page[at], page[at + 1], page[at + 2], page[at + 3]]);
        let m1 = u32::from_le_bytes([page[at + 4], page[at + 5], page[at + 6], page[at + 7]]);
        let j = 2 * i;
        a = a.wrapping_add(
            u64::from(m0.wrapping_add(key[j])) * u64::from(m1.wrapping_add(key[j + 1])),
        );
        b = b.wrapping_add(
            u64::from(m0.wrapping_add(key[j + 2])) * u64::from(m1.wrapping_add(key[j + 3])),
        );
    }
    (a, b)
}

/// SipHash-2-4 with its 128-bit output (Aumasson and Bernstein).
fn siphash24_128(k0: u64, k1: u64, data: &[u8]) -> (u64, u64) {
    let mut v = [
        k0 ^ 0x736f_6d65_7073_6575,
        k1 ^ 0x646f_7261_6e64_6f6d ^ 0xee,
        k0 ^ 0x6c79_6765_6e65_7261,
        k1 ^ 0x7465_6462_7974_6573,
    ];
    fn round(v: &mut [u64; 4]) {
        v[0] = v[0].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(13) ^ v[0];
        v[0] = v[0].rotate_left(32);
        v[2] = v[2].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(16) ^ v[2];
        v[0] = v[0].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(21) ^ v[0];
        v[2] = v[2].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(17) ^ v[2];
        v[2] = v[2].rotate_left(32);
    }
    let mut words = data.chunks_exact(8);
    for w in &mut words {
        let m = le64(w);
        v[3] ^= m;
        round(&mut v);
        round(&mut v);
        v[0] ^= m;
    }
    let rest = words.remainder();
    let mut last = [0u8; 8];
    last[..rest.len()].copy_from_slice(rest);
    let m = u64::from_le_bytes(last) | ((data.len() as u64) << 56);
    v[3] ^= m;
    round(&mut v);
    round(&mut v);
    v[0] ^= m;
    v[2] ^= 0xee;
    for _ in 0..4 {
        round(&mut v);
    }
    let a = v[0] ^ v[1] ^ v[2] ^ v[3];
    v[1] ^= 0xdd;
    for _ in 0..4 {
        round(&mut v);
    }
    (a, v[0] ^ v[1] ^ v[2] ^ v[3])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn siphash_matches_the_reference_vectors() {
        // From the SipHash reference implementation's vectors_sip128:
        // key 00..0f, messages 00, 00 01, ... ; first two entries.
        let k0 = u64::from_le_bytes([0, 1, 2, 3, 4, 5, 6, 7]);
        let k1 = u64::from_le_bytes([8, 9, 10, 11, 12, 13, 14, 15]);
        let expect = |bytes: [u8; 16]| (le64(&bytes[..8]), le64(&bytes[8..]));
        assert_eq!(
            siphash24_128(k0, k1, &[]),
            expect([
                0xa3, 0x81, 0x7f, 0x04, 0xba, 0x25, 0xa8, 0xe6, 0x6d, 0xf6, 0x72, 0x14, 0xc7, 0x55,
                0x02, 0x93
            ])
        );
        assert_eq!(
            siphash24_128(k0, k1, &[0]),
            expect([
                0xda, 0x87, 0xc1, 0xd8, 0x6b, 0x99, 0xaf, 0x44, 0x34, 0x76, 0x59, 0x11, 0x9b, 0x22,
                0xfc, 0x45
            ])
        );
    }

    fn page(seed: u64) -> Vec<u8> {
        let mut x = seed;
        (0..PAGE_SIZE)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (x >> 56) as u8
            })
            .collect()
    }

    #[test]
    fn every_function_tells_one_changed_byte_or_bit() {
        let key = DigestKey::random().unwrap();
        for f in DigestFunction::ALL {
            let d = PageDigester::new(f, &key);
            let base = page(1);
            let digest = d.digest(&base);
            assert_eq!(d.digest(&base), digest, "{f:?} is deterministic");
            for at in [0, 1, 7, 8, 2047, 4095] {
                for bit in [0u8, 7] {
                    let mut changed = base.clone();
                    changed[at] ^= 1 << bit;
                    assert_ne!(d.digest(&changed), digest, "{f:?} byte {at} bit {bit}");
                }
            }
            // A zero page is a page like any other.
            assert_ne!(d.digest(&[0u8; PAGE_SIZE]), d.digest(&page(2)));
        }
    }

    #[test]
    fn keys_differ_so_digests_differ() {
        let (k1, k2) = (DigestKey::random().unwrap(), DigestKey::random().unwrap());
        assert_ne!(k1, k2);
        for f in DigestFunction::ALL {
            let p = page(3);
            assert_ne!(
                PageDigester::new(f, &k1).digest(&p),
                PageDigester::new(f, &k2).digest(&p),
                "{f:?}"
            );
        }
    }

    #[test]
    fn nh_swapped_words_and_key_cancelling_edits_do_not_collide() {
        // NH is linear-ish: edits a guest might try without the key
        // (swapping the two words of a pair, adding to one word and
        // subtracting from its partner) must still change the digest.
        let key = DigestKey::random().unwrap();
        let d = PageDigester::new(DigestFunction::Nh128, &key);
        let base = page(4);
        let digest = d.digest(&base);
        let mut swapped = base.clone();
        for i in 0..4 {
            swapped.swap(800 + i, 804 + i);
        }
        let mut plus_minus = base.clone();
        plus_minus[16] = plus_minus[16].wrapping_add(1);
        plus_minus[20] = plus_minus[20].wrapping_sub(1);
        assert_ne!(d.digest(&swapped), digest);
        assert_ne!(d.digest(&plus_minus), digest);
    }

    #[test]
    fn short_tail_hashes_as_zero_padded() {
        let key = DigestKey::random().unwrap();
        for f in DigestFunction::ALL {
            let d = PageDigester::new(f, &key);
            let mut full = vec![0u8; PAGE_SIZE];
            full[..100].fill(9);
            if f == DigestFunction::Nh128 {
                assert_eq!(d.digest(&full[..100]), d.digest(&full));
            }
            let mut out = Vec::new();
            d.digest_pages(&[1u8; PAGE_SIZE * 2 + 5], &mut out);
            assert_eq!(out.len(), 3);
        }
    }
}
