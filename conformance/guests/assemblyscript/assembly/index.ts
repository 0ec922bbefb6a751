// An AssemblyScript plugin (solo-io proxy-runtime 0.1.8, ABI 0.2.0) for the conformance
// suite: adds `x-as: <path>` to requests and `x-as-response: yes` to responses, logs each
// request, counts them in a metric, and answers `/deny` with a 403 local response.
export * from "@solo-io/proxy-runtime/proxy";
import {
  RootContext, Context, registerRootContext, FilterHeadersStatusValues, stream_context,
  send_local_response, GrpcStatusValues, log, LogLevelValues, Counter, Headers
} from "@solo-io/proxy-runtime";

class Root extends RootContext {
  requests: Counter = new Counter("as_requests");

  createContext(context_id: u32): Context {
    return new Filter(context_id, this);
  }
}

class Filter extends Context {
  root: Root;

  constructor(context_id: u32, root: Root) {
    super(context_id, root);
    this.root = root;
  }

  onRequestHeaders(a: u32, end_of_stream: bool): FilterHeadersStatusValues {
    const path = stream_context.headers.request.get(":path");
    log(LogLevelValues.info, "as request " + path);
    this.root.requests.increment(1);
    if (path == "/deny") {
      const headers: Headers = [];
      send_local_response(403, "as_denied", String.UTF8.encode("denied by as"), headers, GrpcStatusValues.Unknown);
      return FilterHeadersStatusValues.StopIteration;
    }
    stream_context.headers.request.add("x-as", path);
    return FilterHeadersStatusValues.Continue;
  }

  onResponseHeaders(a: u32, end_of_stream: bool): FilterHeadersStatusValues {
    stream_context.headers.response.add("x-as-response", "yes");
    return FilterHeadersStatusValues.Continue;
  }
}

registerRootContext((context_id: u32): RootContext => { return new Root(context_id); }, "as_root");
