//! One module per subcommand: its arguments and its `run`.

pub mod bench;
pub mod eval;
pub mod generate;
pub mod info;
pub mod rl;
pub mod sample;
pub mod serve;
pub mod tasks;
