//! Host-key verification from the instance's console output. cloud-init prints the host keys'
//! fingerprints to the serial console at first boot; the console output reaches us through the
//! EC2 API over TLS, so it is an independent channel to check the SSH server against.

/// Fingerprints from the last `BEGIN SSH HOST KEY FINGERPRINTS` block of a console output,
/// as OpenSSH prints them without the `SHA256:` prefix (base64 without padding). `None` when the
/// block has not been printed (yet).
pub fn fingerprints_from_console(console: &str) -> Option<Vec<String>> {
    const BEGIN: &str = "-----BEGIN SSH HOST KEY FINGERPRINTS-----";
    const END: &str = "-----END SSH HOST KEY FINGERPRINTS-----";
    let start = console.rfind(BEGIN)? + BEGIN.len();
    let len = console[start..].find(END)?;
    let found: Vec<String> = console[start..start + len]
        .lines()
        .flat_map(|line| line.split_whitespace())
        .filter_map(|word| word.strip_prefix("SHA256:"))
        .map(|fp| fp.trim_end_matches('=').to_string())
        .collect();
    (!found.is_empty()).then_some(found)
}

/// The OpenSSH form of a raw SHA-256 host-key hash.
pub fn sha256_fingerprint(hash: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD_NO_PAD.encode(hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONSOLE: &str = "\
[    0.000000] Linux version 6.1
ec2: #############################################################
ec2: -----BEGIN SSH HOST KEY FINGERPRINTS-----
ec2: 256 SHA256:old root@ip-10-0-0-1 (ED25519)
ec2: -----END SSH HOST KEY FINGERPRINTS-----
reboot
-----BEGIN SSH HOST KEY FINGERPRINTS-----
256 SHA256:uNiVztksCsDhcc0u9e8BujQXVUpKZIDTMczCvj3tD2s root@ip-127-10-1-4 (ED25519)
3072 SHA256:abcDEF+/123 root@ip-127-10-1-4 (RSA)
-----END SSH HOST KEY FINGERPRINTS-----
-----BEGIN SSH HOST KEY KEYS-----
ssh-ed25519 AAAAC3Nza root@ip-127-10-1-4
-----END SSH HOST KEY KEYS-----
";

    #[test]
    fn takes_every_sha256_fingerprint_of_the_last_block() {
        assert_eq!(
            fingerprints_from_console(CONSOLE).unwrap(),
            vec![
                "uNiVztksCsDhcc0u9e8BujQXVUpKZIDTMczCvj3tD2s".to_string(),
                "abcDEF+/123".to_string()
            ]
        );
    }

    #[test]
    fn no_block_or_an_unfinished_block_is_none() {
        assert_eq!(fingerprints_from_console("booting...\n"), None);
        assert_eq!(
            fingerprints_from_console("-----BEGIN SSH HOST KEY FINGERPRINTS-----\n256 SHA256:x"),
            None
        );
    }

    #[test]
    fn the_sha256_form_matches_openssh() {
        // `ssh-keygen -lf` prints base64 without padding.
        assert_eq!(
            sha256_fingerprint(&[0u8; 32]),
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
        );
    }
}
