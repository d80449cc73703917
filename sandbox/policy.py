"""Policy: what a job may ask for. Commands, dangerous options, environment, paths and hosts.

The sandbox is the real boundary; this layer keeps hostile input from ever reaching it and says
exactly why. Every method raises JobRejected(field, rule, message) or returns the normalised value.
Rules are data (PROGRAMS, REFUSED_ENV, ...) so they are easy to read and extend.
"""
from __future__ import annotations

import base64
import binascii
import fnmatch
import os
import re
import unicodedata
from typing import Any, Mapping

from config.settings import Settings
from sandbox import webhooks
from sandbox.errors import JobRejected
from sandbox.hosts import INTERNAL_NAMES, INTERNAL_SUFFIXES, host_within, normalise_host  # noqa: F401 (API)
from sandbox.commands import (  # noqa: F401  (PROGRAMS and split_command are part of this API)
    LAUNCHERS, MAX_ARGS, PROGRAM_NAME, PROGRAMS, SEARCH_DIRS, _show, check_arguments, split_command,
)
from sandbox.spec import DEFAULT_COLLECT_DIRS, JobFile, NetworkPolicy

# --- environment -------------------------------------------------------------------------------

ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]{0,127}")
MAX_ENV_VALUE_BYTES = 32 * 1024
MAX_ENV_TOTAL_BYTES = 256 * 1024
REFUSED_ENV: tuple[tuple[str, str], ...] = (
    ("LD_*", "changes how every program is loaded"), ("GLIBC_TUNABLES", "changes how every program is loaded"),
    ("GCONV_PATH", "loads code from a path"), ("LOCPATH", "loads locale data from a path"),
    ("NLSPATH", "loads message catalogues from a path"), ("MALLOC_*", "changes the C allocator"),
    ("HOSTALIASES", "changes name resolution"), ("RES_OPTIONS", "changes name resolution"),
    ("LOCALDOMAIN", "changes name resolution"),
    ("BASH_ENV", "runs a file in every shell"), ("ENV", "runs a file in every shell"), ("IFS", "changes shell parsing"),
    ("PS4", "runs code in traced shells"), ("PROMPT_COMMAND", "runs code in shells"),
    ("SHELLOPTS", "changes shell behaviour"), ("BASHOPTS", "changes shell behaviour"), ("BASH_FUNC_*", "defines shell functions"),
    ("PATH", "the service fixes the search path"), ("HOME", "the service sets the home directory"),
    ("PYTHON*", "changes what the interpreter runs"), ("NODE_*", "changes what the interpreter runs"),
    ("PERL5*", "changes what the interpreter runs"), ("PERLLIB", "changes what the interpreter runs"),
    ("PERL_*", "changes what the interpreter runs"), ("RUBY*", "changes what the interpreter runs"),
    ("GEM_*", "changes what the interpreter runs"), ("JAVA_TOOL_OPTIONS", "changes what the JVM runs"),
    ("_JAVA_OPTIONS", "changes what the JVM runs"), ("JDK_JAVA_OPTIONS", "changes what the JVM runs"),
    ("CLASSPATH", "changes what the JVM runs"), ("*_PROXY", "the service sets its own proxy"),
    ("GIT_*", "changes what git runs"), ("CURL_HOME", "points curl at a config file"),
    ("WGETRC", "points wget at a config file"), ("SYSTEM_WGETRC", "points wget at a config file"),
    ("TAR_OPTIONS", "adds tar options"), ("GREP_OPTIONS", "adds grep options"),
    ("XDG_CONFIG_HOME", "points programs at config files"),
    # programs' own hooks: each names code or a command a program on the list (or one it calls)
    # runs, so a job could run its own code with no interpreter allowed (curl's OpenSSL loads an
    # engine from OPENSSL_CONF; git runs EDITOR through /bin/sh)
    ("OPENSSL_*", "loads code or config from a path"), ("SSL_ENGINE*", "loads code from a path"),
    ("EDITOR", "a command programs run"), ("VISUAL", "a command programs run"),
    ("PAGER", "a command programs run"), ("MANPAGER", "a command programs run"),
    ("BROWSER", "a command programs run"), ("SHELL", "a command programs run"),
    ("LESS*", "runs commands in less"), ("SSH_*", "changes what ssh runs"), ("RSYNC_*", "changes what rsync runs"),
    ("TAPE", "points tar at a remote archive"), ("RMT", "points tar at a remote archive"),
    ("TERMINFO*", "loads terminal data from a path"), ("TERMCAP", "loads terminal data from a path"),
    ("GNUPGHOME", "points gpg at config files"), ("MAKEFLAGS", "changes what make runs"),
    ("MAKEFILES", "changes what make runs"), ("MFLAGS", "changes what make runs"),
    ("SANDBOX_*", "reserved for the service"), ("CELERY_*", "reserved for the service"), ("AWS_*", "reserved for the service"),
)

# --- paths -------------------------------------------------------------------------------------

MAX_PATH_BYTES = 1024
MAX_SEGMENT_BYTES = 255
# config files the allow-listed programs read on their own, and git's directory: a planted one runs programs
RESERVED_NAMES = frozenset({".git", ".curlrc", "_curlrc", ".wgetrc", ".gitconfig", ".gitmodules", ".netrc"})
R2_PREFIXES = ("jobs/{id}/input/", "templates/", "shared/")


class Policy:
    """The rules one operator's Settings allow; one method per kind of rule."""

    def __init__(self, settings: Settings, search_dirs: tuple[str, ...] = SEARCH_DIRS, image_root: str = "/") -> None:
        self.settings = settings
        self.search_dirs = search_dirs
        self.image_root = image_root  # where the read-only base image is visible to this process

    # -- command --------------------------------------------------------------------------------

    def check_command(self, command: str) -> tuple[str, ...]:
        """Split without a shell, refuse shell syntax and dangerous options; argv[0] becomes absolute."""
        if len(command.encode("utf-8")) > 65536:
            raise JobRejected("/command", "too_large", "the command is longer than 64 KiB")
        argv = split_command(command)
        if not argv:
            raise JobRejected("/command", "empty", "the command has no program")
        if len(argv) > MAX_ARGS:
            raise JobRejected("/command", "too_large", f"the command has more than {MAX_ARGS} arguments")
        program = argv[0]
        if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", program, re.S):
            raise JobRejected("/command", "shell_syntax", "VAR=value before the program is shell syntax; use \"environment\"")
        if "/" in program:
            raise JobRejected("/command", "program_path", "give the program by name only; it is looked up in the base image")
        if program not in self.settings.allowed_commands or not PROGRAM_NAME.fullmatch(program):
            allowed = ", ".join(self.settings.allowed_commands) or "none"
            raise JobRejected("/command", "not_allowed", f"{_show(program)} is not an allowed command (allowed: {allowed})")
        if program in LAUNCHERS:
            raise JobRejected("/command", "launcher", f"{program} exists to run other programs; run the program directly")
        rules = PROGRAMS.get(program)
        if rules:
            check_arguments(program, rules, argv[1:])
        return (self.resolve(program),) + (rules.first_args if rules else ()) + tuple(argv[1:])

    def resolve(self, program: str) -> str:
        """The absolute path of an allowed program in the base image's fixed directories."""
        for directory in self.search_dirs:
            candidate = os.path.join(self.image_root, directory.lstrip("/"), program)
            if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
                return f"{directory}/{program}"
        raise JobRejected("/command", "not_installed", f"{program} is allowed but not installed in the base image")

    # -- environment ----------------------------------------------------------------------------

    def check_environment(self, environment: Mapping[str, str]) -> dict[str, str]:
        """Names [A-Z_][A-Z0-9_]*, none that changes loading, parsing or the service; sizes capped."""
        total = 0
        for name, value in environment.items():
            where = f"/environment/{name}"
            if not ENV_NAME.fullmatch(name):
                raise JobRejected(where, "env_name", "environment names must match [A-Z_][A-Z0-9_]*")
            for pattern, why in REFUSED_ENV:
                if fnmatch.fnmatchcase(name, pattern):
                    raise JobRejected(where, "env_refused", f"{name} may not be set ({pattern}): {why}")
            if "\x00" in value:
                raise JobRejected(where, "nul_byte", "environment values cannot contain NUL")
            size = len(value.encode("utf-8"))
            if size > MAX_ENV_VALUE_BYTES:
                raise JobRejected(where, "too_large", f"the value is {size} bytes; the limit is {MAX_ENV_VALUE_BYTES}")
            total += size + len(name) + 2
        if total > MAX_ENV_TOTAL_BYTES:
            raise JobRejected("/environment", "too_large", f"the environment is {total} bytes; the limit is {MAX_ENV_TOTAL_BYTES}")
        return dict(environment)

    # -- files ----------------------------------------------------------------------------------

    def check_files(self, files: list[dict[str, Any]], job_id: str) -> tuple[JobFile, ...]:
        """Relative, unambiguous, unique paths; one valid source each; count and size capped."""
        if len(files) > self.settings.max_input_files:
            raise JobRejected("/files", "too_many", f"{len(files)} files; the limit is {self.settings.max_input_files}")
        out: list[JobFile] = []
        seen: set[str] = set()
        inline = 0
        for index, item in enumerate(files):
            where = f"/files/{index}"
            path = check_path(item["path"], f"{where}/path")
            if path in seen:
                raise JobRejected(f"{where}/path", "duplicate_path", f"{path!r} is given twice (after normalisation)")
            seen.add(path)
            content: bytes | None = None
            r2_key = None
            if "content" in item:
                content = item["content"].encode("utf-8")
            elif "content_base64" in item:
                content = _b64(item["content_base64"], f"{where}/content_base64")
            else:
                r2_key = self.check_r2_key(item["r2_key"], job_id, f"{where}/r2_key")
            inline += len(content or b"")
            if inline > self.settings.max_inline_bytes:
                raise JobRejected(where, "too_large", f"inline content exceeds {self.settings.max_inline_bytes} bytes in total")
            out.append(JobFile(path=path, content=content, r2_key=r2_key, mode=int(item.get("mode", 0o644))))
        for path in seen:  # "a" as a file and "a/b" beneath it cannot both exist
            parent = path.rpartition("/")[0]
            while parent:
                if parent in seen:
                    index = next(i for i, f in enumerate(out) if f.path == path)
                    raise JobRejected(f"/files/{index}/path", "path_conflict", f"{parent!r} is a file, so {path!r} cannot lie beneath it")
                parent = parent.rpartition("/")[0]
        return tuple(out)

    def check_r2_key(self, key: str, job_id: str, where: str) -> str:
        """Only this job's inputs, templates/ and shared/; no traversal, URLs or odd characters."""
        if re.search(r"[\x00-\x1f\x7f\\%]", key) or "//" in key or ":" in key:
            raise JobRejected(where, "bad_key", "the key holds a control character, backslash, %, ':' or '//'")
        if any(seg in (".", "..") for seg in key.split("/")):
            raise JobRejected(where, "traversal", "the key has a '.' or '..' segment")
        if unicodedata.normalize("NFC", key) != key:
            raise JobRejected(where, "bad_key", "the key is not in Unicode NFC form")
        prefixes = [p.format(id=job_id) for p in R2_PREFIXES]
        if not any(key.startswith(p) and len(key) > len(p) and not key.endswith("/") for p in prefixes):
            raise JobRejected(where, "not_allowed", f"the key must name an object under {', '.join(prefixes)}")
        return key

    def check_collect(self, collect: list[str] | None) -> tuple[str, ...]:
        """Workspace directories to upload: relative paths under the same rules as input files."""
        if collect is None:
            return DEFAULT_COLLECT_DIRS
        out: list[str] = []
        for index, item in enumerate(collect):
            path = check_path(item, f"/collect/{index}")
            if path in out:
                raise JobRejected(f"/collect/{index}", "duplicate_path", f"{path!r} is listed twice")
            out.append(path)
        return tuple(out)

    def check_callback_url(self, url: str | None) -> str | None:
        """An http(s) URL whose host is on SANDBOX_WEBHOOK_ALLOWED_HOSTS (the webhook code's own rule)."""
        if url is not None:
            webhooks.check_callback_url(url, self.settings.webhook_allowed_hosts)
        return url

    # -- network --------------------------------------------------------------------------------

    def check_network(self, network: Mapping[str, Any]) -> NetworkPolicy:
        """Outbound only to names within the operator's list; job ports merged with the operator's."""
        outbound = bool(network.get("outbound", False))
        hosts = [self.check_host(h, f"/network/allowed_hosts/{i}") for i, h in enumerate(network.get("allowed_hosts", []))]
        if hosts and not outbound:
            raise JobRejected("/network/outbound", "outbound_off", "allowed_hosts is given but outbound is false; set outbound to true")
        if outbound and not self.settings.allowed_hosts:
            raise JobRejected("/network/outbound", "not_allowed", "the operator allows no outbound hosts (SANDBOX_ALLOWED_HOSTS is empty)")
        if outbound and not hosts:  # deny by default still holds: the operator's list is the ceiling
            hosts = [normalise_host(h)[0] for h in self.settings.allowed_hosts]
        ports = sorted(set(network.get("blocked_ports", [])) | set(self.settings.blocked_ports))
        allowed_ports = network.get("allowed_ports")
        if allowed_ports is not None and not outbound:
            raise JobRejected("/network/outbound", "outbound_off", "allowed_ports is given but outbound is false; set outbound to true")
        for i, port in enumerate(allowed_ports or ()):
            if port in ports:
                raise JobRejected(f"/network/allowed_ports/{i}", "port_blocked",
                                  f"port {port} is blocked (SANDBOX_BLOCKED_PORTS or network.blocked_ports)")
        return NetworkPolicy(outbound=outbound, allowed_hosts=tuple(dict.fromkeys(hosts)), blocked_ports=tuple(ports),
                             allowed_ports=tuple(dict.fromkeys(allowed_ports or (443,))))

    def check_host(self, entry: str, where: str) -> str:
        """A normalised host name (or "*." + name) that lies within SANDBOX_ALLOWED_HOSTS."""
        name, rule, why = normalise_host(entry)
        if rule:
            raise JobRejected(where, rule, f"{_show(entry)}: {why}")
        if not any(host_within(name, allowed) for allowed in self._operator_hosts()):
            allowed = ", ".join(self.settings.allowed_hosts) or "none"
            raise JobRejected(where, "not_allowed", f"{name} is not within the operator's allowed hosts ({allowed})")
        return name

    def _operator_hosts(self) -> list[str]:
        return [n for n, rule, _ in map(normalise_host, self.settings.allowed_hosts) if not rule]


# --- helpers (module level so other modules and tests can use them) ----------------------------


def check_path(raw: str, where: str) -> str:
    """A workspace-relative path: NFC, NFKC-stable, no '..', NUL, backslash, control or leading '-'."""
    if "\x00" in raw:
        raise JobRejected(where, "nul_byte", "the path contains NUL")
    if "\\" in raw:
        raise JobRejected(where, "backslash", "the path contains a backslash; use '/'")
    if re.search(r"[\x00-\x1f\x7f]", raw):
        raise JobRejected(where, "control_char", "the path contains a control character")
    path = unicodedata.normalize("NFC", raw)
    if unicodedata.normalize("NFKC", path) != path:
        raise JobRejected(where, "nfkc", f"{_show(raw)} changes under NFKC normalisation (lookalike characters)")
    if path.startswith("/"):
        raise JobRejected(where, "absolute", "the path must be relative to the workspace")
    if len(path.encode("utf-8")) > MAX_PATH_BYTES:
        raise JobRejected(where, "too_large", f"the path is longer than {MAX_PATH_BYTES} bytes")
    for segment in path.split("/"):
        if segment in ("", ".", ".."):
            raise JobRejected(where, "traversal", f"{_show(raw)} has an empty, '.' or '..' segment")
        if segment.startswith("-"):
            raise JobRejected(where, "leading_dash", f"{_show(segment)} starts with '-' and would read as an option")
        if len(segment.encode("utf-8")) > MAX_SEGMENT_BYTES:
            raise JobRejected(where, "too_large", f"a path segment is longer than {MAX_SEGMENT_BYTES} bytes")
        if segment.lower() in RESERVED_NAMES:
            raise JobRejected(where, "reserved_name", f"{segment!r} is a config file or directory a program would obey")
    return path


def _b64(text: str, where: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise JobRejected(where, "bad_base64", f"not valid standard base64: {e}") from e
