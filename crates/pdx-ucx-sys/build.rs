//! Links the system UCX found by `pkg-config ucx` (ucp, uct, ucs). No bindgen here: the bindings are
//! committed in `src/bindings.rs` (regenerate them with `regen.sh`).
//!
//! Without UCX (no `pkg-config ucx`), the crate still compiles (it is a workspace member, and the workspace
//! must build on machines without libucx) but links nothing and sets `cfg(pdx_ucx_missing)`, which compiles its
//! tests out; anything that calls into it (the `ucx` feature of pdx-transfer) then fails to link, naming UCX.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(pdx_ucx_missing)");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=PKG_CONFIG_PATH");
    match pkg_config::Config::new()
        .atleast_version("1.13")
        .probe("ucx")
    {
        Ok(lib) => {
            // The log shim (see src/log_shim.c) needs UCX's headers.
            println!("cargo:rerun-if-changed=src/log_shim.c");
            cc::Build::new()
                .file("src/log_shim.c")
                .includes(&lib.include_paths)
                .warnings(true)
                .compile("pdx_ucx_log_shim");
            // ucx.pc lists ucp/uct/ucs (and ucm); make sure all three are linked even if a distribution's
            // .pc file is trimmed.
            for l in ["ucp", "uct", "ucs"] {
                if !lib.libs.iter().any(|x| x == l) {
                    println!("cargo:rustc-link-lib={l}");
                }
            }
        }
        Err(e) => {
            println!(
                "cargo:warning=pdx-ucx-sys: system UCX >= 1.13 not found via `pkg-config ucx` ({e}); \
                 install libucx-dev to use the `ucx` feature"
            );
            println!("cargo:rustc-cfg=pdx_ucx_missing");
        }
    }
}
