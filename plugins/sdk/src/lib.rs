pub mod source_bindings {
    wit_bindgen::generate!({
        world: "source-connector",
        path: "../../wit",
        pub_export_macro: true,
        export_macro_name: "__export_source_world",
        default_bindings_module: "::cdp_plugin_sdk::source_bindings",
        type_section_suffix: "source",
        debug: true,
    });
}
pub mod dest_bindings {
    wit_bindgen::generate!({
        world: "destination-connector",
        path: "../../wit",
        pub_export_macro: true,
        export_macro_name: "__export_destination_world",
        default_bindings_module: "::cdp_plugin_sdk::dest_bindings",
        type_section_suffix: "destination",
        with: {
            "cdp:connector/host@0.1.0": crate::source_bindings::cdp::connector::host,
            "cdp:connector/http@0.1.0": crate::source_bindings::cdp::connector::http,
            "cdp:connector/types@0.1.0": crate::source_bindings::cdp::connector::types,
        },
        debug: true,
    });
}
