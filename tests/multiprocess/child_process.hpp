// A child process (fork + exec) whose stdin and stdout are one end of a socket pair: the test
// sends it command lines and reads its answers. The destructor SIGKILLs and reaps a child that
// is still there, so a failing test leaves no process behind.
#pragma once

#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <optional>
#include <stdexcept>
#include <string>
#include <system_error>
#include <vector>

namespace vmmpp_mp {

class child_process {
public:
    /// Starts `args[0]` with `args` as its argv.
    explicit child_process(const std::vector<std::string>& args) {
        std::vector<char*> argv;  // built before fork: the child only calls dup2, execv, _exit
        for (const auto& a : args) {
            argv.push_back(const_cast<char*>(a.c_str()));
        }
        argv.push_back(nullptr);
        int sv[2];
        if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) {
            throw std::system_error(errno, std::generic_category(), "socketpair");
        }
        pid_ = ::fork();
        if (pid_ < 0) {
            const int err = errno;
            ::close(sv[0]);
            ::close(sv[1]);
            throw std::system_error(err, std::generic_category(), "fork");
        }
        if (pid_ == 0) {
            ::dup2(sv[1], STDIN_FILENO);  // dup2 clears close-on-exec on the copies
            ::dup2(sv[1], STDOUT_FILENO);
            ::execv(argv[0], argv.data());
            ::_exit(127);
        }
        ::close(sv[1]);
        fd_ = sv[0];
    }
    child_process(const child_process&) = delete;
    child_process& operator=(const child_process&) = delete;
    ~child_process() {
        if (fd_ >= 0) {
            ::close(fd_);
        }
        if (!reaped_) {
            ::kill(pid_, SIGKILL);
            int status = 0;
            while (::waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
            }
        }
    }

    [[nodiscard]] pid_t pid() const noexcept { return pid_; }

    void send(const std::string& line) {
        const std::string text = line + "\n";
        std::size_t done = 0;
        while (done < text.size()) {
            const ssize_t n = ::send(fd_, text.data() + done, text.size() - done, MSG_NOSIGNAL);
            if (n < 0) {
                if (errno == EINTR) {
                    continue;
                }
                throw std::system_error(errno, std::generic_category(), "send to child " + std::to_string(pid_));
            }
            done += static_cast<std::size_t>(n);
        }
    }

    /// The next line the child writes, or nullopt if none comes within `timeout`. Throws if the
    /// child closes its end first.
    std::optional<std::string> poll_line(std::chrono::milliseconds timeout) {
        const auto deadline = std::chrono::steady_clock::now() + timeout;
        for (;;) {
            if (const auto eol = buffer_.find('\n'); eol != std::string::npos) {
                std::string line = buffer_.substr(0, eol);
                buffer_.erase(0, eol + 1);
                return line;
            }
            const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
                deadline - std::chrono::steady_clock::now());
            pollfd p{fd_, POLLIN, 0};
            const int rc = ::poll(&p, 1, static_cast<int>(std::max<std::chrono::milliseconds::rep>(0, left.count())));
            if (rc < 0) {
                if (errno == EINTR) {
                    continue;
                }
                throw std::system_error(errno, std::generic_category(), "poll");
            }
            if (rc == 0) {
                return std::nullopt;
            }
            char chunk[4096];
            const ssize_t n = ::recv(fd_, chunk, sizeof chunk, 0);
            if (n < 0) {
                if (errno == EINTR) {
                    continue;
                }
                throw std::system_error(errno, std::generic_category(), "recv from child " + std::to_string(pid_));
            }
            if (n == 0) {
                throw std::runtime_error("child " + std::to_string(pid_) + " closed its output (died?) after '" +
                                         buffer_ + "'");
            }
            buffer_.append(chunk, static_cast<std::size_t>(n));
        }
    }

    /// The next line; throws if none comes within `timeout`.
    std::string read_line(std::chrono::milliseconds timeout = std::chrono::seconds(120)) {
        if (auto line = poll_line(timeout)) {
            return *line;
        }
        throw std::runtime_error("child " + std::to_string(pid_) + " said nothing for " +
                                 std::to_string(timeout.count()) + " ms");
    }

    /// Sends a command and returns the answer.
    std::string ask(const std::string& line) {
        send(line);
        return read_line();
    }

    void signal(int sig) const { ::kill(pid_, sig); }

    /// Waits until the child has exited but leaves it a zombie (not reaped).
    void wait_exited_unreaped() const {
        siginfo_t info{};
        while (::waitid(P_PID, static_cast<id_t>(pid_), &info, WEXITED | WNOWAIT) < 0 && errno == EINTR) {
        }
    }

    /// Reaps the child; returns its wait status.
    int wait() {
        int status = 0;
        while (::waitpid(pid_, &status, 0) < 0) {
            if (errno != EINTR) {
                throw std::system_error(errno, std::generic_category(), "waitpid");
            }
        }
        reaped_ = true;
        return status;
    }

private:
    pid_t pid_ = -1;
    int fd_ = -1;
    bool reaped_ = false;
    std::string buffer_;
};

} // namespace vmmpp_mp
