//! A Pingora proxy with proxy-wasm plugins in front of one upstream.
//!
//! ```sh
//! cargo run -p filterbox-pingora --example pingora_proxy -- \
//!     127.0.0.1:6188 127.0.0.1:8080 plugin.wasm [more.wasm=its configuration ...]
//! curl -i http://127.0.0.1:6188/
//! ```
//!
//! Each plugin is named after its file and gets the text after `=` as its configuration. The
//! proxy runs until it gets SIGTERM or SIGINT.

use filterbox::{FilterChain, Plugin, PluginConfig};
use filterbox_pingora::{WasmFilters, WasmProxy};
use pingora::upstreams::peer::HttpPeer;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, upstream, plugins @ ..] = args.as_slice() else {
        anyhow::bail!("usage: pingora_proxy LISTEN UPSTREAM PLUGIN.wasm[=CONFIGURATION]...");
    };
    let plugins = plugins
        .iter()
        .map(|arg| {
            let (path, configuration) = arg.split_once('=').unwrap_or((arg, ""));
            let wasm = std::fs::read(path)?;
            let name = std::path::Path::new(path)
                .file_stem()
                .map_or_else(|| path.to_owned(), |s| s.to_string_lossy().into_owned());
            let config = PluginConfig::named(&name).with_configuration(configuration);
            Ok(Plugin::load(config, &wasm)?)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let filters = WasmFilters::new(FilterChain::new(plugins)?);

    let mut server = pingora::server::Server::new(None)?;
    server.bootstrap();
    // A plain HTTP upstream; `HttpPeer::new(addr, true, sni)` speaks TLS to it.
    let peer = HttpPeer::new(upstream.as_str(), false, String::new());
    let mut proxy =
        pingora::proxy::http_proxy_service(&server.configuration, WasmProxy::new(filters, peer));
    proxy.add_tcp(listen);
    server.add_service(proxy);
    server.run_forever()
}
