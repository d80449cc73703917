"""Policy: what a job may ask for. Commands, dangerous options, environment, paths and hosts.

The sandbox is the real boundary; this layer keeps hostile input from ever reaching it and says
exactly why. Every method raises JobRejected(field, rule, message) or returns the normalised value.
Rules are data (PROGRAMS, REFUSED_ENV, ...) so they are easy to read and extend.
"""
from __future__ import annotations

import base64
import binascii
import fnmatch
import ipaddress
import os
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Mapping
from urllib.parse import urlsplit

import idna

from config.settings import Settings
from sandbox.errors import JobRejected
from sandbox.spec import DEFAULT_COLLECT_DIRS, JobFile, NetworkPolicy

SEARCH_DIRS = ("/usr/local/bin", "/usr/bin", "/bin")  # never PATH, never the workspace
PROGRAM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
MAX_ARGS = 4096

# --- dangerous options, per program ------------------------------------------------------------


@dataclass(frozen=True)
class ProgramRules:
    """How one program's arguments are checked; every option named here is matched in all its
    spellings: `--opt val`, `--opt=val`, an abbreviation `--op`, `-o val`, `-oval`, `-xo val`."""

    refused: Mapping[str, str] = field(default_factory=dict)  # option -> why it is refused
    takes_value: frozenset[str] = frozenset()  # options whose value is the next word
    output_paths: frozenset[str] = frozenset()  # options whose value is written: must stay in the workspace
    url_operands: bool = False  # operands must be http(s) URLs (curl guesses ftp:// from "ftp.x")
    url_options: frozenset[str] = frozenset()  # options whose value is a URL, checked like an operand
    refused_values: tuple[tuple[str, str], ...] = ()  # (regex, why): refused in any argument
    single_dash_long: bool = False  # find: "-exec" is one word, not a cluster of letters
    abbreviations: bool = True  # getopt_long takes unambiguous prefixes: "--output-doc" = "--output-document"
    old_style_first: bool = False  # tar: "tar xIf prog a.tar" reads its first word as options
    subcommands: Mapping[str, frozenset[str]] | None = None  # git: allowed subcommand -> its refused options
    harmless: frozenset[str] = frozenset()  # exact options that merely look like abbreviations of refused ones


_RUNS = "runs another program"
_WRITES = "writes outside the job's control"
_OTHER_SCHEMES = (r"(?i)^\s*(file|gopher|dict|ftp|ftps|tftp|ldap|ldaps|telnet|scp|sftp|smb|smbs|imap|imaps|pop3|pop3s"
                  r"|smtp|smtps|rtsp|rtmp|rtmpe|mqtt|ws|wss|unix)\s*:")
LAUNCHERS = frozenset({
    "xargs", "env", "timeout", "nohup", "nice", "ionice", "stdbuf", "setsid", "chroot", "sudo", "su",
    "doas", "runuser", "unshare", "nsenter", "strace", "ltrace", "gdb", "flock", "watch", "script",
    "busybox", "parallel", "time", "chrt", "taskset", "prlimit", "capsh", "setpriv", "systemd-run",
})

PROGRAMS: dict[str, ProgramRules] = {
    "find": ProgramRules(
        single_dash_long=True,
        refused={"-exec": _RUNS, "-execdir": _RUNS, "-ok": _RUNS, "-okdir": _RUNS, "-delete": "deletes files",
                 "-fprint": _WRITES, "-fprint0": _WRITES, "-fprintf": _WRITES, "-fls": _WRITES},
    ),
    "tar": ProgramRules(
        old_style_first=True,
        harmless=frozenset({"--checkpoint"}),
        refused={"--checkpoint-action": _RUNS, "--to-command": _RUNS, "-I": _RUNS,
                 "--use-compress-program": _RUNS, "--info-script": _RUNS, "--new-volume-script": _RUNS,
                 "-F": _RUNS, "--rsh-command": _RUNS, "--rmt-command": _RUNS,
                 "-P": "extracts to absolute paths", "--absolute-names": "extracts to absolute paths"},
        takes_value=frozenset({"-f", "--file", "-C", "--directory", "-T", "--files-from", "-X", "--exclude-from",
                               "-b", "--blocking-factor", "-H", "--format", "-L", "--tape-length", "-N",
                               "--newer", "-V", "--label", "-g", "--listed-incremental", "--index-file"}),
        output_paths=frozenset({"-f", "--file", "-C", "--directory", "-g", "--listed-incremental", "--index-file"}),
    ),
    "git": ProgramRules(
        refused={"-c": "sets configuration that can run programs", "--config": "sets configuration that can run programs",
                 "--config-env": "sets configuration that can run programs", "--exec-path": _RUNS,
                 "--git-dir": "points git at a planted repository", "--work-tree": "points git outside the workspace",
                 "--upload-pack": _RUNS, "--receive-pack": _RUNS, "--template": "installs hooks that run programs",
                 "--ext-diff": _RUNS, "-O": _RUNS, "--open-files-in-pager": _RUNS, "--exec": _RUNS,
                 "--separate-git-dir": _WRITES},
        takes_value=frozenset({"-C", "-m", "--message", "-b", "--branch", "--depth", "-n", "--max-count",
                               "--author", "--format", "--pretty", "-o", "--origin", "--since", "--until",
                               "--output"}),
        output_paths=frozenset({"-C", "--output"}),
        refused_values=((r"^[A-Za-z0-9+.-]+::", "selects a remote helper that runs programs (ext::, fd::)"),
                        (r"(?i)^(?!https?://)[a-z][a-z0-9+.-]*://", "only https:// and http:// remotes are allowed")),
        subcommands={name: frozenset() for name in (
            "init", "status", "log", "show", "diff", "add", "commit", "rev-parse", "ls-files", "branch", "tag",
            "describe", "blame", "shortlog", "checkout", "switch", "grep", "version", "ls-tree", "cat-file",
            "rm", "mv", "restore", "reset", "merge", "stash", "notes", "count-objects")}
        | {"clone": frozenset({"-u"}), "fetch": frozenset({"-u"}), "pull": frozenset({"-u"}),
           "ls-remote": frozenset({"-u"})},
    ),
    "curl": ProgramRules(
        refused={"-K": "reads options from a file", "--config": "reads options from a file",
                 "--unix-socket": "reaches host sockets", "--abstract-unix-socket": "reaches host sockets",
                 "--engine": "loads code from a file", "--proto-default": "changes the default protocol"},
        takes_value=frozenset({
            "-o", "--output", "--output-dir", "-H", "--header", "-d", "--data", "--data-binary", "--data-raw",
            "--data-urlencode", "--json", "-X", "--request", "-A", "--user-agent", "-e", "--referer", "-u", "--user",
            "-m", "--max-time", "--connect-timeout", "-w", "--write-out", "-r", "--range", "-T", "--upload-file",
            "-F", "--form", "-b", "--cookie", "-c", "--cookie-jar", "-D", "--dump-header", "--trace",
            "--trace-ascii", "--stderr", "--libcurl", "--etag-save", "--etag-compare", "--hsts", "--alt-svc",
            "--retry", "--retry-delay", "--retry-max-time", "-x", "--proxy", "--url", "-z", "--time-cond",
            "--limit-rate", "-Y", "--speed-limit", "-y", "--speed-time", "--max-filesize", "--max-redirs",
            "--resolve", "--connect-to", "--cacert", "--cert", "--key", "--proto", "--proto-redir", "-E",
            "--interface", "--noproxy", "-C", "--continue-at", "--compressed-ssh", "--oauth2-bearer"}),
        output_paths=frozenset({"-o", "--output", "--output-dir", "-c", "--cookie-jar", "-D", "--dump-header",
                                "--trace", "--trace-ascii", "--stderr", "--libcurl", "--etag-save", "--hsts",
                                "--alt-svc"}),
        url_operands=True,
        url_options=frozenset({"--url"}),
    ),
    "wget": ProgramRules(
        refused={"--config": "reads options from a file", "-e": "runs wgetrc commands", "--execute": "runs wgetrc commands",
                 "--use-askpass": _RUNS, "-i": "reads URLs the policy cannot check",
                 "--input-file": "reads URLs the policy cannot check"},
        takes_value=frozenset({
            "-O", "--output-document", "-o", "--output-file", "-a", "--append-output", "-P", "--directory-prefix",
            "-T", "--timeout", "-t", "--tries", "-U", "--user-agent", "--header", "--post-data", "--post-file",
            "--method", "--body-data", "--save-cookies", "--load-cookies", "--warc-file", "--rejected-log",
            "--hsts-file", "-i", "--input-file", "-l", "--level", "-Q", "--quota", "--user", "--password",
            "-w", "--wait", "--limit-rate", "-A", "--accept", "-R", "--reject", "-D", "--domains", "-B", "--base"}),
        output_paths=frozenset({"-O", "--output-document", "-o", "--output-file", "-a", "--append-output", "-P",
                                "--directory-prefix", "--save-cookies", "--warc-file", "--rejected-log", "--hsts-file"}),
        url_operands=True,
    ),
}
for _name in ("curl", "wget"):
    # every argument, not only operands: a value such as --url or --referer is a URL too
    PROGRAMS[_name] = ProgramRules(**{**PROGRAMS[_name].__dict__, "refused_values": (
        (_OTHER_SCHEMES, "uses a protocol other than http or https"),)})

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
    ("SANDBOX_*", "reserved for the service"), ("CELERY_*", "reserved for the service"), ("AWS_*", "reserved for the service"),
)

# --- paths -------------------------------------------------------------------------------------

MAX_PATH_BYTES = 1024
MAX_SEGMENT_BYTES = 255
# config files the allow-listed programs read on their own, and git's directory: a planted one runs programs
RESERVED_NAMES = frozenset({".git", ".curlrc", "_curlrc", ".wgetrc", ".gitconfig", ".gitmodules", ".netrc"})
R2_PREFIXES = ("jobs/{id}/input/", "templates/", "shared/")

# --- hosts -------------------------------------------------------------------------------------

INTERNAL_NAMES = frozenset({"localhost", "metadata", "instance-data", "metadata.google.internal", "kubernetes"})
INTERNAL_SUFFIXES = (".localhost", ".local", ".internal", ".intranet", ".lan", ".home", ".corp", ".arpa",
                     ".localdomain", ".home.arpa", ".svc", ".onion")
_NUMERIC_LABEL = re.compile(r"(0x[0-9a-f]*|[0-9]+)")


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
        if program in PROGRAMS:
            check_arguments(program, PROGRAMS[program], argv[1:])
        return (self.resolve(program),) + tuple(argv[1:])

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
        """A syntactically valid http(s) URL with no userinfo; the webhook code checks the host."""
        if url is None:
            return None
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError as e:
            raise JobRejected("/callback_url", "bad_url", f"not a valid URL: {e}") from e
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname or "@" in parts.netloc:
            raise JobRejected("/callback_url", "bad_url", "the callback must be an http(s) URL with a host and no user:password@")
        if re.search(r"[\x00-\x20\x7f]", url):
            raise JobRejected("/callback_url", "bad_url", "the URL holds whitespace or control characters")
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
        return NetworkPolicy(outbound=outbound, allowed_hosts=tuple(dict.fromkeys(hosts)), blocked_ports=tuple(ports))

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


def _show(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...'"


_SHELL_CHARS = {";": "';'", "|": "'|'", "&": "'&'", "<": "'<'", ">": "'>'", "`": "backticks", "(": "'('",
                ")": "')'", "\n": "a newline", "\r": "a carriage return", "*": "a glob '*'", "?": "a glob '?'",
                "[": "a glob '['", "{": "'{' (brace expansion)", "}": "'}'"}


def split_command(command: str) -> list[str]:
    """POSIX-shlex splitting that refuses, rather than drops, shell syntax found outside quotes."""
    words: list[str] = []
    word: list[str] = []
    in_word = False
    quote = ""
    i = 0
    while i < len(command):
        ch = command[i]
        if quote == "'":
            if ch == "'":
                quote = ""
            else:
                word.append(ch)
        elif quote == '"':
            if ch == '"':
                quote = ""
            elif ch == "\\" and command[i + 1:i + 2] in ('"', "\\"):  # shlex: only \" and \\ escape here
                word.append(command[i + 1])
                i += 1
            else:
                word.append(ch)  # $(...), `...` and ; are plain text inside quotes: no shell runs
        elif ch in " \t":
            if in_word:
                words.append("".join(word))
                word, in_word = [], False
        else:
            if ch == "\\":
                if i + 1 >= len(command) or command[i + 1] in "\n\r":
                    raise JobRejected("/command", "shell_syntax", "a trailing backslash or line continuation is shell syntax")
                word.append(command[i + 1])
                i += 1
            elif ch in "'\"":
                quote = ch
            elif ch in _SHELL_CHARS:
                raise JobRejected("/command", "shell_syntax", f"{_SHELL_CHARS[ch]} outside quotes is shell syntax; no shell runs the command")
            elif ch == "$":
                raise JobRejected("/command", "shell_syntax", "'$' outside quotes (a variable or $(...)) is shell syntax; quote it if literal")
            elif ord(ch) < 32 or ord(ch) == 127:
                raise JobRejected("/command", "shell_syntax", f"control character {ch!r} outside quotes")
            elif not in_word and ch in "#~":
                raise JobRejected("/command", "shell_syntax", f"a word starting with {ch!r} is shell syntax (comment or home directory)")
            else:
                word.append(ch)
            in_word = True
        i += 1
    if quote:
        raise JobRejected("/command", "unbalanced_quote", f"the command has an unclosed {quote} quote")
    if in_word:
        words.append("".join(word))
    return words


def check_arguments(program: str, rules: ProgramRules, args: list[str]) -> None:
    """Refuse the program's dangerous options in every spelling, and paths or URLs that escape."""
    known = set(rules.refused) | rules.takes_value | rules.harmless
    subcommand_refused: frozenset[str] = frozenset()
    seen_subcommand = rules.subcommands is None
    only_operands = False
    queue = list(args)
    if rules.old_style_first and queue and not queue[0].startswith("-"):
        queue[0] = "-" + queue[0]  # "tar xzf a.tar" is "tar -xzf a.tar"
    i = 0
    while i < len(queue):
        arg = queue[i]
        i += 1
        for pattern, why in rules.refused_values:
            if re.search(pattern, arg):
                raise JobRejected("/command", "dangerous_argument", f"{program}: {_show(arg)} {why}")
        if only_operands or arg == "-" or not arg.startswith("-"):
            if not seen_subcommand:
                assert rules.subcommands is not None
                if arg not in rules.subcommands:
                    raise JobRejected("/command", "not_allowed", f"{program} {_show(arg)} is not an allowed subcommand")
                subcommand_refused, seen_subcommand = rules.subcommands[arg], True
            elif rules.url_operands and not re.match(r"(?i)https?://", arg):
                raise JobRejected("/command", "dangerous_argument", f"{program}: {_show(arg)} is not an http:// or https:// URL")
            continue
        if arg == "--" and not rules.single_dash_long:
            only_operands = True
            continue
        refused = {**rules.refused, **{o: "is refused here" for o in subcommand_refused}}
        if rules.single_dash_long or arg.startswith("--"):
            name, eq, value = arg.partition("=")
            match = _long_option(name, known | set(refused), refused, rules.abbreviations and not rules.single_dash_long)
            if match in refused:
                raise JobRejected("/command", "dangerous_option", f"{program} {name}: {refused[match]}")
            if match in rules.takes_value and not eq and i < len(queue):
                value, eq = queue[i], "="
                i += 1
            if match in rules.output_paths and eq:
                check_output_path(program, match, value)
            if match in rules.url_options and eq and not re.match(r"(?i)https?://", value):
                raise JobRejected("/command", "dangerous_argument", f"{program} {name}: {_show(value)} is not an http(s) URL")
            continue
        for j, letter in enumerate(arg[1:], start=1):  # a cluster: -sSo/x is -s -S -o /x
            option = "-" + letter
            if option in refused:
                raise JobRejected("/command", "dangerous_option", f"{program} {option} (in {_show(arg)}): {refused[option]}")
            if option in rules.takes_value:
                value = arg[j + 1:]
                if not value and i < len(queue):
                    value = queue[i]
                    i += 1
                if option in rules.output_paths:
                    check_output_path(program, option, value)
                break


def _long_option(name: str, known: set[str], refused: Mapping[str, str], abbreviations: bool) -> str:
    """The option getopt_long would pick; an abbreviation that could be a refused option counts as it."""
    if name in known or not abbreviations or len(name) < 3:
        return name
    expansions = sorted(k for k in known if k.startswith(name) and k.startswith("--"))
    risky = [k for k in expansions if k in refused] or expansions
    return risky[0] if risky else name


def check_output_path(program: str, option: str, value: str) -> None:
    """A file a program writes must stay in the workspace: relative, no '..', no host:path."""
    if value == "-":
        return
    segments = value.split("/")
    if not value or value.startswith(("/", "~")) or ".." in segments or ":" in value or "\\" in value:
        raise JobRejected("/command", "output_path", f"{program} {option} {_show(value)}: output must be a relative path inside the workspace")


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


def normalise_host(entry: str) -> tuple[str, str, str]:
    """(normalised name, rule, why); rule is "" when the entry is an acceptable host name."""
    if "@" in entry:
        return entry, "userinfo", "user info is not allowed; give a host name only"
    if entry.count(":") >= 2 or entry.startswith("["):
        return entry, "ip_literal", "IP addresses are not allowed; give a host name"
    if ":" in entry:
        return entry, "port", "ports are not allowed; give a host name only"
    if re.search(r"[/?#\\\s\x00-\x1f]", entry):
        return entry, "host_syntax", "give a host name only, not a URL"
    wildcard = entry.startswith("*.")
    body = entry[2:] if wildcard else entry
    if "*" in body:
        return entry, "wildcard", "only a leading '*.' wildcard is allowed"
    try:
        ascii_name = idna.encode(body.rstrip(".") if body.endswith(".") and not body.endswith("..") else body,
                                 uts46=True, std3_rules=True).decode("ascii").lower()
    except (idna.IDNAError, UnicodeError, ValueError) as e:
        return entry, "invalid_host", f"not a valid host name ({e})"
    labels = ascii_name.split(".")
    if wildcard and len(labels) < 2:
        return entry, "wildcard", "a wildcard must sit above a name of at least two labels"
    if _NUMERIC_LABEL.fullmatch(labels[-1]) or _is_ip(ascii_name):  # 127.1, 2130706433, 0x7f.1, 0177.0.0.1
        return entry, "ip_literal", "IP addresses are not allowed in any spelling; give a host name"
    if ascii_name in INTERNAL_NAMES or ascii_name.endswith(INTERNAL_SUFFIXES) or len(labels) < 2:
        return entry, "internal_name", "local, internal and single-label names are not allowed"
    return ("*." if wildcard else "") + ascii_name, "", ""


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def host_within(name: str, allowed: str) -> bool:
    """True if `name` (maybe "*.x") lies within the operator entry `allowed` ("*.y" covers subdomains of y)."""
    if not allowed.startswith("*."):
        return name == allowed
    base = allowed[2:]
    if name.startswith("*."):
        return name[2:] == base or name[2:].endswith("." + base)
    return name.endswith("." + base)
