//! An error and its causes on one line, each cause printed once.
//!
//! Many errors already show their cause in their own message (`cannot read X: {source}`)
//! and also return it from `source()`; printing the chain (`{:#}` of anyhow) then says
//! it twice: `…: Permission denied (os error 13): I/O error: Permission denied (os error
//! 13)`. A cause whose text the line already holds is left out.

use std::error::Error;
use std::fmt;

/// Displays an error followed by those of its causes that add something, `: `-joined.
pub struct Report<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut line = self.0.to_string();
        let mut cause = self.0.source();
        while let Some(error) = cause {
            let text = error.to_string();
            if !text.is_empty() && !line.contains(&text) {
                line.push_str(": ");
                line.push_str(&text);
            }
            cause = error.source();
        }
        f.write_str(&line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    #[derive(Debug)]
    struct Wrap {
        message: String,
        source: Box<dyn Error + 'static>,
    }
    impl fmt::Display for Wrap {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(&self.message)
        }
    }
    impl Error for Wrap {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            Some(&*self.source)
        }
    }

    fn denied() -> io::Error {
        io::Error::from_raw_os_error(13)
    }

    #[test]
    fn a_cause_already_in_the_message_is_printed_once() {
        // rustls' PEM error says "I/O error: {io}" and returns the io::Error as its
        // source; our error says "cannot read …: {pem}" and returns the PEM error.
        let pem = Wrap {
            message: format!("I/O error: {}", denied()),
            source: Box::new(denied()),
        };
        let ours = Wrap {
            message: format!("cannot read the identity certificate from c.pem: {pem}"),
            source: Box::new(pem),
        };
        assert_eq!(
            Report(&ours).to_string(),
            "cannot read the identity certificate from c.pem: I/O error: Permission denied (os error 13)"
        );
    }

    #[test]
    fn a_cause_the_message_does_not_hold_is_appended() {
        let ours = Wrap {
            message: "cannot read config file c.toml".into(),
            source: Box::new(denied()),
        };
        assert_eq!(
            Report(&ours).to_string(),
            "cannot read config file c.toml: Permission denied (os error 13)"
        );
    }
}
