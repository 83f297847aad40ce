//! What an identity name may be: an exact DNS name, checked before it is put in a
//! certificate (`meshproxy identity issue`) or read out of one (`tls::identity_of`).
//!
//! An identity names one workload, so it is a plain DNS name (RFC 1123 host name
//! syntax): labels of ASCII letters, digits and `-`, not starting or ending with `-`,
//! 1 to 63 characters each, at most 253 in all, no empty label (so no leading,
//! trailing or doubled dot), and a last label that is not all digits (which would read
//! as an IP address). Wildcards are refused: `*.shop.mesh.local` is not an identity,
//! and a certificate carrying it must not pass for `redis-a.shop.mesh.local`.
//!
//! Names compare ASCII case-insensitively, as DNS names do.
//!
//! A name that passes is also a safe file name: it holds no `/`, is not `.` or `..`,
//! and does not start with `-`, so `issue` may write `NAME.crt` inside `--out`.

/// The longest DNS name, in characters (RFC 1035, without the root's trailing dot).
pub const MAX_NAME: usize = 253;
/// The longest DNS label.
pub const MAX_LABEL: usize = 63;

/// A string that is not an identity name, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "{name:?} is not a valid identity name: {reason} (expected a DNS name such as \
     web.default.mesh.local: labels of letters, digits and '-', 1 to {MAX_LABEL} \
     characters each, {MAX_NAME} in all, no wildcard)"
)]
pub struct InvalidName {
    pub name: String,
    pub reason: String,
}

/// Checks that `name` is an exact DNS name usable as an identity.
pub fn check(name: &str) -> Result<(), InvalidName> {
    let invalid = |reason: String| InvalidName {
        name: name.to_string(),
        reason,
    };
    if name.is_empty() {
        return Err(invalid("it is empty".into()));
    }
    if name.len() > MAX_NAME {
        return Err(invalid(format!(
            "it is {} characters long, more than {MAX_NAME}",
            name.len()
        )));
    }
    if name.contains('*') {
        return Err(invalid(
            "wildcards are not identities: an identity names one workload".into(),
        ));
    }
    let mut last = "";
    for label in name.split('.') {
        if label.is_empty() {
            return Err(invalid(
                "it has an empty label (a leading, trailing or doubled '.')".into(),
            ));
        }
        if label.len() > MAX_LABEL {
            return Err(invalid(format!(
                "label {label:?} is {} characters long, more than {MAX_LABEL}",
                label.len()
            )));
        }
        if let Some(bad) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
        {
            return Err(invalid(format!("character {bad:?} is not allowed")));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(invalid(format!("label {label:?} starts or ends with '-'")));
        }
        last = label;
    }
    if last.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid(format!(
            "its last label {last:?} is all digits, like an IP address"
        )));
    }
    Ok(())
}

/// Whether two identity names are the same name (ASCII case-insensitive, exact
/// otherwise: no wildcard matching).
pub fn same(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_names_pass() {
        for name in [
            "web.default.mesh.local",
            "redis-a.shop.mesh.local",
            "REDIS-A.Shop.mesh.local",
            "a",
            "x1.y2",
            "0pod.mesh.local",
            &format!("{}.mesh", "a".repeat(63)),
            &[
                "b".repeat(63),
                "c".repeat(63),
                "d".repeat(63),
                "e".repeat(61),
            ]
            .join("."),
        ] {
            assert_eq!(check(name), Ok(()), "{name}");
        }
    }

    #[test]
    fn everything_else_is_refused_naming_the_value() {
        for (name, why) in [
            ("", "empty"),
            ("*.shop.mesh.local", "wildcard"),
            ("redis-*.shop.mesh.local", "wildcard"),
            ("*", "wildcard"),
            ("web default.mesh.local", "' '"),
            ("../../etc/passwd", "empty label"),
            ("a/b.mesh.local", "'/'"),
            ("..", "empty label"),
            (".", "empty label"),
            ("a..b", "empty label"),
            (".a.b", "empty label"),
            ("a.b.", "empty label"),
            ("-rf.mesh.local", "starts or ends with '-'"),
            ("a-.mesh.local", "starts or ends with '-'"),
            ("under_score.mesh.local", "'_'"),
            ("wéb.mesh.local", "'é'"),
            ("nul\0.mesh.local", "'\\0'"),
            ("198.18.0.1", "all digits"),
            (&format!("{}.mesh", "a".repeat(64)), "more than 63"),
            (
                &[
                    "b".repeat(63),
                    "c".repeat(63),
                    "d".repeat(63),
                    "e".repeat(62),
                ]
                .join("."),
                "more than 253",
            ),
        ] {
            let err = check(name).expect_err(name);
            let text = err.to_string();
            assert!(text.contains(why), "{name:?}: {text}");
            assert!(text.contains(&format!("{name:?}")), "{name:?}: {text}");
        }
    }

    #[test]
    fn comparison_ignores_ascii_case_only() {
        assert!(same("Redis-A.shop.mesh.local", "redis-a.SHOP.mesh.local"));
        assert!(!same("*.shop.mesh.local", "redis-a.shop.mesh.local"));
        assert!(!same("redis-a.shop.mesh.local", "redis-a.shop.mesh.local."));
    }
}
