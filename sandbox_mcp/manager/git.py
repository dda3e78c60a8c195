"""A branch per workspace: the diff against where it was cloned from, and fetching its commits back."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import gitflow, hostgit
from ..errors import InvalidState
from ..models import FetchResult, RepoInfo, WorkspaceDiff, WorkspaceRecord

if TYPE_CHECKING:
    from . import WorkspaceManager as _Manager
else:
    _Manager = object

__all__ = ["GitOps"]


class GitOps(_Manager):
    """workspace_diff and fetch_workspace."""

    async def _repo_of(self, name: str, owner_uid: int | None) -> tuple[WorkspaceRecord, RepoInfo]:
        record = await self._running(name, owner_uid)
        if record.repo is None:
            raise InvalidState(
                f"workspace {name!r} was not created from a host repository; create one with "
                "create_workspace(name, repo='/path/to/repo')"
            )
        return record, record.repo

    async def git_diff(self, name: str, stat_only: bool = False, *, owner_uid: int | None = None) -> WorkspaceDiff:
        """What changed in the workspace's clone since its base (committed and not), computed inside it.

        Raises:
            WorkspaceNotFound, InvalidState (not running, or not made from a repository), BackendError, SSHError.
        """
        record, repo = await self._repo_of(name, owner_uid)
        return await self._ssh_call(
            record, lambda t: gitflow.workspace_diff(self.ssh, t, repo, self.settings, stat_only)
        )

    async def git_fetch(
        self, name: str, include_uncommitted: bool = False, *, owner_uid: int | None = None
    ) -> FetchResult:
        """The workspace's branch into its host repository as ``refs/heads/sandbox/NAME``, by the git protocol over
        the exec channel, written by ``owner_uid``'s git (as root: the repository owner's). See :mod:`gitflow`.

        Raises:
            WorkspaceNotFound, InvalidState (not running, not from a repository, no such branch), InvalidSpec (the
            pack is over the bound), AccessDenied (the repository is not the caller's to write), BackendError.
        """
        record, repo = await self._repo_of(name, owner_uid)
        user = hostgit.host_user(hostgit.run_uid(owner_uid, repo.path))
        return await self._ssh_call(
            record,
            lambda t: gitflow.fetch_from(self.ssh, t, name, user, repo, self.settings,
                                         include_uncommitted=include_uncommitted),
        )  # fmt: skip
