//! Audiences: rule-based segments of profiles. A rule is an expression in a
//! subset of CEL ([`expr`] parses it), type-checked against the manifest's
//! model and compiled into a [`program::Program`] that evaluates a profile's
//! values by slot. The language knows nothing of the manifest: the scope it
//! checks against is built by `manifest::rules`, and evaluating every
//! audience of a manifest for one profile is `profile::audiences`.

pub mod expr;
pub mod program;

pub use program::{CheckError, CheckErrorKind, Program, Scope, Type, Val, compile};
