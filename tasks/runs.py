"""What the flows share around their steps: readable run names and artifact keys, run tags,
ckptflow's log records in the run's logs, errors in the flow's own words, and the concurrency
limit that serialises manual conversions to one destination."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import threading
from collections.abc import Iterator, Mapping
from uuid import UUID

from prefect.concurrency.sync import concurrency
from prefect.context import FlowRunContext, TaskRunContext
from prefect.logging.handlers import APILogHandler

from ckpt_core.errors import CkptError, StorageRefusedError
from ckpt_core.io import retry
from ckpt_core.pipeline.run import STORAGE_REFUSALS

__all__ = [
    "artifact_key",
    "bridge_loggers",
    "run_logs",
    "destination_slot",
    "in_flow_terms",
    "reported",
    "short",
    "tag_run",
]

# The library's loggers (storage retry warnings among them): forwarded to the run's logs.
LOGGERS = ("ckpt_core", "ckptflow")
_FLAG = re.compile(r"--([a-z][a-z0-9-]*)")
_MISSING = re.compile(r"no such file or directory|does not exist", re.IGNORECASE)
_END = r"(?=$|[/\s:;,)'\"])"  # a URL ends its path at one of these


def short(url: str) -> str:
    """The last two parts of a path or URL (`run1/global_step200`): enough to tell runs apart."""
    parts = [p for p in url.rstrip("/").split("/") if p]
    return "/".join(parts[-2:]) or url


def artifact_key(prefix: str, url: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) unique per `url`: readable
    tail plus a short hash, so two destinations never share a key."""
    tail = re.sub(r"[^a-z0-9]+", "-", short(url).lower()).strip("-")[-40:].strip("-")
    digest = hashlib.sha256(url.encode()).hexdigest()[:8]
    return f"{prefix}-{tail}-{digest}" if tail else f"{prefix}-{digest}"


# The flow runs of this process, innermost last: ckptflow's own threads (read-ahead, shard
# pools) carry no Prefect context, so their records go to the run that started them.
_RUNS: list[UUID] = []
_RUNS_GUARD = threading.Lock()


class _RunLogHandler(APILogHandler):
    """Prefect's API handler for ckptflow's records logged during a flow run (the CLI logs the
    same records without a run: those stay on stderr as before)."""

    def emit(self, record: logging.LogRecord) -> None:
        if FlowRunContext.get() is None and TaskRunContext.get() is None:
            with _RUNS_GUARD:
                if not _RUNS:
                    return
                record.flow_run_id = _RUNS[-1]
        super().emit(record)


class _ThreadTimeoutNote(logging.Filter):
    """Drops Prefect's per-task note that a timeout in a worker thread waits for the blocking
    call in progress: ckptflow's reads and writes are bounded calls (each with its own IO
    retries), so the limit takes effect between them; one note per shard only buries the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "is running in a worker thread" not in record.getMessage()


@contextlib.contextmanager
def run_logs() -> Iterator[None]:
    """Around a flow's body: ckptflow's log records (storage retry warnings among them) go to
    this run's logs, the UI's, as well as to stderr."""
    bridge_loggers()
    context = FlowRunContext.get()
    run_id = context.flow_run.id if context is not None and context.flow_run else None
    if run_id is None:
        yield
        return
    with _RUNS_GUARD:
        _RUNS.append(run_id)
    try:
        yield
    finally:
        with _RUNS_GUARD:
            _RUNS.remove(run_id)


def bridge_loggers() -> None:
    """Add the run-log handler to ckptflow's loggers, once per process."""
    runs = logging.getLogger("prefect.task_runs")
    if not any(isinstance(f, _ThreadTimeoutNote) for f in runs.filters):
        runs.addFilter(_ThreadTimeoutNote())
    for name in LOGGERS:
        logger = logging.getLogger(name)
        # PREFECT_LOGGING_EXTRA_LOGGERS gives these loggers Prefect's own API handler: this one
        # replaces it (it also covers ckptflow's threads), so no record is sent twice.
        for plain in [h for h in logger.handlers if type(h) is APILogHandler]:
            logger.removeHandler(plain)
        if not any(isinstance(h, _RunLogHandler) for h in logger.handlers):
            logger.addHandler(_RunLogHandler())
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)


def tag_run(*tags: str) -> None:
    """Add `tags` to the current flow run (the run list filters by them)."""
    from prefect.client.orchestration import get_client

    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return
    run = context.flow_run
    merged = sorted({*run.tags, *tags})
    with get_client(sync_client=True) as client:
        client.update_flow_run(run.id, tags=merged)
    run.tags = merged


def in_flow_terms(
    error: BaseException, flags: Mapping[str, str], urls: Mapping[str, str]
) -> BaseException:
    """`error` as the flow reports it, one line: a refused storage operation explained as
    `conversion_run` does for the CLI, the CLI flags in its message named as the flow's
    parameters (`--base` -> `parameter base`), and a refused or missing file under one of the
    flow's URL parameters followed by that parameter's name. `flags`: flag name -> parameter name;
    `urls`: parameter name -> its URL (the first is where an error without a file is about)."""
    if isinstance(error, STORAGE_REFUSALS) or (
        isinstance(error, OSError) and error.errno in retry.DESTINATION_ERRNOS
    ):
        assert isinstance(error, OSError)
        error = retry.explain(error, next(iter(urls.values()), "storage"))
    if not isinstance(error, CkptError):
        return error  # a bug: keep its type and traceback

    def name(match: re.Match[str]) -> str:
        found = flags.get(match.group(1))
        return f"parameter {found}" if found else match.group(0)

    message = _FLAG.sub(name, str(error))
    refused = isinstance(error, StorageRefusedError) or _MISSING.search(message)
    if refused and "parameter " not in message:
        owner = _owner(message, urls)
        message += f" (parameter {owner})" if owner else ""
    if message == str(error):
        return error
    try:
        return type(error)(message)
    except TypeError:
        return CkptError(message)


def _owner(message: str, urls: Mapping[str, str]) -> str | None:
    """The parameter whose URL the message's file lies under (the longest match)."""
    best: tuple[int, str] | None = None
    for parameter, url in urls.items():
        for candidate in {url.rstrip("/"), url.split("://", 1)[-1].rstrip("/")}:
            found = candidate and re.search(re.escape(candidate) + _END, message)
            if found and (best is None or len(candidate) > best[0]):
                best = (len(candidate), parameter)
    return best[1] if best else None


@contextlib.contextmanager
def reported(flags: Mapping[str, str], **urls: str) -> Iterator[None]:
    """Run the flow body; an expected failure leaves it as one line in the flow's terms
    (`urls`: the flow's URL parameters by name, see `in_flow_terms`)."""
    try:
        yield
    except Exception as e:
        translated = in_flow_terms(e, flags, urls)
        if translated is e:
            raise
        raise translated from e


def flag_names(parameters: list[str], **aliases: str) -> dict[str, str]:
    """CLI flag -> flow parameter: each parameter's own flag (`max_shard_size` is
    `--max-shard-size`) plus `aliases` (flag with underscores -> parameter)."""
    found = {p.replace("_", "-"): p for p in parameters}
    found.update({flag.replace("_", "-"): p for flag, p in aliases.items()})
    return found


@contextlib.contextmanager
def destination_slot(dst: str) -> Iterator[str]:
    """Hold the global concurrency limit of `dst` (one slot: conversions to one destination run
    one after another, the next waits in Prefect instead of failing on the destination lock).
    The limit is created on first use; yields its name."""
    name = artifact_key("ckptflow-dst", dst)
    _ensure_limit(name, limit=1)
    with concurrency(name, occupy=1, strict=True):
        yield name


def _ensure_limit(name: str, *, limit: int) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
            return
        except ObjectNotFound:
            pass
        with contextlib.suppress(ObjectAlreadyExists):  # another run created it meanwhile
            client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=name, limit=limit)
            )
