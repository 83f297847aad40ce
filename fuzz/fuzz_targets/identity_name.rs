#![no_main]

use libfuzzer_sys::fuzz_target;
use meshinit_fuzz::proxy_checks;

fuzz_target!(|data: &[u8]| {
    proxy_checks::identity_name(data);
});
