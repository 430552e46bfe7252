#include "server/worker_supervisor.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"

extern char** environ;

namespace zeroq::server {
namespace {

// A length above this is not a WorkerMessage but a broken stream.
constexpr uint64_t kMaxMessageBytes = uint64_t{64} << 20;
constexpr size_t kLogTailBytes = 2048;

std::string ErrnoText(int err) { return std::string(strerror(err)); }

void CloseFd(int& fd) {
  if (fd >= 0) ::close(fd);
  fd = -1;
}

// Moves a descriptor above 3: the child's dup2 onto 0..3 must never have
// source == target, which would leave close-on-exec set on the target.
int AboveStdio(int fd) {
  if (fd < 0 || fd > 3) return fd;
  int moved = ::fcntl(fd, F_DUPFD_CLOEXEC, 4);
  ::close(fd);
  return moved;
}

absl::Status WriteFile(const std::string& path, const std::string& bytes) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) {
    return absl::InternalError(
        absl::StrCat("cannot write ", path, ": ", ErrnoText(errno)));
  }
  const char* p = bytes.data();
  size_t left = bytes.size();
  while (left > 0) {
    ssize_t n = ::write(fd, p, left);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const int err = errno;
      ::close(fd);
      return absl::InternalError(
          absl::StrCat("cannot write ", path, ": ", ErrnoText(err)));
    }
    p += n;
    left -= static_cast<size_t>(n);
  }
  if (::close(fd) != 0) {
    return absl::InternalError(
        absl::StrCat("cannot write ", path, ": ", ErrnoText(errno)));
  }
  return absl::OkStatus();
}

// The last whole lines of a file, at most kLogTailBytes.
std::string LogTail(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return "";
  std::string tail;
  const off_t size = ::lseek(fd, 0, SEEK_END);
  if (size > 0) {
    const off_t from =
        std::max<off_t>(0, size - static_cast<off_t>(kLogTailBytes));
    tail.resize(static_cast<size_t>(size - from));
    ssize_t n;
    do {
      n = ::pread(fd, tail.data(), tail.size(), from);
    } while (n < 0 && errno == EINTR);
    tail.resize(n > 0 ? static_cast<size_t>(n) : 0);
    if (from > 0) {
      const size_t newline = tail.find('\n');
      tail.erase(0, newline == std::string::npos ? 0 : newline + 1);
    }
  }
  ::close(fd);
  return tail;
}

std::string SignalName(int sig) {
  const char* abbrev = sigabbrev_np(sig);
  return abbrev != nullptr ? absl::StrCat("SIG", abbrev)
                           : absl::StrCat("signal ", sig);
}

// Milliseconds until `t` for poll(), rounded up; -1 for the infinite future.
int PollTimeout(absl::Time now, absl::Time t) {
  if (t == absl::InfiniteFuture()) return -1;
  if (t <= now) return 0;
  const int64_t ms =
      absl::ToInt64Milliseconds(absl::Ceil(t - now, absl::Milliseconds(1)));
  return static_cast<int>(std::min<int64_t>(ms, 60 * 1000));
}

}  // namespace

struct WorkerProcess::State {
  WorkerLaunch launch;
  EventFn on_event;
  ExitFn on_exit;
  std::string request_path, log_path;
  int wake_read = -1, wake_write = -1;  // Cancel() wakes the reader's poll
  std::thread thread;

  absl::Mutex mu;
  bool spawn_done ABSL_GUARDED_BY(mu) = false;
  absl::Status spawn_status ABSL_GUARDED_BY(mu);
  pid_t pid ABSL_GUARDED_BY(mu) = 0;  // 0 before the start and once reaped
  bool cancel_requested ABSL_GUARDED_BY(mu) = false;
  bool exited ABSL_GUARDED_BY(mu) = false;  // on_exit has returned
  bool joined ABSL_GUARDED_BY(mu) = false;

  ~State() {
    CloseFd(wake_read);
    CloseFd(wake_write);
  }

  // The reader thread: starts the worker, then supervises it.
  void Main();

 private:
  // Owned by the reader thread.
  int pipe_read = -1;
  pid_t child = 0;

  absl::Status Spawn();
  void Supervise();
  WorkerOutcome Classify(int wait_status, bool status_known, bool cancelled,
                         bool timed_out, const std::string& stream_error,
                         std::optional<v1::WorkerMessage> final_message);
};

absl::Status WorkerProcess::State::Spawn() {
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) {
    return absl::InternalError(absl::StrCat("pipe: ", ErrnoText(errno)));
  }
  pipe_read = fds[0];
  int pipe_write = AboveStdio(fds[1]);
  if (pipe_write < 0) {
    const int err = errno;
    CloseFd(pipe_read);
    return absl::InternalError(absl::StrCat("pipe: ", ErrnoText(err)));
  }
  int log_fd = AboveStdio(::open(
      log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644));
  if (log_fd < 0) {
    const int err = errno;
    CloseFd(pipe_write);
    CloseFd(pipe_read);
    return absl::InternalError(
        absl::StrCat("cannot open ", log_path, ": ", ErrnoText(err)));
  }

  // Everything the child needs is prepared here: between fork and exec it
  // may only make system calls.
  const std::vector<std::string> args = {
      launch.worker_path,
      absl::StrCat("--request=", request_path),
      "--progress_fd=3",
      absl::StrCat("--parent_pid=", ::getpid()),
  };
  std::set<std::string> overridden;
  for (const auto& [key, value] : launch.env) overridden.insert(key);
  std::vector<std::string> env;
  for (char** e = environ; e != nullptr && *e != nullptr; ++e) {
    const std::string entry = *e;
    if (overridden.count(entry.substr(0, entry.find('='))) == 0)
      env.push_back(entry);
  }
  for (const auto& [key, value] : launch.env)
    env.push_back(absl::StrCat(key, "=", value));
  std::vector<char*> argv, envp;
  for (const std::string& a : args)
    argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  for (const std::string& e : env) envp.push_back(const_cast<char*>(e.c_str()));
  envp.push_back(nullptr);

  // Signals the worker must not inherit blocked or ignored from the server.
  sigset_t none;
  sigemptyset(&none);
  const int defaults[] = {SIGTERM, SIGINT, SIGHUP, SIGPIPE, SIGCHLD};
  // exec's failure travels back through this close-on-exec pipe; success
  // closes it empty.
  int exec_error[2];
  if (::pipe2(exec_error, O_CLOEXEC) != 0) {
    const int err = errno;
    CloseFd(pipe_write);
    CloseFd(log_fd);
    CloseFd(pipe_read);
    return absl::InternalError(absl::StrCat("pipe: ", ErrnoText(err)));
  }
  const pid_t parent = ::getpid();
  // fork, not posix_spawn: the death signal must be set before exec. The
  // worker links LibTorch, whose loading takes a second or more before its
  // main() could set it itself; a server killed in that second would leave
  // a worker behind. Between fork and exec the child (one thread of a
  // multithreaded server) calls async-signal-safe functions only.
  const pid_t pid_out = ::fork();
  if (pid_out == 0) {
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != parent) ::_exit(127);  // the server died already
    // Its own process group: signals reach anything it starts.
    ::setpgid(0, 0);
    struct sigaction dfl {};
    dfl.sa_handler = SIG_DFL;
    for (int sig : defaults) ::sigaction(sig, &dfl, nullptr);
    ::sigprocmask(SIG_SETMASK, &none, nullptr);
    const int null_fd = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
    int err = 0;
    if (null_fd < 0 || ::dup2(null_fd, 0) < 0 || ::dup2(log_fd, 1) < 0 ||
        ::dup2(log_fd, 2) < 0 || ::dup2(pipe_write, 3) < 0) {
      err = errno;
    } else {
      ::execve(launch.worker_path.c_str(), argv.data(), envp.data());
      err = errno;
    }
    while (::write(exec_error[1], &err, sizeof(err)) < 0 && errno == EINTR) {
    }
    ::_exit(127);
  }
  const int fork_errno = pid_out < 0 ? errno : 0;
  ::close(exec_error[1]);
  int rc = fork_errno;
  if (pid_out > 0) {
    ::setpgid(pid_out, pid_out);  // either side may run first
    int child_errno = 0;
    ssize_t n;
    while ((n = ::read(exec_error[0], &child_errno, sizeof(child_errno))) < 0 &&
           errno == EINTR) {
    }
    if (n == sizeof(child_errno)) {
      rc = child_errno;
      int ignored;
      ::waitpid(pid_out, &ignored, 0);  // exec failed: reap it now
    }
  }
  ::close(exec_error[0]);
  // The child holds the write end now: EOF on pipe_read means it is gone.
  CloseFd(pipe_write);
  CloseFd(log_fd);
  if (rc != 0) {
    CloseFd(pipe_read);
    return absl::InternalError(absl::StrCat(
        "cannot start the worker ", launch.worker_path, ": ", ErrnoText(rc)));
  }
  child = pid_out;
  absl::MutexLock lock(&mu);
  pid = pid_out;
  return absl::OkStatus();
}

void WorkerProcess::State::Main() {
  absl::Status spawned = Spawn();
  {
    absl::MutexLock lock(&mu);
    spawn_status = spawned;
    spawn_done = true;
  }
  // On failure Start reports the error and joins; on_exit never runs.
  if (spawned.ok()) Supervise();
}

void WorkerProcess::State::Supervise() {
  const absl::Time started = absl::Now();
  const absl::Time deadline = launch.time_limit == absl::InfiniteDuration()
                                  ? absl::InfiniteFuture()
                                  : started + launch.time_limit;
  const absl::Duration grace =
      std::max(launch.kill_grace, absl::ZeroDuration());

  absl::Time term_sent = absl::InfiniteFuture();  // when SIGTERM went out
  bool killed = false, cancelled = false, timed_out = false, eof = false;
  std::string buffer, stream_error;
  std::optional<v1::WorkerMessage> final_message;
  int wait_status = 0;
  bool status_known = true;

  // Only this thread signals and reaps the child, so the group it signals
  // always still exists (its leader is at worst a zombie) and is ours.
  auto signal_group = [&](int sig) { ::kill(-child, sig); };
  auto terminate = [&](absl::Time now) {
    if (term_sent != absl::InfiniteFuture()) return;
    term_sent = now;
    signal_group(SIGTERM);
  };
  auto broken_stream = [&](std::string why) {
    stream_error = std::move(why);
    signal_group(SIGKILL);
    killed = true;
    eof = true;
    CloseFd(pipe_read);
  };

  // Handles the complete messages at the front of `buffer`.
  auto parse = [&] {
    size_t pos = 0;
    while (!eof) {
      uint64_t length = 0;
      size_t i = pos;
      bool complete = false;
      for (int shift = 0; i < buffer.size() && shift < 35; shift += 7) {
        const uint8_t b = static_cast<uint8_t>(buffer[i++]);
        length |= uint64_t{b & 0x7fu} << shift;
        if ((b & 0x80u) == 0) {
          complete = true;
          break;
        }
      }
      if (!complete) {
        if (i - pos >= 5) broken_stream("the worker sent a malformed length");
        break;
      }
      if (length > kMaxMessageBytes) {
        broken_stream(absl::StrCat("the worker sent a message of ", length,
                                   " bytes (more than 64 MiB)"));
        break;
      }
      if (buffer.size() - i < length) break;
      v1::WorkerMessage message;
      if (!message.ParseFromArray(buffer.data() + i,
                                  static_cast<int>(length))) {
        broken_stream("the worker sent a message that does not parse");
        break;
      }
      pos = i + length;
      if (final_message.has_value()) continue;  // nothing counts after the last
      if (message.kind_case() == v1::WorkerMessage::kEvent) {
        if (on_event) on_event(message.event());
      } else if (message.kind_case() != v1::WorkerMessage::KIND_NOT_SET) {
        final_message = std::move(message);
      }
    }
    buffer.erase(0, pos);
  };

  char chunk[64 * 1024];
  for (;;) {
    absl::Time now = absl::Now();
    bool cancel;
    {
      absl::MutexLock lock(&mu);
      cancel = cancel_requested;
    }
    if (cancel && !cancelled) {
      cancelled = true;
      terminate(now);
    }
    if (now >= deadline && term_sent == absl::InfiniteFuture()) {
      timed_out = true;
      terminate(now);
    }
    if (!killed && term_sent != absl::InfiniteFuture() &&
        now >= term_sent + grace) {
      signal_group(SIGKILL);
      killed = true;
    }
    if (eof) {
      const pid_t r = ::waitpid(child, &wait_status, WNOHANG);
      if (r == child) break;
      if (r < 0 && errno == ECHILD) {  // SIGCHLD ignored: reaped by the kernel
        status_known = false;
        break;
      }
    }

    absl::Time wake_at = absl::InfiniteFuture();
    if (term_sent == absl::InfiniteFuture()) {
      wake_at = deadline;
    } else if (!killed) {
      wake_at = term_sent + grace;
    }
    // After EOF the exit is normally a moment away: look again soon.
    if (eof) wake_at = std::min(wake_at, now + absl::Milliseconds(5));
    pollfd fds[2] = {{wake_read, POLLIN, 0}, {pipe_read, POLLIN, 0}};
    const int n = ::poll(fds, eof ? 1 : 2, PollTimeout(now, wake_at));
    if (n < 0) continue;  // EINTR: recompute the timeout
    if (fds[0].revents & POLLIN) {
      char drain[64];
      while (::read(wake_read, drain, sizeof(drain)) > 0) {
      }
    }
    if (!eof && (fds[1].revents & (POLLIN | POLLHUP | POLLERR))) {
      const ssize_t got = ::read(pipe_read, chunk, sizeof(chunk));
      if (got > 0) {
        buffer.append(chunk, static_cast<size_t>(got));
        parse();
      } else if (got == 0 || (errno != EINTR && errno != EAGAIN)) {
        eof = true;
        CloseFd(pipe_read);
      }
    }
  }
  CloseFd(pipe_read);
  {
    absl::MutexLock lock(&mu);
    pid = 0;
  }
  if (stream_error.empty() && !buffer.empty() && !final_message.has_value()) {
    stream_error = "the worker's last message was cut short";
  }

  WorkerOutcome outcome =
      Classify(wait_status, status_known, cancelled, timed_out, stream_error,
               std::move(final_message));
  outcome.elapsed = absl::Now() - started;
  outcome.log_tail = LogTail(log_path);
  if (on_exit) on_exit(std::move(outcome));
  absl::MutexLock lock(&mu);
  exited = true;
}

WorkerOutcome WorkerProcess::State::Classify(
    int wait_status, bool status_known, bool cancelled, bool timed_out,
    const std::string& stream_error,
    std::optional<v1::WorkerMessage> final_message) {
  using Kind = WorkerOutcome::Kind;
  WorkerOutcome out;
  bool exited_zero = !status_known;  // unknown: trust the final message
  std::string how = "ended (exit status unknown)";
  if (status_known && WIFEXITED(wait_status)) {
    out.exit_code = WEXITSTATUS(wait_status);
    exited_zero = out.exit_code == 0;
    how = absl::StrCat("exited with status ", out.exit_code);
  } else if (status_known && WIFSIGNALED(wait_status)) {
    out.term_signal = WTERMSIG(wait_status);
    exited_zero = false;
    how = absl::StrCat("killed by signal ", out.term_signal, " (",
                       SignalName(out.term_signal), ")");
  }
  const bool has_error = final_message && final_message->has_error();
  const bool succeeded =
      final_message && !has_error && exited_zero && stream_error.empty() &&
      (final_message->has_result() || final_message->has_inspection());

  // A result that was complete before a late Cancel() or deadline still
  // counts: the work is done.
  if (succeeded) {
    out.kind = Kind::kSucceeded;
    if (final_message->has_result()) {
      out.result = std::move(*final_message->mutable_result());
    } else {
      out.inspection = std::move(*final_message->mutable_inspection());
    }
    return out;
  }
  if (cancelled) {
    out.kind = Kind::kCancelled;
    out.error.set_code(static_cast<int>(absl::StatusCode::kCancelled));
    out.error.set_message(
        has_error && final_message->error().code() ==
                         static_cast<int>(absl::StatusCode::kCancelled)
            ? final_message->error().message()
            : "cancelled");
    return out;
  }
  if (timed_out) {
    out.kind = Kind::kTimedOut;
    out.error.set_code(static_cast<int>(absl::StatusCode::kDeadlineExceeded));
    out.error.set_message(absl::StrCat("the time limit of ",
                                       absl::FormatDuration(launch.time_limit),
                                       " passed; the worker was stopped"));
    return out;
  }
  if (has_error && stream_error.empty()) {
    out.kind = Kind::kFailed;
    out.error = final_message->error();
    return out;
  }
  out.kind = Kind::kCrashed;
  out.error.set_code(static_cast<int>(absl::StatusCode::kInternal));
  if (!stream_error.empty()) {
    out.error.set_message(absl::StrCat(stream_error, "; worker ", how));
  } else if (final_message) {
    out.error.set_message(
        absl::StrCat("worker ", how, " after its final message"));
  } else {
    out.error.set_message(absl::StrCat("worker ", how, " without a result"));
  }
  return out;
}

absl::StatusOr<std::unique_ptr<WorkerProcess>> WorkerProcess::Start(
    WorkerLaunch launch, EventFn on_event, ExitFn on_exit) {
  auto state = std::make_shared<State>();
  state->request_path = launch.work_dir + "/request.pb";
  state->log_path = launch.work_dir + "/worker.log";
  state->launch = std::move(launch);
  state->on_event = std::move(on_event);
  state->on_exit = std::move(on_exit);

  std::string bytes;
  if (!state->launch.request.SerializeToString(&bytes)) {
    return absl::InternalError("cannot serialize the WorkerRequest");
  }
  if (absl::Status s = WriteFile(state->request_path, bytes); !s.ok()) return s;
  int wake[2];
  if (::pipe2(wake, O_CLOEXEC | O_NONBLOCK) != 0) {
    return absl::InternalError(absl::StrCat("pipe: ", ErrnoText(errno)));
  }
  state->wake_read = wake[0];
  state->wake_write = wake[1];

  // The worker is started from the reader thread, which then lives until the
  // worker is reaped: PR_SET_PDEATHSIG fires when the thread that started a
  // process ends, not only when the process does. The raw pointer is safe:
  // the thread is always joined before the State can go away.
  State* raw = state.get();
  state->thread = std::thread([raw] { raw->Main(); });
  absl::Status spawned;
  {
    absl::MutexLock lock(&state->mu);
    state->mu.Await(absl::Condition(&state->spawn_done));
    spawned = state->spawn_status;
  }
  if (!spawned.ok()) {
    state->thread.join();
    return spawned;
  }
  return std::unique_ptr<WorkerProcess>(new WorkerProcess(std::move(state)));
}

WorkerProcess::WorkerProcess(std::shared_ptr<State> state)
    : state_(std::move(state)) {}

WorkerProcess::~WorkerProcess() {
  Cancel();
  Wait();
  bool join = false;
  {
    absl::MutexLock lock(&state_->mu);
    join = !state_->joined;
    state_->joined = true;
  }
  if (join && state_->thread.joinable()) state_->thread.join();
}

void WorkerProcess::Cancel() {
  {
    absl::MutexLock lock(&state_->mu);
    if (state_->cancel_requested || state_->exited) return;
    state_->cancel_requested = true;
  }
  // Wake the reader, which sends the signals. A full pipe is awake already.
  const char byte = 1;
  ssize_t n;
  do {
    n = ::write(state_->wake_write, &byte, 1);
  } while (n < 0 && errno == EINTR);
}

void WorkerProcess::Wait() {
  absl::MutexLock lock(&state_->mu);
  state_->mu.Await(absl::Condition(&state_->exited));
}

pid_t WorkerProcess::pid() const {
  absl::MutexLock lock(&state_->mu);
  return state_->pid;
}

}  // namespace zeroq::server
