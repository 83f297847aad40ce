#![no_main]

use libfuzzer_sys::fuzz_target;
use meshinit_fuzz::rules_checks;

fuzz_target!(|data: &[u8]| rules_checks::ruleset(data));
