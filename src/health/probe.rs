//! The daemon's own probes: an HTTP GET or a TCP connect to an instance's private address, with a
//! timeout. Each is one attempt; thresholds are applied across rounds by the judge
//! ([`bakery_core::observe::ProbeState`]).

use std::net::IpAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::config::{Probe, ProbeKind};

/// Probes `ip`; `Ok(())` when healthy, else what went wrong.
pub async fn probe(ip: IpAddr, p: &Probe) -> Result<(), String> {
    match tokio::time::timeout(p.timeout, attempt(ip, p)).await {
        Ok(r) => r,
        Err(_) => Err(format!("timed out after {:?}", p.timeout)),
    }
}

async fn attempt(ip: IpAddr, p: &Probe) -> Result<(), String> {
    let mut stream = TcpStream::connect((ip, p.port))
        .await
        .map_err(|e| format!("connect {ip}:{}: {e}", p.port))?;
    let ProbeKind::Http { path } = &p.kind else {
        return Ok(());
    };
    let request = format!("GET {path} HTTP/1.0\r\nHost: {ip}\r\nUser-Agent: bakery-daemon\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("send to {ip}:{}: {e}", p.port))?;
    // The status line is all we need.
    let mut buf = vec![0u8; 256];
    let mut got = 0;
    while got < 12 {
        let n = stream
            .read(&mut buf[got..])
            .await
            .map_err(|e| format!("read from {ip}:{}: {e}", p.port))?;
        if n == 0 {
            break;
        }
        got += n;
    }
    let head = String::from_utf8_lossy(&buf[..got]);
    let code: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| {
            format!(
                "GET {path}: not an HTTP response ({:?})",
                head.lines().next().unwrap_or("")
            )
        })?;
    if (200..400).contains(&code) {
        Ok(())
    } else {
        Err(format!("GET {path} answered {code}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn http(path: &str) -> Probe {
        Probe {
            kind: ProbeKind::Http { path: path.into() },
            port: 0,
            timeout: Duration::from_secs(1),
            healthy_threshold: 2,
            unhealthy_threshold: 2,
        }
    }

    async fn server(status: &'static str) -> u16 {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut b = [0u8; 512];
                let _ = s.read(&mut b).await;
                let _ = s
                    .write_all(format!("HTTP/1.0 {status}\r\n\r\n").as_bytes())
                    .await;
            }
        });
        port
    }

    #[tokio::test]
    async fn http_probes_judge_by_status() {
        let ok = Probe {
            port: server("200 OK").await,
            ..http("/healthz")
        };
        let bad = Probe {
            port: server("503 Service Unavailable").await,
            ..http("/healthz")
        };
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(probe(ip, &ok).await, Ok(()));
        assert_eq!(
            probe(ip, &bad).await,
            Err("GET /healthz answered 503".into())
        );
        let closed = Probe {
            port: 1,
            ..http("/")
        };
        assert!(probe(ip, &closed)
            .await
            .unwrap_err()
            .starts_with("connect 127.0.0.1:1"));
    }
}
