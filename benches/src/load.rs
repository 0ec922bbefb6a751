//! What the load benchmarks (`bench-proxy`, `bench-shared`) share: an upstream, proxy
//! processes, wrk runs and their medians.

use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The proxy process, stopped however the run ends.
pub struct Proxy(pub Child);

/// How long a proxy gets to exit after SIGINT before it is killed.
const EXIT_WAIT: Duration = Duration::from_secs(5);

impl Drop for Proxy {
    /// SIGINT first: `serve`, Pingora and nginx exit at once on it, and a clean exit is what
    /// lets an instrumented build write its profile (`scripts/pgo-build` trains on these
    /// runs). SIGKILL if the process is still there after [`EXIT_WAIT`].
    fn drop(&mut self) {
        let interrupted = Command::new("kill")
            .args(["-INT", &self.0.id().to_string()])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success());
        let deadline = Instant::now() + EXIT_WAIT;
        while interrupted && Instant::now() < deadline {
            match self.0.try_wait() {
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Ok(Some(_)) => return,
                Err(_) => break,
            }
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An upstream that answers every request `200 hello`, on its own one-thread runtime.
pub fn start_upstream() -> Result<(SocketAddr, tokio::runtime::Runtime)> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let addr = listener.local_addr()?;
    runtime.spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let service = service_fn(|_: http::Request<Incoming>| async {
                    Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                        Bytes::from_static(b"hello\n"),
                    )))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok((addr, runtime))
}

/// A loopback port free now (the kernel's pick), for a proxy about to start.
pub fn free_port() -> Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// Starts `command` (a proxy that will listen on `addr`) and waits until it listens.
pub fn spawn_proxy(command: &mut Command, addr: SocketAddr) -> Result<Proxy> {
    let name = command.get_program().to_string_lossy().into_owned();
    let child = command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    let mut proxy = Proxy(child);
    let started = Instant::now();
    while TcpStream::connect(addr).is_err() {
        if let Some(status) = proxy.0.try_wait()? {
            bail!("{name} exited: {status}");
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("{name} did not listen on {addr} within 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(proxy)
}

/// Requests per second and p99 latency (ms) of one wrk run.
pub fn wrk(url: &str, seconds: u64, connections: u32) -> Result<(f64, f64)> {
    let output = Command::new("wrk")
        .args([
            "-t",
            "1",
            "-c",
            &connections.to_string(),
            "-d",
            &format!("{seconds}s"),
            "--latency",
            url,
        ])
        .output()
        .context("running wrk (Debian: apt-get install wrk)")?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "wrk failed: {text}{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    if let Some(line) = text
        .lines()
        .find(|l| l.contains("Non-2xx") || l.contains("Socket errors"))
    {
        bail!("wrk saw failures ({}): {text}", line.trim());
    }
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .with_context(|| format!("no Requests/sec in wrk output: {text}"))?;
    let p99 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("99%"))
        .map(str::trim)
        .and_then(duration_ms)
        .with_context(|| format!("no 99% latency in wrk output: {text}"))?;
    Ok((rps, p99))
}

/// wrk's `1.23ms` / `456.00us` / `1.20s` in milliseconds.
pub fn duration_ms(text: &str) -> Option<f64> {
    for (unit, scale) in [("us", 0.001), ("ms", 1.0), ("s", 1000.0)] {
        if let Some(number) = text.strip_suffix(unit) {
            return number.parse::<f64>().ok().map(|n| n * scale);
        }
    }
    None
}

/// The middle value (the mean of the middle two for an even count).
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    let at = |i: usize| values.get(i).copied().unwrap_or(0.0);
    match n {
        0 => 0.0,
        _ if n % 2 == 1 => at(n / 2),
        _ => (at(n / 2 - 1) + at(n / 2)) / 2.0,
    }
}

/// Each target (name, URL) warmed up, then measured once per round, the rounds one after the
/// other so that the machine's drift hits every target alike: `(name, requests/s, p99 ms)`,
/// the medians of the rounds.
pub fn interleaved(
    targets: &[(String, String)],
    rounds: u32,
    seconds: u64,
    connections: u32,
) -> Result<Vec<(String, f64, f64)>> {
    for (_, url) in targets {
        eprintln!("warming up {url}");
        wrk(url, 2, connections)?;
    }
    let mut runs: Vec<Vec<(f64, f64)>> = vec![Vec::new(); targets.len()];
    for round in 1..=rounds {
        for ((_, url), runs) in targets.iter().zip(&mut runs) {
            eprintln!("round {round}: {url}");
            runs.push(wrk(url, seconds, connections)?);
        }
    }
    Ok(targets
        .iter()
        .zip(runs)
        .map(|((name, _), runs)| {
            let rps = median(runs.iter().map(|r| r.0).collect());
            let p99 = median(runs.iter().map(|r| r.1).collect());
            (name.clone(), rps, p99)
        })
        .collect())
}
