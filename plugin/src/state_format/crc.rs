// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! CRC32C arithmetic the `crc32c` crate lacks in fast form.
//!
//! The whole-stream CRC must cover elided zero runs that can be GiBs long,
//! and DATA payloads whose CRC we already computed for the record. Both
//! are handled algebraically: appending `n` bytes to a CRC multiplies the
//! CRC register by `x^(8n)` modulo the CRC32C polynomial, which costs
//! O(log n) small multiplications instead of touching `n` bytes.
//!
//! Polynomials are in the reflected representation CRC32C uses: bit 31
//! holds the coefficient of `x^0`, bit 0 that of `x^31`.

/// The CRC32C (Castagnoli) polynomial, reflected.
const POLY: u32 = 0x82F6_3B78;
/// The polynomial `1`.
const ONE: u32 = 1 << 31;

/// `a * b mod POLY`.
const fn mul_mod(a: u32, mut b: u32) -> u32 {
    let mut product = 0;
    let mut bit = ONE;
    while bit != 0 && a & (bit | (bit - 1)) != 0 {
        if a & bit != 0 {
            product ^= b;
        }
        // b *= x
        b = if b & 1 != 0 { (b >> 1) ^ POLY } else { b >> 1 };
        bit >>= 1;
    }
    product
}

/// `X_POW2[k] = x^(2^k) mod POLY`, enough for 8 * u64::MAX bits.
const X_POW2: [u32; 67] = {
    let mut table = [0u32; 67];
    table[0] = ONE >> 1; // x
    let mut k = 1;
    while k < table.len() {
        table[k] = mul_mod(table[k - 1], table[k - 1]);
        k += 1;
    }
    table
};

/// `x^(8n) mod POLY`: advances a CRC register over `n` zero bytes.
fn zero_bytes_operator(mut n: u64) -> u32 {
    let mut op = ONE;
    let mut k = 3; // 8n = n << 3
    while n != 0 {
        if n & 1 != 0 {
            op = mul_mod(op, X_POW2[k]);
        }
        n >>= 1;
        k += 1;
    }
    op
}

/// Below this many bytes, hardware CRC over real bytes beats the algebra.
const SMALL: usize = 16 * 1024;

/// The CRC32C of `crc`'s data followed by `n` zero bytes.
pub(crate) fn append_zeros(crc: u32, n: u64) -> u32 {
    if n as usize <= SMALL.min(super::ZEROS.len()) {
        return crc32c::crc32c_append(crc, &super::ZEROS[..n as usize]);
    }
    !mul_mod(zero_bytes_operator(n), !crc)
}

/// The CRC32C of A followed by B, from `crc32c(A)`, `crc32c(B)` and B's
/// length.
pub(crate) fn combine(crc_a: u32, crc_b: u32, len_b: u64) -> u32 {
    mul_mod(zero_bytes_operator(len_b), crc_a) ^ crc_b
}

/// Extends a running stream CRC by `payload`, whose own CRC is known:
/// large payloads are combined, small ones rehashed.
pub(crate) fn extend(crc: u32, payload: &[u8], payload_crc: u32) -> u32 {
    if payload.len() <= SMALL {
        crc32c::crc32c_append(crc, payload)
    } else {
        combine(crc, payload_crc, payload.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn append_zeros_matches_real_zero_bytes() {
        let prefix = bytes(1000, 7);
        let start = crc32c::crc32c(&prefix);
        for n in [0u64, 1, 3, 4096, 16 * 1024, 16 * 1024 + 1, 300_000] {
            let real = crc32c::crc32c_append(start, &vec![0u8; n as usize]);
            assert_eq!(append_zeros(start, n), real, "n = {n}");
            // The algebraic path, also for small n.
            assert_eq!(!mul_mod(zero_bytes_operator(n), !start), real, "n = {n}");
        }
        assert_eq!(append_zeros(0, 5), crc32c::crc32c(&[0u8; 5]));
    }

    #[test]
    fn combine_matches_crate_and_concatenation() {
        let a = bytes(5000, 1);
        let b = bytes(70_000, 2);
        let (ca, cb) = (crc32c::crc32c(&a), crc32c::crc32c(&b));
        let whole = crc32c::crc32c_append(ca, &b);
        assert_eq!(combine(ca, cb, b.len() as u64), whole);
        assert_eq!(crc32c::crc32c_combine(ca, cb, b.len()), whole);
        assert_eq!(extend(ca, &b, cb), whole);
        assert_eq!(extend(ca, &b[..10], crc32c::crc32c(&b[..10])), {
            crc32c::crc32c_append(ca, &b[..10])
        });
        assert_eq!(combine(ca, 0, 0), ca);
    }
}
