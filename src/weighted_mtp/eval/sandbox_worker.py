"""The sandbox's fork server: one per worker, started by `sandbox.py` as a fresh interpreter.

It imports only the standard library, applies the isolation that is shared by every program once
(a private network and mount namespace, a private /tmp, a seccomp filter that refuses network
sockets), then forks one child per program. The child drops to the worker's unprivileged uid, sets
its resource limits, enters a fresh working directory with a clean environment and runs the program
in-process as `__main__`. Forking an already-started interpreter is what makes the sandbox fast;
the child never inherits anything the harness has (no modules, no environment, no file descriptors).

Protocol on two inherited file descriptors: 4-byte big-endian length + UTF-8 JSON, one request and
one reply per program. Two more inherited pipes carry a serving program's calls (HumanEval: the
harness runs `check(candidate)` and each call of `candidate` is a request to the program's child and a
plain-data answer back); the worker only hands them to that child. This file runs as a script (`python sandbox_worker.py REQ_FD RESP_FD`), so it
must not import from `weighted_mtp`.
"""

import ctypes
import ctypes.util
import errno
import json
import math
import os
import platform
import resource
import select
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback
import types

VERDICT_FD = 3
CALLS_FD, RESULTS_FD = 4, 5  # a serving program: call requests from the harness, values back to it
CHILD_SETUP_FAILED = 125
READ_CHUNK = 65536
VERDICT_LIMIT = 4096
SCRATCH_ROOTS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")  # the world-writable directories

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 8, 1 << 12, 1 << 14, 1 << 18
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_SECCOMP, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 22, 36, 38
SECCOMP_MODE_FILTER = 2
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
AF_UNIX = 1
# (audit arch, socket syscall numbers): x86_64 also accepts x32 numbers, which have bit 30 set.
SECCOMP_ARCHES = {"x86_64": (0xC000003E, (41, 41 | 0x40000000)), "aarch64": (0xC00000B7, (198, 198))}

libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def read_message(fd):
    header = read_exactly(fd, 4)
    if header is None:
        return None
    return json.loads(read_exactly(fd, struct.unpack(">I", header)[0]).decode())


def read_exactly(fd, n):
    chunks, remaining = [], n
    while remaining:
        chunk = os.read(fd, remaining)
        if not chunk:
            return None
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def write_message(fd, obj):
    data = json.dumps(obj).encode()
    data = struct.pack(">I", len(data)) + data
    while data:
        data = data[os.write(fd, data) :]


def check(result, what):
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


# ----------------------------------------------------------------------------- isolation, once


def enter_namespaces(as_root):
    """A private network namespace (no interfaces but a down loopback) and mount namespace."""
    if as_root:
        check(libc.unshare(CLONE_NEWNS | CLONE_NEWNET), "unshare(mount, network)")
        return
    uid, gid = os.getuid(), os.getgid()
    check(libc.unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET), "unshare(user, mount, network)")
    for path, text in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", f"{uid} {uid} 1"),
                       ("/proc/self/gid_map", f"{gid} {gid} 1")):
        with open(path, "w") as handle:
            handle.write(text)


def make_mounts_private():
    check(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "make mounts private")


def interpreter_paths():
    """The directories the interpreter imports from: they stay visible whatever is hidden."""
    needed = []
    for path in sorted({os.path.realpath(p) for p in [sys.base_prefix, sys.prefix, *sys.path] if os.path.isdir(p)}):
        if not any(path.startswith(outer + "/") for outer in needed):
            needed.append(path)
    return needed


def hide_directories(explicit):
    """Hide directories behind empty tmpfs mounts in the worker's mount namespace, then bind-mount the
    interpreter's own directories back into them: the harness's (its working directory, its home, the
    benchmark data and run storage it names: `explicit`), and any directory the unprivileged uid
    cannot enter on the way to the interpreter (a pyenv under a 0700 /root). A program then cannot read
    the tests' expected values from the data files, nor anything else of the harness's."""
    needed = interpreter_paths()
    hidden = set()
    for path in explicit:
        path = os.path.realpath(path)
        if os.path.isdir(path) and path != "/" and not any(path == n or path.startswith(n + "/") for n in needed):
            hidden.add(path)
    for path in needed:
        parts = path.strip("/").split("/")
        for depth in range(1, len(parts)):
            ancestor = "/" + "/".join(parts[:depth])
            if not os.stat(ancestor).st_mode & 0o001:
                hidden.add(ancestor)
                break
    hidden = {h for h in hidden if not any(h.startswith(other + "/") for other in hidden)}
    if not hidden:
        return
    staging = tempfile.mkdtemp(prefix="wmtp-sandbox-expose-")
    try:
        staged = []
        for path in needed:
            if any(path.startswith(h + "/") for h in hidden):
                stage = os.path.join(staging, str(len(staged)))
                os.mkdir(stage)
                check(libc.mount(path.encode(), stage.encode(), None, MS_BIND | MS_REC, None), f"bind {path}")
                staged.append((stage, path))
        for path in sorted(hidden):
            check(libc.mount(b"tmpfs", path.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"mode=755"), f"hide {path}")
        for stage, path in staged:
            os.makedirs(path, mode=0o755, exist_ok=True)
            check(libc.mount(stage.encode(), path.encode(), None, MS_BIND | MS_REC, None), f"expose {path}")
            check(libc.umount2(stage.encode(), MNT_DETACH), f"detach {stage}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def mount_private_scratch(size_mb):
    """Fresh tmpfs over the world-writable directories, so nothing a program writes there is shared."""
    for root in SCRATCH_ROOTS:
        if os.path.isdir(root):
            options = f"size={size_mb}m,mode=1777".encode()
            check(libc.mount(b"tmpfs", root.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, options), f"tmpfs on {root}")


def clear_scratch(keep):
    """Empty the private scratch directories after a program, so the next one starts from nothing
    (files it left, a filled-up tmpfs); `keep` is the worker's own directory of work directories."""
    for root in SCRATCH_ROOTS:
        if not os.path.isdir(root):
            continue
        for entry in os.scandir(root):
            if entry.path == keep:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                try:
                    os.unlink(entry.path)
                except OSError:
                    pass


def hide_other_processes():
    """A /proc of our own with hidepid=2: a program sees its own processes only, not the harness's
    command line or environment (root, the worker, still sees everything)."""
    check(libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, b"hidepid=2"), "mount /proc")


class SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]


def install_socket_filter():
    """seccomp: socket() for any family but AF_UNIX fails with EACCES; foreign-arch syscalls fail."""
    arch, (socket_nr, socket_nr_alt) = SECCOMP_ARCHES[platform.machine()]
    ld, jeq, ret = 0x20, 0x15, 0x06
    program = [
        (ld, 0, 0, 4),  # 0: seccomp_data.arch
        (jeq, 1, 0, arch),  # 1: our arch -> 3
        (ret, 0, 0, SECCOMP_RET_ERRNO | errno.EPERM),  # 2
        (ld, 0, 0, 0),  # 3: seccomp_data.nr
        (jeq, 1, 0, socket_nr),  # 4: socket -> 6
        (jeq, 0, 3, socket_nr_alt),  # 5: else -> 9 (allow)
        (ld, 0, 0, 16),  # 6: args[0] (family), low 32 bits
        (jeq, 1, 0, AF_UNIX),  # 7: AF_UNIX -> 9
        (ret, 0, 0, SECCOMP_RET_ERRNO | errno.EACCES),  # 8
        (ret, 0, 0, SECCOMP_RET_ALLOW),  # 9
    ]
    filters = (SockFilter * len(program))(*[SockFilter(*insn) for insn in program])
    prog = SockFprog(len(program), filters)
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    check(libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0), "seccomp")


def set_up(settings):
    """Apply what the system allows; return {feature: None if applied else why not}."""
    as_root = os.geteuid() == 0
    report = {}
    check(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "subreaper")
    uid = settings.get("uid")
    if uid is None:
        report["unprivileged user"] = "not running as root" if not as_root else "disabled"
    else:
        report["unprivileged user"] = try_drop_test(uid)
        if report["unprivileged user"] is not None:
            settings["uid"] = None
    namespaces = None
    if settings["isolate_network"]:
        namespaces = capture(enter_namespaces, as_root)
        report["network namespace"] = namespaces
    else:
        report["network namespace"] = "disabled"
    private_mounts = capture(make_mounts_private) if namespaces is None and settings["isolate_network"] else "no namespace"
    if settings["uid"] is not None:
        if private_mounts is None:
            report["harness directories hidden"] = capture(hide_directories, settings["hidden"])
        if not can_import_as(settings["uid"]):
            report["unprivileged user"] = "the interpreter's files are not readable by an unprivileged user"
            settings["uid"] = None
    report["process-count limit"] = None if settings["uid"] is not None else "needs a dedicated uid"
    report["kill by uid"] = report["process-count limit"]
    if settings["private_tmp"] and private_mounts is None:
        report["private /tmp"] = capture(mount_private_scratch, settings["scratch_mb"])
    else:
        report["private /tmp"] = "disabled" if not settings["private_tmp"] else "needs a mount namespace"
    settings["clear_scratch"] = report["private /tmp"] is None
    if private_mounts is None and as_root:
        report["other processes hidden"] = capture(hide_other_processes)
    else:
        report["other processes hidden"] = "needs root and a mount namespace"
    if platform.machine() not in SECCOMP_ARCHES:
        report["socket filter"] = f"seccomp filter not written for {platform.machine()}"
    else:
        report["socket filter"] = capture(install_socket_filter)
    return report


def capture(fn, *args):
    try:
        fn(*args)
        return None
    except (OSError, KeyError) as exc:
        return str(exc)


def succeeds_as(uid, check=lambda: True):
    """Whether a forked child can become `uid` and then pass `check()`."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            os._exit(0 if check() else 1)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def can_import_as(uid):
    """Whether a child running as `uid` can read the standard library and site-packages."""
    return succeeds_as(uid, lambda: all(os.access(p, os.R_OK | os.X_OK) for p in sys.path if os.path.isdir(p)))


def try_drop_test(uid):
    return None if succeeds_as(uid) else f"setuid({uid}) failed"


# ----------------------------------------------------------------------------- one program


# The harness starts this worker with a minimal environment (sandbox.WORKER_ENV); programs get that
# plus their own home and temporary directory.
WORKER_ENVIRONMENT = dict(os.environ)


def clean_environment(workdir):
    return {**WORKER_ENVIRONMENT, "HOME": workdir, "TMPDIR": workdir}


def child(request, settings, workdir, stdin_path, out_w, err_w, verdict_w, nonce, worker_pid):
    """Runs in the forked child; never returns."""
    exit_now, write = os._exit, os.write
    try:
        os.setsid()
        stdin_fd = os.open(stdin_path or os.devnull, os.O_RDONLY)
        os.dup2(stdin_fd, 0)
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        os.dup2(verdict_w, VERDICT_FD)
        serving = request.get("serve") is not None
        if serving:
            os.dup2(settings["calls_fd"], CALLS_FD)
            os.dup2(settings["results_fd"], RESULTS_FD)
        os.closerange((RESULTS_FD if serving else VERDICT_FD) + 1, os.sysconf("SC_OPEN_MAX"))
        limits = request["limits"]
        cpu = max(1, math.ceil(request["cpu_time_s"]))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        memory = limits["memory_mb"] << 20
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        size = limits["file_size_mb"] << 20
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        uid = settings["uid"]
        if uid is not None:
            resource.setrlimit(resource.RLIMIT_NPROC, (limits["max_processes"], limits["max_processes"]))
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != worker_pid:  # the worker died before the signal was armed: nobody will reap us
            exit_now(CHILD_SETUP_FAILED)
        os.chdir(workdir)
        os.environ.clear()
        os.environ.update(clean_environment(workdir))
        main = types.ModuleType("__main__")
        main.__file__ = os.path.join(workdir, "program.py")
        main.__builtins__ = __builtins__
        sys.modules["__main__"] = main
        sys.argv = [main.__file__]
        sys.path.insert(0, workdir)
        source, is_stdio = request["source"], request["stdin"] is not None
    except BaseException:
        exit_now(CHILD_SETUP_FAILED)
    exit_code = run_as_main(source, main.__dict__, is_stdio, write)
    calls = request.get("calls")
    results = None if calls is None or exit_code != 0 else evaluate_calls(calls, main.__dict__)
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except BaseException:
            pass
    if exit_code == 0:
        write_all(VERDICT_FD, nonce + (b"" if results is None else results))
        if serving:
            serve_calls(main.__dict__, nonce.decode())
    exit_now(exit_code)


def serve_calls(namespace, nonce):
    """Answer the harness's calls of the program's functions until it says done: each request is
    [nonce, name, args, kwargs] in plain data, each answer [nonce, kind, value]. A request with
    another nonce (left over from an earlier program) is skipped."""
    loads, dumps = json.loads, json.dumps
    while True:
        request = read_frame(CALLS_FD)
        if request is None:
            return
        try:
            tag, name, args, kwargs = loads(request)
        except BaseException:
            continue
        if tag != nonce:
            continue
        if name is None:
            return
        try:
            value = namespace[name](*from_plain(args), **from_plain(kwargs))
        except BaseException as exc:
            answer = ["raised", exception_name(exc)]
        else:
            try:
                answer = ["value", to_plain(value)]
            except BaseException as exc:
                answer = ["not plain data", exception_name(exc)]
        try:
            data = dumps([nonce, *answer], allow_nan=True).encode()
        except BaseException:
            data = dumps([nonce, "not plain data", "?"]).encode()
        try:
            write_all(RESULTS_FD, struct.pack(">I", len(data)) + data)
        except OSError:
            return


def read_frame(fd):
    header = read_exactly(fd, 4)
    return None if header is None else read_exactly(fd, struct.unpack(">I", header)[0])


def write_all(fd, data, write=os.write):
    while data:
        data = data[write(fd, data):]


def evaluate_calls(calls, namespace):
    """Each call's value as plain data, or the name of the exception it raised: JSON bytes."""
    out = []
    for call in calls:
        try:
            value = eval(compile(call, "<test>", "eval", dont_inherit=True), namespace)
        except BaseException as exc:
            out.append(["raised", exception_name(exc)])
            continue
        try:
            out.append(["value", to_plain(value)])
        except BaseException as exc:
            out.append(["not plain data", exception_name(exc)])
    try:
        return json_dumps(out, allow_nan=True).encode()
    except BaseException:
        return b"[]"


def exception_name(exc, type=type, str=str):
    try:
        return str(type(exc).__name__)
    except BaseException:
        return "?"


def make_to_plain():
    """`to_plain(value)`: builtin data as JSON-ready values, built from the builtin types' own C
    methods (a subclass is read as its builtin base: its overrides never run), every other type an
    error. Containers are tagged so that tuples, sets, bytes and dict keys come back as they were.
    The builtins are bound now, before any program runs and can replace them."""
    type_, issubclass_, slice_ = type, issubclass, slice
    int_, float_, complex_, str_, bytes_ = int, float, complex, str, bytes
    list_, tuple_, dict_, set_, frozenset_ = list, tuple, dict, set, frozenset
    int_index, float_float, complex_complex, str_str = int.__index__, float.__float__, complex.__complex__, str.__str__
    bytes_bytes, list_copy, tuple_get, dict_copy = bytes.__bytes__, list.copy, tuple.__getitem__, dict.copy
    set_copy, frozenset_copy, dict_items, bytes_hex = set.copy, frozenset.copy, dict.items, bytes.hex
    bool_, none_type, max_depth = bool, type(None), 64

    def to_plain(value, depth=0):
        if depth > max_depth:
            raise ValueError("nested too deeply")
        kind = type_(value)
        if kind is none_type or kind is bool_:
            return value
        if issubclass_(kind, int_):
            return int_index(value)
        if issubclass_(kind, float_):
            return float_float(value)
        if issubclass_(kind, str_):
            return str_str(value)
        if issubclass_(kind, complex_):
            number = complex_complex(value)
            return {"complex": [number.real, number.imag]}
        if issubclass_(kind, bytes_):
            return {"bytes": bytes_hex(bytes_bytes(value))}
        if issubclass_(kind, list_):
            return {"list": [to_plain(item, depth + 1) for item in list_copy(value)]}
        if issubclass_(kind, tuple_):
            return {"tuple": [to_plain(item, depth + 1) for item in tuple_get(value, slice_(None))]}
        if issubclass_(kind, dict_):
            return {"dict": [[to_plain(k, depth + 1), to_plain(v, depth + 1)] for k, v in dict_items(dict_copy(value))]}
        if issubclass_(kind, frozenset_):
            return {"frozenset": [to_plain(item, depth + 1) for item in frozenset_copy(value)]}
        if issubclass_(kind, set_):
            return {"set": [to_plain(item, depth + 1) for item in set_copy(value)]}
        raise TypeError(f"{kind.__name__} is not plain data")

    return to_plain


to_plain = make_to_plain()


def from_plain(value):
    """The builtin value `to_plain` encoded; anything else is an error."""
    if value is None or type(value) in (bool, int, float, str):
        return value
    if type(value) is not dict or len(value) != 1:
        raise ValueError(f"not plain data: {value!r:.80}")
    ((tag, items),) = value.items()
    if tag == "list":
        return [from_plain(item) for item in items]
    if tag == "tuple":
        return tuple(from_plain(item) for item in items)
    if tag == "set":
        return {from_plain(item) for item in items}
    if tag == "frozenset":
        return frozenset(from_plain(item) for item in items)
    if tag == "dict":
        return {from_plain(key): from_plain(item) for key, item in items}
    if tag == "bytes":
        return bytes.fromhex(items)
    if tag == "complex":
        return complex(float(items[0]), float(items[1]))
    raise ValueError(f"unknown plain-data tag {tag!r}")
json_dumps = json.dumps


def run_as_main(source, namespace, is_stdio, write):
    """Execute the program; return its exit code. Any exception, SystemExit included, is a failure in
    assert mode (the tests did not all run); in stdin/stdout mode SystemExit(0) is a normal exit."""
    try:
        exec(compile(source, "program.py", "exec", dont_inherit=True, optimize=0), namespace)
        return 0
    except SystemExit as exc:
        if is_stdio and exc.code in (None, 0):
            return 0
        report_error(write, exc)
        return exc.code if isinstance(exc.code, int) and 0 < exc.code < 256 else 1
    except BaseException as exc:
        report_error(write, exc)
        try:
            traceback.print_exc()
        except BaseException:
            pass
        return 1


def report_error(write, exc):
    try:
        message = str(exc)[:500]
    except BaseException:
        message = ""
    try:
        write(VERDICT_FD, b"E" + json.dumps({"type": type(exc).__name__, "message": message}).encode())
    except BaseException:
        pass


def run_program(request, settings):
    nonce = (request.get("nonce") or os.urandom(16).hex()).encode()
    scratch = settings["scratch_dir"]
    workdir = tempfile.mkdtemp(prefix="program-", dir=scratch)
    uid = settings["uid"]
    if uid is not None:
        os.chown(workdir, uid, uid)
    stdin_path = None
    if request["stdin"] is not None:
        stdin_path = os.path.join(workdir, ".stdin")
        with open(stdin_path, "w", encoding="utf-8") as handle:
            handle.write(request["stdin"])
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    verdict_r, verdict_w = os.pipe()
    start = time.monotonic()
    worker_pid = os.getpid()
    pid = os.fork()
    if pid == 0:
        try:
            child(request, settings, workdir, stdin_path, out_w, err_w, verdict_w, nonce, worker_pid)
        finally:
            os._exit(CHILD_SETUP_FAILED)
    for fd in (out_w, err_w, verdict_w):
        os.close(fd)
    try:
        limit = request["limits"]["output_limit_bytes"]
        verdict_limit = VERDICT_LIMIT if request.get("calls") is None else VERDICT_LIMIT + limit
        streams = {out_r: Capture(limit), err_r: Capture(limit), verdict_r: Capture(verdict_limit)}
        status, usage, timed_out = supervise(pid, streams, start + request["wall_time_s"])
        duration = time.monotonic() - start
        if status is None:
            os.kill(pid, signal.SIGKILL)
            _, status, usage = os.wait4(pid, 0)
        if may_have_left_processes(pid, uid):
            kill_everything_left(pid, uid)
        drain(streams, time.monotonic() + 1.0)
    finally:
        for fd in (out_r, err_r, verdict_r):
            os.close(fd)
        shutil.rmtree(workdir, ignore_errors=True)
        if settings.get("clear_scratch"):
            clear_scratch(settings["scratch_dir"])
    verdict = streams[verdict_r].data
    return {
        "timed_out": timed_out,
        "exit_code": os.waitstatus_to_exitcode(status),
        "tests_completed": nonce in verdict,
        "call_results": verdict.split(nonce, 1)[1].decode("utf-8", "replace") if nonce in verdict else None,
        "call_results_truncated": streams[verdict_r].truncated,
        "error": parse_error(verdict),
        "stdout": streams[out_r].text(),
        "stderr": streams[err_r].text(),
        "stdout_truncated": streams[out_r].truncated,
        "duration_s": duration,
        "cpu_s": usage.ru_utime + usage.ru_stime,
    }


class Capture:
    """Keeps the first `limit` bytes of a stream and counts (but drops) the rest."""

    def __init__(self, limit):
        self.limit, self.data, self.truncated, self.open = limit, b"", False, True

    def feed(self, chunk):
        room = self.limit - len(self.data)
        if len(chunk) > room:
            self.truncated = True
        if room > 0:
            self.data += chunk[:room]

    def text(self):
        return self.data.decode("utf-8", errors="replace")


def supervise(pid, streams, deadline):
    """Collect output until the child exits or the deadline passes; return (wait status, resource
    usage, timed_out)."""
    pidfd = os.pidfd_open(pid)
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None, None, True
            watched = [fd for fd, capture in streams.items() if capture.open] + [pidfd]
            ready, _, _ = select.select(watched, [], [], remaining)
            for fd in ready:
                if fd != pidfd:
                    read_into(fd, streams[fd])
            if pidfd in ready:
                _, status, usage = os.wait4(pid, 0)
                return status, usage, False
    finally:
        os.close(pidfd)


def read_into(fd, capture):
    chunk = os.read(fd, READ_CHUNK)
    if chunk:
        capture.feed(chunk)
    else:
        capture.open = False


def drain(streams, deadline):
    """Read what is left once every writer is dead (bounded, in case one escaped)."""
    while any(capture.open for capture in streams.values()):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        ready, _, _ = select.select([fd for fd, c in streams.items() if c.open], [], [], remaining)
        for fd in ready:
            read_into(fd, streams[fd])


def may_have_left_processes(pid, uid):
    """Whether the program may have created a process or thread. Pids are handed out in order, so
    anything it created has a pid after its own, up to the kernel's last one: if none of those
    belongs to the program's uid (or, without a uid, if none was handed out at all), the sweep
    below is skipped. Other processes on a busy machine only cost a look at their status."""
    try:
        with open("/proc/sys/kernel/ns_last_pid", "rb") as handle:
            last = int(handle.read())
    except (OSError, ValueError):
        return True
    if last == pid:
        return False
    if uid is None or not pid < last <= pid + 256:
        return True
    for candidate in range(pid + 1, last + 1):
        try:
            with open(f"/proc/{candidate}/status", "rb") as handle:
                status = handle.read()
        except OSError:
            continue
        uids = status.split(b"\nUid:", 1)[1].split(b"\n", 1)[0].split()
        if int(uids[0]) == uid:
            return True
    return False


def kill_everything_left(pid, uid):
    """SIGKILL the program's process group, then every process of the worker's uid (catches
    processes that left the group with setsid), or, without a dedicated uid, every process that
    was reparented to this subreaper. Reap the zombies."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    give_up = time.monotonic() + 5.0
    while time.monotonic() < give_up:
        if uid is not None:
            kill_all_of_uid(uid)
        reap_zombies()
        left = processes_of_uid(uid) if uid is not None else kill_adopted_children()
        if not left:
            return
        time.sleep(0.001)


def reap_zombies():
    while True:
        try:
            child_pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if child_pid == 0:
            return


def kill_all_of_uid(uid):
    """kill(-1) from a process of that uid signals exactly the processes of that uid (its return
    value says nothing: it succeeds whenever any other process exists, signalled or not)."""
    reaper = os.fork()
    if reaper == 0:
        try:
            os.setresuid(uid, uid, uid)
            os.kill(-1, signal.SIGKILL)
        finally:
            os._exit(0)
    os.waitpid(reaper, 0)


def processes_of_uid(uid):
    found = False
    with os.scandir("/proc") as entries:
        for entry in entries:
            if entry.name.isdigit():
                try:
                    found = found or entry.stat().st_uid == uid
                except OSError:
                    pass
    return found


def kill_adopted_children():
    me = str(os.getpid())
    found = False
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me:
            found = True
            try:
                os.kill(int(entry), signal.SIGKILL)
            except ProcessLookupError:
                pass
    return found


def parse_error(verdict):
    if verdict.startswith(b"E"):
        try:
            error, _ = json.JSONDecoder().raw_decode(verdict[1:].decode("utf-8", errors="replace"))
            return {"type": str(error["type"]), "message": str(error["message"])}
        except (ValueError, KeyError, TypeError):
            pass
    return None


def main():
    request_fd, reply_fd = int(sys.argv[1]), int(sys.argv[2])
    calls_fd, results_fd = int(sys.argv[3]), int(sys.argv[4])
    for fd in (0, 1):
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, fd)
        os.close(null)
    settings = read_message(request_fd)
    settings["calls_fd"], settings["results_fd"] = calls_fd, results_fd
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 1024), min(hard, 1024)))
    report = set_up(settings)
    settings["scratch_dir"] = tempfile.mkdtemp(prefix="wmtp-sandbox-")
    os.chmod(settings["scratch_dir"], 0o711)
    write_message(reply_fd, {"applied": report, "pid": os.getpid()})
    try:
        while (request := read_message(request_fd)) is not None:
            try:
                reply = run_program(request, settings)
            except Exception as exc:
                reply = {"sandbox_error": f"{type(exc).__name__}: {exc}"}
            write_message(reply_fd, reply)
    finally:
        shutil.rmtree(settings["scratch_dir"], ignore_errors=True)


if __name__ == "__main__":
    main()
