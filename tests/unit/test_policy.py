"""Policy rules one kind at a time: every refused option in every spelling, hosts, paths, environment."""
from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from config.settings import Settings, load_settings
from sandbox.errors import JobRejected
from sandbox.policy import (
    PROGRAMS, REFUSED_ENV, Policy, check_path, host_within, normalise_host, split_command,
)


@pytest.fixture(scope="module")
def settings() -> Settings:
    return load_settings({
        "SANDBOX_ALLOWED_COMMANDS": "ls,cat,grep,curl,wget,python3,find,tar,git",
        "SANDBOX_ALLOWED_HOSTS": "*.example.com,api.github.com",
    })


@pytest.fixture()
def image(tmp_path: Path) -> Path:
    """A fake base image: programs in /usr/bin, one shadowed copy in /usr/local/bin."""
    for directory in ("usr/bin", "usr/local/bin", "bin"):
        (tmp_path / directory).mkdir(parents=True)
    for name in ("ls", "cat", "grep", "curl", "wget", "python3", "find", "tar", "git"):
        exe = tmp_path / "usr/bin" / name
        exe.write_text("")
        exe.chmod(0o755)
    (tmp_path / "usr/local/bin/python3").write_text("")
    (tmp_path / "usr/local/bin/python3").chmod(0o755)
    (tmp_path / "usr/local/bin/grep").write_text("")  # not executable: must be skipped
    (tmp_path / "usr/local/bin/cat").mkdir()  # a directory: must be skipped
    return tmp_path


@pytest.fixture()
def policy(settings: Settings, image: Path) -> Policy:
    return Policy(settings, image_root=str(image))


# --- command splitting ---------------------------------------------------------------------------

@pytest.mark.parametrize("command", [
    "ls -la", "python3 -c \"import os; print(1)\"", "grep 'a b' \"c d\" e\\ f", "grep -e \"x\\\"y\" f",
    "cat 'it''s'", "grep \"\\\\\" f", "ls\t-l", "grep '' f",
])
def test_split_matches_shlex_for_legal_commands(command: str) -> None:
    assert split_command(command) == shlex.split(command)


def test_program_is_resolved_in_fixed_directories_only(policy: Policy) -> None:
    # Given /usr/local/bin/python3, it wins; a non-executable file or a directory there is skipped
    assert policy.check_command("python3 -V")[0] == "/usr/local/bin/python3"
    assert policy.check_command("grep x f")[0] == "/usr/bin/grep"
    assert policy.check_command("cat f")[0] == "/usr/bin/cat"


def test_resolution_ignores_path_and_workspace(policy: Policy, image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    evil = image / "evil"
    evil.mkdir()
    (evil / "ls").write_text("")
    (evil / "ls").chmod(0o755)
    monkeypatch.setenv("PATH", str(evil))
    monkeypatch.chdir(evil)
    assert policy.check_command("ls")[0] == "/usr/bin/ls"


def test_real_base_image_resolves_ls(settings: Settings) -> None:
    argv = Policy(settings).check_command("ls -la")
    assert argv[0] in ("/usr/local/bin/ls", "/usr/bin/ls", "/bin/ls") and argv[1:] == ("-la",)


def test_not_allowed_message_lists_allowed_commands(policy: Policy) -> None:
    with pytest.raises(JobRejected) as caught:
        policy.check_command("bash -c id")
    assert caught.value.rule == "not_allowed" and "curl" in caught.value.message


# --- dangerous options: one test per rule, in every spelling ----------------------------------

def _spellings(program: str, option: str) -> list[str]:
    prefix = {"find": "find . ", "tar": "tar -cf a.tar ", "git": "git ", "curl": "curl ", "wget": "wget "}[program]
    suffix = {"git": " log"}.get(program, "")
    if option == "-u" and program == "git":
        return ["git clone -u x https://api.github.com/r", "git fetch -ux"]
    if PROGRAMS[program].single_dash_long:
        return [f"{prefix}{option} x"]
    if option.startswith("--"):
        out = [f"{prefix}{option}=x{suffix}", f"{prefix}{option} x{suffix}"]
        if PROGRAMS[program].abbreviations and len(option) > 8:
            out.append(f"{prefix}{option[:-1]}=x{suffix}")  # getopt_long accepts the abbreviation
        return out
    return [f"{prefix}{option} x{suffix}", f"{prefix}{option}x{suffix}", f"{prefix}-v{option[1]}x{suffix}"]


RULES = [(p, o, s) for p, r in PROGRAMS.items() for o in r.refused for s in _spellings(p, o)]


@pytest.mark.parametrize(("program", "option", "command"), RULES, ids=[c for _, _, c in RULES])
def test_refused_option_in_every_spelling(program: str, option: str, command: str, policy: Policy) -> None:
    with pytest.raises(JobRejected) as caught:
        policy.check_command(command)
    assert caught.value.field == "/command"
    assert caught.value.rule == "dangerous_option", caught.value.message


OUTPUTS = [(p, o) for p, r in PROGRAMS.items() for o in sorted(r.output_paths)]


@pytest.mark.parametrize(("program", "option"), OUTPUTS, ids=[f"{p} {o}" for p, o in OUTPUTS])
def test_output_options_must_stay_in_the_workspace(program: str, option: str, policy: Policy) -> None:
    base = {"tar": "tar -xf a.tar", "git": "git", "curl": "curl", "wget": "wget"}[program]
    url = " https://a.example.com/x" if program in ("curl", "wget") else ""
    tail = " status" if program == "git" else url
    for bad in ("/etc/x", "../x", "a/../../x", "host:x", "~/x"):
        spelled = f"{option}={shlex.quote(bad)}" if option.startswith("--") else f"{option} {shlex.quote(bad)}"
        with pytest.raises(JobRejected) as caught:
            policy.check_command(f"{base} {spelled}{tail}")
        assert caught.value.rule == "output_path", (bad, caught.value.message)
    good = f"{option}=out/x" if option.startswith("--") else f"{option} out/x"
    policy.check_command(f"{base} {good}{tail}")


def test_options_after_double_dash_are_operands(policy: Policy) -> None:
    # "--" ends options: "-K" after it is a (bad) URL, not the config option
    with pytest.raises(JobRejected) as caught:
        policy.check_command("curl -- -K")
    assert caught.value.rule == "dangerous_argument"
    assert policy.check_command("grep -- -exec notes.txt")[1:] == ("--", "-exec", "notes.txt")


def test_git_subcommands_are_an_allow_list(policy: Policy) -> None:
    assert policy.check_command("git -C repo status")[1:] == ("-C", "repo", "status")
    for sub in ("difftool", "bisect", "submodule", "filter-branch", "daemon", "help", "config", "send-email"):
        with pytest.raises(JobRejected) as caught:
            policy.check_command(f"git {sub}")
        assert caught.value.rule == "not_allowed", sub


# --- environment ---------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern", [p for p, _ in REFUSED_ENV])
def test_every_refused_environment_pattern(pattern: str, policy: Policy) -> None:
    name = pattern.replace("*", "X")
    with pytest.raises(JobRejected) as caught:
        policy.check_environment({name: "1"})
    assert (caught.value.field, caught.value.rule) == (f"/environment/{name}", "env_refused")


def test_environment_total_size_is_capped(policy: Policy) -> None:
    many = {f"V{i}": "x" * 30000 for i in range(10)}
    with pytest.raises(JobRejected) as caught:
        policy.check_environment(many)
    assert (caught.value.field, caught.value.rule) == ("/environment", "too_large")


# --- paths ---------------------------------------------------------------------------------------

def test_path_is_nfc_normalised() -> None:
    assert check_path("cafe\u0301.txt", "/p") == "caf\u00e9.txt"


@pytest.mark.parametrize(("path", "rule"), [
    ("a/./b", "traversal"), ("a/", "traversal"), ("a/-b", "leading_dash"), (".GIT/hooks/x", "reserved_name"),
    ("x" * 256, "too_large"), ("a\x7f", "control_char"), ("\u2024\u2024/x", "nfkc"),
])
def test_path_rules(path: str, rule: str) -> None:
    with pytest.raises(JobRejected) as caught:
        check_path(path, "/p")
    assert caught.value.rule == rule


def test_r2_prefix_uses_this_job_id(policy: Policy) -> None:
    assert policy.check_r2_key("jobs/j1/input/a", "j1", "/k") == "jobs/j1/input/a"
    for key in ("jobs/j1/input/", "jobs/j10/input/a", "jobs/j1/inputx", "templates", "shared/"):
        with pytest.raises(JobRejected):
            policy.check_r2_key(key, "j1", "/k")


# --- hosts ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("entry", "expected"), [
    ("API.GitHub.com", "api.github.com"), ("api.github.com.", "api.github.com"), ("*.Example.com", "*.example.com"),
    ("b\u00fccher.example.com", "xn--bcher-kva.example.com"), ("\uff41.example.com", "a.example.com"),
])
def test_host_normalisation(entry: str, expected: str) -> None:
    assert normalise_host(entry) == (expected, "", "")


@pytest.mark.parametrize("entry", ["0x7f.1", "017700000001", "1.2.3.4.", "0x7f.0x0.0x0.0x1", "::ffff:7f00:1", "fe80::1%eth0"])
def test_ip_literals_in_odd_spellings(entry: str) -> None:
    assert normalise_host(entry)[1] == "ip_literal"


@pytest.mark.parametrize(("name", "allowed", "inside"), [
    ("a.example.com", "*.example.com", True), ("a.b.example.com", "*.example.com", True),
    ("*.b.example.com", "*.example.com", True), ("*.example.com", "*.example.com", True),
    ("example.com", "*.example.com", False), ("aexample.com", "*.example.com", False),
    ("a.example.com", "example.com", False), ("*.example.com", "example.com", False),
])
def test_host_within(name: str, allowed: str, inside: bool) -> None:
    assert host_within(name, allowed) is inside


def test_outbound_without_hosts_takes_the_operator_list(policy: Policy) -> None:
    network = policy.check_network({"outbound": True, "blocked_ports": [8080, 22]})
    assert network.allowed_hosts == ("*.example.com", "api.github.com")
    assert 8080 in network.blocked_ports and 6379 in network.blocked_ports
    assert list(network.blocked_ports) == sorted(set(network.blocked_ports))


def test_outbound_refused_when_operator_allows_no_host(image: Path) -> None:
    closed = Policy(load_settings({}), image_root=str(image))
    assert closed.check_network({}).outbound is False
    with pytest.raises(JobRejected) as caught:
        closed.check_network({"outbound": True})
    assert (caught.value.field, caught.value.rule) == ("/network/outbound", "not_allowed")
