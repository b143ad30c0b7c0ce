//! Redacts stdin to stdout as bakery shows provisioner output, with the secrets given as
//! arguments: the redactor alone, to measure it against `cat` (`scripts/bench-output` measures a
//! whole bake).
//!
//!   head -c 50M /dev/zero | tr '\0' A | target/release/examples/redact 's3cr3t-Pa55w0rd!' >/dev/null

use std::io::{Read, Write};

use bakery_core::secret::{LineRedactor, Redactor};

fn main() -> std::io::Result<()> {
    let mut redactor = Redactor::default();
    for s in std::env::args().skip(1) {
        redactor.add(&s);
    }
    let mut lines = LineRedactor::new(redactor);
    let mut input = std::io::stdin().lock();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = input.read(&mut buf)?;
        if n == 0 {
            break;
        }
        for l in lines.push(&buf[..n]) {
            writeln!(out, "{l}")?;
        }
    }
    for l in lines.finish() {
        writeln!(out, "{l}")?;
    }
    out.flush()
}
