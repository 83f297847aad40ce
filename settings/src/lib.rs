//! What `meshinit` and `meshproxy` share at their edges, so both binaries behave alike:
//!
//! - `sources`: each setting declared once ([`settings!`]), read from flag > env >
//!   `--config` TOML file, with errors that name the source of a bad value;
//! - `report`: an error and its causes on one line, each cause printed once;
//! - `orig_dst`: the one `SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST` reader;
//! - `logging`: one logging set-up (`MESHINIT_LOG` / `MESHPROXY_LOG`, `RUST_LOG` as the
//!   fallback, plain or JSON lines on stderr).

#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]

mod logging;
mod orig_dst;
mod report;
mod sources;

pub use crate::logging::{init_logging, LogFormat, Program};
pub use crate::orig_dst::original_dst;
pub use crate::report::Report;
pub use crate::sources::{
    bool_flags, document_value, join_bool_values, File, FileError, Origin, Setting, SettingError,
    Sources,
};
