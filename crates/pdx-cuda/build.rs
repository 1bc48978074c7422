//! Build script of `pdx-cuda`: compiles the CUDA kernels of the workspace's `kernels/` folder to PTX for sm_80
//! and sm_90 when `nvcc` is on the PATH, and always writes `$OUT_DIR/<stem>.<arch>.ptx` (empty without `nvcc`)
//! so the crate can `include_str!` them. An empty PTX means "compile the embedded `.cu` source with NVRTC at
//! run time"; machines without CUDA never touch either. (It lives here rather than in the top-level package
//! because a build script can only feed its own crate, and the kernels are loaded by this one.)

use std::path::{Path, PathBuf};
use std::process::Command;

/// Kernels embedded by `src/kernels.rs` (each needs its PTX file to exist, even if empty).
const KERNELS: &[&str] = &["kv_pack"];
const ARCHS: &[&str] = &["sm_80", "sm_90"];

fn main() {
    println!("cargo::rustc-check-cfg=cfg(pdx_kernels_ptx)");
    println!("cargo::rerun-if-env-changed=PATH");
    println!("cargo::rerun-if-env-changed=PDX_NO_NVCC");
    let kernels_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"))
        .join("../../kernels");
    println!("cargo::rerun-if-changed={}", kernels_dir.display());
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = std::env::var_os("PDX_NO_NVCC").is_none()
        && Command::new("nvcc")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
    let mut all_built = nvcc;
    for stem in KERNELS {
        let cu = kernels_dir.join(format!("{stem}.cu"));
        println!("cargo::rerun-if-changed={}", cu.display());
        for arch in ARCHS {
            let ptx = out.join(format!("{stem}.{arch}.ptx"));
            if !(nvcc && compile(&cu, arch, &ptx)) {
                all_built = false;
                std::fs::write(&ptx, "").expect("write empty PTX marker");
            }
        }
    }
    if all_built {
        println!("cargo::rustc-cfg=pdx_kernels_ptx");
    }
}

fn compile(cu: &Path, arch: &str, ptx: &Path) -> bool {
    let status = Command::new("nvcc")
        .args(["--ptx", "-O3", "-std=c++17", &format!("-arch={arch}"), "-o"])
        .arg(ptx)
        .arg(cu)
        .status();
    let ok = matches!(status, Ok(s) if s.success());
    if !ok {
        println!("cargo::warning=nvcc failed on {} for {arch}; the kernels will be compiled with NVRTC at run time", cu.display());
    }
    ok
}
