//! HTTP streams on a VM: their callbacks, header maps and bodies, properties and events.

use super::*;

impl Vm {
    /// Creates an HTTP stream context (`proxy_on_context_create(id, root)`).
    pub fn create_http_stream(&mut self) -> Result<HttpStream, VmError> {
        self.create_http_stream_under(self.root_context)
    }

    /// Creates an HTTP stream context under root context `root` (the first root, or one
    /// from [`Vm::add_root_context`]).
    pub fn create_http_stream_under(&mut self, root: u32) -> Result<HttpStream, VmError> {
        if root != self.root_context && !self.extra_roots.contains(&root) {
            return Err(VmError::UnknownRoot {
                plugin: self.plugin.config().name.clone(),
                root,
            });
        }
        let id = self.create_context(ContextKind::Http, root)?;
        if self.plugin.shared().reads_properties {
            let info = crate::attributes::StreamInfo {
                started: Some(std::time::SystemTime::now()),
                request_headers: None,
                connection: None,
                upstream: None,
            };
            self.state().stream_info.insert(id, info);
        }
        Ok(HttpStream {
            vm: self.serial,
            id,
        })
    }

    fn check(&self, stream: &HttpStream) -> Result<(), VmError> {
        self.check_serial(stream.vm)
    }

    pub(super) fn check_serial(&self, vm: u64) -> Result<(), VmError> {
        if vm == self.serial {
            Ok(())
        } else {
            Err(VmError::ForeignStream {
                plugin: self.plugin.config().name.clone(),
            })
        }
    }

    /// Hands `headers` to the plugin for the length of `f`, then takes them back (also when
    /// the guest traps).
    pub(super) fn with_map<R>(
        &mut self,
        map: MapType,
        headers: &mut HeaderMap,
        f: impl FnOnce(&mut Self) -> R,
    ) -> R {
        self.state().maps[map as usize] = Some(std::mem::take(headers));
        let result = f(self);
        *headers = self.state().maps[map as usize].take().unwrap_or_default();
        result
    }

    pub(super) fn with_body<R>(
        &mut self,
        kind: BufferType,
        body: &mut BytesMut,
        f: impl FnOnce(&mut Self) -> R,
    ) -> R {
        self.state().body = Some((kind, std::mem::take(body)));
        let result = f(self);
        *body = self.state().body.take().map(|(_, b)| b).unwrap_or_default();
        result
    }

    /// Calls a filter callback and turns its result into an [`Action`]: a local response sent
    /// during the call wins; 0 (or a missing export) continues; anything else pauses.
    fn filter_call(
        &mut self,
        stream: &HttpStream,
        callback: Callback,
        args: &[i32],
    ) -> Result<Action, VmError> {
        self.filter_call_on((stream.vm, stream.id), callback, args)
    }

    pub(super) fn filter_call_on(
        &mut self,
        on: (u64, u32),
        callback: Callback,
        args: &[i32],
    ) -> Result<Action, VmError> {
        self.filter_call_returning(on, callback, args)
            .map(|(action, _)| action)
    }

    /// [`Vm::filter_call_on`], with the value the callback returned (if it returned one).
    fn filter_call_returning(
        &mut self,
        (vm, id): (u64, u32),
        callback: Callback,
        args: &[i32],
    ) -> Result<(Action, Option<i32>), VmError> {
        self.check_serial(vm)?;
        self.state().local_response = None;
        let before = self.state().events.len();
        let returned = self.call(id, callback, args);
        // A stream the callback closed is reset whatever the callback returns (as in
        // Envoy): it pauses here, and its `Close` event tells the embedder to reset it.
        let closed = self.state().events.get(before..).is_some_and(|new| {
            new.iter()
                .any(|(c, e)| *c == id && matches!(e, StreamEvent::Close(_)))
        });
        let local = match self.state().local_response.take() {
            Some((context, response)) if context == id => Some(response),
            Some((context, response)) => {
                // Sent for another stream (through proxy_set_effective_context).
                let events = &mut self.state().events;
                events.push((context, StreamEvent::Respond(response)));
                None
            }
            None => None,
        };
        let returned = returned?;
        let action = match (local, returned) {
            (Some(response), _) => Action::Respond(response),
            (None, _) if closed => Action::Pause,
            (None, Returned::Missing | Returned::Nothing) => Action::Continue,
            (None, Returned::Value(value)) if continues(callback, value) => Action::Continue,
            (None, Returned::Value(_)) => Action::Pause,
        };
        let value = match returned {
            Returned::Value(value) => Some(value),
            Returned::Missing | Returned::Nothing => None,
        };
        Ok((action, value))
    }

    fn headers_call(
        &mut self,
        stream: &HttpStream,
        (map, callback): (MapType, Callback),
        headers: &mut HeaderMap,
        end_of_stream: bool,
    ) -> Result<Action, VmError> {
        // ABI 0.1.0 header callbacks take no end_of_stream; the engine passes only as many
        // arguments as the export has.
        let args = [
            stream.id as i32,
            wasm_i32(headers.len()),
            i32::from(end_of_stream),
        ];
        let action = self.with_map(map, headers, |vm| vm.filter_call(stream, callback, &args))?;
        let state = self.state();
        if map == MapType::HttpRequestHeaders
            && !state.request_headers_set_by_caller
            && let Some(info) = state.stream_info.get_mut(&stream.id)
        {
            // For request.* attributes in later callbacks.
            info.request_headers = Some(headers.clone());
        }
        let parked = &mut state.parked;
        match action {
            Action::Pause => {
                parked.insert((stream.id, map), headers.clone());
            }
            // Nothing parked is the common case: no hashing then.
            _ if !parked.is_empty() => {
                parked.remove(&(stream.id, map));
            }
            _ => {}
        }
        Ok(action)
    }

    /// Sets the request headers `stream`'s `request.*` attributes read after its request
    /// headers callback (`None` forgets them). From the first call on, this VM's request
    /// headers callbacks keep no copy of their own: a chain gives every plugin's stream the
    /// request as the whole chain left it, as Envoy's attributes read the request's one live
    /// map, and a copy each plugin kept would make the next plugin's edit copy the map (and
    /// cost reference counting). Only a VM's first exchange keeps one, until the chain sets
    /// the map at the end of its request phase.
    #[cfg(feature = "tower")]
    pub(crate) fn set_request_headers_seen(
        &mut self,
        stream: &HttpStream,
        headers: Option<HeaderMap>,
    ) {
        let state = self.state();
        state.request_headers_set_by_caller = true;
        if let Some(info) = state.stream_info.get_mut(&stream.id) {
            info.request_headers = headers;
        }
    }

    /// Trailers the plugin added to a message that had none, from its body callback with
    /// `end_of_stream` (`map` is [`MapType::HttpRequestTrailers`] or
    /// [`MapType::HttpResponseTrailers`]). Send them after the body; `None` if it added none.
    pub fn take_added_trailers(&mut self, stream: &HttpStream, map: MapType) -> Option<HeaderMap> {
        self.state().added_trailers.remove(&(stream.id, map))
    }

    /// The headers of `stream` as the plugin left them after pausing in a header callback:
    /// a plugin that resumes from a later callback (an HTTP-call answer, a tick) may have
    /// changed them since. Take them when the stream is resumed; `None` if the stream did not
    /// pause on `map`.
    pub fn take_paused_headers(&mut self, stream: &HttpStream, map: MapType) -> Option<HeaderMap> {
        self.state().parked.remove(&(stream.id, map))
    }

    fn body_call(
        &mut self,
        stream: &HttpStream,
        (kind, callback): (BufferType, Callback),
        body: &mut BytesMut,
        end_of_stream: bool,
    ) -> Result<Action, VmError> {
        let args = [
            stream.id as i32,
            wasm_i32(body.len()),
            i32::from(end_of_stream),
        ];
        let on = (stream.vm, stream.id);
        let call = |vm: &mut Self, body: &mut BytesMut| {
            vm.with_body(kind, body, |vm| {
                vm.filter_call_returning(on, callback, &args)
            })
        };
        let (action, value) = match end_of_stream {
            // The last body callback of a message may add trailers it did not have (Envoy's
            // addDecodedTrailers/addEncodedTrailers): the plugin gets an empty map to fill.
            true => {
                let map = match kind {
                    BufferType::HttpRequestBody => MapType::HttpRequestTrailers,
                    _ => MapType::HttpResponseTrailers,
                };
                let mut added = HeaderMap::new();
                let result = self.with_map(map, &mut added, |vm| call(vm, body));
                if !added.is_empty() {
                    self.state().added_trailers.insert((stream.id, map), added);
                }
                result?
            }
            false => call(self, body)?,
        };
        if action == Action::Pause && value == Some(STOP_ITERATION_NO_BUFFER) {
            // The plugin took what it was given: nothing is kept for its next call, which
            // sees only new data (Envoy's StopIterationNoBuffer).
            body.clear();
        }
        Ok(action)
    }

    fn trailers_call(
        &mut self,
        stream: &HttpStream,
        (map, callback): (MapType, Callback),
        trailers: &mut HeaderMap,
    ) -> Result<Action, VmError> {
        let args = [stream.id as i32, wasm_i32(trailers.len())];
        self.with_map(map, trailers, |vm| vm.filter_call(stream, callback, &args))
    }

    /// Request headers arrived (`proxy_on_request_headers`). The plugin may change `headers`.
    pub fn on_request_headers(
        &mut self,
        stream: &HttpStream,
        headers: &mut HeaderMap,
        end_of_stream: bool,
    ) -> Result<Action, VmError> {
        let phase = (MapType::HttpRequestHeaders, Callback::ProxyOnRequestHeaders);
        self.headers_call(stream, phase, headers, end_of_stream)
    }

    /// Request body data arrived (`proxy_on_request_body`). `body` is everything buffered so
    /// far; the plugin may change it. [`Action::Pause`] asks the proxy to buffer and call again.
    pub fn on_request_body(
        &mut self,
        stream: &HttpStream,
        body: &mut BytesMut,
        end_of_stream: bool,
    ) -> Result<Action, VmError> {
        let phase = (BufferType::HttpRequestBody, Callback::ProxyOnRequestBody);
        self.body_call(stream, phase, body, end_of_stream)
    }

    /// Request trailers arrived (`proxy_on_request_trailers`).
    pub fn on_request_trailers(
        &mut self,
        stream: &HttpStream,
        trailers: &mut HeaderMap,
    ) -> Result<Action, VmError> {
        let phase = (
            MapType::HttpRequestTrailers,
            Callback::ProxyOnRequestTrailers,
        );
        self.trailers_call(stream, phase, trailers)
    }

    /// Response headers arrived (`proxy_on_response_headers`).
    pub fn on_response_headers(
        &mut self,
        stream: &HttpStream,
        headers: &mut HeaderMap,
        end_of_stream: bool,
    ) -> Result<Action, VmError> {
        let phase = (
            MapType::HttpResponseHeaders,
            Callback::ProxyOnResponseHeaders,
        );
        self.headers_call(stream, phase, headers, end_of_stream)
    }

    /// Response body data arrived (`proxy_on_response_body`).
    pub fn on_response_body(
        &mut self,
        stream: &HttpStream,
        body: &mut BytesMut,
        end_of_stream: bool,
    ) -> Result<Action, VmError> {
        let phase = (BufferType::HttpResponseBody, Callback::ProxyOnResponseBody);
        self.body_call(stream, phase, body, end_of_stream)
    }

    /// Response trailers arrived (`proxy_on_response_trailers`).
    pub fn on_response_trailers(
        &mut self,
        stream: &HttpStream,
        trailers: &mut HeaderMap,
    ) -> Result<Action, VmError> {
        let phase = (
            MapType::HttpResponseTrailers,
            Callback::ProxyOnResponseTrailers,
        );
        self.trailers_call(stream, phase, trailers)
    }

    /// The exchange is complete (`proxy_on_log`): the plugin may read, not change, the
    /// request and response headers.
    pub fn on_log(
        &mut self,
        stream: &HttpStream,
        request_headers: &mut HeaderMap,
        response_headers: &mut HeaderMap,
    ) -> Result<(), VmError> {
        self.check(stream)?;
        self.state().phase = Phase::Log;
        let result = self.with_map(MapType::HttpRequestHeaders, request_headers, |vm| {
            vm.with_map(MapType::HttpResponseHeaders, response_headers, |vm| {
                vm.call(stream.id, Callback::ProxyOnLog, &[stream.id as i32])
            })
        });
        self.state().phase = Phase::Other;
        result.map(drop)
    }

    /// Ends a stream: `proxy_on_done` then `proxy_on_delete`, and forgets its context. On a
    /// failed VM nothing runs and the context is still forgotten.
    pub fn finish_stream(&mut self, stream: HttpStream) -> Result<(), VmError> {
        self.check(&stream)?;
        let id = stream.id;
        let result = match self.failure {
            Some(_) => Ok(()),
            None => self
                .call(id, Callback::ProxyOnDone, &[id as i32])
                .and_then(|_| self.call(id, Callback::ProxyOnDelete, &[id as i32]))
                .map(drop),
        };
        self.forget_context(id);
        result
    }

    /// Sets a property of `stream` that `proxy_get_property` answers with `value` (see
    /// [`PropertyValue`](crate::PropertyValue) for Envoy's encodings): how an embedder supplies
    /// per-stream attributes such as `source.address`, `connection.id` or
    /// `request.protocol`. A plugin's own `proxy_set_property` writes the same place.
    pub fn set_stream_property(&mut self, stream: &HttpStream, path: &[&str], value: Bytes) {
        let path = filterbox_abi::property_path::encode(path);
        self.state().properties.insert((stream.id, path), value);
    }

    /// The upstream `stream`'s request goes to: `upstream.address` and `upstream.port`
    /// answer the plugin's `proxy_get_property`, encoded only when asked (a property set
    /// under those paths wins). Nothing is kept for a plugin that does not import
    /// `proxy_get_property`.
    pub fn set_stream_upstream(&mut self, stream: &HttpStream, address: std::net::SocketAddr) {
        if let Some(info) = self.state().stream_info.get_mut(&stream.id) {
            info.upstream = Some(address);
        }
    }

    /// The client connection `stream`'s request came on: its attributes (`source.address`
    /// and the rest, see [`ConnectionInfo`](crate::ConnectionInfo)) answer the plugin's
    /// `proxy_get_property`, encoded only when asked. Nothing is kept for a plugin that does
    /// not import `proxy_get_property`.
    pub fn set_stream_connection(
        &mut self,
        stream: &HttpStream,
        connection: std::sync::Arc<crate::ConnectionInfo>,
    ) {
        if let Some(info) = self.state().stream_info.get_mut(&stream.id) {
            info.connection = Some(connection);
        }
    }

    /// A property set on `stream` by the plugin (`proxy_set_property`, Envoy's filter state
    /// through `set_envoy_filter_state`: path `["filter_state", key]`) or by the embedder;
    /// how an embedder reads what a plugin left for the access log or the next filter.
    pub fn stream_property(&mut self, stream: &HttpStream, path: &[&str]) -> Option<Bytes> {
        let path = filterbox_abi::property_path::encode(path);
        self.state().properties.get(&(stream.id, path)).cloned()
    }

    /// Sets a property every context of this VM sees unless a stream sets its own (node
    /// metadata, cluster and listener names).
    pub fn set_root_property(&mut self, path: &[&str], value: Bytes) {
        let path = filterbox_abi::property_path::encode(path);
        let root = self.root_context;
        self.state().properties.insert((root, path), value);
    }

    /// Takes what the plugin asked of `stream` (resume, close) since the last call.
    pub fn take_stream_events(&mut self, stream: &HttpStream) -> Vec<StreamEvent> {
        let events = &mut self.state().events;
        let mut taken = Vec::new();
        events.retain(|(context, event)| {
            let mine = *context == stream.id;
            if mine {
                taken.push(event.clone());
            }
            !mine
        });
        taken
    }

    /// Whether the plugin asked anything of `stream` that [`Vm::take_stream_events`] would
    /// take, without taking it.
    pub fn has_stream_events(&mut self, stream: &HttpStream) -> bool {
        self.state()
            .events
            .iter()
            .any(|(context, _)| *context == stream.id)
    }

    /// Request metadata arrived (`proxy_on_request_metadata`, ABI 0.1.0 era; there is no map
    /// type to read it through, so the plugin gets only the count).
    pub fn on_request_metadata(
        &mut self,
        stream: &HttpStream,
        elements: usize,
    ) -> Result<Action, VmError> {
        let args = [stream.id as i32, wasm_i32(elements)];
        self.filter_call(stream, Callback::ProxyOnRequestMetadata, &args)
    }

    /// Response metadata arrived (`proxy_on_response_metadata`; see
    /// [`Vm::on_request_metadata`]).
    pub fn on_response_metadata(
        &mut self,
        stream: &HttpStream,
        elements: usize,
    ) -> Result<Action, VmError> {
        let args = [stream.id as i32, wasm_i32(elements)];
        self.filter_call(stream, Callback::ProxyOnResponseMetadata, &args)
    }
}
