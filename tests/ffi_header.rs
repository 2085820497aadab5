//! The checked-in C header `bindings/c/verity.h` must be what cbindgen generates from
//! `src/ffi.rs` with `cbindgen.toml`. After changing the C ABI, regenerate it with
//! `VERITY_BLESS=1 cargo test --release --test ffi_header` and commit the header.

use std::path::PathBuf;

fn generate() -> String {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(root.join("cbindgen.toml")).expect("cbindgen.toml");
    let bindings = cbindgen::Builder::new()
        .with_config(config)
        .with_src(root.join("src/ffi.rs"))
        .generate()
        .expect("cbindgen could not read src/ffi.rs");
    let mut out = Vec::new();
    bindings.write(&mut out);
    String::from_utf8(out).expect("UTF-8 header")
}

#[test]
fn header_is_up_to_date() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("bindings/c/verity.h");
    let generated = generate();
    if std::env::var("VERITY_BLESS").is_ok_and(|v| v == "1") {
        std::fs::write(&path, &generated).expect("write the header");
        println!("wrote {}", path.display());
        return;
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    if checked_in != generated {
        let tmp = std::env::temp_dir().join(format!("verity-{}.h", std::process::id()));
        std::fs::write(&tmp, &generated).expect("write the generated header");
        panic!(
            "{} is out of date with src/ffi.rs (the generated one is in {}; `diff` them).\n\
             Regenerate it with: VERITY_BLESS=1 cargo test --release --test ffi_header",
            path.display(),
            tmp.display()
        );
    }
}
