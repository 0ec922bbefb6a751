// A filter written in C++ against the proxy-wasm ABI 0.2.1, built with clang, libc++ and
// wasi-libc as a reactor (`_initialize` runs the static constructors), allocating through the
// exported `malloc` as C++ SDK plugins do (no `proxy_on_memory_allocate`).
//
// Configuration: the value of the `x-cpp` request header it adds. Requests whose path starts
// with `/deny` get a 403 with `x-denied-by: cpp`; responses get `x-cpp-response: yes`.

#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>
#include <unordered_map>

#define IMPORT(name) extern "C" __attribute__((import_module("env"), import_name(#name)))
#define EXPORT(name) extern "C" __attribute__((export_name(#name)))

IMPORT(proxy_log) int32_t proxy_log(int32_t level, const char* message, size_t size);
IMPORT(proxy_get_buffer_bytes)
int32_t proxy_get_buffer_bytes(int32_t type, size_t start, size_t max, char** data, size_t* size);
IMPORT(proxy_get_header_map_value)
int32_t proxy_get_header_map_value(int32_t map, const char* key, size_t key_size, char** value,
                                   size_t* value_size);
IMPORT(proxy_add_header_map_value)
int32_t proxy_add_header_map_value(int32_t map, const char* key, size_t key_size,
                                   const char* value, size_t value_size);
IMPORT(proxy_send_local_response)
int32_t proxy_send_local_response(int32_t status, const char* details, size_t details_size,
                                  const char* body, size_t body_size, const char* headers,
                                  size_t headers_size, int32_t grpc_status);

namespace {

constexpr int32_t kInfo = 2;
constexpr int32_t kRequestHeaders = 0;
constexpr int32_t kResponseHeaders = 2;
constexpr int32_t kPluginConfiguration = 7;

void log(const std::string& message) { proxy_log(kInfo, message.data(), message.size()); }

// A buffer the host allocated with our malloc: taken over, freed here.
std::string take(char* data, size_t size) {
    std::string out(data ? data : "", data ? size : 0);
    free(data);
    return out;
}

void add(int32_t map, std::string_view key, std::string_view value) {
    proxy_add_header_map_value(map, key.data(), key.size(), value.data(), value.size());
}

// Built by `_initialize`: proves the static constructors ran before any callback.
std::string greeting = "hello from c++";
std::string configured;
// What each stream saw, by context id.
std::unordered_map<uint32_t, std::string> paths;

}  // namespace

EXPORT(proxy_abi_version_0_2_1) void proxy_abi_version_0_2_1() {}

EXPORT(proxy_on_context_create) void proxy_on_context_create(uint32_t, uint32_t) {}

EXPORT(proxy_on_vm_start) int32_t proxy_on_vm_start(uint32_t, uint32_t) {
    log(greeting);
    return 1;
}

EXPORT(proxy_on_configure) int32_t proxy_on_configure(uint32_t, uint32_t size) {
    char* data = nullptr;
    size_t got = 0;
    if (size > 0 && proxy_get_buffer_bytes(kPluginConfiguration, 0, size, &data, &got) == 0) {
        configured = take(data, got);
    }
    log("configured: " + configured);
    return 1;
}

EXPORT(proxy_on_request_headers)
int32_t proxy_on_request_headers(uint32_t context, uint32_t, uint32_t) {
    char* data = nullptr;
    size_t size = 0;
    std::string path;
    if (proxy_get_header_map_value(kRequestHeaders, ":path", 5, &data, &size) == 0) {
        path = take(data, size);
    }
    paths[context] = path;
    if (path.rfind("/deny", 0) == 0) {
        // One pair, x-denied-by: cpp, in the ABI's pairs encoding (the literal's own final
        // NUL ends the value).
        static const char pairs[] = "\x01\x00\x00\x00" "\x0b\x00\x00\x00" "\x03\x00\x00\x00"
                                    "x-denied-by\0cpp";
        static const char body[] = "denied by c++\n";
        proxy_send_local_response(403, "", 0, body, sizeof body - 1, pairs, sizeof pairs, -1);
        return 1;
    }
    add(kRequestHeaders, "x-cpp", configured);
    return 0;
}

EXPORT(proxy_on_response_headers)
int32_t proxy_on_response_headers(uint32_t, uint32_t, uint32_t) {
    add(kResponseHeaders, "x-cpp-response", "yes");
    return 0;
}

EXPORT(proxy_on_done) int32_t proxy_on_done(uint32_t) { return 1; }

EXPORT(proxy_on_delete) void proxy_on_delete(uint32_t context) {
    auto seen = paths.find(context);
    if (seen != paths.end()) {
        log("stream " + std::to_string(context) + " saw " + seen->second);
        paths.erase(seen);
    }
}
