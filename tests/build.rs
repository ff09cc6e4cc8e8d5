//! Generates the test gRPC service's client and server (`tests/src/grpc.rs`) with tonic-build's
//! manual builder: the messages are written in Rust, so no `.proto` file and no `protoc`.

use tonic_build::manual::{Builder, Method, Service};

fn main() {
    let method = |name: &str, route: &str, input: &str, output: &str| {
        Method::builder()
            .name(name)
            .route_name(route)
            .input_type(format!("crate::grpc::{input}"))
            .output_type(format!("crate::grpc::{output}"))
            .codec_path("tonic_prost::ProstCodec")
    };
    let service = Service::builder()
        .name("Echo")
        .package("baton.test")
        .method(method("echo", "Echo", "Text", "Text").build())
        .method(
            method("count", "Count", "Number", "Number")
                .server_streaming()
                .build(),
        )
        .method(
            method("sum", "Sum", "Number", "Number")
                .client_streaming()
                .build(),
        )
        .build();
    Builder::new().build_transport(false).compile(&[service]);
    println!("cargo::rerun-if-changed=build.rs");
}
