"""Git operations the agent pipeline needs, on GitPython.

Every git process started here:
* never prompts (``GIT_TERMINAL_PROMPT=0``, ssh in batch mode): an agent has no terminal,
  a prompt would hang the task until its timeout;
* gets identity explicitly (author *and* committer), never from the user's config;
* runs with repository hooks, fsmonitor and signing disabled through ``GIT_CONFIG_*``
  overrides, and with secret-looking environment variables blanked. The repository was
  just modified by a coder and by the repository's own tests, both untrusted: a
  ``.git/hooks/pre-commit`` they wrote must not run with the agent's credentials.

Those overrides cover what we know of, not everything a ``.git/config`` can say (an
``http.proxy``, a ``credential.helper``, a ``filter.<x>.clean`` that ``git add`` runs):
the functions that work in a checkout (``changed_files``, ``diff``, ``commit_all``,
``push``) are for repositories only the agent wrote. After a coder has run in a
workspace, git goes through the agent's own clone (:mod:`infra.adapters.git.agent_clone`).

The functions block (git is a subprocess); async callers use ``asyncio.to_thread``.
"""

from __future__ import annotations

import collections
import errno
import fnmatch
import json
import os
import re
import shlex
import shutil
import stat
import tempfile
import unicodedata
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

import git

from events.errors import CccError, InfrastructureError

from infra.adapters.git.workspace import scrubbed_env_name

EMPTY_TREE = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"
OWN_BRANCH_PREFIX = "ccc/"
_CONFIG_OVERRIDES = (
    ("core.hooksPath", "/dev/null"),
    ("core.fsmonitor", "false"),
    ("commit.gpgSign", "false"),
    ("tag.gpgSign", "false"),
    ("core.quotePath", "false"),
    ("advice.detachedHead", "false"),
)
_URL_CREDS = re.compile(r"(://)[^/\s:@]+(:[^/\s@]*)?@")


class GitOperationError(InfrastructureError):
    """A git command failed (network, remote, corrupt clone). Retryable by default:
    most causes are transient, and retries are bounded by the caller."""


class PushRejected(GitOperationError):
    """The remote refused the push (the lease failed: someone else moved the branch)."""


class NothingToCommit(CccError):
    """The coder finished but the working tree equals HEAD: there is no change to
    propose. A decision about the outcome, not a failure of the world."""

    retryable = False


def redact(text: str) -> str:
    """Remove credentials embedded in URLs (``https://x-access-token:...@host``)."""
    return _URL_CREDS.sub(r"\1***@", text)


def git_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment *overrides* for git processes (GitPython starts from os.environ)."""
    env = {name: "" for name in os.environ if scrubbed_env_name(name)}
    env["GIT_TERMINAL_PROMPT"] = "0"
    env.setdefault("GIT_SSH_COMMAND", os.environ.get("GIT_SSH_COMMAND") or "ssh -o BatchMode=yes")
    env["GIT_CONFIG_COUNT"] = str(len(_CONFIG_OVERRIDES))
    for i, (key, value) in enumerate(_CONFIG_OVERRIDES):
        env[f"GIT_CONFIG_KEY_{i}"] = key
        env[f"GIT_CONFIG_VALUE_{i}"] = value
    env.update(extra or {})
    return env


def identity_env(name: str, email: str) -> dict[str, str]:
    return {"GIT_AUTHOR_NAME": name, "GIT_AUTHOR_EMAIL": email,
            "GIT_COMMITTER_NAME": name, "GIT_COMMITTER_EMAIL": email}


def run_git(
    cwd: Path | str, *args: str, env: Mapping[str, str] | None = None, check: bool = True
) -> tuple[int, bytes, str]:
    """Run ``git <args>`` in ``cwd``; returns (status, stdout bytes, stderr text)."""
    g = git.Git(str(cwd))
    status, out, err = g.execute(
        [git.Git.GIT_PYTHON_GIT_EXECUTABLE or "git", *args],
        with_extended_output=True,
        with_exceptions=False,
        stdout_as_string=False,
        strip_newline_in_stdout=False,
        env=git_env(env),
    )
    if check and status != 0:
        raise GitOperationError(f"git {args[0]} failed ({status}): {redact(str(err).strip())}")
    return status, out, str(err)


def git_output(cwd: Path | str, *args: str, env: Mapping[str, str] | None = None) -> str:
    """``git <args>``'s standard output as text, stripped; raises if git fails."""
    return run_git(cwd, *args, env=env)[1].decode("utf-8", "replace").strip()


# -- clone and branches -------------------------------------------------------------
def clone(
    url: str, dest: Path | str, *, branch: str | None = None, env: Mapping[str, str] | None = None
) -> git.Repo:
    """Clone ``url`` into ``dest`` (absent or empty). ``env`` carries credentials for
    this call only (e.g. ``GIT_ASKPASS``), since the ambient secrets are blanked."""
    kwargs = {"branch": branch} if branch else {}
    try:
        return git.Repo.clone_from(url, str(dest), env=git_env(env), **kwargs)
    except git.GitCommandError as exc:
        raise GitOperationError(f"git clone {redact(url)} failed: {redact(str(exc.stderr).strip())}") from exc


def default_branch(repo: git.Repo | Path | str) -> str:
    """The branch a change is proposed against: the remote's HEAD in a clone, else the
    branch HEAD points at (also for bare repositories and unborn branches)."""
    cwd = repo.git_dir if isinstance(repo, git.Repo) else str(repo)
    status, out, _ = run_git(cwd, "symbolic-ref", "-q", "--short", "refs/remotes/origin/HEAD", check=False)
    if status == 0 and out.strip():
        return out.decode().strip().removeprefix("origin/")
    return git_output(cwd, "symbolic-ref", "--short", "HEAD")


def head_sha(repo_dir: Path | str) -> str | None:
    status, out, _ = run_git(repo_dir, "rev-parse", "-q", "--verify", "HEAD^{commit}", check=False)
    return out.decode().strip() if status == 0 else None


def create_branch(repo_dir: Path | str, name: str) -> None:
    """Check out ``name`` at the current commit, resetting it if it exists (a retry on
    a reused clone starts the branch again rather than failing).

    What ``git checkout --no-track -B <name>`` does at the current commit, with plumbing:
    the branch set to HEAD's commit, then HEAD pointed at it. The files and the index do
    not change either way, but ``checkout`` walks and rewrites the whole index to learn
    that: 39 ms against 8 ms on 30,000 files (and ~70 ms under load, in the trace of a
    ``ccc bench task`` run). An unborn HEAD (no commit yet) just gets its new name."""
    status, _, _ = run_git(repo_dir, "check-ref-format", "--branch", name, check=False)
    if status != 0:
        raise GitOperationError(f"invalid branch name {name!r}", retryable=False)
    status, out, _ = run_git(repo_dir, "rev-parse", "-q", "--verify", "HEAD^{commit}", check=False)
    if status == 0:
        run_git(repo_dir, "update-ref", "-m", f"branch: reset to HEAD ({name})", f"refs/heads/{name}",
                out.decode().strip())
    run_git(repo_dir, "symbolic-ref", "-m", f"checkout: moving to {name}", "HEAD", f"refs/heads/{name}")


def check_out_from(repo_dir: Path | str, source: Path | str, ref: str, branch: str, *,
                   head_at: str | None = None) -> None:
    """Check out ``ref`` of the repository at ``source`` (the agent's own clone) as
    ``branch`` in the clone at ``repo_dir``: for a round on a pull request's branch, so the
    coder finds the branch checked out, its git clean. ``head_at`` (a commit of ``ref``'s
    history) moves the branch back there, the index and the files staying as ``ref`` has
    them: what ``ref`` adds shows as a staged change (a rebase's conflicts to resolve).

    For a workspace before the coder or any command ran in it (its ``.git`` is still the
    one our clone made); ``source`` is a local path, so no credentials are involved."""
    status, _, _ = run_git(repo_dir, "check-ref-format", "--branch", branch, check=False)
    if status != 0:
        raise GitOperationError(f"invalid branch name {branch!r}", retryable=False)
    run_git(repo_dir, "fetch", "-q", "--no-tags", "--no-write-fetch-head", str(source),
            f"+{ref}:refs/ccc/start")
    run_git(repo_dir, "checkout", "-q", "-f", "--no-track", "-B", branch, "refs/ccc/start")
    if head_at is not None:
        run_git(repo_dir, "reset", "-q", "--soft", head_at)
    run_git(repo_dir, "update-ref", "-d", "refs/ccc/start")


def branch_name(task_id: str, title: str, max_slug: int = 40) -> str:
    """``ccc/task-<task_id>-<slug>``: stable per task, so every attempt pushes the same
    branch, and readable in a PR list."""
    ascii_title = unicodedata.normalize("NFKD", title).encode("ascii", "ignore").decode().lower()
    slug = ""
    for word in re.findall(r"[a-z0-9]+", ascii_title):
        candidate = f"{slug}-{word}" if slug else word
        if len(candidate) > max_slug:
            if not slug:
                slug = word[:max_slug]
            break
        slug = candidate
    safe_id = re.sub(r"[^A-Za-z0-9_=-]", "-", task_id).strip("-") or "unknown"
    return f"{OWN_BRANCH_PREFIX}task-{safe_id}-{slug or 'change'}"


# -- the working tree's change -------------------------------------------------------
@contextmanager
def _worktree_index(repo_dir: Path | str) -> Iterator[dict[str, str]]:
    """A throw-away index holding the whole working tree (untracked files included,
    ignored ones not), so the change can be diffed against HEAD without touching the
    real index. Starting from a copy of the real index keeps git's stat cache: only
    files that changed are re-hashed. The copy keeps the index's mtime (``copy2``): git
    trusts a cached stat only for files older than the index file, so a fresh mtime
    would hide a same-size edit made within the second of the checkout."""
    real = Path(repo_dir, git_output(repo_dir, "rev-parse", "--git-path", "index"))
    with tempfile.TemporaryDirectory(prefix="ccc-index-") as tmp:
        index = Path(tmp, "index")
        if real.is_file():
            shutil.copy2(real, index)
        env = {"GIT_INDEX_FILE": str(index)}
        run_git(repo_dir, "add", "-A", env=env)
        yield env


def _base(repo_dir: Path | str) -> str:
    return head_sha(repo_dir) or EMPTY_TREE


def changed_files(repo_dir: Path | str) -> list[str]:
    """Paths added, modified or deleted relative to HEAD (a rename is both)."""
    with _worktree_index(repo_dir) as env:
        out = run_git(repo_dir, "diff", "--cached", "--name-only", "-z", "--no-renames",
                      _base(repo_dir), env=env)[1]
    return sorted(p for p in out.decode("utf-8", "surrogateescape").split("\0") if p)


def diff(repo_dir: Path | str, *, binary: bool = False) -> str:
    """The full change as a unified diff against HEAD, new files included. Binary files
    show as "Binary files differ" unless ``binary`` asks for an applicable git binary
    patch; bytes that are not UTF-8 are replaced, so the result is always text."""
    args = ["diff", "--cached", "--no-renames", "--no-ext-diff", "--no-textconv", "--no-color",
            "--src-prefix=a/", "--dst-prefix=b/"]
    if binary:
        args.append("--binary")
    with _worktree_index(repo_dir) as env:
        out = run_git(repo_dir, *args, _base(repo_dir), env=env)[1]
    return out.decode("utf-8", "replace")


def diff_stat(repo_dir: Path | str) -> str:
    """E.g. ``2 files changed, 10 insertions(+), 1 deletion(-)``."""
    with _worktree_index(repo_dir) as env:
        out = git_output(repo_dir, "diff", "--cached", "--no-renames", "--shortstat", _base(repo_dir),
                         env=env)
    return out or "0 files changed, 0 insertions(+), 0 deletions(-)"


def commit_all(repo_dir: Path | str, message: str, author_name: str, author_email: str) -> str:
    """Stage everything (respecting .gitignore) and commit; returns the new sha."""
    if not message.strip():
        raise GitOperationError("empty commit message", retryable=False)
    run_git(repo_dir, "add", "-A")
    status, _, _ = run_git(repo_dir, "diff", "--cached", "--quiet", _base(repo_dir), check=False)
    if status == 0:
        raise NothingToCommit(f"no change to commit in {repo_dir}")
    run_git(repo_dir, "commit", "-q", "--no-verify", "-m", message,
            env=identity_env(author_name, author_email))
    return git_output(repo_dir, "rev-parse", "HEAD")


def push(
    repo_dir: Path | str, branch: str, remote: str = "origin", *, env: Mapping[str, str] | None = None,
    lease: str | None = None,
) -> str:
    """Push ``branch``; returns the pushed sha.

    Our own ``ccc/`` branches are force-pushed *with a lease*: a retry attempt starts
    from a fresh clone and pushes the same branch name again, replacing the previous
    attempt, but only if the remote branch is still what we saw just before pushing.
    A round on a pull request's existing branch (a CI fix, a rebase) passes ``lease``:
    the branch's commit when the round started, so a push someone made to the branch
    since is never overwritten (``PushRejected``). Other branches are never forced (a
    push on top of a branch that moved is then refused as not a fast-forward)."""
    sha = git_output(repo_dir, "rev-parse", f"refs/heads/{branch}")
    args = ["push", "--porcelain", "--no-verify", remote]
    if branch.startswith(OWN_BRANCH_PREFIX):
        if lease is None:
            out = git_output(repo_dir, "ls-remote", remote, f"refs/heads/{branch}", env=env)
            lease = out.split()[0] if out else ""  # "" = the branch must not exist yet
        args.append(f"--force-with-lease=refs/heads/{branch}:{lease}")
    args.append(f"refs/heads/{branch}:refs/heads/{branch}")
    status, out_b, err = run_git(repo_dir, *args, env=env, check=False)
    if status != 0:
        text = redact((out_b.decode("utf-8", "replace") + err).strip())
        if "[rejected]" in text or "stale info" in text or "non-fast-forward" in text:
            raise PushRejected(f"push of {branch} rejected: {text}")
        raise GitOperationError(f"push of {branch} failed: {text}")
    return sha


# -- reading the repository's own files ------------------------------------------------
def read_regular_file(root: Path | str, path: str, *, max_bytes: int) -> bytes | None:
    """The first ``max_bytes + 1`` bytes of ``root/path`` (so a caller sees whether there
    was more) when it is a regular file reached without following a symlink; None when it
    is absent, a symlink (at any component), a directory, a FIFO or a device.

    For files a repository controls and the agent reads for itself (instructions for the
    coder, the test command): a committed ``CLAUDE.md -> /proc/self/environ`` must not put
    the agent's environment into a prompt. Each component is opened with ``O_NOFOLLOW``
    relative to its parent's descriptor, so a link swapped in between is not followed
    either; a FIFO does not block the open (``O_NONBLOCK``)."""
    rel = PurePosixPath(path)
    if not rel.parts or rel.is_absolute() or ".." in rel.parts:
        raise ValueError(f"{path!r}: a path inside the repository is needed")
    nofollow = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(root, nofollow | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        for part in rel.parts[:-1]:
            parent, fd = fd, -1
            try:
                fd = os.open(part, nofollow | os.O_DIRECTORY, dir_fd=parent)
            finally:
                os.close(parent)
        parent, fd = fd, -1
        try:
            fd = os.open(rel.parts[-1], nofollow | os.O_NONBLOCK, dir_fd=parent)
        finally:
            os.close(parent)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        chunks, left = [], max_bytes + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 16))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR, errno.EACCES, errno.ENXIO):
            return None  # absent, a symlink (ELOOP), under a non-directory, unreadable
        raise
    finally:
        if fd >= 0:
            os.close(fd)


_MAX_CONFIG_FILE = 256 * 1024  # a test command, a pyproject.toml: far less


def _text(repo: Path, path: str) -> str | None:
    data = read_regular_file(repo, path, max_bytes=_MAX_CONFIG_FILE)
    return None if data is None else data[:_MAX_CONFIG_FILE].decode("utf-8", "replace")


# -- what kind of repository is this -------------------------------------------------
_LANGUAGES = {
    ".py": "Python", ".pyi": "Python", ".js": "JavaScript", ".mjs": "JavaScript",
    ".cjs": "JavaScript", ".jsx": "JavaScript", ".ts": "TypeScript", ".tsx": "TypeScript",
    ".go": "Go", ".rs": "Rust", ".java": "Java", ".kt": "Kotlin", ".kts": "Kotlin",
    ".scala": "Scala", ".rb": "Ruby", ".php": "PHP", ".c": "C", ".h": "C", ".cc": "C++",
    ".cpp": "C++", ".cxx": "C++", ".hpp": "C++", ".hh": "C++", ".cs": "C#", ".swift": "Swift",
    ".m": "Objective-C", ".sh": "Shell", ".bash": "Shell", ".ps1": "PowerShell", ".sql": "SQL",
    ".html": "HTML", ".htm": "HTML", ".css": "CSS", ".scss": "SCSS", ".vue": "Vue",
    ".svelte": "Svelte", ".dart": "Dart", ".ex": "Elixir", ".exs": "Elixir", ".erl": "Erlang",
    ".hs": "Haskell", ".ml": "OCaml", ".clj": "Clojure", ".lua": "Lua", ".r": "R", ".jl": "Julia",
    ".pl": "Perl", ".tf": "HCL", ".md": "Markdown", ".rst": "reStructuredText",
}
_SKIP_DIRS = {".git", "node_modules", "__pycache__", "venv", ".venv", "env", ".tox", ".nox",
              "site-packages", ".mypy_cache", ".pytest_cache", "dist", "build", "target", "vendor"}


def _walk_files(repo_dir: Path) -> Iterator[str]:
    for dirpath, dirnames, filenames in os.walk(repo_dir):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(".")
                       and not Path(dirpath, d, "pyvenv.cfg").exists()]
        rel = os.path.relpath(dirpath, repo_dir)
        for f in filenames:
            yield f if rel == "." else f"{rel}/{f}"


_VENV_MARK = "pyvenv.cfg"


def _repo_files(repo_dir: Path, *patterns: str) -> list[str]:
    """Tracked and untracked-but-not-ignored files (``/``-separated, relative) when it is
    a git repository (so build outputs and venvs listed in .gitignore do not count), else
    a directory walk; only those matching a ``patterns`` glob (``**/`` for any directory)
    when there are any. Skipped either way: files under a directory of :data:`_SKIP_DIRS`
    or under a virtualenv (a directory with a ``pyvenv.cfg``).

    Plain string work on git's listing, close to ``git ls-files`` itself: on 30,000 files
    a ``Path`` per file and a set of its parents took 1.0–1.7 s, this ~0.04 s (a listing
    that names no skipped directory and no venv is taken as it is)."""
    if (repo_dir / ".git").exists():
        specs = [f":(glob){p}" for p in (*patterns, f"**/{_VENV_MARK}")] if patterns else []
        status, out, _ = run_git(repo_dir, "ls-files", "-z", "--cached", "--others", "--exclude-standard",
                                 "--", *specs, check=False)
        if status == 0:
            text = out.decode("utf-8", "surrogateescape")
            paths = [p for p in text.split("\0") if p]
            # each venv as "dir/" (a prefix of what lies in it); a venv at the top is
            # the whole repository, as the walk sees it
            venvs = tuple({p[:-len(_VENV_MARK)] for p in paths
                           if p == _VENV_MARK or p.endswith("/" + _VENV_MARK)}) if _VENV_MARK in text else ()
            if venvs or any(f"{d}/" in text for d in _SKIP_DIRS):
                skip = _SKIP_DIRS
                paths = [p for p in paths if (not venvs or not p.startswith(venvs))
                         and skip.isdisjoint(p.split("/")[:-1])]
            if patterns:
                paths = [p for p in paths if p.rpartition("/")[2] != _VENV_MARK or _VENV_MARK in patterns]
            return paths
    files = _walk_files(repo_dir)
    if patterns:
        return [p for p in files if any(fnmatch.fnmatchcase(p.rpartition("/")[2], pat.rpartition("/")[2])
                                        for pat in patterns)]
    return list(files)


def languages(repo_dir: Path | str) -> dict[str, int]:
    """Language -> number of files, most common first (by extension only: cheap, and
    enough to match an agent's specialty)."""
    by_ext = collections.Counter(os.path.splitext(p)[1] for p in _repo_files(Path(repo_dir)))
    counts: dict[str, int] = {}
    for ext, n in by_ext.items():
        lang = _LANGUAGES.get(ext.lower())
        if lang:
            counts[lang] = counts.get(lang, 0) + n
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


_NPM_PLACEHOLDER = "no test specified"


def _has_python_tests(repo: Path) -> bool:
    if (repo / "pytest.ini").is_file() or (repo / "conftest.py").is_file():
        return True
    for name, marker in (("pyproject.toml", "[tool.pytest"), ("setup.cfg", "[tool:pytest]"),
                         ("tox.ini", "[pytest]")):
        text = _text(repo, name)
        if text is not None and marker in text:
            return True
    for p in _repo_files(repo, "**/test_*.py", "**/*_test.py"):
        d = p.rpartition("/")[0]
        if not d.startswith(".") and "/." not in d:  # (not under a hidden directory)
            return True
    return False


def detect_test_command(repo_dir: Path | str) -> list[str] | None:
    """How this repository runs its tests, or None when we cannot tell.

    An explicit ``.ccc/test-command`` (one line, shell words) wins; then conventions:
    pytest, ``npm test`` (unless it is npm's "no test specified" placeholder),
    ``make test``, ``go test ./...``, ``cargo test``. The files are read as regular
    files only (:func:`read_regular_file`): a symlinked ``.ccc/test-command`` is ignored."""
    repo = Path(repo_dir)
    explicit = _text(repo, ".ccc/test-command")
    if explicit is not None:
        for line in explicit.splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                return shlex.split(line)
    if _has_python_tests(repo):
        return ["python", "-m", "pytest", "-q"]
    pkg = _text(repo, "package.json")
    if pkg is not None:
        try:
            script = json.loads(pkg).get("scripts", {}).get("test")
        except (ValueError, AttributeError):
            script = None
        if isinstance(script, str) and script.strip() and _NPM_PLACEHOLDER not in script:
            return ["npm", "test", "--silent"]
    for name in ("GNUmakefile", "makefile", "Makefile"):
        mk = _text(repo, name)
        if mk is not None and re.search(r"^test\s*:(?!=)", mk, re.MULTILINE):
            return ["make", "test"]
    if (repo / "go.mod").is_file():
        return ["go", "test", "./..."]
    if (repo / "Cargo.toml").is_file():
        return ["cargo", "test"]
    return None
