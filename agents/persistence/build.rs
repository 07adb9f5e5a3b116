//! Compiles the MongoDB conformance run only when `BERTH_TEST_MONGODB_URL` is set, so that the
//! test list itself says when it was skipped (`mongodb_conformance_skipped_no_server`).

fn main() {
    println!("cargo::rerun-if-env-changed=BERTH_TEST_MONGODB_URL");
    println!("cargo::rustc-check-cfg=cfg(berth_mongodb_test)");
    if std::env::var_os("BERTH_TEST_MONGODB_URL").is_some_and(|url| !url.is_empty()) {
        println!("cargo::rustc-cfg=berth_mongodb_test");
    }
}
