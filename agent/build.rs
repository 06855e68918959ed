//! Compiles the KServe v2 gRPC protocol (`proto/grpc_predict_v2.proto`) when the `grpc`
//! feature is on, with the protoc that `protoc-bin-vendored` carries for the build host (so
//! nothing is downloaded and cross builds need no target protoc).

fn main() {
    println!("cargo:rerun-if-changed=proto/grpc_predict_v2.proto");
    #[cfg(feature = "grpc")]
    {
        let protoc =
            protoc_bin_vendored::protoc_bin_path().expect("a vendored protoc for this host");
        // SAFETY: build scripts are single-threaded; the variable is read by prost-build below.
        unsafe { std::env::set_var("PROTOC", protoc) };
        tonic_prost_build::configure()
            .build_client(false)
            .compile_protos(&["proto/grpc_predict_v2.proto"], &["proto"])
            .expect("compiling the KServe v2 gRPC protocol");
    }
}
