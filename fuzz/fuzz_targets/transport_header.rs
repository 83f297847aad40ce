#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use meshinit_fuzz::proxy_checks;
use tokio::runtime::Runtime;

static RUNTIME: OnceLock<Runtime> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    proxy_checks::transport_header(RUNTIME.get_or_init(proxy_checks::runtime), data);
});
