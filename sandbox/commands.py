"""Commands: splitting without a shell, and each allowed program's dangerous options, as data.

A program's rules (ProgramRules in PROGRAMS) say which options run other programs, read host files
or write outside the workspace; check_arguments matches them in every spelling getopt accepts.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from sandbox.errors import JobRejected

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
    first_args: tuple[str, ...] = ()  # put before the job's arguments (curl -q: never read a .curlrc)


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
        first_args=("-q",),
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
