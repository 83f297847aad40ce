#![no_main]

use libfuzzer_sys::fuzz_target;
use meshinit_fuzz::{proxy_checks, rules_checks};

fuzz_target!(|data: &[u8]| {
    rules_checks::ports(data);
    proxy_checks::proxy_ports(data);
});
