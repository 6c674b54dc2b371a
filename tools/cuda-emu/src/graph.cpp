// graph.cpp - stream capture and CUDA graphs. While a stream captures, the work enqueued on it
// (kernel launches, device memsets and device-to-device copies, cuBLAS/cuBLASLt GEMMs) is recorded with
// its arguments copied by value instead of run; cuStreamEndCapture hands the recording out as a
// graph, and cuGraphLaunch replays it in order through the same checked paths as a direct call,
// so a replay that touches freed or resized memory is reported like any other launch. Work that
// a graph cannot hold (host copies, allocation, synchronisation) invalidates the capture, as on a
// GPU; allocation is refused even where a GPU would make it a graph memory node, because the
// engine's graphs must reuse fixed buffers.
#include <cstdio>
#include <map>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "emu_internal.h"

namespace emu {
namespace {

struct Capture {
    // the thread that began it: a stream-less call (cuMemAlloc, ...) concerns only the captures
    // of its own thread, as in CU_STREAM_CAPTURE_MODE_THREAD_LOCAL
    std::thread::id owner;
    std::vector<Node> nodes;
    const char* broken = nullptr;  // the first API that invalidated the capture
};

std::mutex g_mu;
std::map<void*, Capture> g_captures;  // by stream handle

}  // namespace

bool capturing(void* stream) {
    if (!stream) return false;
    std::lock_guard<std::mutex> l(g_mu);
    return g_captures.count(stream) != 0;
}

bool any_capture() {
    std::lock_guard<std::mutex> l(g_mu);
    for (const auto& kv : g_captures)
        if (kv.second.owner == std::this_thread::get_id()) return true;
    return false;
}

void record(void* stream, Node n) {
    std::lock_guard<std::mutex> l(g_mu);
    auto it = g_captures.find(stream);
    if (it == g_captures.end()) fatal("record: stream %p is not capturing", stream);
    it->second.nodes.push_back(std::move(n));
}

void invalidate(void* stream, const char* api) {
    std::lock_guard<std::mutex> l(g_mu);
    for (auto& kv : g_captures) {
        if (stream ? kv.first != stream : kv.second.owner != std::this_thread::get_id()) continue;
        if (!kv.second.broken) kv.second.broken = api;
    }
    trace("%s during stream capture: the capture is invalidated", api);
}

bool begin_capture(void* stream) {
    std::lock_guard<std::mutex> l(g_mu);
    if (!stream || g_captures.count(stream)) return false;
    Capture c;
    c.owner = std::this_thread::get_id();
    g_captures.emplace(stream, std::move(c));
    return true;
}

int end_capture(void* stream, std::vector<Node>* out) {
    std::lock_guard<std::mutex> l(g_mu);
    auto it = g_captures.find(stream);
    if (it == g_captures.end()) return 1;
    Capture c = std::move(it->second);
    g_captures.erase(it);
    if (c.broken) {
        fprintf(stderr, "cuda-emu: stream capture invalidated by %s\n", c.broken);
        return 2;
    }
    *out = std::move(c.nodes);
    return 0;
}

}  // namespace emu
