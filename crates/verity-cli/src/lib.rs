//! The application side of verity, above the embeddable runtime: the evaluation harness
//! (`eval`: selection rules compared on GSM8K-style data; `rescore`: the same on a saved
//! trace file, without decoding), the online learning loop (`rl`),
//! synthetic verifiable tasks (`tasks`) and the learning-curve plot (`plot`). The `verity`
//! binary (`main.rs`, one file per subcommand under `cmd/`) drives them.

pub mod eval;
pub mod plot;
pub mod rescore;
pub mod rl;
pub mod tasks;
