"""The command line for people: the same operations as the MCP tools, plus serve, ssh, doctor, bench."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from types import UnionType
from typing import TYPE_CHECKING, Any, Literal, get_args, get_origin

import anyio
from pydantic import ValidationError

from . import __version__, shutdown
from .config import Settings, load_settings
from .errors import InvalidSpec, SandboxError
from .fsutil import atomic_write
from .models import CreateSpec
from .naming import validate_name
from .runtimes import known_types

if TYPE_CHECKING:
    from .ssh import SSHTarget
    from .workspaces import Workspaces

__all__ = ["add_create_flags", "build_parser", "create_spec", "main", "ssh_command_argv"]


async def _print_progress(message: str, fraction: float | None = None) -> None:
    pct = f"{fraction * 100:3.0f}% " if fraction is not None else "     "
    print(f"  {pct}{message}", file=sys.stderr, flush=True)


def _dump(model: Any) -> None:
    print(model.model_dump_json(indent=2))


def _use_daemon(settings: Settings) -> bool:
    """Whether to go through the daemon (see :func:`daemon_use.use_daemon`, which raises InvalidState)."""
    from .daemon_use import use_daemon

    return use_daemon(settings)


async def _with_manager(settings: Settings, fn: Callable[[Workspaces], Awaitable[int]]) -> int:
    """Run ``fn`` with the daemon's workspaces (as this user) or, as root without a daemon, a local manager."""
    if _use_daemon(settings):
        from .daemon_client import RemoteManager

        async with RemoteManager(settings) as remote:
            return await fn(remote)
    # Imported here: the daemon's clients never load the manager (pyroute2, asyncssh, ...).
    from .manager import WorkspaceManager
    from .owners import OwnedManager

    async with WorkspaceManager(settings, serve_ports=False) as manager:  # a running server serves them
        return await fn(OwnedManager(manager, os.geteuid()))


def _cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    # Through the daemon over stdio, serve is a byte bridge: it loads neither the MCP server nor the manager
    # (~1 s of imports), so the client's session starts that much sooner.
    if _use_daemon(settings):
        if args.http:
            from contextlib import asynccontextmanager

            from .daemon_client import RemoteManager
            from .server import serve_http

            @asynccontextmanager
            async def remote(server: object):  # type: ignore[no-untyped-def]
                async with RemoteManager(settings) as m:
                    yield m

            serve_http(settings, args.host, args.port, lifespan=remote)
        else:
            from .bridge import bridge_stdio
            from .daemon_use import where_serve_goes

            # The one line a stdio serve writes at start: the client's log shows whose settings apply.
            print(f"sandbox-mcp serve: {where_serve_goes(settings)}", file=sys.stderr, flush=True)
            anyio.run(bridge_stdio, settings.daemon_socket, settings.daemon_group)
            shutdown.exit_now(0)
    elif args.http:
        from .server import serve_http

        serve_http(settings, args.host, args.port)
    else:
        from .server import build_server, serve_stdio

        anyio.run(serve_stdio, build_server(settings))
        shutdown.exit_now(0)  # the client waits for the exit; the work is all done and closed
    return 0


def _cmd_daemon(args: argparse.Namespace, settings: Settings) -> int:
    from .daemon import run_daemon

    anyio.run(run_daemon, settings)
    return 0


def _cmd_create(args: argparse.Namespace, settings: Settings) -> int:
    async def run(m: Workspaces) -> int:
        ws = await m.create(create_spec(args), _print_progress)
        _dump(ws)
        return 0

    return anyio.run(_with_manager, settings, run)


# Help for some flags shorter than the field's description (the tool's words, written for agents).
_CREATE_HELP = {
    "egress": "network access from inside: none, internet, or domain names separated by commas "
              "(pypi.org,*.pythonhosted.org); internet and names need SANDBOX_MCP_NAT=true",
    "cpus": "CPUs it may use (default: the settings' cpus)",
    "memory_mib": "memory in MiB (default: the settings' memory_mib)",
    "repo": "a host git repository to clone into the workspace (on branch sandbox/NAME)",
    "ref": "with --repo: the branch, tag or commit to start from (default HEAD)",
}


def add_create_flags(p: argparse.ArgumentParser) -> None:
    """``create``'s arguments, one per :class:`CreateSpec` field: a new field is a new flag, with no edit here."""
    own = {
        "name": lambda: p.add_argument("name"),
        "packages": lambda: p.add_argument("-p", "--package", dest="packages", metavar="PACKAGE", action="append",
                                           default=[], help="extra package (repeatable)"),
        "start": lambda: p.add_argument("--no-start", dest="start", action="store_false"),
        "egress": lambda: p.add_argument("--egress", type=egress_arg, help=_CREATE_HELP["egress"]),
        "secrets": lambda: p.add_argument("--secret", dest="secrets", metavar="NAME", action="append", default=[],
                                          help="a secret configured on the host, used through placeholders "
                                          "(repeatable)"),
    }
    for name, field in CreateSpec.model_fields.items():
        if name in own:
            own[name]()
            continue
        kind = field.annotation
        if isinstance(kind, UnionType):  # X | None: the flag takes an X
            kind = next(a for a in get_args(kind) if a is not type(None))
        flag = "--" + name.replace("_", "-")
        help_text = _CREATE_HELP.get(name)
        if kind is bool:
            p.add_argument(flag, action="store_true", default=None, help=help_text or field.description)
        elif name == "type":  # the types the known runtimes realise
            p.add_argument(flag, choices=known_types(), default=field.default, help=help_text)
        elif get_origin(kind) is Literal:
            p.add_argument(flag, choices=list(get_args(kind)), default=field.default, help=help_text)
        else:
            p.add_argument(flag, type=kind, help=help_text)


def egress_arg(text: str) -> str | list[str]:
    """``--egress``'s value: ``none``, ``internet`` or domain names separated by commas (checked by the spec)."""
    return text if text in ("none", "internet") else [n for n in text.replace(" ", ",").split(",") if n]


def _cmd_egress(args: argparse.Namespace, settings: Settings) -> int:
    async def run(m: Workspaces) -> int:
        _dump(await m.set_egress(args.name, egress_arg(args.egress)))
        return 0

    return anyio.run(_with_manager, settings, run)


def create_spec(args: argparse.Namespace) -> CreateSpec:
    """The :class:`CreateSpec` that ``create``'s arguments ask for (flags not given keep the field's default).

    Raises:
        InvalidSpec: an argument the spec refuses (the workspace name's rule first, as the manager says it).
    """
    validate_name(args.name)
    given = {k: v for k, v in vars(args).items() if k in CreateSpec.model_fields and v is not None}
    try:
        return CreateSpec(**given)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise InvalidSpec(f"invalid create arguments: {problems}") from None


def _cmd_ls(args: argparse.Namespace, settings: Settings) -> int:
    from .budget import page_workspaces

    async def run(m: Workspaces) -> int:
        result = page_workspaces(await m.list(), args.offset, args.limit)
        if args.json:
            _dump(result)
            return 0
        rows = [("NAME", "TYPE", "STATE", "IP", "HOST DIR")]
        rows += [(w.name, w.type, w.state, w.ip or "-", w.host_workspace_dir) for w in result.workspaces]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for row in rows:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        return 0

    return anyio.run(_with_manager, settings, run)


def _cmd_exec(args: argparse.Namespace, settings: Settings) -> int:
    import shlex

    command = args.command[0] if len(args.command) == 1 else shlex.join(args.command)
    stdin = None if sys.stdin.isatty() or not args.stdin else sys.stdin.read()
    env = dict(pair.split("=", 1) for pair in args.env) or None

    async def run(m: Workspaces) -> int:
        r = await m.exec(args.name, command, args.cwd, env, args.timeout, stdin)
        sys.stdout.write(r.stdout)
        sys.stderr.write(r.stderr)
        if r.truncated:
            print("[sandbox-mcp: output truncated]", file=sys.stderr)
        if r.timed_out:
            print(f"[sandbox-mcp: timed out after {args.timeout}s]", file=sys.stderr)
            return 124
        return r.exit_code if r.exit_code is not None else 255

    return anyio.run(_with_manager, settings, run)


def _cmd_start_process(args: argparse.Namespace, settings: Settings) -> int:
    import shlex

    command = args.command[0] if len(args.command) == 1 else shlex.join(args.command)
    env = dict(pair.split("=", 1) for pair in args.env) or None

    async def run(m: Workspaces) -> int:
        _dump(await m.start_process(args.name, command, args.cwd, env, args.process_id))
        return 0

    return anyio.run(_with_manager, settings, run)


def _cmd_process_output(args: argparse.Namespace, settings: Settings) -> int:
    """The output from ``--cursor`` on, raw: stdout to stdout, stderr to stderr; ``--follow`` until it ends.

    The process keeps running inside the workspace whatever happens here, so following it can be
    stopped (Ctrl-C) and picked up again with the cursor printed at the end.
    """

    async def run(m: Workspaces) -> int:
        cursor = args.cursor
        while True:
            out = await m.process_output(args.name, args.process_id, cursor, args.wait if not args.follow else 30,
                                         args.max_bytes)  # fmt: skip
            if out.dropped_bytes:
                print(f"[sandbox-mcp: {out.dropped_bytes} bytes before this were no longer kept]", file=sys.stderr)
            sys.stdout.write(out.stdout)
            sys.stdout.flush()
            sys.stderr.write(out.stderr)
            cursor = out.next_cursor
            if not args.follow or (not out.running and not out.more):
                break
        if not out.running:
            how = f"exit code {out.exit_code}" if out.signal is None else f"signal {out.signal}"
            print(f"[sandbox-mcp: ended, {how}]", file=sys.stderr)
        print(f"[sandbox-mcp: next cursor {cursor}]", file=sys.stderr)
        return 0

    return anyio.run(_with_manager, settings, run)


def _cmd_wait_process(args: argparse.Namespace, settings: Settings) -> int:
    async def run(m: Workspaces) -> int:
        result = await m.wait_process(args.name, args.process_id, args.until, args.timeout, args.cursor)
        _dump(result)
        return 0 if result.matched else 1

    return anyio.run(_with_manager, settings, run)


def _env_pair(text: str) -> str:
    if "=" not in text or text.startswith("="):
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return text


def ssh_command_argv(target: SSHTarget, known_hosts: Path, extra: Sequence[str]) -> list[str]:
    """The OpenSSH argv for ``sandbox-mcp ssh``: the person's extra words go after ``--``.

    OpenSSH parses options again after the host name, so without ``--`` an extra
    ``-o ProxyCommand=...`` would run a command on this host; after it, everything is the
    remote command. A leading ``--`` the person typed is not doubled.

    Raises:
        InvalidSpec: a key or known_hosts path OpenSSH cannot take (see :func:`ssh.ssh_argv`).
    """
    from . import ssh

    words = list(extra)
    if words[:1] == ["--"]:
        words = words[1:]
    return ssh.ssh_argv(target, known_hosts, ["--", *words] if words else [])


def _cmd_ssh(args: argparse.Namespace, settings: Settings) -> int:
    from . import ssh
    from .naming import validate_name
    from .paths import WorkspacePaths

    validate_name(args.name)
    if os.geteuid() != 0:  # through the daemon, with this user's own key (userkeys.py)
        from .daemon_client import RemoteManager

        async def remote() -> SSHTarget:
            async with RemoteManager(settings) as m:
                return await m.ssh_target(args.name)

        target = anyio.run(remote)
        known_hosts = target.client_key_path.with_name(f"known_hosts-{args.name}")
    else:  # root reads the state itself, daemon or not

        from .manager import WorkspaceManager
        from .owners import OwnedManager

        async def local() -> SSHTarget:
            async with WorkspaceManager(settings, serve_ports=False) as manager:
                return await OwnedManager(manager, 0).ssh_target(args.name)

        target = anyio.run(local)
        known_hosts = WorkspacePaths.of(settings.state_dir, args.name).runtime / "known_hosts"
    atomic_write(known_hosts, ssh.known_hosts_line(target.host, target.host_key_path, target.port) + "\n", mode=0o600)
    argv = ssh_command_argv(target, known_hosts, args.extra)
    os.execvp(argv[0], argv)
    return 1  # not reached


def _simple(method: str, *extra: str) -> Callable[[argparse.Namespace, Settings], int]:
    def command(args: argparse.Namespace, settings: Settings) -> int:
        async def run(m: Workspaces) -> int:
            kwargs = {k: getattr(args, k) for k in extra}
            fn = getattr(m, method)
            if method in ("start", "restore", "fork", "snapshot"):
                kwargs["progress"] = _print_progress
            result = await fn(args.name, **kwargs)
            if method == "logs":
                print(result.log)
            else:
                _dump(result)
            return 0

        return anyio.run(_with_manager, settings, run)

    return command


def _cmd_git(args: argparse.Namespace, settings: Settings) -> int:
    """diff | fetch | merge | apply: the workspace's branch, back into the host repository it came from.

    fetch goes through the server (the daemon's git runs as this user); merge and apply then run this
    user's git in the host repository (as root: the repository owner's), hooks off, clean config.
    """
    from . import hostgit

    async def run(m: Workspaces) -> int:
        if args.action == "diff":
            diff = await m.git_diff(args.name, args.stat)
            for f in diff.files:
                counts = "-\t-" if f.added is None else f"{f.added}\t{f.deleted}"
                print(f"{counts}\t{f.status}\t{f.path}")
            if diff.patch:
                print(diff.patch, end="" if diff.patch.endswith("\n") else "\n")
            if diff.truncated:
                print("sandbox-mcp: the diff was cut at the server's bound (git_patch_max_bytes)", file=sys.stderr)
            return 0
        fetched = await m.git_fetch(args.name, args.include_uncommitted)
        print(f"{fetched.ref} = {fetched.head} ({fetched.commits} commits since the base) in {fetched.repo}",
              file=sys.stderr)  # fmt: skip
        if args.action == "fetch":
            _dump(fetched)
            return 0
        user = hostgit.host_user(hostgit.run_uid(os.geteuid() or None, fetched.repo))
        branch = fetched.ref.removeprefix("refs/heads/")
        try:
            out = await hostgit.merge_branch(user, fetched.repo, branch, squash=args.action == "apply")
        except hostgit.MergeConflict as exc:
            print(f"sandbox-mcp: {exc}", file=sys.stderr)
            return 1
        if args.action == "apply":
            print(out, end="")
            print(f"sandbox-mcp: {branch} applied to the index as one change; review and commit it", file=sys.stderr)
        else:
            print(out)
        return 0

    return anyio.run(_with_manager, settings, run)


def _cmd_doctor(args: argparse.Namespace, settings: Settings) -> int:
    from .doctor import run_checks

    failed = 0
    for check in run_checks(settings):
        mark = "ok  " if check.ok else ("FAIL" if check.required else "warn")
        print(f"[{mark}] {check.name}: {check.detail}")
        if not check.ok and check.fix:
            print(f"       fix: {check.fix}")
        failed += int(not check.ok and check.required)
    return 1 if failed else 0


def _images_in_use(settings: Settings) -> list[str]:
    """The image keys the registry's workspaces use (each runtime keeps its key as ``runtime_state.image``)."""
    from .registry import Registry

    if not settings.registry_path.is_file():
        return []
    data = Registry(settings.registry_path).read_sync()
    return sorted({key for r in data.workspaces.values() if isinstance(key := r.runtime_state.get("image"), str)})


def _cmd_image(args: argparse.Namespace, settings: Settings) -> int:
    from .images import DebianRoot, ImageStore
    from .naming import validate_packages

    store = ImageStore(settings.image_dir)
    root = DebianRoot(settings, store)
    if args.action == "ls":
        for meta in store.list_images():
            print(json.dumps(meta))
        return 0
    if args.action == "prune":
        from .runtimes.incus.image import IncusImage
        from .runtimes.qemu.image import VmImage

        # Never what a registered workspace uses (running VMs also hold their image's lock: ImageStore.hold).
        keep = _images_in_use(settings)
        # Derived images after the roots, so images of pruned roots go too.
        for name in [*root.prune(keep), *VmImage(settings, store, root).prune(keep),
                     *IncusImage(settings, store).prune(keep)]:
            print(f"removed {store.root / name}")
        return 0
    packages = validate_packages(args.package, "debian")
    if args.vm:
        from .runtimes.qemu.image import VmImage

        vm = VmImage(settings, store, root)
        key = anyio.run(vm.ensure, packages, _print_progress)
        print(store.path(key))
        return 0
    key = anyio.run(root.ensure, packages, _print_progress)
    print(root.path(key))
    return 0


def _cmd_bench(args: argparse.Namespace, settings: Settings) -> int:
    from .bench import run_bench

    return anyio.run(run_bench, settings, args)


def _cmd_install_claude(args: argparse.Namespace, settings: Settings) -> int:
    from .claude_install import DAEMON_INSTALL, default_server_command, install_claude, skills_dir
    from .daemon_client import daemon_available

    # With the daemon (running, or installed by scripts/setup) serve runs as the user: no sudo.
    installed = DAEMON_INSTALL / "venv" / "bin" / "sandbox-mcp"
    daemon = daemon_available(settings) or os.access(installed, os.X_OK)
    http = None
    if args.http:
        from .http_auth import load_token

        http = (args.http, load_token(settings).value)
    report = install_claude(
        args.scope,
        project_dir=Path(args.project or ".").resolve() if args.scope == "project" else None,
        home=Path.home(),
        server_command=default_server_command(
            needs_root=settings.mode != "nixos" and not daemon,
            script=str(installed) if os.access(installed, os.X_OK) else None,  # root-owned, stable
        ),
        skills_src=skills_dir(),
        dry_run=args.dry_run,
        claude_config_dir=os.environ.get("CLAUDE_CONFIG_DIR"),
        http=http,
    )
    _dump(report)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sandbox-mcp", description="Disposable, isolated workspaces for AI agents.")
    p.add_argument("--version", action="version", version=f"sandbox-mcp {__version__}")
    p.add_argument("--no-daemon", action="store_true",
                   help="work in process (as root) even where a daemon runs, with this user's settings")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    s = sub.add_parser("serve", help="run the MCP server (stdio by default)")
    s.add_argument("--http", action="store_true", help="serve streamable HTTP instead of stdio")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8765)
    s.set_defaults(fn=_cmd_serve)

    s = sub.add_parser("daemon", help="run the root daemon that serve and the CLI talk to (on its unix socket)")
    s.set_defaults(fn=_cmd_daemon)

    s = sub.add_parser("create", help="create (and start) a workspace")
    add_create_flags(s)
    s.set_defaults(fn=_cmd_create)

    s = sub.add_parser("ls", help="list workspaces (in name order)")
    s.add_argument("--json", action="store_true")
    s.add_argument("--offset", type=int, default=0, help="skip this many")
    s.add_argument("--limit", type=int, help="list at most this many")
    s.set_defaults(fn=_cmd_ls)

    s = sub.add_parser("exec", help="run a command in a workspace")
    s.add_argument("name")
    s.add_argument("command", nargs="+")
    s.add_argument("--cwd")
    s.add_argument("--timeout", type=float, default=120)
    s.add_argument("--stdin", action="store_true", help="pass this process's stdin to the command")
    s.add_argument("-e", "--env", action="append", default=[], type=_env_pair, metavar="KEY=VALUE",
                   help="environment variable for the command (repeatable)")
    s.set_defaults(fn=_cmd_exec)

    s = sub.add_parser("start-process", help="start a command in the background of a workspace (see ps, output)")
    s.add_argument("name")
    s.add_argument("command", nargs="+")
    s.add_argument("--cwd")
    s.add_argument("-e", "--env", action="append", default=[], type=_env_pair, metavar="KEY=VALUE",
                   help="environment variable for the command (repeatable)")
    s.add_argument("--id", dest="process_id", help="your name for it (default: one is made)")
    s.set_defaults(fn=_cmd_start_process)

    s = sub.add_parser("output", help="a background process's output (raw), from a cursor on")
    s.add_argument("name")
    s.add_argument("process_id")
    s.add_argument("--cursor", type=int, default=0, help="where to start (the last call's next cursor)")
    s.add_argument("--wait", type=float, default=0, help="wait up to this many seconds for new output")
    s.add_argument("--max-bytes", type=int, default=65536, help="at most this many bytes per read")
    s.add_argument("-f", "--follow", action="store_true", help="keep reading until the process ends")
    s.set_defaults(fn=_cmd_process_output)

    s = sub.add_parser("wait-process", help="wait until a background process exits, listens or prints a line "
                       "(exit status 1 when it did not)")
    s.add_argument("name")
    s.add_argument("process_id")
    s.add_argument("--until", default="exit", help="exit, port:N or output:REGEX (default exit)")
    s.add_argument("--timeout", type=float, default=60)
    s.add_argument("--cursor", type=int, default=0, help="output:REGEX searches from here")
    s.set_defaults(fn=_cmd_wait_process)

    s = sub.add_parser("stop-process", help="stop a background process and what it started (signal, then KILL)")
    s.add_argument("name")
    s.add_argument("process_id")
    s.add_argument("--signal", default="TERM", choices=["TERM", "INT", "HUP", "KILL", "QUIT", "USR1", "USR2"])
    s.add_argument("--grace", dest="grace_s", type=float, default=5, help="seconds before KILL")
    s.set_defaults(fn=_simple("stop_process", "process_id", "signal", "grace_s"))

    s = sub.add_parser("ps", help="a workspace's background processes since it last started")
    s.add_argument("name")
    s.set_defaults(fn=_simple("list_processes"))

    s = sub.add_parser("publish", help="reach a workspace's TCP port at 127.0.0.1:HOST_PORT (served by the "
                       "daemon; not by a one-shot CLI in process)")
    s.add_argument("name")
    s.add_argument("port", type=int)
    s.add_argument("--host-port", type=int, help="the host port (default: a free one)")
    s.set_defaults(fn=_simple("publish_port", "port", "host_port"))

    s = sub.add_parser("unpublish", help="close the host side of a published port")
    s.add_argument("name")
    s.add_argument("port", type=int)
    s.set_defaults(fn=_simple("unpublish_port", "port"))

    s = sub.add_parser("ssh", help="interactive shell in a workspace (pinned host key)")
    s.add_argument("name")
    s.add_argument("extra", nargs=argparse.REMAINDER, help="extra arguments for ssh (e.g. a command)")
    s.set_defaults(fn=_cmd_ssh)

    for name, method, helptext in (("start", "start", "start a workspace"), ("stop", "stop", "stop a workspace"),
                                   ("status", "status", "show a workspace with runtime detail")):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("name")
        s.set_defaults(fn=_simple(method))

    for name, method, helptext in (("pause", "pause", "freeze a running workspace"),
                                   ("resume", "resume", "thaw a paused workspace"),
                                   ("snapshots", "list_snapshots", "list a workspace's snapshots")):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("name")
        s.set_defaults(fn=_simple(method))

    s = sub.add_parser("snapshot", help="save a workspace (its dir, Claude config and root) as a named snapshot")
    s.add_argument("name")
    s.add_argument("snapshot")
    s.add_argument("--memory", action="store_true",
                   help="keep the running processes too (refused: not available, see snapshot_workspace)")
    s.set_defaults(fn=_simple("snapshot", "snapshot", "memory"))

    s = sub.add_parser("restore", help="put a workspace back to a snapshot (files written since are lost)")
    s.add_argument("name")
    s.add_argument("snapshot")
    s.set_defaults(fn=_simple("restore", "snapshot"))

    s = sub.add_parser("rm-snapshot", help="delete one snapshot of a workspace")
    s.add_argument("name")
    s.add_argument("snapshot")
    s.set_defaults(fn=_simple("delete_snapshot", "snapshot"))

    s = sub.add_parser("fork", help="make a new workspace from another's current state (or a snapshot)")
    s.add_argument("name")
    s.add_argument("new_name")
    s.add_argument("--snapshot", help="fork from this snapshot instead of the current state")
    s.set_defaults(fn=_simple("fork", "new_name", "snapshot"))

    s = sub.add_parser("egress", help="change a workspace's network access at once (no restart)")
    s.add_argument("name")
    s.add_argument("egress", metavar="POLICY",
                   help="none, internet, or domain names separated by commas (pypi.org,*.pythonhosted.org)")
    s.set_defaults(fn=_cmd_egress)

    s = sub.add_parser("rm", help="destroy a workspace")
    s.add_argument("name")
    s.add_argument("--keep-data", action="store_true", help="keep the host workspace directory")
    s.set_defaults(fn=_simple("destroy", "keep_data"))

    s = sub.add_parser("logs", help="show a workspace's boot log")
    s.add_argument("name")
    s.add_argument("-n", "--lines", type=int, default=200)
    s.set_defaults(fn=_simple("logs", "lines"))

    s = sub.add_parser("git", help="a workspace's branch: diff, fetch into the host repository, merge, apply")
    s.add_argument("name")
    s.add_argument("action", choices=["diff", "fetch", "merge", "apply"],
                   help="diff: changes since the base; fetch: the branch sandbox/NAME into the host repository; "
                   "merge: fetch, then merge it --no-ff into the current branch; apply: fetch, then stage it as "
                   "one squashed change")
    s.add_argument("--stat", action="store_true", help="diff: the file list only")
    s.add_argument("--include-uncommitted", action="store_true",
                   help="fetch/merge/apply: commit the workspace's uncommitted work first")
    s.set_defaults(fn=_cmd_git)

    s = sub.add_parser("image", help="build, list or prune the cached root images (direct mode)")
    s.add_argument("action", choices=["build", "ls", "prune"])
    s.add_argument("-p", "--package", action="append", default=[], help="extra Debian package (repeatable)")
    s.add_argument("--vm", action="store_true", help="build the VM image (kernel, initrd, root disk) instead")
    s.set_defaults(fn=_cmd_image)

    s = sub.add_parser("doctor", help="check host prerequisites")
    s.set_defaults(fn=_cmd_doctor)

    s = sub.add_parser("bench", help="measure create, exec and file transfer against ssh baselines")
    s.add_argument("--runs", type=int, default=5, help="create/destroy cycles")
    s.add_argument("--execs", type=int, default=200, help="exec calls for the latency percentiles")
    s.add_argument("--file-mib", type=int, default=16)
    s.add_argument("--create", choices=("also", "only"), default="also",
                   help="only: just create -> first exec against a bare boot (and stop, destroy), --runs times")
    s.add_argument("--incus", choices=("also", "only", "no"), default="also",
                   help="the Incus section (a private incusd; skipped where Incus is not installed)")
    s.add_argument("--vm-runs", type=int, default=2, help="VM create/destroy cycles (0: no VM figures)")
    s.add_argument("--capacity", choices=("also", "only", "no"), default="also",
                   help="how many containers start at once (a ramp) and MiB per idle one; privileged too "
                   "with SANDBOX_MCP_ALLOW_PRIVILEGED=true")
    s.add_argument("--parallel-max", type=int, default=40, help="where the capacity ramp (10, 20, ...) stops")
    s.add_argument("--process-runs", type=int, default=10,
                   help="rounds of the processes section (start_process, long-poll; 0: no processes, ports "
                   "and exec-progress figures)")
    s.add_argument("--git", choices=("also", "only", "no"), default="also",
                   help="the git section: create with repo= against a plain create, fetch_workspace of commits")
    s.add_argument("--git-files", type=int, default=10_000, help="files in the git section's repository")
    s.add_argument("--git-commits", type=int, default=100, help="commits fetch_workspace brings back")
    s.add_argument("--concurrency", choices=("also", "only", "no"), default="also",
                   help="many exec true at once over several workspaces: stdio serve, in process, raw ssh")
    s.add_argument("--concurrent-calls", type=int, default=200, help="calls at once in the concurrency section")
    s.add_argument("--concurrent-workspaces", type=int, default=10, help="workspaces the calls spread over")
    s.add_argument("--concurrent-rounds", type=int, default=5, help="rounds of the concurrency section")
    s.add_argument("--snapshots", choices=("also", "only", "no"), default="also",
                   help="pause/resume, snapshot/restore against cp -a (and reflinks on btrfs), fork -> first exec")
    s.add_argument("--host-disk", choices=("only", "no"), default="no",
                   help="what HOST_DISK_MIB costs: create -> first exec and a 64 MiB write, with and without it")
    s.add_argument("--egress", choices=("also", "only", "no"), default="also",
                   help="the egress resolver's answer time against a direct query to a stand-in upstream")
    s.add_argument("--dns-queries", type=int, default=200, help="queries per figure in the egress section")
    s.add_argument("--snapshot-mib", default="100",
                   help="workspace dir sizes in MiB for the snapshot figures, comma-separated (e.g. 100,1024)")
    s.add_argument("--snapshot-vm", action="store_true",
                   help="also a VM's memory snapshot save and restore against a disk snapshot's (two boots)")
    s.add_argument("--secrets", choices=("also", "only", "no"), default="also",
                   help="the secrets proxy's added latency and throughput against direct HTTPS (on loopback)")
    s.add_argument("--secrets-requests", type=int, default=300, help="small requests each way (secrets section)")
    s.add_argument("--pool", choices=("also", "only", "no"), default="also",
                   help="the warm pool: create -> first exec claiming a booted slot against the cold path and a "
                   "bare boot, the refill time and a slot's memory")
    s.add_argument("--pool-creates", type=int, default=20, help="creates from the pool (pool section)")
    s.add_argument("--pool-size", type=int, default=2, help="pool_size of the pool section's server")
    s.set_defaults(fn=_cmd_bench)

    s = sub.add_parser("install-claude", help="register the server with Claude Code and install the skills")
    s.add_argument("--scope", choices=["user", "project"], default="user")
    s.add_argument("--project", help="project directory (project scope); default: the current directory")
    s.add_argument("--dry-run", action="store_true")
    s.add_argument(
        "--http", metavar="URL",
        help="register the HTTP server at URL (e.g. http://127.0.0.1:8765/mcp) with its bearer token "
        "(SANDBOX_MCP_HTTP_TOKEN, else the one `serve --http` generates) instead of the stdio command",
    )  # fmt: skip
    s.set_defaults(fn=_cmd_install_claude)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
        if args.no_daemon:
            settings = settings.model_copy(update={"use_daemon": False})
        return int(args.fn(args, settings) or 0)
    except SandboxError as exc:
        print(f"sandbox-mcp: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
