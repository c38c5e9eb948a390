"""Warm repositories: an agent's mirror of each repository it works on, and the task
checkouts made from it.

Why: on a repository of 30,000 files and 5,000 commits a plain ``git clone`` of the local
forge's ``file://`` URL takes 2.5–3 s (the URL forces a transport, so every object is
packed again), a local-path clone ~0.8 s, ``git worktree add`` from a mirror ~0.9 s,
``git clone --shared`` from one ~0.9 s, a ``cp --reflink=auto -a`` copy of a warm
checkout ~0.5 s (ext4 has no reflinks: it copies). All of them write 30,000 files, and
that is what costs (``ccc bench workspace`` measures them beside ours in one run). So a
task does not wait for files to be written at all: the checkout it gets was written
before it started.

Layout, per agent and repository (``<root>/<agent_id>/mirrors/<name>-<hash>/``)::

    lock            fcntl lock of everything below; holds "<pid> <time>" while held
    used            touched by every task (an unused mirror is removed after a while)
    current         the name of the generation in use, e.g. ``g1.git``
    g1.git/         the mirror: bare, the forge's branches and tags (fetch --prune), no gc
                    of its own (``collect`` runs it, under the lock)
    spares/g1-*/    warm checkouts of the default branch, ready to be taken
    doubtful        left when the lock's last holder died holding it

A task (:meth:`Mirror.check_out`), under the lock: fetch (the first task clones, from
the local path of a ``file://`` URL), take a warm checkout, bring it to the fetched
commit (a fetch from the mirror and a two-tree ``read-tree -m -u``: only the files that
changed are written), rename it into the task's workspace. Without a warm checkout (the
first task, or a second one at the same time) the task builds its own from the mirror
(``clone --shared --no-checkout`` + a parallel checkout), outside the lock. The
workbench then asks its background thread (:mod:`~infra.adapters.git.background`) for a
new warm checkout, off the task's path.

A checkout is a ``git clone --shared`` of the mirror: an ordinary, complete repository
with its own index, refs and config, whose objects dir names the mirror's in
``objects/info/alternates``; nothing of it is registered in the mirror (unlike a
worktree, whose refs *are* the mirror's: the model could move them), so deleting it
leaves the mirror as it was. The sandbox binds the mirror's objects read-only (the
workspace's metadata names them), so the model's git works inside and cannot change
them. Hardlinks are not used for checkouts: a file hardlinked from the mirror or a warm
checkout could be rewritten in place through the link (the model runs as the agent's
user and may chmod), corrupting every later task.

Crashes. The lock is ``flock`` (released by the kernel when its holder dies); its file
says who held it, and is emptied on every orderly release, so a file found non-empty
means the last holder died holding it. That, an interrupted fetch (``ccc-fetching``
left in the mirror) or git's own lock and temporary files left behind make the mirror
doubtful: the next task removes the leftovers, drops the warm checkouts (one may have
been half updated) and runs ``git fsck --connectivity-only``; if that fails the mirror
is cloned again as a new generation (``g2.git``). Old generations stay until no
unfinished workspace borrows their objects, so a repair never pulls objects away from a
running task.

Sparse checkouts: a repository that lists directories in ``.ccc/sparse`` (one per line,
``#`` comments) gets cone-mode sparse checkouts of them, its top-level files and ``.ccc/``
(the rest is in the index as skip-worktree, not on disk). A file the coder creates outside them is still part of the
change; a tracked file outside them cannot be changed.

Every call blocks (git is a subprocess). Git here runs only on the agent's own
repositories (the mirror, warm checkouts nobody else touched), never on a workspace a
model has used.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import NamedTuple
from urllib.parse import unquote, urlsplit

import structlog

from events.errors import ConfigError

from infra.adapters.git import gitops
from infra.adapters.git.cleanup import remove_tree

log = structlog.get_logger("ccc.mirrors")

__all__ = ["MIRRORS_DIR", "SPARSE_FILE", "Checkout", "Mirror", "Sparse", "local_source", "mirror_name"]

MIRRORS_DIR = "mirrors"
SPARSE_FILE = ".ccc/sparse"
MAX_SPARSE_FILE = 64 * 1024
_LOCK, _USED, _CURRENT, _DOUBTFUL, _SPARES = "lock", "used", "current", "doubtful", "spares"
_FETCHING = "ccc-fetching"  # in a generation, while a fetch runs
_NEW, _BUILDING = ".new-", ".building-"  # a generation being cloned, a warm checkout being built
_STALE_BUILD = 3600.0  # a warm checkout still being built after this long: its builder is gone
_GENERATION = re.compile(r"^g(\d+)\.git$")
_REFSPECS = ("+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*")
_CHECKOUT_REFSPECS = ("+refs/heads/*:refs/remotes/origin/*", "+refs/tags/*:refs/tags/*")
_GC_AUTO = "6700"  # git's default threshold, for the collect pass's own `gc --auto`


def local_source(url: str) -> str:
    """Where git reads the repository at ``url`` from: a ``file://`` URL as its path, so
    cloning it is a local clone (object files linked or copied) rather than a transport
    that packs every object again; any other URL unchanged."""
    parts = urlsplit(url)
    if parts.scheme == "file" and parts.netloc in ("", "localhost"):
        return unquote(parts.path)
    return url


def mirror_name(url: str) -> str:
    """The directory of ``url``'s mirror: its last path component (readable) and a hash
    of the whole URL, credentials removed (two forges' ``app.git`` are two mirrors)."""
    clean = gitops.redact(url).rstrip("/")
    tail = re.sub(r"[^A-Za-z0-9_.-]", "_", clean.rpartition("/")[2].removesuffix(".git")).strip(".")[:40]
    return f"{tail or 'repo'}-{hashlib.sha256(clean.encode()).hexdigest()[:16]}"


class Sparse(NamedTuple):
    """A repository's ``.ccc/sparse`` at a commit: the blob's id ("" without one) and
    the directories it lists."""

    id: str
    dirs: tuple[str, ...]


NO_SPARSE = Sparse("", ())


class Checkout(NamedTuple):
    """What :meth:`Mirror.check_out` made: the objects the checkout borrows, the branch
    and commit checked out (None for a repository without commits), whether it was a
    warm checkout, and whether the mirror was first cloned or repaired for it."""

    objects: Path
    branch: str
    sha: str | None
    warm: bool
    cloned: bool
    repaired: bool


def parse_sparse(text: str) -> tuple[str, ...]:
    """The directories of a ``.ccc/sparse`` file; a line that is not a plain relative
    directory is a :class:`ConfigError` naming it (the repository's mistake, shown as is)."""
    dirs = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        d = line.strip("/")
        parts = d.split("/")
        if (line.startswith(("/", "-")) or any(p in ("", ".", "..") for p in parts) or "\0" in d
                or any(c in d for c in "*?[]!\\")):
            raise ConfigError(f"{SPARSE_FILE}: line {n}: {raw!r} is not a directory of the repository "
                              "(one relative directory per line, no patterns)")
        dirs.append(d)
    return tuple(dict.fromkeys(dirs))


class Mirror:
    """One repository's mirror and warm checkouts, for one agent, at ``path``."""

    def __init__(self, path: Path | str, url: str) -> None:
        self.path = Path(path)
        self.url = url
        self.spares_dir = self.path / _SPARES

    # -- the lock ----------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the mirror's lock. Threads of one process exclude each other too (each
        call opens the file anew: ``flock`` belongs to the open file description)."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(self.path / _LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        try:
            held = os.pread(fd, 256, 0).decode("utf-8", "replace").strip()
            if held:  # emptied on every orderly release: its holder died holding it
                (self.path / _DOUBTFUL).write_text(held + "\n")
                log.warning("mirror.lock_holder_died", mirror=str(self.path), holder=held)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {time.time():.0f}\n".encode(), 0)
            yield
        finally:
            os.ftruncate(fd, 0)
            os.close(fd)  # releases the lock

    # -- a task's checkout -------------------------------------------------------------
    def check_out(self, dest: Path, *, env: Mapping[str, str] | None = None,
                  record: Callable[[Path], None] | None = None, workers: int = 0) -> Checkout:
        """Make ``dest`` (absent or an empty directory) a checkout of the repository's
        default branch as the forge has it now. ``record`` is called, under the lock and
        before any file of ``dest`` exists, with the objects directory the checkout will
        borrow (so a clean-up never removes it while the checkout is in use). ``env``:
        the forge's credentials, for the fetch. ``workers``: parallel checkout processes
        when a checkout has to be built (0: one per CPU)."""
        with self.locked():
            (self.path / _USED).touch()
            self._sweep()
            gen, cloned, repaired = self._usable(env)
            if not cloned:
                self._fetch(gen, env)
            branch, sha = self._head(gen, env)
            sparse = self._sparse(gen, sha)
            if record is not None:
                record(gen / "objects")
            warm = sha is not None and self._take_spare(gen, branch, sha, sparse, dest)
        if not warm:
            self._build(gen, branch, sha, sparse, dest, workers=workers)
        return Checkout(gen / "objects", branch, sha, warm, cloned, repaired)

    def refill(self, count: int = 1, *, workers: int = 0) -> int:
        """Build warm checkouts of the mirror's default branch (as last fetched) until
        there are ``count``; returns how many were built. The building happens outside
        the lock; a doubtful mirror is left for the next task to repair."""
        built = 0
        while True:
            with self.locked():
                gen = self._current()
                if gen is None or self._doubts(gen):
                    return built
                branch, sha = self._head(gen, None, ask_forge=False)
                if sha is None or len(self._spares(gen)) >= count:
                    return built
                sparse = self._sparse(gen, sha)
                self.spares_dir.mkdir(mode=0o700, exist_ok=True)
            name = uuid.uuid4().hex[:12]
            tmp = self.spares_dir / f"{_BUILDING}{name}"
            try:
                self._build(gen, branch, sha, sparse, tmp, workers=workers)
            except BaseException:
                remove_tree(tmp)
                raise
            with self.locked():
                if self._current() != gen:  # repaired meanwhile: this one borrows the old objects
                    remove_tree(tmp)
                    return built
                os.rename(tmp, self.spares_dir / f"{gen.name.removesuffix('.git')}-{name}")
                built += 1

    def collect(self, in_use: set[str], max_idle: float) -> list[Path]:
        """Remove generations no longer current whose objects no unfinished workspace
        borrows (``in_use``: objects directories), and the whole mirror when no task used
        it for ``max_idle`` seconds and none borrows it; warm checkouts of removed or old
        generations, and stale half-built ones, go too. Then git's own ``gc --auto`` on
        what stays (never pruning recent objects). Returns the generations removed."""
        if not self.path.is_dir():
            return []
        removed: list[Path] = []
        with self.locked():
            self._sweep()
            current = self._current()
            try:
                idle = time.time() - (self.path / _USED).stat().st_mtime > max_idle
            except FileNotFoundError:
                idle = True
            for gen in self._generations():
                if str(gen / "objects") in in_use or (gen == current and not idle):
                    continue
                for spare in self._spares(gen):
                    remove_tree(spare)
                remove_tree(gen)
                removed.append(gen)
                if gen == current:
                    (self.path / _CURRENT).unlink(missing_ok=True)
                    current = None
            if current is not None and not self._doubts(current):
                gitops.run_git(current, "-c", f"gc.auto={_GC_AUTO}", "gc", "--auto", "--quiet", check=False)
        if removed:
            log.info("mirror.collected", mirror=str(self.path), generations=[g.name for g in removed])
        return removed

    # -- generations ---------------------------------------------------------------------
    def _generations(self) -> list[Path]:
        found = []
        for p in self.path.iterdir() if self.path.is_dir() else ():
            m = _GENERATION.match(p.name)
            if m and p.is_dir():
                found.append((int(m.group(1)), p))
        return [p for _, p in sorted(found)]

    def _current(self) -> Path | None:
        try:
            name = (self.path / _CURRENT).read_text().strip()
        except FileNotFoundError:
            return None
        gen = self.path / name
        return gen if _GENERATION.match(name) and (gen / "HEAD").is_file() else None

    def _usable(self, env: Mapping[str, str] | None) -> tuple[Path, bool, bool]:
        """The generation to use: (it, newly cloned, repaired)."""
        gen = self._current()
        repaired = False
        if gen is not None:
            doubts = self._doubts(gen)
            if doubts:
                log.warning("mirror.doubtful", mirror=str(gen), reasons=doubts)
                for spare in self._spares(gen):  # one may have been half updated
                    remove_tree(spare)
                if self._repair(gen):
                    repaired = True
                else:
                    log.warning("mirror.recloning", mirror=str(gen))
                    gen = None
        if gen is None:
            return self._clone(env), True, repaired
        return gen, False, repaired

    def _clone(self, env: Mapping[str, str] | None) -> Path:
        """A new generation: a bare clone of the forge's branches and tags."""
        numbers = [int(m.group(1)) for p in self.path.iterdir() if (m := _GENERATION.match(p.name))]
        gen = self.path / f"g{max(numbers, default=0) + 1}.git"
        tmp = self.path / f"{_NEW}{uuid.uuid4().hex[:12]}.git"
        status, _, err = gitops.run_git(self.path, "clone", "-q", "--bare", "--", local_source(self.url), str(tmp),
                                        env=env, check=False)
        if status != 0:
            remove_tree(tmp)
            raise gitops.GitOperationError(f"git clone {gitops.redact(self.url)} failed: "
                                           f"{gitops.redact(err.strip())}")
        gitops.run_git(tmp, "config", "--replace-all", "remote.origin.fetch", _REFSPECS[0])
        gitops.run_git(tmp, "config", "--add", "remote.origin.fetch", _REFSPECS[1])
        for key, value in (("gc.auto", "0"), ("maintenance.auto", "false"), ("fetch.writeCommitGraph", "false")):
            gitops.run_git(tmp, "config", key, value)
        os.rename(tmp, gen)
        current = self.path / f"{_CURRENT}.tmp"
        current.write_text(gen.name + "\n")
        os.replace(current, self.path / _CURRENT)
        (self.path / _DOUBTFUL).unlink(missing_ok=True)
        log.info("mirror.cloned", mirror=str(gen), url=gitops.redact(self.url))
        return gen

    # -- doubt and repair ------------------------------------------------------------------
    @staticmethod
    def _leftovers(gen: Path) -> list[Path]:
        """Git's lock and temporary files: under our lock no git runs here, so any found
        belong to a git that was killed."""
        found = [*gen.glob("*.lock"), *(gen / "objects").glob("incoming-*"),
                 *(gen / "objects" / "pack").glob("tmp_*")]
        if (gen / "refs").is_dir():
            found += list((gen / "refs").rglob("*.lock"))
        return found

    def _doubts(self, gen: Path) -> list[str]:
        reasons = []
        if (self.path / _DOUBTFUL).exists():
            reasons.append("the last holder of its lock died holding it")
        if (gen / _FETCHING).exists():
            reasons.append("a fetch was interrupted")
        left = self._leftovers(gen)
        if left:
            reasons.append(f"git left {len(left)} lock or temporary file(s) ({left[0].name})")
        return reasons

    def _repair(self, gen: Path) -> bool:
        """Remove what a killed git left and check the mirror; True when it is sound."""
        for p in self._leftovers(gen):
            remove_tree(p) if p.is_dir() else p.unlink(missing_ok=True)
        status, _, err = gitops.run_git(gen, "fsck", "--connectivity-only", "--no-dangling", "--no-progress",
                                        check=False)
        if status != 0:
            log.warning("mirror.fsck_failed", mirror=str(gen), error=err.strip()[-500:])
            return False
        (gen / _FETCHING).unlink(missing_ok=True)
        (self.path / _DOUBTFUL).unlink(missing_ok=True)
        log.info("mirror.repaired", mirror=str(gen))
        return True

    # -- fetching ----------------------------------------------------------------------
    def _fetch(self, gen: Path, env: Mapping[str, str] | None) -> None:
        marker = gen / _FETCHING
        marker.write_text(f"{os.getpid()} {time.time():.0f}\n")
        status, _, err = gitops.run_git(gen, "fetch", "-q", "--prune", "--no-write-fetch-head", "origin",
                                        env=env, check=False)
        if status < 0:  # git was killed (by a signal): what it left decides, next time
            raise gitops.GitOperationError(f"git fetch into the mirror was killed ({status})")
        marker.unlink()
        if status != 0:
            raise gitops.GitOperationError(f"git fetch {gitops.redact(self.url)} failed: "
                                           f"{gitops.redact(err.strip())}")

    def _head(self, gen: Path, env: Mapping[str, str] | None, *, ask_forge: bool = True) -> tuple[str, str | None]:
        """The default branch and its commit (None: no commits). When the branch HEAD
        names is gone while others exist, the forge's default branch was renamed: ask it."""
        branch = gitops.git_output(gen, "symbolic-ref", "--short", "HEAD")
        sha = self._commit(gen, f"refs/heads/{branch}")
        if sha is None and ask_forge and gitops.git_output(gen, "for-each-ref", "--count=1", "refs/heads"):
            status, out, _ = gitops.run_git(gen, "ls-remote", "--symref", "origin", "HEAD", env=env, check=False)
            m = re.match(r"ref: refs/heads/(\S+)\tHEAD", out.decode("utf-8", "replace"))
            if status == 0 and m:
                gitops.run_git(gen, "symbolic-ref", "HEAD", f"refs/heads/{m.group(1)}")
                branch, sha = m.group(1), self._commit(gen, f"refs/heads/{m.group(1)}")
        return branch, sha

    @staticmethod
    def _commit(repo: Path, ref: str) -> str | None:
        status, out, _ = gitops.run_git(repo, "rev-parse", "-q", "--verify", f"{ref}^{{commit}}", check=False)
        return out.decode().strip() if status == 0 else None

    @staticmethod
    def _sparse(gen: Path, sha: str | None) -> Sparse:
        """``.ccc/sparse`` at ``sha``, read from the mirror's objects: a regular file of
        the commit, at most :data:`MAX_SPARSE_FILE` bytes."""
        if sha is None:
            return NO_SPARSE
        status, out, _ = gitops.run_git(gen, "ls-tree", "-z", sha, "--", SPARSE_FILE, check=False)
        entry = out.decode("utf-8", "replace").strip("\0")
        if status != 0 or not entry:
            return NO_SPARSE
        mode, kind, blob = entry.partition("\t")[0].split()
        if kind != "blob" or mode not in ("100644", "100755"):
            raise ConfigError(f"{SPARSE_FILE}: must be a regular file in the repository (found mode {mode})")
        if int(gitops.git_output(gen, "cat-file", "-s", blob)) > MAX_SPARSE_FILE:
            raise ConfigError(f"{SPARSE_FILE}: larger than {MAX_SPARSE_FILE} bytes")
        dirs = parse_sparse(gitops.run_git(gen, "cat-file", "blob", blob)[1].decode("utf-8", "replace"))
        # .ccc/ always: the agent reads its test command and instructions from the files
        return Sparse(blob, tuple(dict.fromkeys((".ccc", *dirs)))) if dirs else NO_SPARSE

    # -- checkouts ---------------------------------------------------------------------
    def _spares(self, gen: Path) -> list[Path]:
        prefix = gen.name.removesuffix(".git") + "-"
        if not self.spares_dir.is_dir():
            return []
        return sorted(p for p in self.spares_dir.iterdir() if p.name.startswith(prefix))

    def _sweep(self) -> None:
        """Under the lock: generations whose clone died half way, warm checkouts whose
        builder is gone, and those of generations that are not current."""
        for p in self.path.glob(f"{_NEW}*"):
            remove_tree(p)
        if self.spares_dir.is_dir():
            current = self._current()
            keep = current.name.removesuffix(".git") + "-" if current is not None else None
            now = time.time()
            for p in self.spares_dir.iterdir():
                if p.name.startswith(_BUILDING):
                    with contextlib.suppress(FileNotFoundError):
                        if now - p.lstat().st_mtime > _STALE_BUILD:
                            remove_tree(p)
                elif keep is None or not p.name.startswith(keep):
                    remove_tree(p)

    def _take_spare(self, gen: Path, branch: str, sha: str, sparse: Sparse, dest: Path) -> bool:
        for spare in self._spares(gen):
            if self._refresh(spare, gen, branch, sha, sparse):
                os.rename(spare, dest)  # onto the workspace's empty repo directory
                os.chmod(dest, 0o700)
                return True
            remove_tree(spare)
        return False

    @staticmethod
    def _refresh(spare: Path, gen: Path, branch: str, sha: str, sparse: Sparse) -> bool:
        """Bring a warm checkout to ``sha``: the mirror's refs fetched into it, then only
        the files that differ written (a two-tree ``read-tree -m -u``). False when it
        cannot be (another branch or sparse setting: it is dropped)."""
        status, out, _ = gitops.run_git(spare, "config", "--get", "ccc.sparse", check=False)
        if status != 0 or out.decode().strip() != (sparse.id or "none"):
            return False
        status, out, _ = gitops.run_git(spare, "symbolic-ref", "--short", "HEAD", check=False)
        if status != 0 or out.decode().strip() != branch:
            return False
        status, _, _ = gitops.run_git(spare, "fetch", "-q", "--no-tags", "--prune", "--no-write-fetch-head", str(gen),
                                      *_CHECKOUT_REFSPECS, check=False)
        if status != 0:
            return False
        head = Mirror._commit(spare, "HEAD")
        if head != sha:
            if head is None or gitops.run_git(spare, "read-tree", "-m", "-u", head, sha, check=False)[0] != 0:
                return False
            gitops.run_git(spare, "update-ref", f"refs/heads/{branch}", sha)
        return True

    @staticmethod
    def _build(gen: Path, branch: str, sha: str | None, sparse: Sparse, dest: Path, *, workers: int = 0) -> None:
        """A checkout of ``sha`` as ``branch`` at ``dest`` (absent or empty), borrowing the
        mirror's objects; cone-mode sparse when the repository asks for it."""
        gitops.run_git(gen, "clone", "-q", "--shared", "--no-checkout", "--", str(gen), str(dest))
        os.chmod(dest, 0o700)
        gitops.run_git(dest, "config", "ccc.sparse", sparse.id or "none")
        if sha is None:
            return  # nothing to check out: an empty repository
        if sparse.dirs:
            gitops.run_git(dest, "sparse-checkout", "set", "--cone", *sparse.dirs)
        n = workers or os.cpu_count() or 1
        gitops.run_git(dest, "-c", f"checkout.workers={n}", "-c", "checkout.thresholdForParallelism=100",
                       "checkout", "-q", "-f", "-B", branch, sha)
