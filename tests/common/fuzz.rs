//! A small mutation fuzzer for the parsers a client reaches (request JSON, GGUF and
//! safetensors headers, adapter configs): valid seed inputs are mutated (bit flips,
//! interesting bytes and integers, deleted, repeated and spliced ranges, dictionary tokens)
//! and every mutant must come back as a value or an error, never a panic. Seeded, so a
//! failure reproduces; a failing input is saved and its path printed.
//!
//! CI runs a bounded number of cases per target; `VERITY_FUZZ_CASES=200000 cargo test
//! --release --test fuzz` (and `-p verity-server --test fuzz`) runs a longer campaign.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

/// Cases per target: `VERITY_FUZZ_CASES`, else `default`.
pub fn cases(default: usize) -> usize {
    std::env::var("VERITY_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// xorshift64*: deterministic, no dependency.
pub struct Mutator {
    state: u64,
}

const INTERESTING_U64: [u64; 12] = [
    0,
    1,
    0x7f,
    0xff,
    0x7fff,
    0xffff,
    0x7fff_ffff,
    0xffff_ffff,
    0x8000_0000_0000_0000,
    u64::MAX,
    u64::MAX - 1,
    1 << 40,
];

impl Mutator {
    pub fn new(seed: u64) -> Self {
        Self { state: seed.max(1) }
    }

    pub fn next(&mut self) -> u64 {
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        self.state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    /// A position, within the first `focus` bytes nine times out of ten (where the
    /// structure is; the rest of a model file is tensor data).
    fn position(&mut self, len: usize, focus: usize) -> usize {
        if len == 0 {
            return 0;
        }
        if focus > 0 && self.below(10) != 0 {
            self.below(focus.min(len))
        } else {
            self.below(len)
        }
    }

    /// One to four mutations of `seed`.
    pub fn mutate(&mut self, seed: &[u8], dictionary: &[&[u8]], focus: usize) -> Vec<u8> {
        let mut d = seed.to_vec();
        for _ in 0..1 + self.below(4) {
            let at = self.position(d.len(), focus);
            match self.below(8) {
                0 if !d.is_empty() => {
                    let at = at.min(d.len() - 1);
                    d[at] ^= 1 << self.below(8);
                }
                1 if !d.is_empty() => {
                    let bytes = [0u8, 0xff, 0x7f, 0x80, b'"', b'{', b'[', b'9', b'-', b'\\'];
                    let at = at.min(d.len() - 1);
                    d[at] = bytes[self.below(bytes.len())];
                }
                2 => {
                    let end = (at + 1 + self.below(16)).min(d.len());
                    d.drain(at..end);
                }
                3 if !d.is_empty() => {
                    let end = (at + 1 + self.below(32)).min(d.len());
                    let copy = d[at..end].to_vec();
                    let to = self.position(d.len(), focus);
                    d.splice(to..to, copy);
                }
                4 if !dictionary.is_empty() => {
                    let token = dictionary[self.below(dictionary.len())];
                    d.splice(at..at, token.iter().copied());
                }
                5 => d.truncate(at),
                6 if d.len() >= 8 => {
                    let at = at.min(d.len() - 8);
                    let v = INTERESTING_U64[self.below(INTERESTING_U64.len())];
                    let width = [1, 2, 4, 8][self.below(4)];
                    d[at..at + width].copy_from_slice(&v.to_le_bytes()[..width]);
                }
                _ if !dictionary.is_empty() => {
                    // Replace a range by a dictionary token.
                    let end = (at + 1 + self.below(8)).min(d.len());
                    let token = dictionary[self.below(dictionary.len())];
                    d.splice(at..end, token.iter().copied());
                }
                _ => {}
            }
        }
        d
    }
}

/// Runs `check` on `cases` mutants of `seeds` (and on the seeds themselves); a panic is
/// a failure whose input is saved under the temporary folder.
pub fn run(
    target: &str,
    seeds: &[Vec<u8>],
    dictionary: &[&[u8]],
    focus: usize,
    cases: usize,
    check: impl FnMut(&[u8]),
) {
    run_with(
        target,
        seeds.len() + cases,
        |m, i| {
            if i < seeds.len() {
                seeds[i].clone()
            } else {
                let seed = &seeds[m.below(seeds.len())];
                m.mutate(seed, dictionary, focus)
            }
        },
        check,
    )
}

/// Runs `check` on `cases` inputs made by `generate` (given the case's index).
pub fn run_with(
    target: &str,
    cases: usize,
    mut generate: impl FnMut(&mut Mutator, usize) -> Vec<u8>,
    mut check: impl FnMut(&[u8]),
) {
    let mut m = Mutator::new(0x5eed ^ target.len() as u64 ^ (cases as u64) << 20);
    for i in 0..cases {
        let input = generate(&mut m, i);
        if catch_unwind(AssertUnwindSafe(|| check(&input))).is_err() {
            let path: PathBuf = std::env::temp_dir().join(format!("verity-fuzz-{target}-{i}.bin"));
            std::fs::write(&path, &input).expect("save the failing input");
            panic!(
                "{target}: case {i} panicked; its input is saved in {}",
                path.display()
            );
        }
    }
}
