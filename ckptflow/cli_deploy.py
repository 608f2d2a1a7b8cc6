"""`ckptflow deploy`: the `ckptflow` process work pool and deployments/prefect.yaml's deployments
on the Prefect server at PREFECT_API_URL, with this site's paths checked before anything is
stored. The deployments themselves come from `prefect deploy` on the yaml (a copy carrying the
overrides), so what the README shows and what this command does are the same."""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any
from uuid import UUID

from ckpt_core.errors import UsageError
from ckptflow.deploy_notify import AUTOMATION, check_target, ensure_automation, notification_block

PREFECT_FILE = Path(__file__).resolve().parent.parent / "deployments" / "prefect.yaml"
WATCH_PATHS = ("root", "out_root")
# The only variables a Secret block may hand the worker: what s3fs reads (storage.py).
S3_VARIABLES = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION")


def add_parsers(subparsers: Any) -> None:
    deploy = subparsers.add_parser(
        "deploy", help="create the work pool and the deployments on the server at PREFECT_API_URL"
    )
    deploy.add_argument("--prefect-file", default=str(PREFECT_FILE), help="(default: %(default)s)")
    deploy.add_argument("--pool", help="work pool name (default: the yaml's, ckptflow)")
    deploy.add_argument("--root", help="watch/hourly: the checkpoints' root, as the worker sees it")
    deploy.add_argument("--out-root", help="watch/hourly: where conversions are published")
    deploy.add_argument(
        "--interval", type=float, help="watch/hourly runs every SECONDS instead of hourly (cron)"
    )
    deploy.add_argument(
        "--s3-secret",
        metavar="BLOCK",
        help="the pool's runs take AWS_* storage settings from this Prefect Secret block "
        "(a JSON object of AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...), resolved on the worker",
    )
    deploy.add_argument(
        "--notify-webhook",
        metavar="URL",
        help="a failed, crashed or timed-out run of these deployments POSTs a JSON message "
        f"(text, subject, body) to URL (Prefect automation and block {AUTOMATION})",
    )
    deploy.add_argument(
        "--notify-block",
        metavar="TYPE/NAME",
        help="the same through an existing Prefect notification block, e.g. slack-webhook/ops",
    )
    deploy.set_defaults(handler=run_deploy)


def run_deploy(args: argparse.Namespace) -> int:
    import yaml

    check_target(webhook=args.notify_webhook, block=args.notify_block)
    spec = load_spec(Path(args.prefect_file))
    apply_overrides(spec, pool=args.pool, root=args.root, out_root=args.out_root)
    api_url = server_url()
    if args.interval is not None:
        for deployment in scheduled(spec):
            deployment["schedules"] = [{"interval": args.interval}]
    pool = args.pool or spec["definitions"]["work_pool"]["name"]
    # The notification block first: a wrong --notify-block is refused before anything is stored.
    target = args.notify_webhook or args.notify_block
    block_id = notification_block(webhook=args.notify_webhook, block=args.notify_block)
    ensure_pool(pool, s3_secret=args.s3_secret)
    with tempfile.TemporaryDirectory(prefix="ckptflow-deploy-") as tmp:
        prefect_file = Path(tmp) / "prefect.yaml"
        prefect_file.write_text(yaml.safe_dump(spec, sort_keys=False))
        # Prefect's own command on the yaml; its cwd is the empty tmp dir, so nothing of this
        # checkout (no working directory, no file) can end up in a deployment.
        command = [sys.executable, "-m", "prefect", "--no-prompt", "deploy"]
        done = subprocess.run(
            [*command, "--prefect-file", str(prefect_file), "--all"], cwd=tmp, check=False
        )
    if done.returncode != 0:
        raise UsageError(f"`prefect deploy` on {args.prefect_file} failed (its output is above)")
    names = ", ".join(d["name"] for d in spec["deployments"])
    if block_id:
        print(notify(spec, pool, block_id, target, api_url))
    print(f"deployed {names} to {api_url}; start a worker on each host that runs them:")
    print(f"  PREFECT_API_URL={api_url} prefect worker start --pool {pool}")
    return 0


def notify(spec: dict[str, Any], pool: str, block_id: UUID, target: str, api_url: str) -> str:
    """The failed-run automation over the deployments just made (found by name in the pool)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterName,
        WorkPoolFilter,
        WorkPoolFilterName,
    )

    names = [d["name"] for d in spec["deployments"]]
    with get_client(sync_client=True) as client:
        made = client.read_deployments(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=names)),
            work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[pool])),
        )
        missing = set(names) - {d.name for d in made}
        if missing:
            raise UsageError(
                f"deployments {', '.join(sorted(missing))} not found in pool {pool} after "
                "`prefect deploy`: no failed-run automation made; run ckptflow deploy again"
            )
        return ensure_automation(
            client,
            block_id=block_id,
            target=target,
            deployment_ids=[d.id for d in made],
            server_url=api_url,
        )


def server_url() -> str:
    """PREFECT_API_URL (environment or profile), answering: a deployment needs a real server."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise UsageError(
            "ckptflow deploy needs a Prefect server: start one (`prefect server start`) and set "
            "PREFECT_API_URL=http://127.0.0.1:4200/api (the URL it prints, with /api)"
        )
    try:
        httpx.get(f"{url.rstrip('/')}/health", timeout=10).raise_for_status()
    except httpx.HTTPError as e:
        raise UsageError(f"no Prefect server answers at PREFECT_API_URL={url}: {e}") from e
    return str(url)


def load_spec(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise UsageError(f"{path}: no such prefect.yaml; pass --prefect-file")
    spec: dict[str, Any] = yaml.safe_load(path.read_text())
    return spec


def scheduled(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [d for d in spec["deployments"] if d.get("schedules")]


def apply_overrides(
    spec: dict[str, Any], *, pool: str | None, root: str | None, out_root: str | None
) -> None:
    """Put --pool/--root/--out-root into the spec; a scheduled deployment left with this site's
    shipped paths must find them here, or its every run would fail on this machine's worker."""
    given = {"root": root, "out_root": out_root}
    for deployment in spec["deployments"]:
        if pool:
            deployment["work_pool"] = {**deployment["work_pool"], "name": pool}
    for deployment in scheduled(spec):
        parameters = deployment.setdefault("parameters", {})
        parameters.update({k: v for k, v in given.items() if v})
        for name in WATCH_PATHS:
            value = str(parameters.get(name, ""))
            if not given[name] and "://" not in value and not Path(value).exists():
                flag = "--" + name.replace("_", "-")
                raise UsageError(
                    f"{deployment['name']}: parameter {name} is this site's default {value!r}, "
                    f"which does not exist here: pass {flag} DIR (the path on the worker's host)"
                )


def ensure_pool(name: str, *, s3_secret: str | None) -> None:
    """Create the process pool when missing; with --s3-secret, its runs' environment names the
    block's AWS_* values, which the worker resolves at run time (the server stores references)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            template = client.read_work_pool(name).base_job_template
            exists = True
        except ObjectNotFound:
            template, exists = ProcessWorker.get_default_base_job_template(), False
        if s3_secret:
            env = template["variables"]["properties"]["env"]
            env["default"] = {**(env.get("default") or {}), **secret_env(client, s3_secret)}
        if not exists:
            client.create_work_pool(
                WorkPoolCreate(name=name, type="process", base_job_template=template)
            )
            print(f"created work pool {name} (process)")
        elif s3_secret:
            client.update_work_pool(name, WorkPoolUpdate(base_job_template=template))


def secret_env(client: Any, block: str) -> dict[str, str]:
    from prefect.exceptions import ObjectNotFound

    try:
        document = client.read_block_document_by_name(block, "secret", include_secrets=False)
    except ObjectNotFound as e:
        raise UsageError(
            f"--s3-secret {block}: no Secret block of that name; create it with the value "
            f'{{"AWS_ENDPOINT_URL": ..., "AWS_ACCESS_KEY_ID": ..., "AWS_SECRET_ACCESS_KEY": ...}}'
        ) from e
    value = document.data.get("value")
    keys = sorted(value) if isinstance(value, dict) else []
    unknown = [k for k in keys if k not in S3_VARIABLES]
    if not keys or unknown:
        raise UsageError(
            f"--s3-secret {block}: its value must be a JSON object of {', '.join(S3_VARIABLES)}"
            + (f"; not {', '.join(unknown)}" if unknown else "")
        )
    return {k: f"{{{{ prefect.blocks.secret.{block}.{k} }}}}" for k in keys}
