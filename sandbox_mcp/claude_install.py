"""``sandbox-mcp install-claude``: register the MCP server with Claude Code and install the skills.

Where Claude Code reads things (checked against its issue tracker, since ``.claude.json`` is
not a documented format):

- User scope MCP servers: top-level ``mcpServers`` in ``~/.claude.json``, or in
  ``$CLAUDE_CONFIG_DIR/.claude.json`` when that is set (anthropics/claude-code#4193, #37165,
  #48448). Not ``~/.claude/settings.json``, not ``~/.mcp.json``.
- Project scope: ``.mcp.json`` at the project root, ``{"mcpServers": {name: {"type": "stdio",
  "command", "args", "env"}}}``; a project server waits for approval until it is listed in
  ``enabledMcpjsonServers`` of ``.claude/settings.local.json`` (anthropics/claude-code#79973).
- ``claude mcp add --scope user|project NAME -- COMMAND ARGS...`` writes exactly those
  entries; ``--`` keeps the server's own flags away from claude's parser.
- HTTP servers: ``{"type": "http", "url", "headers"}`` in the same places (``claude mcp add
  --transport http NAME URL --header ...`` writes that). We write the JSON ourselves for them,
  so the bearer token never appears in a process's argv.
- Skills: ``~/.claude/skills/<name>/SKILL.md`` (``$CLAUDE_CONFIG_DIR/skills`` when set) and
  ``<project>/.claude/skills/<name>/SKILL.md``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from .errors import CommandFailed, CommandTimeout, InvalidSpec
from .fsutil import atomic_write

__all__ = [
    "DAEMON_INSTALL",
    "SERVER_NAME",
    "InstallReport",
    "Scope",
    "claude_mcp_add_argv",
    "claude_mcp_remove_argv",
    "default_server_command",
    "install_claude",
    "mcp_http_entry",
    "mcp_server_entry",
    "skills_dir",
]

SERVER_NAME = "sandbox"
Scope = Literal["user", "project"]
_CLAUDE_TIMEOUT_S = 60


class InstallReport(BaseModel):
    """What ``install_claude`` did (or, with ``dry_run``, would do)."""

    scope: Scope
    method: Literal["claude-cli", "config-file"] = Field(
        description="'claude-cli' ran `claude mcp add`; 'config-file' wrote Claude Code's JSON directly"
    )
    server_name: str
    server_command: list[str] = Field(description="The stdio command; empty for an HTTP registration")
    server_url: str | None = Field(default=None, description="The HTTP endpoint, for an HTTP registration")
    config_file: str = Field(description="The file that holds the server entry")
    commands: list[list[str]] = Field(default_factory=list, description="Commands run, in order")
    files_written: list[str] = Field(default_factory=list)
    skills_installed: list[str] = Field(default_factory=list, description="Skill directories installed")
    unchanged: bool = Field(default=False, description="The server entry was already as wanted")
    dry_run: bool = False
    notes: list[str] = Field(default_factory=list, description="Things the person should know")


def skills_dir() -> Path:
    """The directory holding the bundled skills (``<name>/SKILL.md``).

    An installed package carries them as ``sandbox_mcp/skills``; a repository checkout
    (editable install) has them at ``<repo>/skills``.

    Raises:
        InvalidSpec: neither location holds any skill (a broken installation).
    """
    here = Path(__file__).resolve().parent
    for candidate in (here / "skills", here.parent / "skills"):
        if any(candidate.glob("*/SKILL.md")):
            return candidate
    raise InvalidSpec(
        f"no bundled skills found in {here / 'skills'} or {here.parent / 'skills'}; reinstall sandbox-mcp"
    )


DAEMON_INSTALL = Path("/opt/sandbox-mcp")  # where scripts/setup installs the daemon's code, root-owned


def default_server_command(
    *, needs_root: bool, euid: int | None = None, script: str | None = None
) -> list[str]:
    """The command Claude Code should run to start the server over stdio.

    ``script`` defaults to the running ``sandbox-mcp`` console script (beside the interpreter,
    else on PATH); failing both, ``python -m sandbox_mcp``. (install-claude passes the root-owned
    install's, ``DAEMON_INSTALL``, when scripts/setup made one.) With the daemon, ``serve`` runs as the user and
    needs no root (pass ``needs_root=False``). Without it, direct mode creates bridges and
    containers, so the server must be root: when ``needs_root`` and ``euid`` (default: the
    current one) is not 0 the command goes through ``sudo -n``, which fails at once, instead of
    hanging on a password prompt nobody sees, unless sudo is passwordless for it.
    """
    euid = os.geteuid() if euid is None else euid
    if script is not None:
        base = [script, "serve"]
    else:
        beside = Path(sys.executable).parent / "sandbox-mcp"
        found = str(beside) if os.access(beside, os.X_OK) and beside.is_file() else None
        found = found or shutil.which("sandbox-mcp")
        base = [os.path.abspath(found), "serve"] if found else [sys.executable, "-m", "sandbox_mcp", "serve"]
    if needs_root and euid != 0:
        return ["sudo", "-n", *base]
    return base


def mcp_server_entry(server_command: Sequence[str]) -> dict[str, Any]:
    """The JSON object Claude Code stores for a stdio server."""
    if not server_command:
        raise InvalidSpec("server command is empty")
    return {"type": "stdio", "command": server_command[0], "args": list(server_command[1:]), "env": {}}


def mcp_http_entry(url: str, token: str) -> dict[str, Any]:
    """The JSON object Claude Code stores for a streamable-HTTP server with a bearer token.

    Raises:
        InvalidSpec: ``url`` is not an http(s) URL, or the token is not a plain header value.
    """
    if not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", url):
        raise InvalidSpec(f"--http wants the server's URL, e.g. http://127.0.0.1:8765/mcp; got {url!r}")
    if not token or not all(33 <= ord(c) < 127 for c in token):
        raise InvalidSpec("the HTTP token must be printable ASCII without spaces; check SANDBOX_MCP_HTTP_TOKEN")
    return {"type": "http", "url": url, "headers": {"Authorization": f"Bearer {token}"}}


def claude_mcp_add_argv(
    scope: Scope, server_command: Sequence[str], *, name: str = SERVER_NAME, claude: str = "claude"
) -> list[str]:
    """``claude mcp add --scope <scope> <name> -- <server_command...>``."""
    if not server_command:
        raise InvalidSpec("server command is empty")
    return [claude, "mcp", "add", "--scope", scope, name, "--", *server_command]


def claude_mcp_remove_argv(scope: Scope, *, name: str = SERVER_NAME, claude: str = "claude") -> list[str]:
    """``claude mcp remove --scope <scope> <name>``."""
    return [claude, "mcp", "remove", "--scope", scope, name]


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidSpec(
            f"{path} is not valid JSON ({exc}); fix or move it, then run install-claude again"
        ) from exc
    if not isinstance(data, dict):
        raise InvalidSpec(
            f"{path} does not hold a JSON object; fix or move it, then run install-claude again"
        )
    return data


def _write_json(path: Path, data: dict[str, Any], default_mode: int) -> None:
    """Atomically replace ``path``, keeping an existing file's mode and owner."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        st = path.stat()
        mode, owner = st.st_mode & 0o7777, (st.st_uid, st.st_gid)
    except FileNotFoundError:
        mode, owner = default_mode, None
    if os.geteuid() != 0:
        owner = None
    atomic_write(path, json.dumps(data, indent=2) + "\n", mode=mode, owner=owner)


def _run(argv: list[str], cwd: Path, env: dict[str, str]) -> None:
    try:
        proc = subprocess.run(
            argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=_CLAUDE_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise CommandTimeout(
            f"{argv[0]} did not finish within {_CLAUDE_TIMEOUT_S}s: {' '.join(argv)}"
        ) from exc
    if proc.returncode != 0:
        raise CommandFailed(
            argv,
            proc.returncode,
            proc.stderr or proc.stdout,
            hint="rerun with --dry-run to see what would be written",
        )


def _install_skills(src: Path, dest: Path, dry_run: bool) -> list[str]:
    """Copy each ``src/<name>/`` holding a SKILL.md to ``dest/<name>/``, replacing only those."""
    installed = []
    for skill_md in sorted(src.glob("*/SKILL.md")):
        target = dest / skill_md.parent.name
        installed.append(str(target))
        if dry_run:
            continue
        if target.is_symlink() or target.is_file():
            target.unlink()
        elif target.exists():
            shutil.rmtree(target)
        shutil.copytree(skill_md.parent, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return installed


def install_claude(
    scope: Scope,
    *,
    project_dir: Path | None,
    home: Path,
    server_command: list[str],
    skills_src: Path,
    dry_run: bool = False,
    claude_config_dir: Path | None = None,
    claude_bin: str | None = None,
    use_claude_cli: bool = True,
    env: dict[str, str] | None = None,
    http: tuple[str, str] | None = None,
) -> InstallReport:
    """Register the MCP server ``sandbox`` with Claude Code and install the bundled skills.

    User scope writes ``mcpServers.sandbox`` in ``<home>/.claude.json`` (or
    ``<claude_config_dir>/.claude.json``, as Claude Code does when ``CLAUDE_CONFIG_DIR`` is
    set; pass its value) and copies the skills to ``<home>/.claude/skills/`` (or
    ``<claude_config_dir>/skills/``). Project scope writes ``<project_dir>/.mcp.json``,
    approves the server in ``<project_dir>/.claude/settings.local.json`` and copies the
    skills to ``<project_dir>/.claude/skills/``.

    When ``use_claude_cli`` and a ``claude`` binary is found (``claude_bin``, else PATH) the
    entry is written by ``claude mcp add`` (after ``claude mcp remove`` when a different
    entry of that name exists); otherwise the JSON is merged directly. Either way other
    servers and other keys are kept, and an entry that is already as wanted is left alone.
    Only skill directories of the bundled names are replaced. ``dry_run`` writes and runs
    nothing and reports what it would do.

    Raises:
        InvalidSpec: bad scope, project scope with ``http`` or without an existing ``project_dir``, an empty
            server command, no skills in ``skills_src``, or an existing config file that is
            not a JSON object (it is never overwritten).
        CommandFailed: ``claude mcp add``/``remove`` exited non-zero.
        CommandTimeout: ``claude`` did not finish within a minute.
        OSError: a file could not be written.
    """
    if scope not in ("user", "project"):
        raise InvalidSpec(f"scope must be 'user' or 'project', got {scope!r}")
    entry = mcp_http_entry(*http) if http else mcp_server_entry(server_command)
    if not any(Path(skills_src).glob("*/SKILL.md")):
        raise InvalidSpec(f"no skills (*/SKILL.md) in {skills_src}")
    home = Path(home)
    notes: list[str] = []

    if scope == "project" and http is not None:
        raise InvalidSpec(
            "an HTTP registration carries the bearer token, and a project's .mcp.json is meant to be "
            "committed; register it with --scope user"
        )
    if scope == "project":
        if project_dir is None or not Path(project_dir).is_dir():
            raise InvalidSpec(f"project scope needs an existing project directory, got {project_dir!r}")
        project_dir = Path(project_dir).resolve()
        config_file = project_dir / ".mcp.json"
        skills_dest = project_dir / ".claude" / "skills"
        cwd = project_dir
    else:
        base = Path(claude_config_dir) if claude_config_dir else None
        config_file = (base or home) / ".claude.json"
        skills_dest = (base or home / ".claude") / "skills"
        cwd = home if home.is_dir() else Path("/")  # user scope does not depend on the cwd

    config = _read_json(config_file)
    servers = config.get("mcpServers")
    if servers is not None and not isinstance(servers, dict):
        raise InvalidSpec(
            f"{config_file}: 'mcpServers' is not an object; fix it, then run install-claude again"
        )
    current = (servers or {}).get(SERVER_NAME)
    unchanged = current == entry

    claude = None
    if use_claude_cli and http is None:
        claude = claude_bin or shutil.which("claude", path=(env or os.environ).get("PATH"))
    method: Literal["claude-cli", "config-file"] = "claude-cli" if claude else "config-file"
    report = InstallReport(
        scope=scope,
        method=method,
        server_name=SERVER_NAME,
        server_command=[] if http else list(server_command),
        server_url=http[0] if http else None,
        config_file=str(config_file),
        unchanged=unchanged,
        dry_run=dry_run,
    )

    if not unchanged:
        if claude:
            run_env = dict(os.environ if env is None else env)
            run_env["HOME"] = str(home)
            # claude must write the same file we read: the config dir we were given, or none.
            run_env.pop("CLAUDE_CONFIG_DIR", None)
            if claude_config_dir:
                run_env["CLAUDE_CONFIG_DIR"] = str(claude_config_dir)
            argvs = [claude_mcp_add_argv(scope, server_command, claude=claude)]
            if current is not None:
                argvs.insert(0, claude_mcp_remove_argv(scope, claude=claude))
            for argv in argvs:
                report.commands.append(argv)
                if not dry_run:
                    _run(argv, cwd, run_env)
        else:
            merged = dict(config)
            merged["mcpServers"] = {**(servers or {}), SERVER_NAME: entry}
            if not dry_run:
                # .claude.json holds account state: keep it private; .mcp.json is meant to be committed.
                _write_json(config_file, merged, 0o600 if scope == "user" else 0o644)
        report.files_written.append(str(config_file))

    if scope == "project":
        assert project_dir is not None
        local = project_dir / ".claude" / "settings.local.json"
        settings = _read_json(local)
        enabled = settings.get("enabledMcpjsonServers")
        if not isinstance(enabled, list):
            enabled = []
        if SERVER_NAME not in enabled:
            settings["enabledMcpjsonServers"] = [*enabled, SERVER_NAME]
            if not dry_run:
                _write_json(local, settings, 0o644)
            report.files_written.append(str(local))
        notes.append(f"{config_file} is meant to be committed; {local} stays private to you.")

    report.skills_installed = _install_skills(Path(skills_src), skills_dest, dry_run)
    if http is None and server_command[:1] == ["sudo"]:
        notes.append(
            "The server runs through 'sudo -n' because direct mode needs root: allow it without a password "
            "(e.g. a sudoers rule for this command), or register as root. Under sudo it reads root's "
            "~/.config/sandbox-mcp/config.toml and keeps state in root's ~/sandboxed."
        )
    if http is not None:
        notes.append(f"{config_file} now holds the HTTP bearer token: keep it private.")
    notes.append("Restart Claude Code (or run /mcp) to pick up the server and the skills.")
    report.notes = notes
    return report
