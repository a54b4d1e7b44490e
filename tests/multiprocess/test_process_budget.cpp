// vmmpp::process_budget: one budget in POSIX shared memory for the pools of several processes.
// The multi-process cases run real processes: vmmpp_mp_helper (fork + exec) attaches to the
// segment and commits through an elastic_pool<host, page_granular, process_quota>.
// Every test uses a segment named after this process and removes it, whatever happens.
#define BOOST_TEST_MODULE process_budget
#include "support/cpu_main.hpp"

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "multiprocess/child_process.hpp"
#include "multiprocess/common.hpp"

namespace {

using vmmpp_mp::page;
using vmmpp::detail::pb::register_share;
using vmmpp::process_budget;

/// A segment name no other test or test run uses; unlinked before and after.
class scratch_name {
public:
    explicit scratch_name(const std::string& tag) : name_("/vmmpp-test-" + std::to_string(::getpid()) + "-" + tag) {
        ::shm_unlink(name_.c_str());
    }
    scratch_name(const scratch_name&) = delete;
    scratch_name& operator=(const scratch_name&) = delete;
    ~scratch_name() { ::shm_unlink(name_.c_str()); }
    [[nodiscard]] const std::string& str() const noexcept { return name_; }

private:
    std::string name_;
};

/// Starts vmmpp_mp_helper on `segment` with a pool of `capacity_pages` for `model`.
std::unique_ptr<vmmpp_mp::child_process> start_helper(const std::string& segment, const std::string& model,
                                                      std::size_t model_limit, std::size_t capacity_pages) {
    auto child = std::make_unique<vmmpp_mp::child_process>(std::vector<std::string>{
        VMMPP_MP_HELPER, segment, model, std::to_string(model_limit), std::to_string(capacity_pages)});
    const std::string ready = child->read_line();
    BOOST_REQUIRE_EQUAL(ready, "ready " + std::to_string(child->pid()));
    return child;
}

std::string refused(std::size_t requested, std::size_t in_use, std::size_t limit, const std::string& which) {
    return std::to_string(requested) + " " + std::to_string(in_use) + " " + std::to_string(limit) + " " + which;
}

vmmpp::model_stats model(const vmmpp::process_budget_stats& s, const std::string& name) {
    for (const auto& m : s.models) {
        if (m.name == name) {
            return m;
        }
    }
    BOOST_FAIL("no model " << name << " in the budget");
    return {};
}

/// Bytes the usage records charge to `pid`.
std::size_t usage_of(const vmmpp::process_budget_stats& s, pid_t pid) {
    std::size_t bytes = 0;
    for (const auto& u : s.usage) {
        if (u.process.pid == pid) {
            bytes += u.committed;
        }
    }
    return bytes;
}

/// Every invariant a consistent snapshot must show.
void check_invariants(const vmmpp::process_budget_stats& s) {
    std::size_t models = 0;
    for (const auto& m : s.models) {
        BOOST_TEST(m.committed <= m.limit, "model " << m.name);
        BOOST_TEST(m.peak <= m.limit, "model " << m.name);
        std::size_t records = 0;
        for (const auto& u : s.usage) {
            if (u.model == m.name) {
                records += u.committed;
            }
        }
        BOOST_TEST(records == m.committed, "model " << m.name);
        models += m.committed;
    }
    BOOST_TEST(models == s.committed);
    BOOST_TEST(s.committed <= s.limit);
    BOOST_TEST(s.peak <= s.limit);
}

bool killed_by(int status, int sig) { return WIFSIGNALED(status) && WTERMSIG(status) == sig; }
bool exited_ok(int status) { return WIFEXITED(status) && WEXITSTATUS(status) == 0; }

/// A wait status in words, for failure messages.
std::string describe(int status) {
    if (WIFEXITED(status)) {
        return "exited with " + std::to_string(WEXITSTATUS(status));
    }
    if (WIFSIGNALED(status)) {
        return "killed by signal " + std::to_string(WTERMSIG(status)) + " (" + ::strsignal(WTERMSIG(status)) + ")";
    }
    return "wait status " + std::to_string(status);
}

/// A child made by fork and how it ended.
struct child_result {
    pid_t pid = -1;
    int status = 0;
};

/// Runs `body` in a child made by fork, which exits with what `body` returns (98 if it throws a
/// vmmpp::error, 99 anything else) without running the parent's destructors or test hooks, and
/// dies by the signal itself if it faults (Boost.Test's handlers would turn that into an exit).
template <class Body>
child_result in_child(Body&& body) {
    child_result r;
    r.pid = ::fork();
    BOOST_REQUIRE(r.pid >= 0);
    if (r.pid == 0) {
        ::signal(SIGSEGV, SIG_DFL);
        ::signal(SIGBUS, SIG_DFL);
        int code = 99;
        try {
            code = body();
        } catch (const vmmpp::error&) {
            code = 98;
        } catch (...) {
            code = 99;
        }
        ::_exit(code);
    }
    BOOST_REQUIRE(::waitpid(r.pid, &r.status, 0) == r.pid);
    return r;
}

/// The user the tests make foreign segments as (nobody).
constexpr uid_t other_user = 65534;

boost::test_tools::assertion_result running_as_root(boost::unit_test::test_unit_id) {
    boost::test_tools::assertion_result root(::geteuid() == 0);
    root.message() << "needs root: it makes a segment as another user (uid " << other_user << ")";
    return root;
}

mode_t mode_of(const std::string& name) {
    const int fd = ::shm_open(name.c_str(), O_RDONLY, 0);
    BOOST_REQUIRE(fd >= 0);
    struct stat st {};
    BOOST_REQUIRE(::fstat(fd, &st) == 0);
    ::close(fd);
    return st.st_mode & 0777;
}

bool message_has(const std::exception& e, const std::string& text) {
    return std::string(e.what()).find(text) != std::string::npos;
}

/// A test run killed before its destructors ran (a sanitizer halting, say) leaves its segments in
/// /dev/shm; the next run unlinks those whose process is gone.
struct sweep_stale_segments {
    sweep_stale_segments() {
        std::error_code ec;
        for (const auto& entry : std::filesystem::directory_iterator("/dev/shm", ec)) {
            const std::string file = entry.path().filename().string();
            const std::string prefix = "vmmpp-test-";
            if (file.rfind(prefix, 0) != 0) {
                continue;
            }
            const long pid = std::strtol(file.c_str() + prefix.size(), nullptr, 10);
            if (pid > 0 && ::kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH) {
                ::shm_unlink(("/" + file).c_str());
            }
        }
    }
};

} // namespace

BOOST_TEST_GLOBAL_FIXTURE(sweep_stale_segments);

// ---- liveness -------------------------------------------------------------------------------

BOOST_AUTO_TEST_CASE(proc_stat_fields_are_counted_after_the_last_parenthesis) {
    std::string fields;
    for (int f = 3; f <= 52; ++f) {
        fields += " " + (f == 3 ? std::string("S") : f == 22 ? std::string("4242") : std::to_string(f));
    }
    const auto parsed = vmmpp::detail::proc::parse_stat("77 (a) b (c) d)" + fields);
    BOOST_REQUIRE(parsed.has_value());
    BOOST_TEST(parsed->state == 'S');
    BOOST_TEST(parsed->start_time == 4242u);
    BOOST_TEST(!vmmpp::detail::proc::parse_stat("77 (cut) S 1 2 3").has_value());
    BOOST_TEST(!vmmpp::detail::proc::parse_stat("no parenthesis at all").has_value());
    std::string bad = fields;
    bad.replace(bad.find("4242"), 4, "42x2");
    BOOST_TEST(!vmmpp::detail::proc::parse_stat("77 (a)" + bad).has_value());
}

BOOST_AUTO_TEST_CASE(liveness_checks_pid_start_time_and_zombies) {
    const auto self = vmmpp::current_process_identity();
    BOOST_TEST(self.pid == ::getpid());
    BOOST_TEST(self.start_time > 0u);
    BOOST_TEST(vmmpp::is_process_running(self));
    // A live pid with another start time is an earlier process that had the pid: dead.
    BOOST_TEST(!vmmpp::is_process_running({self.pid, self.start_time + 1}));
    BOOST_TEST(!vmmpp::is_process_running({self.pid, self.start_time - 1}));
    BOOST_TEST(!vmmpp::is_process_running({0, 0}));

    const pid_t child = ::fork();
    BOOST_REQUIRE(child >= 0);
    if (child == 0) {
        ::pause();  // until killed
        ::_exit(0);
    }
    const auto fields = vmmpp::detail::proc::read_stat(child);
    BOOST_REQUIRE(fields.has_value());
    const vmmpp::process_identity id{child, fields->start_time};
    BOOST_TEST(vmmpp::is_process_running(id));
    ::kill(child, SIGKILL);
    siginfo_t info{};
    BOOST_REQUIRE(::waitid(P_PID, static_cast<id_t>(child), &info, WEXITED | WNOWAIT) == 0);
    BOOST_TEST(!vmmpp::is_process_running(id));  // a zombie: exited, not reaped
    int status = 0;
    BOOST_REQUIRE(::waitpid(child, &status, 0) == child);
    BOOST_TEST(!vmmpp::is_process_running(id));  // gone
}

BOOST_AUTO_TEST_CASE(the_image_tag_tells_this_image_from_an_earlier_one) {
    // SipHash-2-4, checked against the reference vector (key 00..0f, message 00..07).
    unsigned char key[16];
    for (unsigned char i = 0; i < 16; ++i) {
        key[i] = i;
    }
    BOOST_TEST(vmmpp::detail::proc::siphash24(key, 0x0706050403020100ull) == 0x93f5f5799a932462ull);
    const auto self = vmmpp::current_process_identity();
    BOOST_TEST(self.image != 0u);
    BOOST_TEST(vmmpp::current_process_identity().image == self.image);
    // This pid and start time under another tag: an image that exec replaced.
    BOOST_TEST(!vmmpp::is_process_running({self.pid, self.start_time, self.image ^ 1}));
    BOOST_TEST(vmmpp::is_process_running(self));
    // A child made by fork keeps the tag (it has a pid of its own).
    const auto child = in_child([&] { return vmmpp::current_process_identity().image == self.image ? 0 : 1; });
    BOOST_TEST(exited_ok(child.status), "the child " << describe(child.status));
}

BOOST_AUTO_TEST_CASE(a_record_with_a_live_pid_but_another_start_time_is_reclaimed) {
    scratch_name name("reuse");
    auto budget = process_budget::create(name.str(), 16 * page);
    const auto self = vmmpp::current_process_identity();
    auto real = budget.register_model("real", 8 * page);
    real.acquire(page);
    // A record of an earlier process that had this very pid: the pid is alive, the process is not.
    const vmmpp::process_identity ghost{self.pid, self.start_time + 1};
    auto fake = register_share(vmmpp_mp::attach_segment(budget.name()), "ghost", 8 * page, ghost);
    fake.acquire(3 * page);
    auto s = budget.stats();
    BOOST_TEST(s.committed == 4 * page);
    BOOST_TEST(s.usage.size() == 2u);
    check_invariants(s);

    BOOST_TEST(budget.reclaim_dead() == 3 * page);
    s = budget.stats();
    BOOST_TEST(s.committed == page);
    BOOST_TEST(model(s, "ghost").committed == 0u);
    BOOST_TEST(model(s, "ghost").peak == 3 * page);
    BOOST_TEST(model(s, "real").committed == page);  // the live identity keeps its share
    BOOST_REQUIRE(s.usage.size() == 1u);
    BOOST_TEST((s.usage[0].process == self));
    BOOST_TEST(s.reclaimed == 3 * page);
    BOOST_TEST(s.reclaimed_records == 1u);
    check_invariants(s);

    fake.release(3 * page);  // its record is gone: nothing happens
    BOOST_TEST(budget.stats().committed == page);
    BOOST_CHECK_THROW(fake.acquire(1), vmmpp::error);
    BOOST_TEST(budget.reclaim_dead() == 0u);
    real.release(page);
    BOOST_TEST(budget.stats().committed == 0u);
}

// ---- creation, attachment, permissions, validation -------------------------------------------

BOOST_AUTO_TEST_CASE(create_open_remove_and_permissions) {
    scratch_name name("perm");
    {
        auto created = process_budget::create(name.str(), 4 * page);
        BOOST_TEST(created.created());
        BOOST_TEST(created.name() == name.str());
        BOOST_TEST(created.limit() == 4 * page);
        BOOST_CHECK_THROW((void)process_budget::create(name.str(), 4 * page), vmmpp::invalid_argument);
        auto attached = process_budget::create_or_open(name.str(), 99 * page);  // the creator's limit holds
        BOOST_TEST(!attached.created());
        BOOST_TEST(attached.limit() == 4 * page);
        auto opened = process_budget::open(name.str().substr(1));  // the leading '/' is optional
        BOOST_TEST(opened.name() == name.str());
        BOOST_TEST(mode_of(name.str()) == 0600u);

        auto quota = attached.register_model("m", 4 * page);
        quota.acquire(page);
        BOOST_TEST(created.stats().committed == page);  // three handles, one budget
        BOOST_TEST(opened.stats().committed == page);

        BOOST_TEST(process_budget::remove(name.str()));
        BOOST_TEST(!process_budget::remove(name.str()));
        BOOST_CHECK_THROW((void)process_budget::open(name.str()), vmmpp::invalid_argument);
        quota.acquire(page);  // who is attached keeps the (unlinked) segment
        BOOST_TEST(created.stats().committed == 2 * page);
        quota.release(2 * page);
    }
    // The mode applies exactly, whatever the umask.
    const mode_t old_umask = ::umask(0077);
    {
        auto b = process_budget::create(name.str(), page, vmmpp::process_budget_options{.mode = 0640});
        BOOST_TEST(mode_of(name.str()) == 0640u);
    }
    ::umask(old_umask);
    BOOST_TEST(process_budget::remove(name.str()));
}

BOOST_AUTO_TEST_CASE(attach_rejects_what_is_not_a_budget_of_this_version) {
    scratch_name name("foreign");
    {
        // A shared memory object that something else made.
        const int fd = ::shm_open(name.str().c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
        BOOST_REQUIRE(fd >= 0);
        BOOST_REQUIRE(::ftruncate(fd, 4096) == 0);
        void* p = ::mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        BOOST_REQUIRE(p != MAP_FAILED);
        const std::uint64_t junk = 0x1234;
        std::memcpy(p, &junk, sizeof junk);
        ::munmap(p, 4096);
        ::close(fd);
        auto not_a_budget = [](const vmmpp::invalid_argument& e) {
            return message_has(e, "is not a vmmpp process budget");
        };
        BOOST_CHECK_EXCEPTION((void)process_budget::open(name.str()), vmmpp::invalid_argument, not_a_budget);
        BOOST_CHECK_EXCEPTION((void)process_budget::create_or_open(name.str(), page), vmmpp::invalid_argument,
                              not_a_budget);
        BOOST_TEST(process_budget::remove(name.str()));
    }
    {
        // A budget of another layout version.
        auto b = process_budget::create(name.str(), page);
        const auto segment = vmmpp_mp::attach_segment(b.name());  // a second mapping, to rewrite it
        auto& head = segment->head();
        head.version = vmmpp::detail::pb::version + 1;
        BOOST_CHECK_EXCEPTION((void)process_budget::open(name.str()), vmmpp::invalid_argument,
                              [](const vmmpp::invalid_argument& e) {
                                  return message_has(e, "layout version " + std::to_string(vmmpp::detail::pb::version + 1));
                              });
        head.version = vmmpp::detail::pb::version;
        BOOST_TEST(process_budget::open(name.str()).limit() == page);
        // One made in another pid namespace, where pids mean something else.
        head.pid_ns_ino += 1;
        BOOST_CHECK_EXCEPTION((void)process_budget::open(name.str()), vmmpp::invalid_argument,
                              [](const vmmpp::invalid_argument& e) { return message_has(e, "namespace"); });
        head.pid_ns_ino -= 1;
        BOOST_TEST(process_budget::open(name.str()).limit() == page);
        BOOST_TEST(process_budget::remove(name.str()));
    }
    {
        // One whose creator died before initialising it: the attacher gives up after its timeout.
        const int fd = ::shm_open(name.str().c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
        BOOST_REQUIRE(fd >= 0);
        ::close(fd);
        const auto start = std::chrono::steady_clock::now();
        BOOST_CHECK_EXCEPTION(
            (void)process_budget::open(name.str(), {.attach_timeout = std::chrono::milliseconds(50)}),
            vmmpp::invalid_argument, [](const vmmpp::invalid_argument& e) { return message_has(e, "initialised"); });
        BOOST_TEST((std::chrono::steady_clock::now() - start >= std::chrono::milliseconds(50)));
    }
}

// ---- trust: who owns a segment, who may write it, what an attached process reads of it ---------
// (A segment that someone else may write controls the processes attached to it: review F2.)

BOOST_AUTO_TEST_CASE(a_segment_that_others_may_write_is_refused_unless_accepted) {
    scratch_name name("shared-write");
    // Making one takes the opt-in too.
    BOOST_CHECK_THROW((void)process_budget::create(name.str(), page, {.mode = 0666}), vmmpp::invalid_argument);
    BOOST_CHECK_THROW((void)process_budget::create(name.str(), page, {.mode = 0620}), vmmpp::invalid_argument);
    BOOST_TEST(!process_budget::remove(name.str()));
    {
        auto made = process_budget::create(name.str(), 4 * page, {.mode = 0666, .allow_shared_write = true});
        BOOST_TEST(mode_of(name.str()) == 0666u);
        auto writable = [](const vmmpp::untrusted_segment& e) {
            return e.mode() == 0666 && e.owner_uid() == ::geteuid() && e.our_uid() == ::geteuid() &&
                   message_has(e, "may be written by its group or others") && message_has(e, "mode 0666");
        };
        BOOST_CHECK_EXCEPTION((void)process_budget::open(name.str()), vmmpp::untrusted_segment, writable);
        BOOST_CHECK_EXCEPTION((void)process_budget::create_or_open(name.str(), 99 * page), vmmpp::untrusted_segment,
                              writable);
        auto accepted = process_budget::open(name.str(), {.allow_shared_write = true});
        BOOST_TEST(accepted.limit() == 4 * page);
        auto joined = process_budget::create_or_open(name.str(), 99 * page, {.allow_shared_write = true});
        BOOST_TEST(!joined.created());
        BOOST_TEST(joined.limit() == 4 * page);
        BOOST_TEST(process_budget::remove(name.str()));
    }
    // One made 0600 and opened up afterwards (chmod) is refused too.
    auto made = process_budget::create(name.str(), 4 * page);
    const int fd = ::shm_open(name.str().c_str(), O_RDONLY, 0);
    BOOST_REQUIRE(fd >= 0);
    BOOST_REQUIRE(::fchmod(fd, 0620) == 0);
    ::close(fd);
    BOOST_CHECK_EXCEPTION((void)process_budget::open(name.str()), vmmpp::untrusted_segment,
                          [](const vmmpp::untrusted_segment& e) { return e.mode() == 0620; });
    BOOST_CHECK_EXCEPTION((void)process_budget::create_or_open(name.str(), page), vmmpp::untrusted_segment,
                          [](const vmmpp::untrusted_segment& e) { return e.mode() == 0620; });
    BOOST_TEST(process_budget::open(name.str(), {.allow_shared_write = true}).limit() == 4 * page);
}

BOOST_AUTO_TEST_CASE(a_segment_of_another_user_is_refused_unless_trusted,
                     *boost::unit_test::precondition(running_as_root)) {
    scratch_name name("owner");
    // Another user gets to the name first, with a limit of its choosing (mode 0600: root can open it).
    const auto squatter = in_child([&] {
        if (::setgid(other_user) != 0 || ::setuid(other_user) != 0) {
            return 10;
        }
        (void)process_budget::create(name.str(), page);
        return 0;
    });
    BOOST_REQUIRE_MESSAGE(exited_ok(squatter.status), "the child as uid " << other_user << " " << describe(squatter.status));
    auto foreign = [](const vmmpp::untrusted_segment& e) {
        return e.owner_uid() == other_user && e.our_uid() == ::geteuid() && e.mode() == 0600 &&
               message_has(e, "is owned by another user") && message_has(e, "owner uid 65534");
    };
    BOOST_CHECK_EXCEPTION((void)process_budget::open(name.str()), vmmpp::untrusted_segment, foreign);
    // create_or_open finds the name taken: it refuses instead of joining the squatter's budget.
    BOOST_CHECK_EXCEPTION((void)process_budget::create_or_open(name.str(), 64 * page), vmmpp::untrusted_segment,
                          foreign);
    // Nor does root remove another user's segment by name.
    BOOST_CHECK_EXCEPTION((void)process_budget::remove(name.str()), vmmpp::untrusted_segment, foreign);
    BOOST_TEST(mode_of(name.str()) == 0600u);  // still there
    // Trusted by name, it is a budget like any other.
    const vmmpp::process_budget_options trusting{.trusted_owners = {other_user}};
    auto trusted = process_budget::open(name.str(), trusting);
    BOOST_TEST(trusted.limit() == page);
    BOOST_TEST(!process_budget::create_or_open(name.str(), 64 * page, trusting).created());
    BOOST_TEST(process_budget::remove(name.str(), trusting));
}

BOOST_AUTO_TEST_CASE(a_rewritten_layout_never_moves_reads_or_writes_outside_the_mapping) {
    scratch_name name("layout");
    auto budget = process_budget::create(name.str(), 16 * page, {.max_models = 4, .max_records = 8});
    auto mine = budget.register_model("parent", 8 * page);
    mine.acquire(page);
    // A record of a live process (this one's parent) whose model index will be rewritten.
    const auto parent = vmmpp::detail::proc::read_stat(::getppid());
    BOOST_REQUIRE(parent.has_value());
    auto stray = register_share(vmmpp_mp::attach_segment(budget.name()), "stray", 8 * page,
                                {::getppid(), parent->start_time});
    // A second mapping of the object, as another writer of it would have.
    const std::size_t bytes = vmmpp::detail::pb::total_bytes(4, 8);
    const int fd = ::shm_open(name.str().c_str(), O_RDWR, 0);
    BOOST_REQUIRE(fd >= 0);
    void* raw = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    ::close(fd);
    BOOST_REQUIRE(raw != MAP_FAILED);
    auto& head = *static_cast<vmmpp::detail::pb::header*>(raw);
    auto& stray_record = reinterpret_cast<vmmpp::detail::pb::record_slot*>(
        static_cast<std::byte*>(raw) + vmmpp::detail::pb::records_offset(4))[stray.record()];
    const auto honest_head = std::make_tuple(head.max_models, head.max_records, head.models_offset,
                                             head.records_offset, head.total_bytes);
    const std::uint64_t honest_model = stray_record.model;
    auto rewrite = [&] {
        head.max_models = 0xffffffffu;
        head.max_records = 0xffffffffu;
        head.models_offset = std::uint64_t{1} << 40;
        head.records_offset = std::uint64_t{1} << 41;
        head.total_bytes = ~std::uint64_t{0};
        stray_record.model = std::uint64_t{1} << 60;
    };
    auto restore = [&] {
        std::tie(head.max_models, head.max_records, head.models_offset, head.records_offset, head.total_bytes) =
            honest_head;
        stray_record.model = honest_model;
    };
    // Each victim attaches while the layout is honest and holds a page; then the layout is
    // rewritten under it and it makes its call. It must end normally, not by SIGSEGV or SIGBUS.
    auto victim = [&](const char* what, auto call) {
        const auto r = in_child([&] {
            // No watcher thread: one started in a child forked from a threaded parent ends it under TSan.
            auto b = process_budget::open(name.str(), {.reclaim_watch = false});
            auto q = b.register_model("victim", 8 * page);
            q.acquire(page);
            rewrite();
            return call(b, q);
        });
        restore();
        BOOST_TEST(exited_ok(r.status), what << ": the victim " << describe(r.status));
        budget.reclaim_dead();
    };
    victim("stats", [](process_budget& b, vmmpp::process_quota&) {
        const auto s = b.stats();  // the stray record points at no model: left out
        return s.max_models == 4 && s.max_records == 8 && s.usage.size() == 2 && s.committed == 2 * page ? 0 : 1;
    });
    victim("acquire", [](process_budget&, vmmpp::process_quota& q) {
        q.acquire(2 * page);
        q.release(page);
        return q.process_committed() == 2 * page && q.stats().committed == 2 * page ? 0 : 1;
    });
    victim("reclaim_dead", [](process_budget& b, vmmpp::process_quota&) { return b.reclaim_dead() == 0 ? 0 : 1; });
    victim("register_model", [](process_budget& b, vmmpp::process_quota&) {
        auto late = b.register_model("late", page);
        late.acquire(page);
        return late.process_committed() == page ? 0 : 1;
    });
    victim("open", [&](process_budget&, vmmpp::process_quota&) {
        try {
            (void)process_budget::open(name.str());  // a new attacher checks the layout it reads
        } catch (const vmmpp::invalid_argument& e) {
            return message_has(e, "laid out for another ABI") ? 0 : 1;
        }
        return 2;
    });
    victim("repair", [&](process_budget& b, vmmpp::process_quota&) {
        // A process dies holding the lock (taken through the raw mapping, whose header holds the
        // mutex): the next lock repairs the totals over the tables.
        const pid_t holder = ::fork();
        if (holder == 0) {
            vmmpp::detail::robust_mutex<> lock(head.mutex, {}, "the test's mapping");
            lock.lock();
            ::raise(SIGKILL);
        }
        int status = 0;
        ::waitpid(holder, &status, 0);
        const auto s = b.stats();
        return s.repairs == 1 && s.committed == 2 * page ? 0 : 1;  // the stray record was freed
    });
    ::munmap(raw, bytes);
    const auto s = budget.stats();
    BOOST_TEST(s.committed == page);
    BOOST_TEST(mine.process_committed() == page);
    check_invariants(s);
}

BOOST_AUTO_TEST_CASE(a_handle_removes_only_its_own_segment) {
    scratch_name name("unlink");
    auto first = process_budget::create(name.str(), page);
    BOOST_TEST(process_budget::remove(name.str()));
    auto second = process_budget::create(name.str(), 2 * page);  // another segment, the same name
    BOOST_TEST(!first.remove());                                 // not first's any more: left alone
    BOOST_TEST(process_budget::open(name.str()).limit() == 2 * page);
    BOOST_TEST(second.remove());
    BOOST_TEST(!second.remove());
    BOOST_CHECK_THROW((void)process_budget::open(name.str()), vmmpp::invalid_argument);
}

BOOST_AUTO_TEST_CASE(names_and_limits_are_checked) {
    scratch_name name("names");
    BOOST_CHECK_THROW((void)process_budget::create("", page), vmmpp::invalid_argument);
    BOOST_CHECK_THROW((void)process_budget::create("/a/b", page), vmmpp::invalid_argument);
    BOOST_CHECK_THROW((void)process_budget::create(std::string(300, 'x'), page), vmmpp::invalid_argument);
    BOOST_CHECK_THROW((void)process_budget::create(name.str(), 0), vmmpp::invalid_argument);
    BOOST_CHECK_THROW((void)process_budget::create(name.str(), page, {.max_models = 0}), vmmpp::invalid_argument);
    BOOST_CHECK_THROW((void)process_budget::create(name.str(), page, {.mode = 01777}), vmmpp::invalid_argument);
    BOOST_TEST(!process_budget::remove(name.str()));  // nothing was left behind

    auto budget = process_budget::create(name.str(), 8 * page);
    BOOST_CHECK_THROW((void)budget.register_model("", page), vmmpp::invalid_argument);
    BOOST_CHECK_THROW((void)budget.register_model(std::string(64, 'm'), page), vmmpp::invalid_argument);
    BOOST_CHECK_THROW((void)budget.register_model("x", 0), vmmpp::invalid_argument);
    auto longest = budget.register_model(std::string(63, 'm'), page);
    BOOST_TEST(longest.stats().name == std::string(63, 'm'));

    // A second registration joins the model; it must state the same limit.
    auto x1 = budget.register_model("x", 4 * page);
    BOOST_CHECK_THROW((void)budget.register_model("x", 5 * page), vmmpp::invalid_argument);
    auto x2 = budget.register_model("x", 4 * page);
    x1.acquire(page);
    x2.acquire(page);
    BOOST_TEST(x1.process_committed() == 2 * page);  // one record: this process's share of x
    BOOST_TEST(x2.stats().committed == 2 * page);
    BOOST_TEST(budget.stats().usage.size() == 2u);  // x, and the 63-character model
    x1.release(2 * page);
    BOOST_TEST(x2.process_committed() == 0u);
}

BOOST_AUTO_TEST_CASE(full_tables_refuse_and_dead_records_make_room) {
    scratch_name name("full");
    auto budget = process_budget::create(name.str(), 8 * page, {.max_models = 2, .max_records = 3});
    const auto self = vmmpp::current_process_identity();
    const auto parent = vmmpp::detail::proc::read_stat(::getppid());
    BOOST_REQUIRE(parent.has_value());
    auto a = budget.register_model("a", 4 * page);                                               // record 1
    const auto segment = vmmpp_mp::attach_segment(budget.name());
    auto live = register_share(segment, "b", 4 * page, {::getppid(), parent->start_time});  // record 2
    auto ghost = register_share(segment, "a", 4 * page, {self.pid, self.start_time + 7});   // record 3
    ghost.acquire(page);
    BOOST_CHECK_EXCEPTION((void)budget.register_model("c", page), vmmpp::error,
                          [](const vmmpp::error& e) { return message_has(e, "model slots"); });
    // The record table is full; registering frees the dead process's record to make room.
    auto b = budget.register_model("b", 4 * page);
    auto s = budget.stats();
    BOOST_TEST(s.reclaimed == page);
    BOOST_TEST(s.committed == 0u);
    BOOST_TEST(s.usage.size() == 3u);
    // Full of live processes: refused.
    BOOST_CHECK_EXCEPTION((void)register_share(segment, "a", 4 * page, {self.pid, self.start_time + 8}),
                          vmmpp::error, [](const vmmpp::error& e) { return message_has(e, "no free usage record"); });
    BOOST_TEST(budget.stats().usage.size() == 3u);
}

// ---- one process ------------------------------------------------------------------------------

BOOST_AUTO_TEST_CASE(acquire_and_release_follow_shared_budget) {
    scratch_name name("semantics");
    auto budget = process_budget::create(name.str(), 10 * page);
    auto a = budget.register_model("a", 4 * page);
    auto b = budget.register_model("b", 8 * page);
    a.acquire(4 * page);
    BOOST_CHECK_EXCEPTION(a.acquire(1), vmmpp::over_quota, [](const vmmpp::over_quota& e) {
        return e.which() == "model a" && e.requested() == 1 && e.in_use() == 4 * page && e.limit() == 4 * page;
    });
    b.acquire(6 * page);
    BOOST_CHECK_EXCEPTION(b.acquire(1), vmmpp::over_quota, [](const vmmpp::over_quota& e) {
        return e.which() == "global" && e.in_use() == 10 * page && e.limit() == 10 * page;
    });
    auto s = budget.stats();
    BOOST_TEST(s.committed == 10 * page);
    BOOST_TEST(s.peak == 10 * page);
    BOOST_TEST(s.denied == 2u);
    BOOST_TEST(model(s, "a").denied == 1u);
    BOOST_TEST(model(s, "b").denied == 1u);
    BOOST_TEST(model(s, "b").committed == 6 * page);  // the refusals changed nothing
    check_invariants(s);
    a.release(100 * page);  // more than it holds: gives back what it holds
    BOOST_TEST(a.stats().committed == 0u);
    BOOST_TEST(budget.stats().committed == 6 * page);
    b.release(6 * page);
    s = budget.stats();
    BOOST_TEST(s.committed == 0u);
    BOOST_TEST(s.peak == 10 * page);
    BOOST_TEST(model(s, "a").peak == 4 * page);
}

BOOST_AUTO_TEST_CASE(threads_of_one_process_share_the_budget) {
    scratch_name name("threads");
    auto budget = process_budget::create(name.str(), 12 * page);
    auto t = budget.register_model("t", 8 * page);
    auto u = budget.register_model("u", 8 * page);
    std::atomic<bool> stop{false};
    std::atomic<std::size_t> refusals{0};
    std::atomic<std::size_t> violations{0};
    std::atomic<unsigned> started{0};
    std::atomic<unsigned> finished{0};
    std::vector<std::thread> workers;
    for (unsigned w = 0; w < 4; ++w) {
        workers.emplace_back([&, w] {
            auto pool = vmmpp_mp::make_pool(6, w % 2 == 0 ? t : u);
            std::mt19937 rng(w);
            std::vector<std::size_t> held;
            ++started;
            while (started.load() < 4) {  // all at once, so that they contend
                std::this_thread::yield();
            }
            for (int i = 0; i < 4000; ++i) {
                if (held.size() >= 4 || (!held.empty() && rng() % 2 == 0)) {  // at most 4 holds: churn
                    pool->release(held.back() * page, page);
                    held.pop_back();
                    continue;
                }
                const std::size_t p = rng() % 6;
                try {
                    pool->ensure_committed(p * page, page);
                    held.push_back(p);
                } catch (const vmmpp::over_quota&) {
                    ++refusals;
                }
            }
            // Every pool wants all its 6 pages at once: 24 pages against a limit of 12, so at
            // least two are refused whatever the interleaving.
            bool whole = false;
            try {
                pool->ensure_committed(0, 6 * page);
                whole = true;
            } catch (const vmmpp::over_quota&) {
                ++refusals;
            }
            ++finished;
            while (finished.load() < 4) {
                std::this_thread::yield();
            }
            if (whole) {
                pool->release(0, 6 * page);
            }
            for (std::size_t p : held) {
                pool->release(p * page, page);
            }
        });
    }
    std::thread sampler([&] {
        while (!stop) {
            const auto s = budget.stats();
            std::size_t models = 0;
            for (const auto& m : s.models) {
                models += m.committed;
            }
            if (s.committed > s.limit || s.peak > s.limit || models != s.committed) {
                ++violations;
            }
            std::this_thread::yield();
        }
    });
    for (auto& w : workers) {
        w.join();
    }
    stop = true;
    sampler.join();
    const auto s = budget.stats();
    BOOST_TEST_MESSAGE("refusals " << refusals.load());
    BOOST_TEST(violations.load() == 0u);
    BOOST_TEST(s.denied >= 2u);  // the limits did bite
    BOOST_TEST(s.committed == 0u);
    BOOST_TEST(t.process_committed() == 0u);
    BOOST_TEST(u.process_committed() == 0u);
    check_invariants(s);
    BOOST_TEST(s.denied == model(s, "t").denied + model(s, "u").denied);
}

BOOST_AUTO_TEST_CASE(a_forked_child_cannot_charge_its_parent) {
    scratch_name name("fork");
    auto budget = process_budget::create(name.str(), 4 * page);
    auto quota = budget.register_model("m", 4 * page);
    quota.acquire(page);
    const pid_t child = ::fork();
    BOOST_REQUIRE(child >= 0);
    if (child == 0) {
        int code = 1;
        try {
            quota.acquire(page);
        } catch (const vmmpp::invalid_argument&) {
            code = 0;
        } catch (...) {
            code = 2;
        }
        quota.release(page);  // does nothing: the bytes are the parent's
        ::_exit(code);
    }
    int status = 0;
    BOOST_REQUIRE(::waitpid(child, &status, 0) == child);
    BOOST_TEST(exited_ok(status));
    BOOST_TEST(budget.stats().committed == page);
    quota.release(page);
    BOOST_TEST(budget.stats().committed == 0u);
}

BOOST_AUTO_TEST_CASE(a_forked_child_registers_through_the_inherited_handle) {
    scratch_name name("fork-register");
    auto budget = process_budget::create(name.str(), 8 * page);
    auto quota = budget.register_model("m", 8 * page);
    quota.acquire(page);
    const auto child = in_child([&] {
        // Held until _exit, as by a process that dies holding them (a quota that goes frees its record).
        auto* again = new vmmpp::process_quota(budget.register_model("m", 8 * page));  // its own record
        again->acquire(2 * page);
        auto* only = new vmmpp::process_quota(budget.register_model("child-only", page));
        only->acquire(page);
        return again->process_committed() == 2 * page && quota.process_committed() == page ? 0 : 1;
    });
    BOOST_TEST(exited_ok(child.status), "the child " << describe(child.status));
    auto s = budget.stats();  // the child is dead, not yet reclaimed: its records show whose they are
    BOOST_TEST(usage_of(s, ::getpid()) == page);
    BOOST_TEST(usage_of(s, child.pid) == 3 * page);
    for (const auto& u : s.usage) {
        if (u.model == "child-only") {
            BOOST_TEST(u.process.pid == child.pid);
        }
    }
    check_invariants(s);
    BOOST_TEST(budget.reclaim_dead() == 3 * page);
    BOOST_TEST(quota.process_committed() == page);
    quota.release(page);
    BOOST_TEST(budget.stats().committed == 0u);
}

BOOST_AUTO_TEST_CASE(unload_and_reload_a_model_in_a_loop_frees_the_record_and_keeps_the_tables_flat) {
    scratch_name name("reload");
    auto budget = process_budget::create(name.str(), 16 * page, {.max_models = 4, .max_records = 4});
    auto resident = budget.register_model("resident", 4 * page);
    resident.acquire(page);
    for (int round = 0; round < 100; ++round) {
        // A reload after remove_model may state another limit.
        const std::size_t limit = (4 + round % 4) * page;
        {
            auto quota = budget.register_model("llama", limit);
            auto copy = quota;  // a pool holds a copy: the record goes with the last of them
            copy.acquire(page);
            quota.acquire(page);
            auto s = budget.stats();
            BOOST_TEST_REQUIRE(s.models.size() == 2u);
            BOOST_TEST(model(s, "llama").limit == limit);
            BOOST_TEST(usage_of(s, ::getpid()) == 3 * page);
            BOOST_TEST(s.usage.size() == 2u);
            quota.release(2 * page);
        }
        auto s = budget.stats();
        BOOST_TEST(s.usage.size() == 1u);  // this process's record of llama is freed
        BOOST_TEST(s.committed == page);
        check_invariants(s);
        if (round % 2 == 0) {
            // Unloaded with the same limit: the slot stays and the next registration joins it.
            BOOST_TEST(s.models.size() == 2u);
            BOOST_TEST(model(s, "llama").committed == 0u);
        }
        BOOST_TEST(budget.remove_model("llama"));  // no live process holds it any more
        s = budget.stats();
        BOOST_TEST(s.models.size() == 1u);
        BOOST_TEST(s.committed == page);
    }
    // A quota dropped while still charged gives its bytes back with the record.
    {
        auto leaky = budget.register_model("leaky", 4 * page);
        leaky.acquire(2 * page);
    }
    auto s = budget.stats();
    BOOST_TEST(s.committed == page);
    BOOST_TEST(model(s, "leaky").committed == 0u);
    check_invariants(s);
    resident.release(page);
}

BOOST_AUTO_TEST_CASE(a_forked_child_dropping_an_inherited_quota_leaves_the_parents_record) {
    scratch_name name("fork-drop");
    auto budget = process_budget::create(name.str(), 8 * page);
    auto quota = std::make_unique<vmmpp::process_quota>(budget.register_model("m", 8 * page));
    quota->acquire(page);
    const auto child = in_child([&] {
        quota.reset();  // the child's copy of the parent's last quota
        return 0;
    });
    BOOST_TEST(exited_ok(child.status), "the child " << describe(child.status));
    BOOST_TEST(usage_of(budget.stats(), ::getpid()) == page);
    BOOST_TEST(quota->process_committed() == page);
    quota->release(page);
}

BOOST_AUTO_TEST_CASE(an_exec_gives_back_what_the_old_image_held) {
    scratch_name name("exec");
    auto budget = process_budget::create(name.str(), 8 * page);
    auto helper = start_helper(name.str(), "m", 8 * page, 8);
    BOOST_TEST(helper->ask("hold 0 3") == "ok " + std::to_string(3 * page));
    BOOST_TEST(usage_of(budget.stats(), helper->pid()) == 3 * page);
    // The helper execs itself: the same pid and start time, a new image (the old one's memory is
    // gone). Attaching again, the new image takes the old image's charge back.
    helper->send("exec");
    BOOST_TEST(helper->read_line() == "ready " + std::to_string(helper->pid()));
    BOOST_TEST(helper->ask("committed") == "committed 0 0");
    auto s = budget.stats();
    BOOST_TEST(s.committed == 0u);
    BOOST_TEST(s.reclaimed == 3 * page);
    BOOST_TEST(s.reclaimed_records == 1u);
    BOOST_TEST(usage_of(s, helper->pid()) == 0u);
    check_invariants(s);
    // The new image's own record is that of a live process.
    BOOST_TEST(helper->ask("hold 0 2") == "ok " + std::to_string(2 * page));
    BOOST_TEST(budget.reclaim_dead() == 0u);
    BOOST_TEST(usage_of(budget.stats(), helper->pid()) == 2 * page);
    BOOST_TEST(helper->ask("exit") == "bye");
    BOOST_TEST(exited_ok(helper->wait()));
    BOOST_TEST(budget.stats().committed == 0u);
}

// ---- several processes --------------------------------------------------------------------------

BOOST_AUTO_TEST_CASE(two_processes_draw_from_one_global_limit) {
    scratch_name name("two");
    auto budget = process_budget::create(name.str(), 8 * page);
    auto a = start_helper(name.str(), "a", 6 * page, 16);
    auto b = start_helper(name.str(), "b", 8 * page, 16);
    BOOST_TEST(a->ask("hold 0 6") == "ok " + std::to_string(6 * page));
    // b gets what the global limit leaves, and is refused by it while a holds its share.
    BOOST_TEST(b->ask("hold_pages 0 4") == "held 2 refused " + refused(page, 8 * page, 8 * page, "global"));
    auto s = budget.stats();
    BOOST_TEST(s.committed == 8 * page);
    BOOST_TEST(model(s, "a").committed == 6 * page);
    BOOST_TEST(model(s, "b").committed == 2 * page);
    BOOST_TEST(model(s, "a").denied == 0u);
    BOOST_TEST(model(s, "b").denied == 1u);
    BOOST_TEST(s.denied == 1u);
    BOOST_TEST(usage_of(s, a->pid()) == 6 * page);
    BOOST_TEST(usage_of(s, b->pid()) == 2 * page);
    check_invariants(s);
    // A model's own limit refuses before the global one.
    BOOST_TEST(a->ask("hold 6 1") == "refused " + refused(page, 6 * page, 6 * page, "model a"));
    BOOST_TEST(b->ask("committed") == "committed " + std::to_string(2 * page) + " " + std::to_string(2 * page));

    // a lets go; b takes the room.
    BOOST_TEST(a->ask("release 0 6") == "ok 0");
    BOOST_TEST(b->ask("hold_pages 2 4") == "held 4 ok");
    s = budget.stats();
    BOOST_TEST(s.committed == 6 * page);
    BOOST_TEST(model(s, "a").committed == 0u);
    BOOST_TEST(model(s, "b").committed == 6 * page);
    // A hold of 3 pages with room for 2 is refused whole: the pool gives back the 2 it took.
    BOOST_TEST(b->ask("hold 6 3") == "refused " + refused(page, 8 * page, 8 * page, "model b"));
    BOOST_TEST(budget.stats().committed == 6 * page);

    BOOST_TEST(a->ask("exit") == "bye");
    BOOST_TEST(b->ask("exit") == "bye");
    BOOST_TEST(exited_ok(a->wait()));
    BOOST_TEST(exited_ok(b->wait()));
    s = budget.stats();
    BOOST_TEST(s.committed == 0u);
    BOOST_TEST(s.peak == 8 * page);
    BOOST_TEST(s.denied == 3u);
    BOOST_TEST(model(s, "a").peak == 6 * page);
    BOOST_TEST(model(s, "a").denied == 1u);
    BOOST_TEST(model(s, "b").peak == 8 * page);
    BOOST_TEST(model(s, "b").denied == 2u);
    BOOST_TEST(s.reclaimed == 0u);  // both gave everything back themselves
    check_invariants(s);
    // Their records went with their last quotas (the pools), not as records of the dead.
    BOOST_TEST(s.usage.empty());
    BOOST_TEST(budget.reclaim_dead() == 0u);
    BOOST_TEST(budget.stats().reclaimed_records == 0u);
}

BOOST_AUTO_TEST_CASE(a_killed_process_gives_its_share_back) {
    scratch_name name("kill");
    auto budget = process_budget::create(name.str(), 8 * page);
    auto mine = vmmpp_mp::make_pool(8, budget.register_model("parent", 8 * page));
    mine->ensure_committed(0, page);
    auto victim = start_helper(name.str(), "victim", 8 * page, 8);
    BOOST_TEST(victim->ask("hold 0 5") == "ok " + std::to_string(5 * page));
    BOOST_TEST(budget.stats().committed == 6 * page);

    victim->signal(SIGKILL);
    victim->wait_exited_unreaped();  // dead, but a zombie: its pid is not free yet
    BOOST_TEST(budget.reclaim_dead() == 5 * page);
    auto s = budget.stats();
    BOOST_TEST(s.committed == page);  // back to what it was before the victim came
    BOOST_TEST(model(s, "victim").committed == 0u);
    BOOST_TEST(model(s, "victim").peak == 5 * page);
    BOOST_TEST(s.reclaimed == 5 * page);
    BOOST_TEST(s.reclaimed_records == 1u);
    BOOST_REQUIRE(s.usage.size() == 1u);
    BOOST_TEST((s.usage[0].process == vmmpp::current_process_identity()));
    check_invariants(s);
    BOOST_TEST(killed_by(victim->wait(), SIGKILL));
    BOOST_TEST(budget.reclaim_dead() == 0u);
    mine->release(0, page);
    BOOST_TEST(budget.stats().committed == 0u);
}

BOOST_AUTO_TEST_CASE(a_refused_acquire_reclaims_the_dead_and_tries_again) {
    scratch_name name("refused");
    auto budget = process_budget::create(name.str(), 8 * page);
    auto mine = vmmpp_mp::make_pool(8, budget.register_model("parent", 8 * page));
    auto hog = start_helper(name.str(), "hog", 8 * page, 8);
    BOOST_TEST(hog->ask("hold 0 8") == "ok " + std::to_string(8 * page));
    BOOST_CHECK_EXCEPTION(mine->ensure_committed(0, page), vmmpp::over_quota,
                          [](const vmmpp::over_quota& e) { return e.which() == "global"; });
    hog->signal(SIGKILL);
    BOOST_TEST(killed_by(hog->wait(), SIGKILL));
    mine->ensure_committed(0, 2 * page);  // refused at first, then the hog's share comes back
    const auto s = budget.stats();
    BOOST_TEST(s.committed == 2 * page);
    BOOST_TEST(s.reclaimed == 8 * page);
    BOOST_TEST(s.denied == 1u);  // only the refusal while the hog lived
    check_invariants(s);
}

BOOST_AUTO_TEST_CASE(attaching_reclaims_the_dead) {
    scratch_name name("attach");
    auto budget = process_budget::create(name.str(), 8 * page);
    auto victim = start_helper(name.str(), "victim", 8 * page, 8);
    BOOST_TEST(victim->ask("hold 0 3") == "ok " + std::to_string(3 * page));
    victim->signal(SIGKILL);
    BOOST_TEST(killed_by(victim->wait(), SIGKILL));
    BOOST_TEST(budget.stats().committed == 3 * page);  // nobody has looked yet
    auto again = process_budget::open(name.str());
    const auto s = budget.stats();
    BOOST_TEST(s.committed == 0u);
    BOOST_TEST(s.reclaimed == 3 * page);
    BOOST_TEST(s.usage.empty());
}

BOOST_AUTO_TEST_CASE(a_process_killed_holding_the_lock_leaves_a_repairable_budget) {
    scratch_name name("ownerdead");
    auto budget = process_budget::create(name.str(), 8 * page);
    auto victim = start_helper(name.str(), "victim", 8 * page, 8);
    BOOST_TEST(victim->ask("hold 0 2") == "ok " + std::to_string(2 * page));
    // It takes the lock, updates the totals but not its record (half an update), and dies.
    victim->send("die_holding_lock 1000");
    BOOST_TEST(killed_by(victim->wait(), SIGKILL));
    auto s = budget.stats();  // the lock reports EOWNERDEAD: the totals are rebuilt from the records
    BOOST_TEST(s.repairs == 1u);
    BOOST_TEST(s.committed == 2 * page);
    BOOST_TEST(model(s, "victim").committed == 2 * page);
    check_invariants(s);
    BOOST_TEST(budget.reclaim_dead() == 2 * page);
    // The lock works as before.
    auto quota = budget.register_model("after", 8 * page);
    quota.acquire(8 * page);
    quota.release(8 * page);
    s = budget.stats();
    BOOST_TEST(s.committed == 0u);
    BOOST_TEST(s.repairs == 1u);
}

BOOST_AUTO_TEST_CASE(many_processes_and_threads_hammer_one_budget) {
    scratch_name name("hammer");
    // Three processes of two threads, each thread a pool of 8 pages: 48 pages wanted, each
    // model allowed 6, all together 12.
    auto budget = process_budget::create(name.str(), 12 * page);
    std::vector<std::unique_ptr<vmmpp_mp::child_process>> children;
    const unsigned seed = std::random_device{}();
    BOOST_TEST_MESSAGE("seed " << seed);
    for (int i = 0; i < 3; ++i) {
        children.push_back(start_helper(name.str(), "m" + std::to_string(i), 6 * page, 8));
    }
    for (std::size_t i = 0; i < children.size(); ++i) {
        children[i]->send("hammer 2 2000 " + std::to_string(seed + i));
    }
    std::vector<std::string> answers(children.size());
    std::size_t samples = 0;
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(240);
    for (std::size_t done = 0; done < children.size();) {
        BOOST_REQUIRE(std::chrono::steady_clock::now() < deadline);
        const auto s = budget.stats();  // consistent at every moment
        ++samples;
        BOOST_TEST_REQUIRE(s.committed <= s.limit);
        check_invariants(s);
        for (std::size_t i = 0; i < children.size(); ++i) {
            if (answers[i].empty()) {
                if (auto line = children[i]->poll_line(std::chrono::milliseconds(1))) {
                    answers[i] = *line;
                    ++done;
                }
            }
        }
    }
    BOOST_TEST_MESSAGE("samples " << samples);
    for (std::size_t i = 0; i < children.size(); ++i) {
        BOOST_TEST_MESSAGE("m" << i << ": " << answers[i]);
        BOOST_TEST(answers[i].rfind("done ", 0) == 0u);
        BOOST_TEST(answers[i].substr(answers[i].rfind(' ')) == " 0");
        BOOST_TEST(children[i]->ask("exit") == "bye");
        BOOST_TEST(exited_ok(children[i]->wait()));
    }
    const auto s = budget.stats();
    BOOST_TEST(s.committed == 0u);
    BOOST_TEST(s.reclaimed == 0u);
    std::size_t denied = 0;
    for (const auto& m : s.models) {
        denied += m.denied;
    }
    BOOST_TEST(s.denied == denied);
    BOOST_TEST(s.denied > 0u);  // the limits did bite
    BOOST_TEST(s.peak <= s.limit);
    check_invariants(s);
}

// ---- reclaim requests across processes ------------------------------------------------------------

namespace {

/// Options for the test process, the one that asks: a wait far above what an answer takes even
/// under a sanitizer, since the wait ends as soon as every process asked has answered.
vmmpp::process_budget_options asking_options() {
    vmmpp::process_budget_options o;
    o.reclaim_wait = std::chrono::seconds(10);
    return o;
}

/// Starts a helper for `model` with 8 spare pages ("nowatch": without the watcher) that holds 8
/// pages, then (with `release`) lets them go: they stay committed as its spares. After this it
/// is sent nothing until the test has checked what it gave back.
std::unique_ptr<vmmpp_mp::child_process> idle_helper(const std::string& segment, const std::string& model,
                                                     bool release, bool watch = true) {
    std::vector<std::string> args{VMMPP_MP_HELPER, segment, model, std::to_string(12 * page), "16", "8"};
    if (!watch) {
        args.emplace_back("nowatch");
    }
    auto child = std::make_unique<vmmpp_mp::child_process>(args);
    BOOST_REQUIRE_EQUAL(child->read_line(), "ready " + std::to_string(child->pid()));
    BOOST_REQUIRE_EQUAL(child->ask("hold 0 8"), "ok " + std::to_string(8 * page));
    if (release) {
        BOOST_REQUIRE_EQUAL(child->ask("release 0 8"), "ok " + std::to_string(8 * page));  // 8 spares
    }
    return child;
}

double ms_since(std::chrono::steady_clock::time_point t) {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t).count();
}

} // namespace

// The case: process a went idle holding spares and makes no call; this process needs
// them. Its commit is refused by the global limit, asks, and a's watcher gives them back.
BOOST_AUTO_TEST_CASE(an_idle_process_gives_its_spares_back_to_a_refused_one) {
    scratch_name name("ask");
    auto budget = process_budget::create(name.str(), 12 * page, asking_options());
    auto a = idle_helper(name.str(), "a", true);
    BOOST_TEST(usage_of(budget.stats(), a->pid()) == 8 * page);

    auto pool = vmmpp_mp::make_pool(16, budget.register_model("b", 12 * page));
    const auto t0 = std::chrono::steady_clock::now();
    BOOST_CHECK_NO_THROW(pool->ensure_committed(0, 8 * page));  // 4 pages were free
    const double took = ms_since(t0);
    BOOST_TEST_MESSAGE("granted after " << took << " ms");
    BOOST_TEST(took < 5000.0);  // well inside the wait (an answer takes about a millisecond)
    BOOST_TEST(pool->committed_bytes() == 8 * page);

    const auto s = budget.stats();
    BOOST_TEST(usage_of(s, a->pid()) == 0u);  // a's spares went back, with no call of a's
    BOOST_TEST(model(s, "a").committed == 0u);
    BOOST_TEST(model(s, "a").spares == 0u);
    BOOST_TEST(model(s, "a").reclaimed == 8 * page);
    BOOST_TEST(model(s, "a").reclaims == 1u);
    BOOST_TEST(model(s, "b").committed == 8 * page);
    // Usually one request and one grant. On a loaded machine (CI: 2 cores, sanitizers) a's watcher
    // may find its pool busy the first time and answer with nothing (a busy pool is skipped, not
    // waited for); the refused commit then asks again.
    BOOST_TEST(s.reclaim_requests >= 1u);
    BOOST_TEST(s.request_grants >= 1u);
    BOOST_TEST(s.request_grants <= s.reclaim_requests);
    BOOST_TEST(s.request_reclaimed == 8 * page);
    BOOST_TEST(model(s, "b").denied >= 1u);  // the refusal(s) before it asked
    check_invariants(s);

    BOOST_TEST(a->ask("committed") == "committed 0 0");
    BOOST_TEST(a->ask("hold 0 4") == "ok " + std::to_string(4 * page));  // what is left; a's pool works on
    pool.reset();
    BOOST_TEST(a->ask("exit") == "bye");
    BOOST_TEST(exited_ok(a->wait()));
    BOOST_TEST(budget.stats().committed == 0u);
}

// When what the others hold is live (no spares), they answer with nothing and the refusal comes
// as before: over_quota with the usual message, long before the wait is up.
BOOST_AUTO_TEST_CASE(a_request_is_refused_cleanly_when_the_others_hold_no_spares) {
    scratch_name name("ask-live");
    auto budget = process_budget::create(name.str(), 12 * page, asking_options());
    auto a = idle_helper(name.str(), "a", false);  // 8 pages live

    auto pool = vmmpp_mp::make_pool(16, budget.register_model("b", 12 * page));
    const auto t0 = std::chrono::steady_clock::now();
    try {
        pool->ensure_committed(0, 8 * page);
        BOOST_FAIL("committed 8 pages with 4 free and no spares anywhere");
    } catch (const vmmpp::over_quota& e) {
        BOOST_TEST(e.which() == "global");
        BOOST_TEST(e.limit() == 12 * page);
        BOOST_TEST(std::string(e.what()) ==
                   vmmpp::over_quota("global", e.requested(), e.in_use(), 12 * page).what());
    }
    const double took = ms_since(t0);
    BOOST_TEST_MESSAGE("refused after " << took << " ms");
    BOOST_TEST(took < 5000.0);  // every process asked answered: no need to wait 10 s
    BOOST_TEST(pool->committed_bytes() == 0u);  // strong guarantee

    const auto s = budget.stats();
    BOOST_TEST(usage_of(s, a->pid()) == 8 * page);  // live memory stays
    BOOST_TEST(s.reclaim_requests >= 1u);           // a was asked
    BOOST_TEST(s.request_grants == 0u);
    BOOST_TEST(s.request_reclaimed == 0u);
    BOOST_TEST(model(s, "b").committed == 0u);
    check_invariants(s);
    BOOST_TEST(a->ask("exit") == "bye");
    BOOST_TEST(exited_ok(a->wait()));
}

// A process that runs no watcher gives nothing back on request, and is not even asked: the
// refusal comes at once, and its spares stay.
BOOST_AUTO_TEST_CASE(a_process_without_the_watcher_keeps_its_spares) {
    scratch_name name("ask-nowatch");
    auto budget = process_budget::create(name.str(), 12 * page, asking_options());
    auto a = idle_helper(name.str(), "a", true, false);

    auto pool = vmmpp_mp::make_pool(16, budget.register_model("b", 12 * page));
    BOOST_CHECK_THROW(pool->ensure_committed(0, 8 * page), vmmpp::over_quota);
    auto s = budget.stats();
    BOOST_TEST(usage_of(s, a->pid()) == 8 * page);
    BOOST_TEST(model(s, "a").reclaimed == 0u);
    BOOST_TEST(s.reclaim_requests == 0u);
    check_invariants(s);
    // Its spares are its own to give: honour_limits, or its next commit, would use them.
    BOOST_TEST(a->ask("hold 8 8") == "ok " + std::to_string(8 * page));
    BOOST_TEST(a->ask("exit") == "bye");
    BOOST_TEST(exited_ok(a->wait()));
}

// A lowered limit wakes the other processes' watchers (no limit_watch polling): an idle process
// gives its spares back with no call of its own.
BOOST_AUTO_TEST_CASE(a_lowered_limit_wakes_the_idle_process_without_polling) {
    scratch_name name("ask-limit");
    auto budget = process_budget::create(name.str(), 12 * page);
    auto a = idle_helper(name.str(), "a", true);
    const vmmpp::limit_change c = budget.set_limit(4 * page);
    BOOST_TEST(c.reclaimed == 0u);  // this process held nothing
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (usage_of(budget.stats(), a->pid()) != 0 && std::chrono::steady_clock::now() < deadline) {
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    const auto s = budget.stats();
    BOOST_TEST(usage_of(s, a->pid()) == 0u);
    BOOST_TEST(model(s, "a").reclaimed == 8 * page);
    BOOST_TEST(budget.limit_status().applied());
    BOOST_TEST(a->ask("exit") == "bye");
    BOOST_TEST(exited_ok(a->wait()));
}

// A forked child inherits no watcher: its records say so, and no one waits for its answer.
BOOST_AUTO_TEST_CASE(a_forked_child_is_not_taken_for_a_watcher) {
    scratch_name name("ask-fork");
    auto budget = process_budget::create(name.str(), 8 * page);
    auto quota = budget.register_model("m", 8 * page);
    const auto child = in_child([&] {
        auto again = budget.register_model("m", 8 * page);
        auto seg = vmmpp_mp::attach_segment(budget.name());
        std::lock_guard lock(seg->mutex());
        const auto& parent = seg->records()[0];  // registered first
        const auto& mine = seg->records()[1];
        return mine.pid == ::getpid() && mine.watching == 0 && parent.watching == 1 ? 0 : 1;
    });
    BOOST_TEST(exited_ok(child.status), "the child " << describe(child.status));
}
