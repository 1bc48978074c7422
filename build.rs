//! Build script of the `pdx` package: compiles the CUDA kernels in `kernels/` to PTX when `nvcc` is on the
//! PATH (sm_80 and sm_90) and tells the crate through `cfg(pdx_kernels_ptx)`. Without `nvcc` nothing is built:
//! the kernels are then compiled at run time with NVRTC where CUDA exists, and GPU paths report `Unavailable`
//! everywhere else. (The kernels arrive with the CUDA issue; today the folder holds none.)

use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(pdx_kernels_ptx)");
    println!("cargo::rerun-if-changed=kernels");
    println!("cargo::rerun-if-env-changed=PATH");
    let kernels: Vec<_> = std::fs::read_dir("kernels")
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "cu"))
                .collect()
        })
        .unwrap_or_default();
    if kernels.is_empty() || Command::new("nvcc").arg("--version").output().is_err() {
        return;
    }
    let out = std::env::var("OUT_DIR").expect("cargo sets OUT_DIR");
    for cu in &kernels {
        let stem = cu.file_stem().and_then(|s| s.to_str()).unwrap_or("kernel");
        for arch in ["sm_80", "sm_90"] {
            let ptx = Path::new(&out).join(format!("{stem}.{arch}.ptx"));
            let status = Command::new("nvcc")
                .args(["--ptx", "-O3", &format!("-arch={arch}"), "-o"])
                .arg(&ptx)
                .arg(cu)
                .status();
            if !matches!(status, Ok(s) if s.success()) {
                println!(
                    "cargo::warning=nvcc failed on {}; kernels will use NVRTC",
                    cu.display()
                );
                return;
            }
        }
    }
    println!("cargo::rustc-cfg=pdx_kernels_ptx");
}
