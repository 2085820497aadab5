//! The checked-in C header `bindings/c/verity.h` must be what cbindgen generates from the
//! C ABI's module `src/ffi/` with `cbindgen.toml`. After changing the C ABI, regenerate it
//! with `VERITY_BLESS=1 cargo test --release --test ffi_header` and commit the header.
//!
//! cbindgen is given `src/ffi/mod.rs` and follows its `mod` declarations to the other
//! files, in the order they are declared (giving it each file as well would list their
//! functions twice). `header_has_every_exported_function` checks that this reaches every
//! `#[no_mangle]` function in `src/ffi/`.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn bindings() -> cbindgen::Bindings {
    let root = root();
    let config = cbindgen::Config::from_file(root.join("cbindgen.toml")).expect("cbindgen.toml");
    cbindgen::Builder::new()
        .with_config(config)
        .with_src(root.join("src/ffi/mod.rs"))
        .generate()
        .expect("cbindgen could not read src/ffi/")
}

fn generate() -> String {
    let mut out = Vec::new();
    bindings().write(&mut out);
    String::from_utf8(out).expect("UTF-8 header")
}

/// The names of the `#[no_mangle]` functions in `dir`'s `.rs` files, sorted (those whose
/// doc says `cbindgen:ignore`, kept out of the header on purpose, left out).
fn exported_functions(dir: &Path) -> Vec<String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("read src/ffi/")
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "rs"))
        .collect();
    files.sort();
    let mut names = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read a source file");
        let mut lines = text.lines();
        let mut ignored = false;
        while let Some(line) = lines.next() {
            if line.contains("cbindgen:ignore") {
                ignored = true;
            }
            if !matches!(line.trim(), "#[no_mangle]" | "#[unsafe(no_mangle)]") {
                continue;
            }
            let item = lines.next().unwrap_or_default();
            let name = item
                .split_once("fn ")
                .and_then(|(_, rest)| rest.split_once('('))
                .map(|(name, _)| name.trim().to_string())
                .unwrap_or_else(|| {
                    panic!(
                        "{}: expected a function right after #[no_mangle], found {item:?}",
                        file.display()
                    )
                });
            if !std::mem::take(&mut ignored) {
                names.push(name);
            }
        }
    }
    names.sort();
    names
}

#[test]
fn header_is_up_to_date() {
    let path = root().join("bindings/c/verity.h");
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
            "{} is out of date with src/ffi/ (the generated one is in {}; `diff` them).\n\
             Regenerate it with: VERITY_BLESS=1 cargo test --release --test ffi_header",
            path.display(),
            tmp.display()
        );
    }
}

#[test]
fn header_has_every_exported_function() {
    let mut in_header: Vec<String> = bindings()
        .functions
        .iter()
        .map(|f| f.path.name().to_string())
        .collect();
    in_header.sort();
    let exported = exported_functions(&root().join("src/ffi"));
    assert!(!exported.is_empty(), "no #[no_mangle] function in src/ffi/");
    assert_eq!(
        in_header, exported,
        "cbindgen's functions (left) are not the #[no_mangle] functions of src/ffi/ (right), \
         each once: is a file of src/ffi/ not declared in src/ffi/mod.rs?"
    );
}
