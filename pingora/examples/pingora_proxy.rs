//! A Pingora proxy with proxy-wasm plugins in front of one upstream.
//!
//! ```sh
//! cargo run -p filterbox-pingora --example pingora_proxy -- \
//!     127.0.0.1:6188 127.0.0.1:8080 plugin.wasm [more.wasm=its configuration ...]
//! curl -i http://127.0.0.1:6188/
//! ```
//!
//! Each plugin is named after its file and gets the text after `=` as its configuration.
//! `PINGORA_THREADS` sets the proxy's worker threads (Pingora's default: 1) and
//! `PINGORA_WORK_STEALING=0` gives each thread a runtime of its own. The proxy runs until it
//! gets SIGTERM (it stops accepting, gives running requests 5 s, then exits; Pingora's own
//! default grace period is 5 minutes) or SIGINT (it exits at once).

use filterbox::{FilterChain, Plugin, PluginConfig};
use filterbox_pingora::{WasmFilters, WasmProxy};
use pingora::upstreams::peer::HttpPeer;

/// mimalloc, as `filterbox serve` uses: glibc's malloc and free took about 7% of this
/// proxy's CPU time per request under load (BENCHMARKS.md runs this example).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, upstream, plugins @ ..] = args.as_slice() else {
        anyhow::bail!("usage: pingora_proxy LISTEN UPSTREAM PLUGIN.wasm[=CONFIGURATION]...");
    };
    // Plugins of one file share its compiled module (one copy of its machine code).
    let mut loaded: Vec<(&str, Plugin)> = Vec::new();
    for arg in plugins {
        let (path, configuration) = arg.split_once('=').unwrap_or((arg, ""));
        let name = std::path::Path::new(path)
            .file_stem()
            .map_or_else(|| path.to_owned(), |s| s.to_string_lossy().into_owned());
        let builder = Plugin::builder(PluginConfig::named(&name).with_configuration(configuration));
        let plugin = match loaded.iter().find(|(file, _)| *file == path) {
            Some((_, compiled)) => builder.build_from(compiled)?,
            None => builder.build(&std::fs::read(path)?)?,
        };
        loaded.push((path, plugin));
    }
    let plugins = loaded.into_iter().map(|(_, plugin)| plugin).collect();
    let filters = WasmFilters::new(FilterChain::new(plugins)?);

    let mut conf = pingora::server::configuration::ServerConf::default();
    if let Ok(threads) = std::env::var("PINGORA_THREADS") {
        conf.threads = threads.parse()?;
    }
    if let Ok(stealing) = std::env::var("PINGORA_WORK_STEALING") {
        conf.work_stealing = stealing != "0";
    }
    conf.grace_period_seconds = Some(5);
    conf.graceful_shutdown_timeout_seconds = Some(1);
    let mut server = pingora::server::Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    // A plain HTTP upstream; `HttpPeer::new(addr, true, sni)` speaks TLS to it.
    let peer = HttpPeer::new(upstream.as_str(), false, String::new());
    let mut proxy =
        pingora::proxy::http_proxy_service(&server.configuration, WasmProxy::new(filters, peer));
    proxy.add_tcp(listen);
    server.add_service(proxy);
    server.run_forever()
}
