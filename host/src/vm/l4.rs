//! TCP connections (L4) on a VM.

use super::*;

impl Vm {
    // --- L4 connections ---

    /// Opens a TCP connection context: `proxy_on_context_create(id, root)` then
    /// `proxy_on_new_connection`. A plugin that answers pause holds the connection until it
    /// resumes it.
    pub fn create_connection(&mut self) -> Result<(Connection, Action), VmError> {
        let id = self.create_context(ContextKind::Tcp, self.root_context)?;
        let connection = Connection {
            vm: self.serial,
            id,
        };
        let action = self.filter_call_on(
            (self.serial, id),
            Callback::ProxyOnNewConnection,
            &[id as i32],
        );
        Ok((connection, action?))
    }

    fn data_call(
        &mut self,
        connection: &Connection,
        (kind, callback): (BufferType, Callback),
        data: &mut BytesMut,
        end_of_stream: bool,
    ) -> Result<Action, VmError> {
        let args = [
            connection.id as i32,
            wasm_i32(data.len()),
            i32::from(end_of_stream),
        ];
        let on = (connection.vm, connection.id);
        self.with_body(kind, data, |vm| vm.filter_call_on(on, callback, &args))
    }

    /// Bytes from the client (`proxy_on_downstream_data`): `data` is everything not yet
    /// forwarded; the plugin may change it.
    pub fn on_downstream_data(
        &mut self,
        connection: &Connection,
        data: &mut BytesMut,
        end_of_stream: bool,
    ) -> Result<Action, VmError> {
        let phase = (BufferType::DownstreamData, Callback::ProxyOnDownstreamData);
        self.data_call(connection, phase, data, end_of_stream)
    }

    /// Bytes from the upstream (`proxy_on_upstream_data`).
    pub fn on_upstream_data(
        &mut self,
        connection: &Connection,
        data: &mut BytesMut,
        end_of_stream: bool,
    ) -> Result<Action, VmError> {
        let phase = (BufferType::UpstreamData, Callback::ProxyOnUpstreamData);
        self.data_call(connection, phase, data, end_of_stream)
    }

    /// The client side closed (`proxy_on_downstream_connection_close`).
    pub fn on_downstream_connection_close(
        &mut self,
        connection: &Connection,
        peer: PeerType,
    ) -> Result<(), VmError> {
        self.close_call(connection, Callback::ProxyOnDownstreamConnectionClose, peer)
    }

    /// The upstream side closed (`proxy_on_upstream_connection_close`).
    pub fn on_upstream_connection_close(
        &mut self,
        connection: &Connection,
        peer: PeerType,
    ) -> Result<(), VmError> {
        self.close_call(connection, Callback::ProxyOnUpstreamConnectionClose, peer)
    }

    fn close_call(
        &mut self,
        connection: &Connection,
        callback: Callback,
        peer: PeerType,
    ) -> Result<(), VmError> {
        self.check_serial(connection.vm)?;
        let args = [connection.id as i32, peer.as_u32() as i32];
        self.call(connection.id, callback, &args).map(drop)
    }

    /// Ends a connection: `proxy_on_done`, `proxy_on_delete`, and forgets its context.
    pub fn finish_connection(&mut self, connection: Connection) -> Result<(), VmError> {
        self.finish_stream(HttpStream {
            vm: connection.vm,
            id: connection.id,
        })
    }

    /// Takes what the plugin asked of `connection` (resume, close) since the last call.
    pub fn take_connection_events(&mut self, connection: &Connection) -> Vec<StreamEvent> {
        self.take_stream_events(&HttpStream {
            vm: connection.vm,
            id: connection.id,
        })
    }
}
