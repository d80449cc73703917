"""A table of hostile jobs, each sent as raw JSON bytes through parse_job, with its expected rejection;
and for every kind of rule a close-but-legal job that must pass."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from config.settings import Settings, load_settings
from sandbox.errors import JobRejected
from sandbox.policy import Policy
from sandbox.spec import parse_job

PROGRAMS = ("ls", "cat", "grep", "curl", "wget", "python3", "find", "tar", "git", "sh", "xargs", "env", "timeout", "nohup")


@pytest.fixture(scope="module")
def settings() -> Settings:
    """An operator who allows interpreters, archivers and git, and two outbound host patterns."""
    return load_settings({
        "SANDBOX_ALLOWED_COMMANDS": ",".join(PROGRAMS),
        "SANDBOX_ALLOWED_HOSTS": "*.example.com,api.github.com",
        "SANDBOX_MAX_INPUT_FILES": "3",
        "SANDBOX_MAX_INLINE_BYTES": "1Ki",
        "SANDBOX_MAX_MEMORY": "1Gi",
        "SANDBOX_WEBHOOK_ALLOWED_HOSTS": "hooks.example.com",
    })


@pytest.fixture(scope="module")
def policy(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Policy:
    """A policy over a fake base image that holds every allowed program, so the test is hermetic."""
    root = tmp_path_factory.mktemp("image")
    (root / "usr/bin").mkdir(parents=True)
    for name in PROGRAMS:
        exe = root / "usr/bin" / name
        exe.write_text("#!/bin/true\n")
        exe.chmod(0o755)
    return Policy(settings, image_root=str(root))


def raw(command: str = "ls", **fields: Any) -> bytes:
    """A job as the wire bytes, with `command` first."""
    return json.dumps({"command": command, **fields}).encode()


def net(*hosts: str, outbound: bool = True) -> dict[str, Any]:
    return {"network": {"outbound": outbound, "allowed_hosts": list(hosts)}}


def one_file(**spec: Any) -> dict[str, Any]:
    return {"files": [{"path": "in.txt", "content": "x", **spec} if "path" not in spec else spec]}


HOSTILE: list[tuple[str, bytes, str, str]] = [
    # --- parser tricks -------------------------------------------------------------------------
    ("duplicate key", b'{"command":"ls","command":"cat /etc/shadow"}', "/command", "duplicate_key"),
    ("nested duplicate", b'{"command":"ls","resources":{"memory":"1Mi","memory":"64Gi"}}', "/resources/memory", "duplicate_key"),
    ("NaN", b'{"command":"ls","timeout":NaN}', "/timeout", "not_a_number"),
    ("Infinity", b'{"command":"ls","timeout":Infinity}', "/timeout", "not_a_number"),
    ("-Infinity", b'{"command":"ls","timeout":-Infinity}', "/timeout", "not_a_number"),
    ("overflowing float", b'{"command":"ls","timeout":1e999}', "/timeout", "not_a_number"),
    ("huge integer", b'{"command":"ls","timeout":1' + b"0" * 5000 + b"}", "", "invalid_json"),
    ("UTF-16", '{"command":"ls"}'.encode("utf-16"), "", "encoding"),
    ("invalid UTF-8", b'{"command":"ls \xff"}', "", "encoding"),
    ("byte-order mark", b'\xef\xbb\xbf{"command":"ls"}', "", "encoding"),
    ("lone surrogate", b'{"command":"ls \\"\\ud800\\""}', "/command", "encoding"),
    ("top-level array", b'[{"command":"ls"}]', "", "type"),
    ("top-level string", b'"ls"', "", "type"),
    ("trailing garbage", b'{"command":"ls"} {"command":"cat"}', "", "invalid_json"),
    ("deep nesting", b'{"command":"ls","files":' + b"[" * 50000 + b"]" * 50000 + b"}", "", "too_deep"),
    ("too large", b'{"command":"ls","files":[{"path":"a","content":"' + b"x" * (4 * 2**20) + b'"}]}', "", "too_large"),
    # --- structure, Celery options, ids and numbers --------------------------------------------
    ("celery queue", raw(queue="celery"), "/queue", "unknown_field"),
    ("celery eta", raw(eta="2030-01-01T00:00:00"), "/eta", "unknown_field"),
    ("celery countdown", raw(countdown=5), "/countdown", "unknown_field"),
    ("celery headers", raw(headers={"task": "x"}), "/headers", "unknown_field"),
    ("celery link", raw(link=["sandbox.cleanup"]), "/link", "unknown_field"),
    ("nested unknown", raw(resources={"gpu": "1"}), "/resources/gpu", "unknown_field"),
    ("missing command", b'{"id":"x"}', "/command", "required"),
    ("empty command", raw(""), "/command", "empty"),
    ("blank command", raw("   "), "/command", "empty"),
    ("id with slash", raw(id="../other"), "/id", "pattern"),
    ("id trailing newline", raw(id="job\n"), "/id", "pattern"),
    ("id too long", raw(id="a" * 65), "/id", "pattern"),
    ("boolean timeout", raw(timeout=True), "/timeout", "type"),
    ("string timeout", raw(timeout="10"), "/timeout", "type"),
    ("zero timeout", raw(timeout=0), "/timeout", "out_of_range"),
    ("timeout above max", raw(timeout=10**30), "/timeout", "above_maximum"),
    ("memory above max", raw(resources={"memory": "2Gi"}), "/resources/memory", "above_maximum"),
    ("memory word", raw(resources={"memory": "lots"}), "/resources/memory", "pattern"),
    ("memory zero", raw(resources={"memory": "0"}), "/resources/memory", "bad_unit"),
    ("cpu negative", raw(resources={"cpu": "-1"}), "/resources/cpu", "pattern"),
    ("cpu number", raw(resources={"cpu": 0.5}), "/resources/cpu", "type"),
    ("cpu above max", raw(resources={"cpu": "64"}), "/resources/cpu", "above_maximum"),
    ("pids boolean", raw(resources={"pids": True}), "/resources/pids", "type"),
    ("pids above max", raw(resources={"pids": 100000}), "/resources/pids", "above_maximum"),
    # --- shell syntax --------------------------------------------------------------------------
    ("semicolon", raw("ls; cat /etc/passwd"), "/command", "shell_syntax"),
    ("pipe", raw("cat a | sh"), "/command", "shell_syntax"),
    ("and", raw("ls && id"), "/command", "shell_syntax"),
    ("or", raw("ls || id"), "/command", "shell_syntax"),
    ("background", raw("ls &"), "/command", "shell_syntax"),
    ("command substitution", raw("ls $(id)"), "/command", "shell_syntax"),
    ("backticks", raw("ls `id`"), "/command", "shell_syntax"),
    ("redirect out", raw("ls > /etc/x"), "/command", "shell_syntax"),
    ("redirect in", raw("cat < /etc/shadow"), "/command", "shell_syntax"),
    ("newline", raw("ls\nid"), "/command", "shell_syntax"),
    ("IFS trick", raw("cat${IFS}/etc/passwd"), "/command", "shell_syntax"),
    ("variable", raw("cat $HOME/x"), "/command", "shell_syntax"),
    ("env prefix", raw("LD_PRELOAD=/x.so ls"), "/command", "shell_syntax"),
    ("glob", raw("cat *"), "/command", "shell_syntax"),
    ("subshell", raw("(id)"), "/command", "shell_syntax"),
    ("comment", raw("ls #x"), "/command", "shell_syntax"),
    ("unclosed quote", raw("ls 'a"), "/command", "unbalanced_quote"),
    ("line continuation", raw("ls \\"), "/command", "shell_syntax"),
    # --- programs ------------------------------------------------------------------------------
    ("not allowed", raw("rm -rf /"), "/command", "not_allowed"),
    ("absolute program", raw("/bin/sh -c id"), "/command", "program_path"),
    ("relative path", raw("./ls"), "/command", "program_path"),
    ("dot dot", raw("../../bin/ls"), "/command", "program_path"),
    ("quoted name with slash", raw("'usr/bin/ls'"), "/command", "program_path"),
    ("xargs", raw("xargs sh"), "/command", "launcher"),
    ("env", raw("env sh -c id"), "/command", "launcher"),
    ("timeout", raw("timeout 5 sh"), "/command", "launcher"),
    ("nohup", raw("nohup sh"), "/command", "launcher"),
    # --- dangerous options ---------------------------------------------------------------------
    ("find -exec", raw("find . -exec sh ';'"), "/command", "dangerous_option"),
    ("find -execdir", raw("find . -execdir id '{}' +"), "/command", "dangerous_option"),
    ("find -ok", raw("find . -ok id"), "/command", "dangerous_option"),
    ("find -delete", raw("find / -delete"), "/command", "dangerous_option"),
    ("find -fprint", raw("find . -fprint /tmp/x"), "/command", "dangerous_option"),
    ("tar checkpoint action", raw("tar -cf a.tar --checkpoint=1 --checkpoint-action=exec=sh ."), "/command", "dangerous_option"),
    ("tar abbreviated", raw("tar -cf a.tar --checkpoint-a=exec=sh ."), "/command", "dangerous_option"),
    ("tar to-command", raw("tar -xf a.tar --to-command=sh"), "/command", "dangerous_option"),
    ("tar -I", raw("tar -I sh -xf a.tar"), "/command", "dangerous_option"),
    ("tar -I clustered", raw("tar -xIsh -f a.tar"), "/command", "dangerous_option"),
    ("tar old style I", raw("tar xIf sh a.tar"), "/command", "dangerous_option"),
    ("tar absolute names", raw("tar -xPf a.tar"), "/command", "dangerous_option"),
    ("tar -C outside", raw("tar -xf a.tar -C /etc"), "/command", "output_path"),
    ("tar remote archive", raw("tar -xf host:/a.tar"), "/command", "output_path"),
    ("git -c", raw("git -c core.pager=sh log"), "/command", "dangerous_option"),
    ("git --config-env", raw("git --config-env=core.pager=X log"), "/command", "dangerous_option"),
    ("git upload-pack", raw("git clone --upload-pack=sh https://api.github.com/x"), "/command", "dangerous_option"),
    ("git upload-pack abbreviated", raw("git clone --upload-p=sh https://api.github.com/x"), "/command", "dangerous_option"),
    ("git clone -u", raw("git clone -u sh https://api.github.com/x"), "/command", "dangerous_option"),
    ("git ext::", raw("git clone 'ext::sh -c id' x"), "/command", "dangerous_argument"),
    ("git file://", raw("git clone file:///etc x"), "/command", "dangerous_argument"),
    ("git ssh proxy", raw("git clone ssh://-oProxyCommand=id/x"), "/command", "dangerous_argument"),
    ("git subcommand", raw("git difftool -x sh"), "/command", "not_allowed"),
    ("git template", raw("git clone --template=t https://api.github.com/x"), "/command", "dangerous_option"),
    ("curl file:", raw("curl file:///etc/passwd"), "/command", "dangerous_argument"),
    ("curl FILE: uppercase", raw("curl FILE:///etc/passwd"), "/command", "dangerous_argument"),
    ("curl gopher", raw("curl gopher://a.example.com/_x"), "/command", "dangerous_argument"),
    ("curl dict", raw("curl dict://a.example.com:11211/stats"), "/command", "dangerous_argument"),
    ("curl ftp", raw("curl ftp://a.example.com/x"), "/command", "dangerous_argument"),
    ("curl scheme guess", raw("curl ftp.example.com/x"), "/command", "dangerous_argument"),
    ("curl --url file", raw("curl --url file:///etc/passwd"), "/command", "dangerous_argument"),
    ("curl unix socket", raw("curl --unix-socket /var/run/docker.sock http://x.example.com/"), "/command", "dangerous_option"),
    ("curl -K", raw("curl -K cfg https://a.example.com"), "/command", "dangerous_option"),
    ("curl --config abbreviated", raw("curl --conf cfg https://a.example.com"), "/command", "dangerous_option"),
    ("curl -o absolute", raw("curl -o /etc/cron.d/x https://a.example.com"), "/command", "output_path"),
    ("curl --output=", raw("curl --output=/etc/x https://a.example.com"), "/command", "output_path"),
    ("curl -o glued", raw("curl -o/x https://a.example.com"), "/command", "output_path"),
    ("curl combined flags", raw("curl -sSo/x https://a.example.com"), "/command", "output_path"),
    ("curl -o traversal", raw("curl -o ../../x https://a.example.com"), "/command", "output_path"),
    ("curl --output-dir abbreviated", raw("curl --output-d /tmp -O https://a.example.com/x"), "/command", "output_path"),
    ("curl cookie jar", raw("curl -c /tmp/jar https://a.example.com"), "/command", "output_path"),
    ("wget -O absolute", raw("wget -O /etc/x https://a.example.com"), "/command", "output_path"),
    ("wget abbreviated", raw("wget --output-doc=/etc/x https://a.example.com"), "/command", "output_path"),
    ("wget -P home", raw("wget -P '~/x' https://a.example.com"), "/command", "output_path"),
    ("wget -e", raw("wget -e use_askpass=sh https://a.example.com"), "/command", "dangerous_option"),
    ("wget -i", raw("wget -i urls.txt"), "/command", "dangerous_option"),
    # --- limits a sandbox cannot start in (they ended `error` naming no field) -------------------
    ("memory too small", raw(resources={"memory": "64Ki"}), "/resources/memory", "below_minimum"),
    ("memory one byte", raw(resources={"memory": "1"}), "/resources/memory", "below_minimum"),
    ("pids 2", raw(resources={"pids": 2}), "/resources/pids", "below_minimum"),
    # --- environment ---------------------------------------------------------------------------
    *[(f"env {name}", raw(environment={name: "x"}), f"/environment/{name}", "env_refused") for name in (
        "LD_PRELOAD", "GLIBC_TUNABLES", "BASH_ENV", "ENV", "IFS", "PS4", "PROMPT_COMMAND", "SHELLOPTS", "PATH",
        "PYTHONSTARTUP", "NODE_OPTIONS", "PERL5OPT", "RUBYOPT", "HTTPS_PROXY", "NO_PROXY", "SANDBOX_R2_BUCKET",
        "CELERY_BROKER_URL", "AWS_SECRET_ACCESS_KEY", "GCONV_PATH", "GIT_SSH_COMMAND", "TAR_OPTIONS",
        # what a program on the list runs or loads (session-8 review: curl + OPENSSL_CONF loaded a
        # job's .so; git ran EDITOR through /bin/sh)
        "OPENSSL_CONF", "OPENSSL_MODULES", "EDITOR", "VISUAL", "PAGER", "SSH_ASKPASS", "TAPE", "LESSOPEN",
        "RSYNC_RSH", "TERMINFO", "MAKEFLAGS")],
    ("env lowercase", raw(environment={"path": "/x"}), "/environment/path", "env_name"),
    ("env dash", raw(environment={"A-B": "x"}), "/environment/A-B", "env_name"),
    ("env name newline", raw(environment={"A\n": "x"}), "/environment/A\n", "env_name"),
    ("env NUL value", raw(environment={"A": "x\x00y"}), "/environment/A", "nul_byte"),
    ("env value too large", raw(environment={"A": "x" * 40000}), "/environment/A", "too_large"),
    ("env non-string", raw(environment={"A": 1}), "/environment/A", "type"),
    # --- files ---------------------------------------------------------------------------------
    ("absolute path", raw(files=[{"path": "/etc/passwd", "content": "x"}]), "/files/0/path", "absolute"),
    ("traversal", raw(files=[{"path": "a/../../x", "content": "x"}]), "/files/0/path", "traversal"),
    ("dot segment", raw(files=[{"path": "./a", "content": "x"}]), "/files/0/path", "traversal"),
    ("double slash", raw(files=[{"path": "a//b", "content": "x"}]), "/files/0/path", "traversal"),
    ("NUL in path", raw(files=[{"path": "a\x00b", "content": "x"}]), "/files/0/path", "nul_byte"),
    ("backslash", raw(files=[{"path": "..\\x", "content": "x"}]), "/files/0/path", "backslash"),
    ("leading dash", raw(files=[{"path": "-rf", "content": "x"}]), "/files/0/path", "leading_dash"),
    ("newline in path", raw(files=[{"path": "a\nb", "content": "x"}]), "/files/0/path", "control_char"),
    ("NFKC lookalike", raw(files=[{"path": "\uff0e\uff0e/x", "content": "x"}]), "/files/0/path", "nfkc"),
    ("NFKC ligature", raw(files=[{"path": "\ufb01le", "content": "x"}]), "/files/0/path", "nfkc"),
    ("duplicate after NFC", raw(files=[{"path": "caf\u00e9", "content": "x"}, {"path": "cafe\u0301", "content": "y"}]),
     "/files/1/path", "duplicate_path"),
    ("file under file", raw(files=[{"path": "a", "content": "x"}, {"path": "a/b", "content": "y"}]), "/files/1/path", "path_conflict"),
    ("planted git dir", raw(files=[{"path": ".git/config", "content": "[core]\nfsmonitor=sh"}]), "/files/0/path", "reserved_name"),
    ("planted curlrc", raw(files=[{"path": ".curlrc", "content": "output=/etc/x"}]), "/files/0/path", "reserved_name"),
    ("two sources", raw(files=[{"path": "a", "content": "x", "r2_key": "shared/a"}]), "/files/0", "one_source"),
    ("no source", raw(files=[{"path": "a"}]), "/files/0", "one_source"),
    ("bad base64", raw(files=[{"path": "a", "content_base64": "!!!!"}]), "/files/0/content_base64", "pattern"),
    ("bad base64 padding", raw(files=[{"path": "a", "content_base64": "abc"}]), "/files/0/content_base64", "bad_base64"),
    ("setuid mode", raw(files=[{"path": "a", "content": "x", "mode": 0o4755}]), "/files/0/mode", "out_of_range"),
    ("negative mode", raw(files=[{"path": "a", "content": "x", "mode": -1}]), "/files/0/mode", "out_of_range"),
    ("string mode", raw(files=[{"path": "a", "content": "x", "mode": "0755"}]), "/files/0/mode", "type"),
    ("too many files", raw(files=[{"path": f"f{i}", "content": "x"} for i in range(4)]), "/files", "too_many"),
    ("inline too large", raw(files=[{"path": "a", "content": "x" * 2000}]), "/files/0", "too_large"),
    ("r2 other job", raw(id="mine", files=[{"path": "a", "r2_key": "jobs/theirs/input/a"}]), "/files/0/r2_key", "not_allowed"),
    ("r2 traversal", raw(id="mine", files=[{"path": "a", "r2_key": "jobs/mine/input/../../theirs/output/x"}]),
     "/files/0/r2_key", "traversal"),
    ("r2 url", raw(files=[{"path": "a", "r2_key": "https://evil.example.com/x"}]), "/files/0/r2_key", "bad_key"),
    ("r2 double slash", raw(files=[{"path": "a", "r2_key": "shared//x"}]), "/files/0/r2_key", "bad_key"),
    ("r2 output prefix", raw(id="mine", files=[{"path": "a", "r2_key": "jobs/mine/output/x"}]), "/files/0/r2_key", "not_allowed"),
    ("r2 encoded traversal", raw(files=[{"path": "a", "r2_key": "shared/%2e%2e/x"}]), "/files/0/r2_key", "bad_key"),
    ("collect absolute", raw(collect=["/etc"]), "/collect/0", "absolute"),
    ("collect traversal", raw(collect=[".."]), "/collect/0", "traversal"),
    # --- network -------------------------------------------------------------------------------
    ("ip dotted", raw(**net("127.0.0.1")), "/network/allowed_hosts/0", "ip_literal"),
    ("ip decimal", raw(**net("2130706433")), "/network/allowed_hosts/0", "ip_literal"),
    ("ip hex", raw(**net("0x7f000001")), "/network/allowed_hosts/0", "ip_literal"),
    ("ip octal", raw(**net("0177.0.0.1")), "/network/allowed_hosts/0", "ip_literal"),
    ("ip short", raw(**net("127.1")), "/network/allowed_hosts/0", "ip_literal"),
    ("ip fullwidth", raw(**net("\uff11\uff12\uff17.0.0.1")), "/network/allowed_hosts/0", "ip_literal"),
    ("ipv6", raw(**net("::1")), "/network/allowed_hosts/0", "ip_literal"),
    ("ipv6 bracketed", raw(**net("[::1]")), "/network/allowed_hosts/0", "ip_literal"),
    ("v4-mapped", raw(**net("::ffff:169.254.169.254")), "/network/allowed_hosts/0", "ip_literal"),
    ("localhost", raw(**net("localhost")), "/network/allowed_hosts/0", "internal_name"),
    ("localhost trailing dot", raw(**net("localhost.")), "/network/allowed_hosts/0", "internal_name"),
    ("localhost fullwidth", raw(**net("\uff4c\uff4f\uff43\uff41\uff4c\uff48\uff4f\uff53\uff54")), "/network/allowed_hosts/0", "internal_name"),
    ("metadata", raw(**net("metadata.google.internal")), "/network/allowed_hosts/0", "internal_name"),
    (".local", raw(**net("printer.local")), "/network/allowed_hosts/0", "internal_name"),
    ("single label", raw(**net("redis")), "/network/allowed_hosts/0", "internal_name"),
    ("userinfo", raw(**net("user@a.example.com")), "/network/allowed_hosts/0", "userinfo"),
    ("port", raw(**net("a.example.com:6379")), "/network/allowed_hosts/0", "port"),
    ("url", raw(**net("https://a.example.com/")), "/network/allowed_hosts/0", "port"),
    ("bare wildcard", raw(**net("*")), "/network/allowed_hosts/0", "wildcard"),
    ("inner wildcard", raw(**net("a.*.example.com")), "/network/allowed_hosts/0", "wildcard"),
    ("not within operator list", raw(**net("evil.com")), "/network/allowed_hosts/0", "not_allowed"),
    ("suffix trick", raw(**net("evilexample.com")), "/network/allowed_hosts/0", "not_allowed"),
    ("operator apex not covered", raw(**net("example.com")), "/network/allowed_hosts/0", "not_allowed"),
    ("top-level wildcard", raw(**net("*.com")), "/network/allowed_hosts/0", "wildcard"),
    ("wildcard wider than operator entry", raw(**net("*.github.com")), "/network/allowed_hosts/0", "not_allowed"),
    ("hosts without outbound", raw(**net("a.example.com", outbound=False)), "/network/outbound", "outbound_off"),
    ("port zero", raw(network={"blocked_ports": [0]}), "/network/blocked_ports/0", "out_of_range"),
    ("port too big", raw(network={"blocked_ports": [65536]}), "/network/blocked_ports/0", "out_of_range"),
    ("outbound string", raw(network={"outbound": "true"}), "/network/outbound", "type"),
    # --- callback ------------------------------------------------------------------------------
    ("callback scheme", raw(callback_url="file:///etc/passwd"), "/callback_url", "pattern"),
    ("callback userinfo", raw(callback_url="https://user:pw@a.example.com/"), "/callback_url", "pattern"),
    ("callback bad port", raw(callback_url="https://hooks.example.com:99999/"), "/callback_url", "invalid_url"),
    ("callback host not allowed", raw(callback_url="https://evil.example.net/"), "/callback_url", "host_not_allowed"),
]


@pytest.mark.parametrize(("raw_job", "field", "rule"), [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_hostile_job_is_rejected_naming_field_and_rule(raw_job: bytes, field: str, rule: str, settings: Settings,
                                                       policy: Policy) -> None:
    with pytest.raises(JobRejected) as caught:
        parse_job(raw_job, settings, policy)
    assert (caught.value.field, caught.value.rule) == (field, rule), caught.value.message
    assert caught.value.message and len(caught.value.message) < 400


def test_table_is_big_enough_and_names_are_unique() -> None:
    names = [h[0] for h in HOSTILE]
    assert len(names) >= 60 and len(set(names)) == len(names)


LEGAL: list[tuple[str, bytes]] = [
    ("quoted shell syntax", raw('python3 -c "import os; print(1)"')),
    ("quoted substitution is plain text", raw("grep '$(id) | `x`' notes.txt")),
    ("escaped semicolon", raw("grep a\\;b notes.txt")),
    ("quoted glob", raw("grep -E 'a*[0-9]?' notes.txt")),
    ("VAR=value as an argument", raw("grep A=1 notes.txt")),
    ("shell when the operator allows it", raw("sh -c 'echo hi'")),
    ("find without exec", raw("find . -name '*.txt' -type f")),
    ("tar extract in workspace", raw("tar -xzf in.tgz -C output")),
    ("tar old style", raw("tar xzf in.tgz")),
    ("tar --checkpoint is not --checkpoint-action", raw("tar --checkpoint=10 -cf output/a.tar data")),
    ("git clone https", raw("git clone --depth 1 https://api.github.com/x.git repo")),
    ("git log format with colon", raw("git -C repo log --format=%h:%s -n 3")),
    ("curl https with headers", raw('curl -sS -H "Accept: application/json" -o output/x.json https://a.example.com/x')),
    ("curl --output= relative", raw("curl --output=output/x https://a.example.com/x")),
    ("curl -o stdout", raw("curl -o - https://a.example.com/x")),
    ("curl after --", raw("curl -s -- https://a.example.com/x")),
    ("wget relative", raw("wget -q -O output/page.html https://a.example.com/")),
    ("environment", raw(environment={"LANG": "C.UTF-8", "MY_TOKEN": "x=y;z", "_X": ""})),
    ("proxy-like name", raw(environment={"PROXY_MODE": "off"})),
    ("unicode file", raw(files=[{"path": "data/caf\u00e9.txt", "content": "x"}])),
    ("dotfile", raw(files=[{"path": ".env.example", "content": "x"}])),
    ("binary content", raw(files=[{"path": "a.bin", "content_base64": "AAEC/w==", "mode": 0o755}])),
    ("NUL inside content", raw(files=[{"path": "a", "content": "x\x00y"}])),
    ("r2 own input", raw(id="mine", files=[{"path": "a", "r2_key": "jobs/mine/input/data.csv"}])),
    ("r2 templates and shared", raw(files=[{"path": "a", "r2_key": "templates/t.py"}, {"path": "b", "r2_key": "shared/x/y"}])),
    ("collect", raw(collect=["output", "results/final"])),
    ("subdomain host", raw(**net("A.Example.COM", "api.github.com."))),
    ("wildcard within wildcard", raw(**net("*.eu.example.com"))),
    ("idna host", raw(**net("b\u00fccher.example.com"))),
    ("outbound with no list takes the operator's", raw(network={"outbound": True})),
    ("blocked ports", raw(network={"blocked_ports": [8080, 22]})),
    ("limits at the maximum", raw(timeout=3600, resources={"cpu": "2", "memory": "1Gi", "disk": "10Gi", "pids": 1024})),
    ("fractional timeout", raw(timeout=0.5)),
    ("callback", raw(callback_url="https://hooks.example.com/done?job=1")),
]


@pytest.mark.parametrize("raw_job", [item[1] for item in LEGAL], ids=[item[0] for item in LEGAL])
def test_close_but_legal_job_passes(raw_job: bytes, settings: Settings, policy: Policy) -> None:
    spec = parse_job(raw_job, settings, policy)
    assert spec.argv[0].startswith("/usr/bin/")
    assert os.path.basename(spec.argv[0]) == spec.command.split()[0]


def test_rejection_with_real_base_image_for_missing_program(settings: Settings) -> None:
    """Given an allowed name that the image lacks, the job is rejected, never run from elsewhere."""
    empty = Policy(settings, image_root=str(Path("/nonexistent-image")))
    with pytest.raises(JobRejected) as caught:
        parse_job(raw("ls"), settings, empty)
    assert caught.value.rule == "not_installed"


# A job far under the document cap whose arrays hold hundreds of thousands of items: jsonschema
# reported every bad item past maxItems, one ~12 KiB error each, before the count was checked (a
# 16 MB job of 1.2M sourceless files took 15 GiB of the worker). Run under a 1 GiB address-space
# limit: a MemoryError or a crash fails the test.
_HUGE_ARRAYS = r"""
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
from config.settings import load_settings
from sandbox.spec import parse_job
from sandbox.errors import JobRejected
docs = {
    "files": '{"command":"ls","files":[' + ",".join(['{"path":"a"}'] * 150_000) + ']}',
    "ports": '{"command":"ls","network":{"blocked_ports":[' + ",".join(["0"] * 500_000) + ']}}',
    "env": '{"command":"ls","environment":{' + ",".join('"x%d":"v"' % i for i in range(150_000)) + '}}',
}
for name, doc in docs.items():
    try:
        parse_job(doc.encode(), load_settings({}))
        print(name, "ACCEPTED")
    except JobRejected as e:
        print(name, e.field, e.rule)
"""


def test_huge_arrays_are_refused_by_their_count_within_a_bounded_memory() -> None:
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run([sys.executable, "-c", _HUGE_ARRAYS], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.stdout.split("\n")[:3] == ["files /files too_many", "ports /network/blocked_ports too_large",
                                           "env /environment too_large"], (done.stdout, done.stderr[-2000:])
