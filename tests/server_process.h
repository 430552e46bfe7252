// server_process.h: a real zeroq-server process for end-to-end tests and
// benchmarks, on 127.0.0.1 with a free port and its own data folder.
//
//   ServerProcess server({"--devices=cpu:2"});
//   ASSERT_TRUE(server.Start());
//   auto client = server.NewClient();
//   server.Kill();            // SIGKILL, as a crash would
//   ASSERT_TRUE(server.Start());   // same data folder: recovery
#ifndef ZEROQ_TESTS_SERVER_PROCESS_H_
#define ZEROQ_TESTS_SERVER_PROCESS_H_

#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "client/client.h"

namespace zeroq::testing {

class ServerProcess {
 public:
  explicit ServerProcess(std::vector<std::string> extra_flags = {})
      : flags_(std::move(extra_flags)) {
    std::string tmpl =
        (std::filesystem::temp_directory_path() / "zeroq_e2e_XXXXXX").string();
    if (char* p = mkdtemp(tmpl.data())) dir_ = p;
  }
  ~ServerProcess() {
    Kill();
    std::error_code ec;
    if (!dir_.empty() && getenv("ZEROQ_KEEP_TEST_DATA") == nullptr)
      std::filesystem::remove_all(dir_, ec);
  }

  // Starts the server and waits until it serves. False on failure (the
  // server's log is in log_path()).
  bool Start() {
    std::string port_file = dir_ + "/port";
    std::filesystem::remove(port_file);
    std::vector<std::string> args = {ZEROQ_SERVER,
                                     "--listen=127.0.0.1:0",
                                     "--port_file=" + port_file,
                                     "--data_dir=" + dir_ + "/data",
                                     "--replica_id=r1",
                                     "--worker=" ZEROQ_WORKER,
                                     "--threads_per_job=1", "--metrics_listen=",
                                     "--http_listen=127.0.0.1:0",
                                     "--http_port_file=" + dir_ + "/http_port"};
    args.insert(args.end(), flags_.begin(), flags_.end());
    pid_ = fork();
    if (pid_ == 0) {
      int fd = ::open(log_path().c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
      dup2(fd, 1);
      dup2(fd, 2);
      std::vector<char*> argv;
      for (auto& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      execv(argv[0], argv.data());
      _exit(127);
    }
    for (int i = 0; i < 600; ++i) {
      std::ifstream in(port_file);
      if (in >> port_ && port_ > 0) return true;
      int status = 0;
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        return false;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    return false;
  }

  // SIGTERM and wait; the exit status (or -1).
  int Stop() {
    if (pid_ <= 0) return -1;
    kill(pid_, SIGTERM);
    int status = 0;
    waitpid(pid_, &status, 0);
    pid_ = -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  }
  void Kill() {
    if (pid_ <= 0) return;
    kill(pid_, SIGKILL);
    int status = 0;
    waitpid(pid_, &status, 0);
    pid_ = -1;
  }

  std::unique_ptr<client::Client> NewClient(
      client::ClientOptions options = {}) {
    return std::move(*client::Client::Connect(address(), options));
  }
  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }
  // The HTTP API's port (read once the server serves), 0 when none.
  int http_port() const {
    int port = 0;
    std::ifstream(dir_ + "/http_port") >> port;
    return port;
  }
  pid_t pid() const { return pid_; }
  const std::string& dir() const { return dir_; }
  std::string data_dir() const { return dir_ + "/data"; }
  // Running jobs' folders (the server runs as replica r1 unless a test's
  // flags name another).
  std::string jobs_dir() const { return data_dir() + "/replicas/r1/jobs"; }
  std::string log_path() const { return dir_ + "/server.log"; }
  std::string Log() const {
    std::ifstream in(log_path());
    return std::string((std::istreambuf_iterator<char>(in)),
                       std::istreambuf_iterator<char>());
  }

 private:
  std::vector<std::string> flags_;
  std::string dir_;
  pid_t pid_ = -1;
  int port_ = 0;
};

// The pid of the worker running `job_id` (from its command line), or -1.
inline pid_t FindWorkerPid(const std::string& job_id) {
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator("/proc", ec)) {
    std::string name = e.path().filename().string();
    if (name.find_first_not_of("0123456789") != std::string::npos) continue;
    // open/read, not an ifstream: a process that exits mid-read makes
    // libstdc++ throw.
    std::string cmd;
    const int fd = ::open((e.path() / "cmdline").c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) continue;
    char buf[4096];
    ssize_t n;
    while ((n = ::read(fd, buf, sizeof(buf))) > 0) cmd.append(buf, n);
    ::close(fd);
    if (cmd.find("zeroq-worker") != std::string::npos &&
        cmd.find("/jobs/" + job_id + "/") != std::string::npos) {
      return std::stoi(name);
    }
  }
  return -1;
}

}  // namespace zeroq::testing

#endif  // ZEROQ_TESTS_SERVER_PROCESS_H_
