//! Links the crate against vmmpp's C ABI library, libvmmpp_kv_capi.so, which CMake builds (target
//! vmmpp_kv_capi, into <build>/interop). Its folder comes from VMMPP_CAPI_LIB_DIR: the library is
//! a build product of the C++ tree, not something cargo can build or find by itself.

use std::env;
use std::path::Path;

fn main() {
    println!("cargo:rerun-if-env-changed=VMMPP_CAPI_LIB_DIR");
    let dir = match env::var("VMMPP_CAPI_LIB_DIR") {
        Ok(dir) if !dir.is_empty() => dir,
        _ => panic!(
            "VMMPP_CAPI_LIB_DIR is not set: point it at the folder holding libvmmpp_kv_capi.so, e.g.\n  \
             cmake --build build/dev --target vmmpp_kv_capi\n  \
             VMMPP_CAPI_LIB_DIR=$PWD/build/dev/interop cargo test --manifest-path bindings/rust/Cargo.toml"
        ),
    };
    let lib = Path::new(&dir).join("libvmmpp_kv_capi.so");
    if !lib.is_file() {
        panic!(
            "VMMPP_CAPI_LIB_DIR={dir} holds no libvmmpp_kv_capi.so: build it with \
             `cmake --build <build> --target vmmpp_kv_capi` and point the variable at <build>/interop"
        );
    }
    println!("cargo:rerun-if-changed={}", lib.display());
    println!("cargo:rustc-link-search=native={dir}");
    println!("cargo:rustc-link-lib=dylib=vmmpp_kv_capi");
    // The tests, examples and binaries find the library where it was built, with no LD_LIBRARY_PATH.
    println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
}
