"""The Debian root recipe: what every direct-mode workspace boots, built with debootstrap.

A base root (systemd, sshd, sudo, python3 for the exec agent, the workspace user) is built
once; a workspace asking for extra packages gets a variant: a copy of the base with those
packages installed, under its own key. Both live in the :class:`~.store.ImageStore`, which
builds aside and renames into place. Containers boot a root with ``--volatile=overlay``, so it
is never written after it is built and any number of workspaces share it; other runtimes derive
their artefacts (a VM disk, an Incus image) from the same root.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import anyio

from .. import claude_workspace, hostcmd
from ..config import Settings
from ..errors import BackendError
from ..naming import BUILD_UID_BASE, UID_RANGE
from ..paths import AGENT_LISTEN_PATH, EXEC_AGENT_PATH
from ..progress import Progress, no_progress
from .store import ImageStore

__all__ = [
    "AGENT_SERVICE",
    "BASE_PACKAGES",
    "CONTAINER_SKIPPED_UNITS",
    "DISABLED_GENERATORS",
    "IMAGE_RECIPE_VERSION",
    "MASKED_UNITS",
    "POOL_SLOT_ARG",
    "DebianRoot",
    "agent_service",
    "compile_exec_agent_argv",
    "debootstrap_argv",
    "detect_debian_mirror",
    "detect_debian_suite",
    "exec_agent_digest",
    "image_key",
    "install_exec_agent",
]

# Bump when the recipe below changes, so cached images are rebuilt.
IMAGE_RECIPE_VERSION = 13
# Installed into every image (EXEC_AGENT_PATH); its digest is part of the image key, so a changed
# agent is never run from an image built with an older one.
EXEC_AGENT_SOURCE = Path(__file__).resolve().parents[1] / "exec_agent.py"

BASE_PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "openssh-server",
    "sudo",
    "iproute2",
    "iputils-ping",
    "ca-certificates",
    "procps",
    "less",
    "git",
    "curl",
    "python3",  # runs the exec agent (sandbox_mcp/exec_agent.py); agents want it anyway
    "python3-venv",  # `python3 -m venv` (ensurepip and its bundled pip wheel): agents make venvs offline too
)

# Units that only slow a short-lived sandbox's boot down or touch the network outside.
MASKED_UNITS = (
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
    "man-db.timer",
    "systemd-tmpfiles-clean.timer",
    "console-getty.service",
    "getty@.service",
    "systemd-networkd-wait-online.service",
    "systemd-timesyncd.service",
    # sshd runs without PAM, so no session ever reaches logind; it held 1 of the 7 inotify instances
    # an idle workspace charged to host root (see sysctls.py).
    "systemd-logind.service",
    # Work a throw-away root in a container never needs (VMs mask them too, runtimes/qemu/image.py):
    # no fstab to remount by, the image's users are made when it is built, nobody logs in to be
    # recorded, the journal stays in memory (journald.conf below), no password prompts (two inotify
    # watchers), no SysV telinit.
    "systemd-remount-fs.service",
    "systemd-sysusers.service",
    "systemd-update-utmp.service",
    "systemd-update-utmp-runlevel.service",
    "systemd-journal-flush.service",
    "systemd-ask-password-console.path",
    "systemd-ask-password-wall.path",
    "systemd-initctl.socket",
    # Never applicable in a container nor in our VMs (which mask them too, runtimes/qemu/image.py): no
    # kernel modules, binfmt, pstore, TPM, repartitioning, seeds or first-boot questions. Each is
    # skipped by its conditions anyway, but masked its unit file is not even parsed on every boot.
    "systemd-random-seed.service",
    "systemd-machine-id-commit.service",
    "systemd-firstboot.service",
    "systemd-update-done.service",
    "ldconfig.service",
    "systemd-repart.service",
    "systemd-pcrphase.service",
    "systemd-pcrphase-sysinit.service",
    "systemd-pstore.service",
    "systemd-binfmt.service",
    "proc-sys-fs-binfmt_misc.automount",
    "systemd-modules-load.service",
    "kmod-static-nodes.service",
    "sys-kernel-debug.mount",
    "sys-kernel-tracing.mount",
    "sys-kernel-config.mount",
    "sys-fs-fuse-connections.mount",
    "dev-hugepages.mount",
)

# Units that ran on every container boot for nothing a container can use, skipped there (a condition in a
# drop-in, so a VM made from the same root still runs them): sysctls (/proc/sys is read-only in a
# container), static device nodes (no CAP_MKNOD), and removing /run/nologin, which is never made
# (NOLOGIN_TMPFILES) and which sshd without PAM does not read anyway.
CONTAINER_SKIPPED_UNITS = (
    "systemd-sysctl.service",
    "systemd-tmpfiles-setup-dev.service",
    "systemd-user-sessions.service",
)
CONTAINER_SKIP_DROP_IN = """\
# Written by sandbox-mcp: nothing for this unit to do in a container.
[Unit]
ConditionVirtualization=!container
"""
# /run/nologin ("System is booting up") is made by tmpfiles and removed by systemd-user-sessions; neither
# is wanted: the file would only stay behind for PAM logins nobody makes.
NOLOGIN_TMPFILES = "systemd-nologin.conf"

# Generators systemd runs before any unit on every boot (a process each) that a workspace does not
# need: no crypt, verity or integrity devices, no gettys, no SysV scripts without units, no GPT
# auto-mounts, no hibernation, no rc.local. Symlinked to /dev/null in /etc/systemd/system-generators.
DISABLED_GENERATORS = (
    "systemd-cryptsetup-generator", "systemd-debug-generator", "systemd-getty-generator",
    "systemd-gpt-auto-generator", "systemd-hibernate-resume-generator", "systemd-integritysetup-generator",
    "systemd-rc-local-generator", "systemd-run-generator", "systemd-system-update-generator",
    "systemd-sysv-generator", "systemd-veritysetup-generator",
)  # fmt: skip

# The journal in memory only (a restart discards the root anyway; nothing to flush to /var), bounded.
JOURNALD_DROP_IN = """\
# Written by sandbox-mcp: a workspace's journal lives in /run and is bounded.
[Journal]
Storage=volatile
RuntimeMaxUse=16M
# The active file is allocated whole in /run, a tmpfs charged to the workspace: 512K (journald's least)
# rather than 2M per idle workspace; a busy one rotates through files up to RuntimeMaxUse.
RuntimeMaxFileSize=512K
"""

# sshd's configuration is fixed in the image: no config test (one more sshd run) on every boot.
SSH_SERVICE_DROP_IN = """\
# Written by sandbox-mcp.
[Service]
ExecStartPre=
"""

# sshd -r: a connection's child goes on from the listener's state instead of executing sshd afresh (which
# reads its configuration and host key again): 24 against 38 ms of the workspace's CPU per SSH connection,
# measured here. The fresh exec re-randomises the child's address space against someone attacking sshd,
# who here would be the workspace's own user: that user is root inside already (sudo), and the only
# client is the server. /etc/default/ssh is where Debian's ssh.service reads its options.
SSHD_DEFAULTS = """\
# Written by sandbox-mcp: no re-exec per connection (see sandbox_mcp/images/debootstrap.py).
SSHD_OPTS=-r
"""

SSHD_DROP_IN = """\
# Written by sandbox-mcp. The host key is generated and pinned by the server and
# shared read-only into the workspace; only keys, never passwords.
HostKey /etc/ssh-host-keys/ssh_host_ed25519_key
# ed25519 only, both ways (OpenSSH 9.2 already refuses ssh-dss; say so rather than rely on it).
HostKeyAlgorithms ssh-ed25519
PubkeyAcceptedAlgorithms ssh-ed25519
AuthorizedKeysFile .ssh/authorized_keys /etc/ssh-host-keys/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
X11Forwarding no
PrintMotd no
UseDNS no
# No PAM: one less step per SSH session (exec latency); the environment comes from SetEnv below.
UsePAM no
MaxSessions 64
MaxStartups 64:30:128
"""

AGENT_SERVICE = "sandbox-mcp-agent.service"
# Given to a warm pool slot's init (nspawn_argv), which systemd reads as its kernel command line: the
# agent service does not start there. A slot has no workspace yet and may wait hours for one; its
# claim starts the agent the usual way.
POOL_SLOT_ARG = "sandbox-mcp.pool-slot"


def agent_service(user: str) -> str:
    """The unit that starts the exec agent at boot, to wait for the server's connection (and, once that
    connection is gone, for the next: ``exec_agent.RELISTEN_WAIT_S``).

    The agent's start (a Python interpreter and its imports, ~20 ms here) then happens while the
    workspace boots instead of after the server logs in: ``exec_agent.listen`` and
    :func:`sandbox_mcp.ssh.agent_start.start_listening_agent` say how the two meet.
    """
    return f"""\
# Written by sandbox-mcp: the exec agent, started ahead of the server's first SSH connection.
[Unit]
Description=sandbox-mcp exec agent (waits for the server's connection)
ConditionKernelCommandLine=!{POOL_SLOT_ARG}

[Service]
User={user}
ExecStart=/usr/bin/python3 -I -S -u {EXEC_AGENT_PATH} --listen {AGENT_LISTEN_PATH}
RuntimeDirectory={AGENT_LISTEN_PATH.split("/")[2]}
RuntimeDirectoryMode=0700
# It becomes its connection's agent, then waits for the next (the same process); what its commands left running
# (a start_process) stays, as it does when an sshd session ends (ssh.service is KillMode=process too).
KillMode=process
# A command the kernel's OOM killer ends is that command's end, not the agent's: by default systemd
# would stop the unit, its main process being the agent (ssh.service restarts sshd instead).
OOMPolicy=continue

[Install]
WantedBy=multi-user.target
"""


_PROGRESS_RE = re.compile(r"^I: (Retrieving|Validating|Extracting|Unpacking|Configuring|Installing) ?(.*)$")
_PHASES = {"Retrieving": 0.05, "Validating": 0.1, "Extracting": 0.35, "Installing": 0.45, "Unpacking": 0.5,
           "Configuring": 0.7}


def detect_debian_suite(os_release: Path = Path("/etc/os-release")) -> str:
    """The host's release codename (e.g. ``bookworm``), used when no suite is configured."""
    try:
        for line in os_release.read_text().splitlines():
            if line.startswith("VERSION_CODENAME="):
                value = line.split("=", 1)[1].strip().strip('"')
                if value:
                    return value
    except OSError:
        pass
    return "bookworm"


def detect_debian_mirror(apt_dir: Path = Path("/etc/apt")) -> str | None:
    """The first Debian archive URI in the host's apt sources, or None (debootstrap's default).

    Reading it from the host means a machine behind a local mirror or proxy uses that.
    """
    candidates: list[str] = []
    sources = apt_dir / "sources.list.d"
    for f in sorted(sources.glob("*.sources")) if sources.is_dir() else []:
        for line in f.read_text(errors="replace").splitlines():
            if line.startswith("URIs:"):
                candidates += line.split()[1:]
    lists = [apt_dir / "sources.list", *sorted(sources.glob("*.list"))] if sources.is_dir() else [
        apt_dir / "sources.list"
    ]
    for f in lists:
        with contextlib.suppress(OSError):
            for line in f.read_text(errors="replace").splitlines():
                parts = line.split()
                if len(parts) >= 3 and parts[0] == "deb":
                    uri = next((p for p in parts[1:] if not p.startswith("[")), None)
                    if uri:
                        candidates.append(uri)
    for uri in candidates:
        if re.match(r"^https?://", uri) and uri.rstrip("/").endswith("/debian"):
            return uri
    return None


def exec_agent_digest(source: Path = EXEC_AGENT_SOURCE) -> str:
    """The SHA-256 (hex) of the exec agent the recipe installs."""
    return hashlib.sha256(source.read_bytes()).hexdigest()


def install_exec_agent(root: Path, source: Path = EXEC_AGENT_SOURCE) -> Path:
    """Copy the exec agent into the image at ``root`` (EXEC_AGENT_PATH, root-owned, 0755); returns its path.

    The pool runs it as ``/usr/bin/python3 -I -S -u EXEC_AGENT_PATH``; root ownership keeps the
    workspace user from replacing it.
    """
    dest = root / EXEC_AGENT_PATH.lstrip("/")
    dest.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    dest.write_bytes(source.read_bytes())
    os.chown(dest, 0, 0)
    dest.chmod(0o755)
    return dest


# Run by the image's own python3 (its bytecode format): the agent's source moves to PATH.py and
# PATH becomes its bytecode, which python3 runs as a script just the same (it knows a .pyc by its
# magic number). A script is otherwise compiled on every start: ~2.6 MiB of the agent's heap
# stayed dirty after it (7.9 MiB private against 5.2 from bytecode, per workspace), and the compile
# delayed every first exec on a new connection.
_COMPILE_IN_PLACE = (
    "import os, py_compile, sys; p = sys.argv[1]; os.replace(p, p + '.py'); "
    "py_compile.compile(p + '.py', cfile=p, doraise=True, "
    "invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH); os.chmod(p, 0o755)"
)


def compile_exec_agent_argv(python: Sequence[str], inside_path: str = EXEC_AGENT_PATH) -> list[str]:
    """The command that turns the installed agent at ``inside_path`` (as ``python`` sees it, e.g. through
    ``chroot ROOT /usr/bin/python3``) into bytecode in place, its source kept beside it as ``.py``."""
    return [*python, "-I", "-c", _COMPILE_IN_PLACE, inside_path]


def recipe_digest() -> str:
    """A digest of the recipe's own code (this module and the onboarding files it writes in).

    In the key beside :data:`IMAGE_RECIPE_VERSION`: two checkouts (branches, or a release and a
    development tree) that both bumped the version to the same number but changed the recipe
    differently would otherwise share one cached image, and one of them would boot the other's.
    """
    h = hashlib.sha256()
    for source in (Path(__file__), Path(claude_workspace.__file__)):
        h.update(source.read_bytes())
    return h.hexdigest()[:16]


def image_key(suite: str, user: str, uid: int, packages: Sequence[str], agent_digest: str | None = None) -> str:
    """A short stable key naming an image built from these inputs (the exec agent's and the recipe's
    digests among them)."""
    spec = {"recipe": IMAGE_RECIPE_VERSION, "code": recipe_digest(), "suite": suite, "user": user, "uid": uid,
            "packages": sorted(packages), "agent": agent_digest or exec_agent_digest()}
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    return f"{suite}-{'base' if not packages else 'pkgs'}-{digest}"


def debootstrap_argv(target: Path, suite: str, mirror: str | None) -> list[str]:
    """The debootstrap command that builds a base root in ``target``."""
    argv = ["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", suite, str(target)]
    if mirror:
        argv.append(mirror)
    return argv


# Fails (status 100) unless every argument is the exact name of a package in apt's lists.
EXACT_NAMES_SH = (
    'for p; do apt-cache --all-names pkgnames -- "$p" | grep -qxF -- "$p" || '
    '{ echo "E: no package is called exactly $p; check the name (apt-cache search)" >&2; exit 100; }; done'
)


def apt_install_argv(root: Path, packages: Sequence[str]) -> list[str]:
    """Install ``packages`` into the image at ``root``, run inside a throwaway nspawn (host network).

    The build container runs in a user namespace of its own uid range (``BUILD_UID_BASE``), on an
    idmapped mount of the image (``--private-users-ownership=map``), so the files apt writes land
    owned as the image needs, while root inside is no host uid that owns anything: it cannot make
    device nodes or write ``/proc/sys`` (host root's files). Not the identity map: with it, root
    inside is host uid 0 to the file permission checks, and ``/proc/sys`` can be remounted and
    written (found on the dev machine).
    Every name must be a package apt knows by exactly that name: apt reads a name it does not
    know that holds ``.``, ``+`` or ``*`` as a regular expression (``e..`` installs thousands).
    """
    script = f'apt-get update -q && {EXACT_NAMES_SH} && apt-get install -y -q --no-install-recommends -- "$@" && apt-get clean'

    return [
        "systemd-nspawn", "--quiet", "--register=no", "--keep-unit", "--as-pid2", f"--directory={root}",
        f"--private-users={BUILD_UID_BASE}:{UID_RANGE}", "--private-users-ownership=map",
        "--setenv=DEBIAN_FRONTEND=noninteractive", "--",
        "sh", "-c", script, "sh", *packages,
    ]  # fmt: skip


class DebianRoot:
    """The Debian root recipe over an image store: the base root and its package variants."""

    RECIPE = "debian-root"

    def __init__(self, settings: Settings, store: ImageStore) -> None:
        self.settings = settings
        self.store = store
        self.suite = settings.debian_suite or detect_debian_suite()
        self.mirror = settings.debian_mirror or detect_debian_mirror()

    def key(self, packages: Sequence[str]) -> str:
        """The store key of the root with ``packages`` (the base for none)."""
        return image_key(self.suite, self.settings.user, self.settings.user_uid, packages)

    def path(self, key: str) -> Path:
        """The root directory of the image ``key`` (it may not exist)."""
        return self.store.path(key)

    def exists(self, key: str) -> bool:
        return self.store.exists(key)

    @classmethod
    def is_current(cls, meta: dict[str, object]) -> bool:
        """False for roots of an older recipe version (``prune`` removes those)."""
        return meta.get("recipe") != cls.RECIPE or meta.get("version") == IMAGE_RECIPE_VERSION

    def _meta(self, packages: Sequence[str]) -> dict[str, object]:
        return {"recipe": self.RECIPE, "version": IMAGE_RECIPE_VERSION, "suite": self.suite,
                "packages": sorted(packages), "exec_agent": exec_agent_digest()}

    async def ensure(self, packages: Sequence[str], progress: Progress = no_progress) -> str:
        """Return the key of a root with ``packages`` installed, building it (and the base) if needed.

        Raises:
            CommandFailed: debootstrap or apt-get failed (the message carries their output tail).
            BackendError: debootstrap or systemd-nspawn is missing.
        """
        base = self.key(())
        if not self.store.exists(base):
            await self.store.ensure(base, lambda tmp: self._build_base(tmp, progress), self._meta(()))
        if not packages:
            return base
        key = self.key(packages)
        await self.store.ensure(key, lambda tmp: self._build_variant(base, tmp, packages, progress),
                                self._meta(packages))
        return key

    async def _build_base(self, tmp: Path, progress: Progress) -> None:
        await progress(f"building the {self.suite} root image with debootstrap (once; about a minute)", 0.0)
        last = [0.0, 0.0]  # fraction, time of last report

        async def on_line(line: str) -> None:
            m = _PROGRESS_RE.match(line)
            now = time.monotonic()
            if m and now - last[1] > 0.5:
                frac = max(last[0], _PHASES.get(m.group(1), last[0]))
                last[:] = [frac, now]
                await progress(f"debootstrap: {m.group(1).lower()} {m.group(2)}".strip(), frac * 0.9)

        await hostcmd.run(debootstrap_argv(tmp, self.suite, self.mirror), timeout_s=1800, on_line=on_line)
        await progress("configuring the image (user, sshd, units)", 0.9)
        await anyio.to_thread.run_sync(self._customise, tmp)
        await progress("root image ready", 1.0)

    async def _build_variant(self, base: str, tmp: Path, packages: Sequence[str], progress: Progress) -> None:
        await progress(f"building an image variant with {', '.join(packages)}", 0.0)
        # The store made tmp; cp copies the base's contents into it.
        await hostcmd.run(["cp", "-a", "--reflink=auto", f"{self.path(base)}/.", str(tmp)], timeout_s=600)

        async def on_line(line: str) -> None:
            if line.startswith(("Get:", "Setting up", "Unpacking")):
                await progress(f"apt: {line[:100]}", None)

        await hostcmd.run(apt_install_argv(tmp, packages), timeout_s=1800, on_line=on_line)
        await progress("image variant ready", 1.0)

    def prune(self, keep: Sequence[str] = ()) -> list[str]:
        """Remove roots of older recipe versions and interrupted builds; return what was removed."""
        return self.store.prune(self.is_current, frozenset(keep))

    def _customise(self, root: Path) -> None:
        """Make a fresh debootstrap a sandbox image: user, sudo, sshd, environment, quiet boot."""
        user, uid = self.settings.user, self.settings.user_uid

        def chroot(*argv: str) -> None:
            proc = subprocess.run(["chroot", str(root), *argv], capture_output=True, text=True)
            if proc.returncode != 0:
                raise BackendError(f"image customisation failed: {' '.join(argv)}: {proc.stderr.strip()}")

        chroot("useradd", "--create-home", "--uid", str(uid), "--shell", "/bin/bash", "--groups", "sudo", user)
        chroot("usermod", "--password", "*", user)  # no password, not locked: key-only login via sshd
        (root / "etc/sudoers.d/sandbox-mcp").write_text(f"{user} ALL=(ALL:ALL) NOPASSWD: ALL\n")
        os.chmod(root / "etc/sudoers.d/sandbox-mcp", 0o440)
        for inside in (claude_workspace.workspace_dir_inside(user), claude_workspace.claude_config_dir_inside(user)):
            d = root / inside.lstrip("/")
            d.mkdir(exist_ok=True)
            os.chown(d, uid, uid)
        (root / "etc/ssh-host-keys").mkdir(exist_ok=True)
        for key in (root / "etc/ssh").glob("ssh_host_*"):
            key.unlink()  # the package's keys are never used; the server's pinned key is
        env = claude_workspace.environment_lines(user)
        (root / "etc/ssh/sshd_config.d/10-sandbox-mcp.conf").write_text(
            SSHD_DROP_IN + "".join(f"SetEnv {line}\n" for line in env)
        )
        with open(root / "etc/environment", "a") as f:
            f.write("".join(line + "\n" for line in env))
        wrapper = root / claude_workspace.CLAUDE_WRAPPER_PATH.lstrip("/")
        wrapper.write_text(claude_workspace.CLAUDE_WRAPPER)
        wrapper.chmod(0o755)
        install_exec_agent(root)
        chroot(*compile_exec_agent_argv(["/usr/bin/python3"]))
        (root / "etc/systemd/system" / AGENT_SERVICE).write_text(agent_service(user))
        wants = root / "etc/systemd/system/multi-user.target.wants"
        wants.mkdir(parents=True, exist_ok=True)
        (wants / AGENT_SERVICE).unlink(missing_ok=True)
        (wants / AGENT_SERVICE).symlink_to(f"/etc/systemd/system/{AGENT_SERVICE}")
        (root / claude_workspace.CLAUDE_PROFILE_SNIPPET_PATH.lstrip("/")).write_text(claude_workspace.CLAUDE_PROFILE_SNIPPET)
        (root / "etc/hostname").unlink(missing_ok=True)  # nspawn sets the workspace name
        (root / "etc/machine-id").write_text("")  # a fresh id on every boot
        for unit in MASKED_UNITS:
            link = root / "etc/systemd/system" / unit
            link.unlink(missing_ok=True)
            link.symlink_to("/dev/null")
        for unit in CONTAINER_SKIPPED_UNITS:
            drop_in = root / "etc/systemd/system" / f"{unit}.d"
            drop_in.mkdir(parents=True, exist_ok=True)
            (drop_in / "10-sandbox-mcp-container.conf").write_text(CONTAINER_SKIP_DROP_IN)
        (root / "etc/tmpfiles.d").mkdir(parents=True, exist_ok=True)
        nologin = root / "etc/tmpfiles.d" / NOLOGIN_TMPFILES
        nologin.unlink(missing_ok=True)
        nologin.symlink_to("/dev/null")
        (root / "etc/systemd/system/ssh.service.d").mkdir(parents=True, exist_ok=True)
        (root / "etc/systemd/system/ssh.service.d/10-sandbox-mcp.conf").write_text(SSH_SERVICE_DROP_IN)
        (root / "etc/default/ssh").write_text(SSHD_DEFAULTS)
        generators = root / "etc/systemd/system-generators"
        generators.mkdir(parents=True, exist_ok=True)
        for generator in DISABLED_GENERATORS:
            link = generators / generator
            link.unlink(missing_ok=True)
            link.symlink_to("/dev/null")
        # dbus stays socket-activated (`systemctl` as the user reaches systemd through it) but is not
        # started at boot: one process less per idle workspace.
        (root / "lib/systemd/system/multi-user.target.wants/dbus.service").unlink(missing_ok=True)
        (root / "etc/systemd/journald.conf.d").mkdir(parents=True, exist_ok=True)
        (root / "etc/systemd/journald.conf.d/10-sandbox-mcp.conf").write_text(JOURNALD_DROP_IN)
        chroot("apt-get", "clean")
