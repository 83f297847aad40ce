#![no_main]

use libfuzzer_sys::fuzz_target;
use meshinit_fuzz::meshinit_checks;

fuzz_target!(|data: &[u8]| meshinit_checks::cni_config(data));
