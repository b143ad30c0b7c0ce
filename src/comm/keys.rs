//! The throwaway login key of one bake: an ed25519 key pair generated in memory. The private
//! half never touches disk and is zeroed when dropped; only the public half goes to AWS.

use std::sync::Arc;

use ssh_key::{Algorithm, LineEnding, PrivateKey};
use zeroize::Zeroizing;

pub struct KeyPair {
    pub public_openssh: String,
    pub private_openssh: Arc<Zeroizing<String>>,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot generate an SSH key: {0}")]
pub struct KeyError(String);

pub fn generate(comment: &str) -> Result<KeyPair, KeyError> {
    let mut key = PrivateKey::random(&mut rand::rngs::OsRng, Algorithm::Ed25519)
        .map_err(|e| KeyError(e.to_string()))?;
    key.set_comment(comment);
    let private_openssh = key
        .to_openssh(LineEnding::LF)
        .map_err(|e| KeyError(e.to_string()))?;
    let public_openssh = key
        .public_key()
        .to_openssh()
        .map_err(|e| KeyError(e.to_string()))?;
    Ok(KeyPair {
        public_openssh,
        private_openssh: Arc::new(private_openssh),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn generates_distinct_openssh_ed25519_keys() {
        let a = super::generate("bakery-test").unwrap();
        let b = super::generate("bakery-test").unwrap();
        assert!(a.public_openssh.starts_with("ssh-ed25519 "));
        assert!(a.public_openssh.ends_with(" bakery-test"));
        assert!(a
            .private_openssh
            .starts_with("-----BEGIN OPENSSH PRIVATE KEY-----"));
        assert_ne!(a.public_openssh, b.public_openssh);
    }
}
