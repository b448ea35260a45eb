//! Audiences: rule-based segments of profiles. A rule is an expression in a
//! subset of CEL ([`expr`] parses it), type-checked against the manifest's
//! model and compiled into a [`program::Program`] that evaluates a profile's
//! values by slot; [`members`] evaluates every rule for one profile. Realtime
//! and scheduled evaluation build on this.

pub mod expr;
pub mod members;
pub mod program;

pub use members::{json_val, members};
pub use program::{CheckError, CheckErrorKind, Program, Scope, Type, Val, compile};
