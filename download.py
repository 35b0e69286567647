"""Fetches a model's files from ModelScope into a local folder that the model server can serve.

    python download.py [MODEL_ID] --local-dir DIR      # default ZhipuAI/glm-4-9b-chat-hf

Writes every file of the repository at --revision (or those --include/--exclude select) under DIR,
keeping the repository's layout; nothing else is written there except the client's partial
`*.incomplete` files while a download runs. Files already complete in DIR (listed size and sha256)
are skipped and a partial file is resumed from where it stopped, so re-running the same command
after an interruption finishes the job. At the end every selected file the hub lists is checked
for its size and, where the hub gives one, its sha256; then the serve command is printed.

The download itself is the modelscope client's `snapshot_download` (progress bars, retries, range
resume). The hub is --endpoint, else the MODELSCOPE_ENDPOINT environment variable, else ModelScope's
own. A private repository needs MODELSCOPE_API_TOKEN."""

from __future__ import annotations

import argparse
import errno
import fnmatch
import hashlib
import logging
import os
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("download")

DEFAULT_MODEL = "ZhipuAI/glm-4-9b-chat-hf"
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


class DownloadError(RuntimeError):
    """The download cannot go on; the message is one line a person can act on."""


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int
    sha256: str | None


# ------------------------------------------------------------------ selection

def _matches(path: str, patterns: list[str]) -> bool:
    # The client's own rule (modelscope_hub._download._matches_patterns): fnmatch globs, plus legacy
    # regex-looking patterns such as ".*\.bin" read with ".*" as "*". Same rule, same selection.
    return any(fnmatch.fnmatch(path, p) or (".*" in p and fnmatch.fnmatch(path, p.replace(".*", "*")))
               for p in patterns)


def select(files: list[RemoteFile], include: list[str] | None, exclude: list[str] | None) -> list[RemoteFile]:
    """The files --include/--exclude keep, exactly as the client filters its own download list."""
    return [f for f in files
            if (not include or _matches(f.path, include)) and not (exclude and _matches(f.path, exclude))]


# ------------------------------------------------------------------ hub

def resolve_endpoint(model_id: str, endpoint: str | None) -> str:
    """The hub URL to use: `endpoint`, else MODELSCOPE_ENDPOINT, else the ModelScope site holding the model."""
    from modelscope_hub import HubApi

    # With an endpoint configured (argument or MODELSCOPE_ENDPOINT) this returns it without a request;
    # otherwise the client looks the model up on modelscope.cn, then modelscope.ai.
    return HubApi(endpoint=endpoint).resolve_endpoint_for_read(model_id, repo_type="model")


def list_files(model_id: str, revision: str, endpoint: str) -> list[RemoteFile]:
    """Every file of the repository at `revision`, with the size and sha256 the hub lists."""
    from modelscope_hub import HubApi

    entries = HubApi(endpoint=endpoint).list_repo_files(model_id, "model", revision=revision, recursive=True)
    return [RemoteFile(e.path, int(e.size), e.sha256) for e in entries if not e.is_dir and e.path]


def fetch(model_id: str, local_dir: Path, revision: str, endpoint: str, *, cache_dir: str | None = None,
          include: list[str] | None = None, exclude: list[str] | None = None) -> Path:
    """Runs the client's snapshot_download into `local_dir`; complete files are not fetched again."""
    from modelscope.hub.snapshot_download import snapshot_download

    return Path(snapshot_download(model_id, revision=revision, cache_dir=cache_dir, local_dir=str(local_dir),
                                  allow_patterns=include, ignore_patterns=exclude, endpoint=endpoint))


# ------------------------------------------------------------------ local checks

def missing_bytes(local_dir: Path, files: list[RemoteFile]) -> int:
    """Bytes still to arrive: listed sizes less what is already in place or in a partial file."""
    total = 0
    for f in files:
        target = local_dir / f.path
        if target.is_file() and target.stat().st_size == f.size:
            continue
        partial = target.with_name(target.name + ".incomplete")
        have = partial.stat().st_size if partial.is_file() else 0
        total += max(0, f.size - have)
    return total


def check_space(local_dir: Path, needed: int) -> None:
    """Raises DownloadError when the disk holding `local_dir` has less than `needed` bytes free."""
    probe = local_dir
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed > free:
        raise DownloadError(f"not enough disk space in {local_dir}: {_size(needed)} still to download, "
                            f"{_size(free)} free; free some space and re-run the same command")


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in 8 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def verify(local_dir: Path, files: list[RemoteFile]) -> list[str]:
    """One line per file that is missing, has the wrong size, or (where listed) the wrong sha256."""
    problems = []
    for f in files:
        target = local_dir / f.path
        if not target.is_file():
            problems.append(f"{f.path}: missing")
        elif target.stat().st_size != f.size:
            problems.append(f"{f.path}: {target.stat().st_size} bytes, the hub lists {f.size}")
        elif f.sha256 and sha256_of(target) != f.sha256.lower():
            problems.append(f"{f.path}: sha256 differs from the hub's")
    return problems


# ------------------------------------------------------------------ failures

def _size(n: int) -> str:
    """Bytes as a person reads them: 18.8 GiB, 645.0 KiB."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _causes(exc: BaseException) -> list[BaseException]:
    """`exc` and what it wraps: its causes, and for an aggregate download error each file's error."""
    seen: list[BaseException] = []
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or any(e is s for s in seen):
            continue
        seen.append(e)
        todo.extend([e.__cause__, e.__context__])
        failed = getattr(e, "failed_files", None)  # FileDownloadError: {path: that file's exception}
        if isinstance(failed, dict):
            todo.extend(failed.values())
    return seen


def describe_failure(exc: BaseException, *, model_id: str, revision: str, endpoint: str,
                     local_dir: Path) -> str | None:
    """The one line to print for a failure while listing, downloading or writing; None if not a known one."""
    import requests
    from modelscope_hub import (AuthenticationError, FileDownloadError, HubError, NetworkError, NotExistError,
                                PermissionDeniedError, ServerError)

    causes = _causes(exc)
    for e in causes:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return (f"disk full while writing to {local_dir}: free some space and re-run the same command; "
                    "it resumes where it stopped")
    if any(isinstance(e, NotExistError) for e in causes):
        return (f"model {model_id} (revision {revision}) not found at {endpoint}: check the model id, "
                f"e.g. {DEFAULT_MODEL}")
    if any(isinstance(e, (AuthenticationError, PermissionDeniedError)) for e in causes):
        return (f"access to {model_id} was refused by {endpoint}: for a private model set MODELSCOPE_API_TOKEN")
    if isinstance(exc, FileDownloadError):
        failed = exc.failed_files or {}
        first = next(iter(failed.items()), None)
        detail = f" (first: {first[0]}: {_first_line(first[1])})" if first else ""
        return (f"{len(failed)} of {exc.total or '?'} file(s) did not download{detail}; "
                "re-run the same command to resume")
    if any(isinstance(e, (NetworkError, requests.ConnectionError, requests.Timeout)) for e in causes):
        # The socket's own words ("Connection refused", "Name or service not known") say it best.
        reason = next((e.strerror for e in reversed(causes) if isinstance(e, OSError) and e.strerror),
                      _first_line(exc))
        return (f"cannot reach the ModelScope hub at {endpoint} ({reason}); check the network, "
                "--endpoint or MODELSCOPE_ENDPOINT, then re-run the same command")
    if isinstance(exc, ServerError):
        return f"the hub at {endpoint} failed ({_first_line(exc)}); try again later, re-running resumes"
    if isinstance(exc, OSError):
        return f"cannot write to {local_dir}: {exc.strerror or _first_line(exc)}"
    if isinstance(exc, (HubError, requests.RequestException)):
        return f"download of {model_id} failed: {_first_line(exc)}"
    return None


# ------------------------------------------------------------------ command line

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model_id", nargs="?", default=DEFAULT_MODEL,
                        help=f"ModelScope model id, owner/name (default {DEFAULT_MODEL})")
    parser.add_argument("--local-dir", help="folder to write the model into (default models/<name>)")
    parser.add_argument("--revision", default="master", help="branch, tag or commit (default master)")
    parser.add_argument("--cache-dir",
                        help="the client's cache folder (default MODELSCOPE_CACHE or ~/.cache/modelscope)")
    parser.add_argument("--include", action="append", metavar="PATTERN",
                        help="download only files matching this glob (repeatable), e.g. '*.json'")
    parser.add_argument("--exclude", action="append", metavar="PATTERN",
                        help="skip files matching this glob (repeatable), e.g. '*.pth'")
    parser.add_argument("--endpoint", help="hub URL, e.g. https://modelscope.cn (default MODELSCOPE_ENDPOINT, "
                                           "else ModelScope's own)")
    return parser


def plan(args: argparse.Namespace, local_dir: Path) -> tuple[str, list[RemoteFile]]:
    """(endpoint, files to have) for the command line; fails early on a bad id, no hub or too little disk."""
    model_id = args.model_id
    endpoint = resolve_endpoint(model_id, args.endpoint or None)
    listed = list_files(model_id, args.revision, endpoint)
    files = select(listed, args.include, args.exclude)
    if not files:
        raise DownloadError(f"no file of {model_id} matches --include/--exclude ({len(listed)} listed)")
    needed = missing_bytes(local_dir, files)
    log.info("%s@%s from %s: %d files, %s, %s still to download into %s", model_id, args.revision, endpoint,
             len(files), _size(sum(f.size for f in files)), _size(needed), local_dir)
    check_space(local_dir, needed)
    return endpoint, files


def check(local_dir: Path, files: list[RemoteFile]) -> None:
    """Raises DownloadError unless every file in `files` arrived intact."""
    log.info("verifying %d files (size%s)", len(files), " and sha256" if any(f.sha256 for f in files) else "")
    problems = verify(local_dir, files)
    if problems:
        raise DownloadError(f"{len(problems)} file(s) failed verification ({problems[0]}"
                            f"{'; ...' if len(problems) > 1 else ''}); re-run the same command to fetch them again")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    local_dir = Path(args.local_dir or Path("models") / args.model_id.split("/")[-1])
    downloading = False
    try:
        endpoint, files = plan(args, local_dir)
        downloading = True
        fetch(args.model_id, local_dir, args.revision, endpoint, cache_dir=args.cache_dir,
              include=args.include, exclude=args.exclude)
        downloading = False
        check(local_dir, files)
    except KeyboardInterrupt:
        message = "interrupted; re-running the same command resumes where it stopped"
        code = EXIT_INTERRUPTED
    except DownloadError as exc:
        message, code = f"error: {exc}", EXIT_FAILED
    except Exception as exc:  # the process edge: known client and OS failures become one line
        described = describe_failure(exc, model_id=args.model_id, revision=args.revision, local_dir=local_dir,
                                     endpoint=args.endpoint or os.environ.get("MODELSCOPE_ENDPOINT") or "ModelScope")
        if described is None:  # not a failure we know: the traceback is the bug report
            raise
        message, code = f"error: {described}", EXIT_FAILED
    else:
        print(f"{args.model_id} is complete and verified in {local_dir}")
        print(f"serve it with: python LLMapis.py --model {shlex.quote(str(local_dir))}")
        return 0
    # A download stopped midway leaves the client's progress bars without a final newline.
    print(("\n" if downloading else "") + f"download.py: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
