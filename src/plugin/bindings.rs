//! Host-side bindings of the `cdp:connector@0.1.0` worlds (`wit/connector.wit`).
//! The destination world reuses the source world's imports and types, so both
//! worlds share one set of Rust types and one linker.

#![allow(clippy::all, missing_docs)]

/// Bindings of the `source-connector` world.
pub mod source {
    wasmtime::component::bindgen!({
        world: "source-connector",
        path: "wit",
        imports: { "cdp:connector/http.send": async, default: trappable },
        exports: { default: async },
    });
}

/// Bindings of the `destination-connector` world.
pub mod destination {
    wasmtime::component::bindgen!({
        world: "destination-connector",
        path: "wit",
        exports: { default: async },
        with: {
            "cdp:connector/types": super::source::cdp::connector::types,
            "cdp:connector/host": super::source::cdp::connector::host,
            "cdp:connector/http": super::source::cdp::connector::http,
        },
    });
}

pub use source::cdp::connector::{host, http, types};
