//! A `redis-server` of a test's own (Debian's `redis-server` package), on a loopback port
//! nothing else uses, with nothing saved to disk; stopped when dropped.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A running `redis-server`.
pub struct RedisServer {
    child: Child,
    address: SocketAddr,
}

impl RedisServer {
    /// Starts one on a free loopback port. `Err` says why it could not (most often: the
    /// `redis-server` binary is not installed; `scripts/setup` installs it).
    pub fn start() -> Result<RedisServer, String> {
        RedisServer::start_on(crate::servers::free_port())
    }

    /// Starts one on `address` (again, after [`RedisServer::stop`]: a restarted server).
    pub fn start_on(address: SocketAddr) -> Result<RedisServer, String> {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port"])
            .arg(address.port().to_string())
            .args(["--save", "", "--appendonly", "no", "--loglevel", "warning"])
            // `DEBUG SLEEP` makes a slow server for the timeout tests.
            .args(["--enable-debug-command", "local"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| {
                format!("could not run redis-server (Debian package redis-server): {e}")
            })?;
        let mut server = RedisServer { child, address };
        crate::servers::wait_until_answering(&mut server.child, "redis-server", address, || {
            RedisServer::command_at(address, &["PING"]).is_ok_and(|r| r.starts_with(b"+PONG"))
        })?;
        Ok(server)
    }

    /// Where it listens.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// `redis://127.0.0.1:<port>/0`.
    pub fn url(&self) -> String {
        format!("redis://{}/0", self.address)
    }

    /// Stops it (its data is gone; nothing is saved).
    pub fn stop(mut self) {
        self.kill();
    }

    /// Sends one command in RESP (every argument a bulk string) and returns the raw reply.
    pub fn command(&self, args: &[&str]) -> Result<Vec<u8>, String> {
        RedisServer::command_at(self.address, args)
    }

    /// [`RedisServer::command`] to the server at `address`, from any thread.
    pub fn command_at(address: SocketAddr, args: &[&str]) -> Result<Vec<u8>, String> {
        let mut stream = TcpStream::connect(address).map_err(|e| e.to_string())?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        let mut request = format!("*{}\r\n", args.len());
        for arg in args {
            request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
        }
        stream
            .write_all(request.as_bytes())
            .map_err(|e| e.to_string())?;
        let mut reply = vec![0; 4096];
        let n = stream.read(&mut reply).map_err(|e| e.to_string())?;
        reply.truncate(n);
        Ok(reply)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
