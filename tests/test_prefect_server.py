"""ckptflow operated as the README's Prefect section says, on a real stack: `prefect server start`
on loopback, the Secret block and `ckptflow deploy` (pool + deployments/prefect.yaml), a process
worker started elsewhere than the checkout; then the scheduler's runs, a manual run with its
artifacts, a storage outage retried and a missing source failed at once, and the UI in
headless Chromium (Debian's package, driven by Playwright; no browser download)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.prefect_server import BIN, OutageProxy, PrefectStack, Webhook
from tests.s3server import CREDENTIALS, MotoServer

pytestmark = pytest.mark.server
CHROMIUM = "/usr/bin/chromium"
SECRET = "ckptflow-s3"
SECRET_VALUE = f"never-stored-{uuid.uuid4().hex}"
NOTIFY = "ckptflow-failed-runs"  # the automation and webhook block `--notify-webhook` makes
# The worker's own IO retries end fast, so that an outage reaches Prefect's task retries.
WORKER_ENV = {"CKPTFLOW_IO_RETRIES": "2", "CKPTFLOW_IO_RETRY_BASE_SECONDS": "0.1"}


class Site:
    def __init__(
        self, stack: PrefectStack, root: Path, proxy: OutageProxy, bucket: str, webhook: Webhook
    ) -> None:
        self.stack, self.root, self.proxy, self.bucket = stack, root, proxy, bucket
        self.webhook = webhook
        self.ids = {
            name: stack.deployment(flow, name)["id"]
            for flow, name in (("convert", "manual"), ("watch", "hourly"))
        }
        self.manual_id = ""


@pytest.fixture(scope="module")
def site(
    tmp_path_factory: pytest.TempPathFactory, tiny_hf_dir: Path, moto_server: MotoServer
) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("prefect-site")
    (root / "runs").mkdir()
    shutil.copytree(tiny_hf_dir, root / "runs" / "step100")  # there before the first tick
    finished = time.time() - 3600  # a checkpoint written an hour ago, not one being written
    for path in [root / "runs" / "step100", *(root / "runs" / "step100").iterdir()]:
        os.utime(path, (finished, finished))
    proxy = OutageProxy(moto_server.port)
    bucket = f"b-{uuid.uuid4().hex[:12]}"
    upload(moto_server.endpoint, bucket, tiny_hf_dir)
    stack = PrefectStack(root)
    webhook = Webhook()
    try:
        stack.start_server()
        # The README's commands: the storage settings as a Secret block, then `ckptflow deploy`
        # (here with a 10 s watch interval instead of hourly, and failed runs notifying a
        # loopback webhook), then a worker.
        settings = {
            "AWS_ENDPOINT_URL": proxy.endpoint,
            "AWS_ACCESS_KEY_ID": CREDENTIALS["AWS_ACCESS_KEY_ID"],
            "AWS_SECRET_ACCESS_KEY": SECRET_VALUE,  # moto takes any; this one is findable
        }
        stack.command(
            [
                sys.executable,
                "-c",
                "import json, sys; from prefect.blocks.system import Secret; "
                f"Secret(value=json.loads(sys.argv[1])).save({SECRET!r})",
                json.dumps(settings),
            ]
        )
        deploy = [str(BIN / "ckptflow"), "deploy", "--s3-secret", SECRET, "--interval", "10"]
        paths = ["--root", str(root / "runs"), "--out-root", str(root / "hf")]
        stack.command([*deploy, *paths, "--notify-webhook", webhook.url])
        # Again, through the block the first one saved: still one automation, one block.
        stack.command([*deploy, *paths, "--notify-block", f"custom-webhook/{NOTIFY}"])
        stack.start_worker("ckptflow", **WORKER_ENV)
        site = Site(stack, root, proxy, bucket, webhook)
        # A manual run with the UI form's parameters, started now: it runs beside the schedule's.
        site.manual_id = stack.run_deployment(
            site.ids["manual"],
            src=str(tiny_hf_dir),
            dst=str(root / "manual-out"),
            dtype="fp32",
            max_shard_size="200KB",
        )["id"]
        yield site
    except BaseException:
        print(stack.logs())
        raise
    finally:
        stack.stop()
        proxy.close()
        webhook.close()


@pytest.fixture(autouse=True)
def _logs_on_failure(request: pytest.FixtureRequest, site: Site) -> Iterator[None]:
    failed_before = request.session.testsfailed
    yield
    if request.session.testsfailed > failed_before:  # shown with the failure's captured output
        print(site.stack.logs())


@pytest.fixture(scope="module")
def manual_run(site: Site) -> dict[str, Any]:
    return site.stack.wait(site.manual_id, 180)


def upload(endpoint: str, bucket: str, local: Path) -> None:
    from s3fs import S3FileSystem

    fs = S3FileSystem(
        key=CREDENTIALS["AWS_ACCESS_KEY_ID"],
        secret=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        endpoint_url=endpoint,
        skip_instance_cache=True,
    )
    fs.mkdir(bucket)
    fs.put(str(local), f"{bucket}/ckpt", recursive=True)


def test_the_scheduler_creates_watch_runs_and_one_converts_the_new_checkpoint(site: Site) -> None:
    stack, deadline = site.stack, time.monotonic() + 150
    marker = site.root / "hf" / "step100" / "_SUCCESS"
    runs: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        runs = stack.runs(site.ids["hourly"])
        done = [r for r in runs if r["state_type"] == "COMPLETED"]
        if done and marker.exists():
            break
        time.sleep(1)
    # Pause it: a run every 10 s would take the CPU from the other tests.
    stack.http.patch(f"deployments/{site.ids['hourly']}", json={"paused": True})
    assert runs, "the scheduler created no run of watch/hourly (SQLAlchemy 2.1 with Prefect 3.8?)"
    assert all(r["auto_scheduled"] for r in runs), "every watch run comes from the schedule"
    assert [r for r in runs if r["state_type"] == "COMPLETED"], [r["state_type"] for r in runs]
    assert marker.exists(), "no published conversion of runs/step100 under out_root"
    converted = load_file(site.root / "hf" / "step100" / "model.safetensors")
    source = load_file(site.root / "runs" / "step100" / "model.safetensors")
    assert set(converted) <= set(source)
    for name, tensor in converted.items():  # the deployment's dtype: bf16
        assert torch.equal(tensor, source[name].to(torch.bfloat16)), name


def test_a_failed_watch_run_notifies_the_webhook_once_per_deploy(
    site: Site, manual_run: dict[str, Any]
) -> None:
    stack = site.stack
    run = stack.run_deployment(site.ids["hourly"], root=str(site.root / "no-such-runs"))
    final = stack.wait(run["id"], 90)
    assert final["state_type"] == "FAILED", stack.run_logs(run["id"])
    body = site.webhook.wait_for(run["id"], 60)  # the link names the run's id
    assert body, f"no notification for run {run['id']}; received {site.webhook.received}"
    text = body["text"]
    assert final["name"] in text and "watch/hourly" in text and "Failed" in text, text
    assert "no-such-runs" in text, text  # the state message: the missing root
    assert f"{stack.url}/runs/flow-run/{run['id']}" in text, text
    assert [b for b in site.webhook.received if run["id"] in json.dumps(b)] == [body]
    assert manual_run["state_type"] == "COMPLETED"
    assert manual_run["id"] not in json.dumps(site.webhook.received), "a completed run notified"
    automations = stack.post("automations/filter", {"automations": {"name": {"any_": [NOTIFY]}}})
    assert len(automations) == 1, automations  # deployed twice, updated in place
    related = automations[0]["trigger"]["match_related"]["prefect.resource.id"]
    assert len(related) == 3, related  # manual, hourly, vlm
    assert all(f"prefect.deployment.{i}" in related for i in site.ids.values()), related


def test_a_block_that_cannot_notify_is_refused_before_anything_is_deployed(site: Site) -> None:
    before = site.stack.deployment("watch", "hourly")["updated"]
    paths = ["--root", str(site.root / "runs"), "--out-root", str(site.root / "hf")]
    done = subprocess.run(
        [str(BIN / "ckptflow"), "deploy", *paths, "--notify-block", f"secret/{SECRET}"],
        env=site.stack.env,
        cwd=site.stack.home,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.strip().splitlines() == [
        f"ckptflow: error: --notify-block secret/{SECRET}: a secret block cannot send "
        "notifications; name a notification block (slack-webhook/..., custom-webhook/..., "
        "email/...)"
    ]
    assert site.stack.deployment("watch", "hourly")["updated"] == before


def test_a_manual_run_with_parameters_completes_with_readable_artifacts(
    site: Site, manual_run: dict[str, Any], tiny_hf_dir: Path
) -> None:
    assert manual_run["state_type"] == "COMPLETED", site.stack.run_logs(manual_run["id"])
    assert manual_run["parameters"]["dtype"] == "fp32"
    dst = site.root / "manual-out"
    manifest = json.loads((dst / "manifest.json").read_text())
    assert (dst / "_SUCCESS").exists() and len(manifest["files"]) > 2  # 200KB shards
    source = load_file(tiny_hf_dir / "model.safetensors")
    written: dict[str, torch.Tensor] = {}
    for name in manifest["files"]:
        if name.endswith(".safetensors"):
            written.update(load_file(dst / name))
    assert written.keys() <= source.keys()
    assert all(torch.equal(t, source[n]) for n, t in written.items())
    artifacts = site.stack.artifacts(manual_run["id"])
    assert artifacts, "the run wrote no artifact"
    text = "\n".join(json.dumps(a["data"]) for a in artifacts)
    assert str(dst) in text or "manual-out" in text, text[:2000]
    assert "OK" in text, text[:2000]


def test_a_storage_outage_is_retried_and_the_run_completes(site: Site) -> None:
    stack = site.stack
    site.proxy.down.set()  # the store is unreachable until a retry has been scheduled
    try:
        run = stack.run_deployment(
            site.ids["manual"],
            src=f"s3://{site.bucket}/ckpt",
            dst=str(site.root / "from-s3"),
            dtype="bf16",
        )
        retried = wait_for_retry(stack, run["id"], 150)
    finally:
        site.proxy.down.clear()
    assert retried, f"no task was retried during the outage:\n{stack.run_logs(run['id'])}"
    final = stack.wait(run["id"], 150)
    assert final["state_type"] == "COMPLETED", stack.run_logs(run["id"])
    assert (site.root / "from-s3" / "_SUCCESS").exists()


def test_a_missing_source_fails_at_once_naming_it(site: Site) -> None:
    stack = site.stack
    run = stack.run_deployment(
        site.ids["manual"], src=f"s3://{site.bucket}/no-such-ckpt", dst=str(site.root / "x")
    )
    final = stack.wait(run["id"], 120)
    logs = stack.run_logs(run["id"])
    assert final["state_type"] == "FAILED", logs
    assert not [t for t in stack.task_runs(run["id"]) if t["run_count"] > 1], logs
    assert final["total_run_time"] < 15, (final["total_run_time"], logs)
    message = final["state"]["message"] or ""
    assert "no-such-ckpt" in message + logs, (message, logs)
    assert "src" in message + logs, (message, logs)
    assert not (site.root / "x").exists()


def test_the_server_stores_references_to_the_storage_settings_not_their_values(
    site: Site,
) -> None:
    pool = site.stack.get("work_pools/ckptflow")
    assert SECRET_VALUE not in json.dumps(pool)
    env = pool["base_job_template"]["variables"]["properties"]["env"]["default"]
    assert env["AWS_SECRET_ACCESS_KEY"] == (
        f"{{{{ prefect.blocks.secret.{SECRET}.AWS_SECRET_ACCESS_KEY }}}}"
    )
    for name in site.ids:
        stored = json.dumps(site.stack.get(f"deployments/{site.ids[name]}"))
        assert SECRET_VALUE not in stored, name
        assert "{{ $" not in stored and "set_working_directory" not in stored, name


def wait_for_retry(stack: PrefectStack, run_id: str, timeout_seconds: float) -> bool:
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        for task_run in stack.task_runs(run_id):
            if task_run["state_name"] in ("AwaitingRetry", "Retrying") or task_run["run_count"] > 1:
                return True
        if stack.get(f"flow_runs/{run_id}")["state_type"] in ("COMPLETED", "FAILED", "CRASHED"):
            return False
        time.sleep(0.5)
    return False


def test_the_ui_shows_the_run_form_and_the_finished_run(
    site: Site, manual_run: dict[str, Any], tmp_path: Path
) -> None:
    if not Path(CHROMIUM).exists():
        missing = f"{CHROMIUM} missing: `apt-get install chromium` (make setup does it as root)"
        if os.environ.get("CI"):
            pytest.fail(f"{missing}; .ci/run installs it")
        pytest.skip(missing)
    from playwright.sync_api import sync_playwright

    shots = Path(os.environ.get("CKPTFLOW_SCREENSHOTS_DIR", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ]
    url = site.stack.url
    keys = sorted(a["key"] for a in site.stack.artifacts(manual_run["id"]) if a["key"])
    assert keys, "the run has no keyed artifact to show"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=flags)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{url}/deployments/deployment/{site.ids['manual']}/run")
        page.get_by_text("dtype").first.wait_for(timeout=60_000)
        form = page.inner_text("body")
        page.screenshot(path=shots / "prefect-run-form.png", full_page=True)
        page.goto(f"{url}/runs/flow-run/{manual_run['id']}")
        page.get_by_text(manual_run["name"]).first.wait_for(timeout=60_000)
        page.get_by_text("Completed").first.wait_for(timeout=60_000)
        page.get_by_text("Artifacts", exact=True).first.click()
        page.get_by_text(keys[0]).first.wait_for(timeout=60_000)
        run_page = page.inner_text("body")
        page.screenshot(path=shots / "prefect-run-artifacts.png", full_page=True)
        browser.close()
    for name in ("src", "dst", "dtype"):
        assert name in form, form[:2000]
    assert manual_run["name"] in run_page and "Completed" in run_page, run_page[:2000]
    for shot in ("prefect-run-form.png", "prefect-run-artifacts.png"):
        assert (shots / shot).stat().st_size > 20_000, shot  # a blank page is ~5 KB
