//! Bakes libtorch's folder into the binaries' RUNPATH so they run without LD_LIBRARY_PATH. With
//! RADFM_LINK_CUDA=1 (CUDA builds, e.g. the trainer image) it also keeps libtorch_cuda linked,
//! which the linker's --as-needed would drop, hiding CUDA from tch; CPU builds against the small
//! libtorch install must not link it (its CUDA libraries are absent there).
fn main() {
    println!("cargo:rerun-if-env-changed=RADFM_LINK_CUDA");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
        if std::env::var("RADFM_LINK_CUDA").is_ok_and(|v| v == "1") {
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
        }
    }
}
