// A lean native gRPC client for bench/server_overhead.py: it sends one pre-serialized request
// COUNT times, one call at a time, and prints each call's latency in microseconds and the
// server-timing trailer it got back, tab-separated. The caller's thread drives the completion
// queue itself, so the client adds little of its own to the latency (grpcio's Python client
// adds thread hand-offs and Python), and what remains is closer to what the server adds.
//
// Build (Debian/Ubuntu: g++, pkg-config, libgrpc++-dev):
//   g++ -O2 -std=c++17 native_client.cc $(pkg-config --cflags --libs grpc++) -o native_client
// Run: native_client HOST:PORT /package.Service/Method REQUEST_FILE COUNT IDLE_MS

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <string>
#include <thread>

int main(int argc, char** argv) {
  if (argc != 6) {
    std::fprintf(stderr, "usage: %s HOST:PORT METHOD REQUEST_FILE COUNT IDLE_MS\n", argv[0]);
    return 2;
  }
  const std::string target = argv[1], method = argv[2];
  std::ifstream file(argv[3], std::ios::binary);
  if (!file) {
    std::fprintf(stderr, "cannot read %s\n", argv[3]);
    return 2;
  }
  const std::string bytes((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  const int count = std::stoi(argv[4]), idle_ms = std::stoi(argv[5]);

  grpc::GenericStub stub(grpc::CreateChannel(target, grpc::InsecureChannelCredentials()));
  grpc::CompletionQueue queue;
  grpc::Slice slice(bytes);
  for (int i = 0; i < count; ++i) {
    if (idle_ms > 0) std::this_thread::sleep_for(std::chrono::milliseconds(idle_ms));
    grpc::ByteBuffer request(&slice, 1), response;
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    grpc::Status status;
    const auto start = std::chrono::steady_clock::now();
    auto call = stub.PrepareUnaryCall(&context, method, request, &queue);
    call->StartCall();
    call->Finish(&response, &status, nullptr);
    void* tag;
    bool ok;
    if (!queue.Next(&tag, &ok) || !ok) {
      std::fprintf(stderr, "the completion queue failed\n");
      return 1;
    }
    const auto end = std::chrono::steady_clock::now();
    if (!status.ok()) {
      std::fprintf(stderr, "call %d failed: status %d: %s\n", i, status.error_code(),
                   status.error_message().c_str());
      return 1;
    }
    std::string timing;
    for (const auto& [key, value] : context.GetServerTrailingMetadata()) {
      if (key == "server-timing") timing.assign(value.data(), value.size());
    }
    std::printf("%.1f\t%s\n", std::chrono::duration<double, std::micro>(end - start).count(),
                timing.c_str());
  }
  return 0;
}
