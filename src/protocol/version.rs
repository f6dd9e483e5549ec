//! `server_version` ("15.18 (Debian 15.18-0+deb12u1)", "18.6", "17beta2") to the
//! `server_version_num` form (150018, 180006, 170000), which orders correctly as a number.

/// Parses the `server_version` that the server reports at startup. `None` when it does not
/// start with a version number.
///
/// From PostgreSQL 10 on, `major.minor` becomes `major * 10000 + minor`; before,
/// `major.minor.patch` becomes `major * 10000 + minor * 100 + patch`. Pre-release suffixes
/// (`devel`, `beta2`, `rc1`) count as minor 0.
pub fn parse_server_version(text: &str) -> Option<u32> {
    let numeric_end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let mut parts = text[..numeric_end].split('.');
    let major: u32 = parts.next()?.parse().ok()?;
    let mut next = || -> Option<u32> {
        match parts.next() {
            None | Some("") => Some(0),
            Some(p) => p.parse().ok(),
        }
    };
    let minor = next()?;
    if major >= 10 {
        if minor >= 10000 {
            return None;
        }
        major.checked_mul(10000)?.checked_add(minor)
    } else {
        let patch = next()?;
        if minor >= 100 || patch >= 100 {
            return None;
        }
        Some(major * 10000 + minor * 100 + patch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_versions() {
        assert_eq!(
            parse_server_version("15.18 (Debian 15.18-0+deb12u1)"),
            Some(150018)
        );
        assert_eq!(parse_server_version("18.6"), Some(180006));
        assert_eq!(parse_server_version("17beta2"), Some(170000));
        assert_eq!(parse_server_version("19devel"), Some(190000));
        assert_eq!(
            parse_server_version("16.4 (Ubuntu 16.4-1.pgdg22.04+1)"),
            Some(160004)
        );
        assert_eq!(parse_server_version("9.6.24"), Some(90624));
        assert_eq!(parse_server_version("10.23"), Some(100023));
        assert_eq!(parse_server_version(""), None);
        assert_eq!(parse_server_version("PostgreSQL 15"), None);
    }

    proptest! {
        #[test]
        fn never_panics(s in ".{0,30}") {
            let _ = parse_server_version(&s);
        }

        #[test]
        fn modern_versions(major in 10u32..100, minor in 0u32..100) {
            prop_assert_eq!(parse_server_version(&format!("{major}.{minor} (x)")),
                            Some(major * 10000 + minor));
        }
    }
}
