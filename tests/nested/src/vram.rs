// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! What the L2 guest of the xe-vfio-pci test writes over its "VRAM" BAR
//! and how it checks it: every chunk holds words derived from a seed, the
//! chunk's index and its generation (how often the guest rewrote it); the
//! guest keeps one checksum per chunk of what it wrote and compares the
//! BAR against them. Pure functions over word slices, so the same code
//! checks a `Vec` in the unit tests and a mapped BAR in the guest.

/// The first word of a chunk at a generation.
pub fn chunk_base(seed: u64, chunk: u64, generation: u64) -> u64 {
    splitmix64(seed ^ chunk.rotate_left(32) ^ generation.rotate_left(48))
}

/// SplitMix64's finaliser: every input bit reaches every output bit.
pub fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The checksum of a chunk: FNV-1a over its 64-bit words, position
/// included (a word moved within the chunk changes it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Checksum(pub u64);

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

impl Checksum {
    pub fn new() -> Self {
        Checksum(FNV_OFFSET)
    }

    pub fn add(&mut self, word: u64) {
        self.0 = (self.0 ^ word).wrapping_mul(FNV_PRIME);
    }
}

impl Default for Checksum {
    fn default() -> Self {
        Self::new()
    }
}

/// Where the words of a chunk live: a mapped BAR (volatile accesses) or
/// memory.
pub trait Words {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn read(&self, index: usize) -> u64;
    fn write(&mut self, index: usize, word: u64);
}

impl Words for [u64] {
    fn len(&self) -> usize {
        <[u64]>::len(self)
    }
    fn read(&self, index: usize) -> u64 {
        self[index]
    }
    fn write(&mut self, index: usize, word: u64) {
        self[index] = word;
    }
}

/// Writes the chunk's pattern for a generation, returns its checksum.
pub fn fill<W: Words + ?Sized>(words: &mut W, seed: u64, chunk: u64, generation: u64) -> Checksum {
    let base = chunk_base(seed, chunk, generation);
    let mut sum = Checksum::new();
    for i in 0..words.len() {
        let word = base.wrapping_add((i as u64).wrapping_mul(0x0101_0101_0101_0101));
        words.write(i, word);
        sum.add(word);
    }
    sum
}

/// The checksum of what the chunk holds now.
pub fn checksum<W: Words + ?Sized>(words: &W) -> Checksum {
    let mut sum = Checksum::new();
    for i in 0..words.len() {
        sum.add(words.read(i));
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filled_chunk_checks_and_a_changed_word_does_not() {
        let mut chunk = vec![0u64; 1024];
        let sum = fill(chunk.as_mut_slice(), 7, 3, 0);
        assert_eq!(checksum(chunk.as_slice()), sum);
        chunk[512] ^= 1;
        assert_ne!(checksum(chunk.as_slice()), sum);
    }

    #[test]
    fn chunks_and_generations_get_different_contents() {
        let mut a = vec![0u64; 64];
        let mut b = vec![0u64; 64];
        let sa = fill(a.as_mut_slice(), 7, 0, 0);
        let sb = fill(b.as_mut_slice(), 7, 1, 0);
        assert_ne!(sa, sb);
        let sc = fill(b.as_mut_slice(), 7, 0, 1);
        assert_ne!(sa, sc);
        // Zeroed memory (a VRAM that never arrived) does not pass.
        let zero = vec![0u64; 64];
        assert_ne!(checksum(zero.as_slice()), sa);
    }

    #[test]
    fn swapped_words_change_the_checksum() {
        let mut chunk = vec![0u64; 16];
        let sum = fill(chunk.as_mut_slice(), 1, 1, 1);
        chunk.swap(2, 3);
        assert_ne!(checksum(chunk.as_slice()), sum);
    }
}
