"""`ckptflow deploy --notify-webhook URL` / `--notify-block TYPE/NAME`: a Prefect automation that
sends a notification through a notification block when a run of a deployment `ckptflow deploy`
made fails, crashes or times out (a scheduled `watch` run has nobody watching it). The block
and the automation are found by name and updated, so a rerun of `ckptflow deploy` never makes a
second one. The server sends the notification (its triggers and actions services, on by
default), so it reaches the webhook even when the worker's host is gone."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, cast
from urllib.parse import urlsplit
from uuid import UUID

from ckpt_core.errors import UsageError

AUTOMATION = "ckptflow-failed-runs"
WEBHOOK_BLOCK = "ckptflow-failed-runs"  # the Custom Webhook block that --notify-webhook saves
# Event names are the state names: a flow timeout is a Failed state named TimedOut.
FAILED_EVENTS = ("prefect.flow-run.Failed", "prefect.flow-run.Crashed", "prefect.flow-run.TimedOut")
SUBJECT = "ckptflow: {{ flow.name }}/{{ deployment.name }} run {{ flow_run.name }} {{ flow_run.state.name }}"
# `ui_url` needs PREFECT_UI_URL (or PREFECT_API_URL) in the server's environment; without it the
# link is built from the URL `ckptflow deploy` reached the server at.
BODY = """\
Flow run {{ flow_run.name }} of deployment {{ flow.name }}/{{ deployment.name }} \
entered {{ flow_run.state.name }} at {{ flow_run.state.timestamp }}.
Message: {{ flow_run.state.message }}
Parameters: {{ flow_run.parameters }}
Run: {{ (flow_run|ui_url) or '%s/runs/flow-run/' ~ flow_run.id }}"""
# Slack/Mattermost-style incoming webhooks read `text`; the other two are for anything else.
WEBHOOK_JSON = {"text": "{{subject}}\n{{body}}", "subject": "{{subject}}", "body": "{{body}}"}


def check_target(*, webhook: str | None, block: str | None) -> None:
    """Refuse a bad --notify-* before the server is asked anything."""
    if webhook and block:
        raise UsageError("pass one of --notify-webhook URL and --notify-block TYPE/NAME, not both")
    if webhook:
        parts = urlsplit(webhook)
        if parts.scheme not in ("http", "https") or not parts.hostname or "{" in webhook:
            raise UsageError(
                f"--notify-webhook {webhook!r}: not an http(s) URL; pass the webhook's full "
                "address, e.g. https://hooks.slack.com/services/..."
            )
    if block and block.count("/") != 1:
        raise UsageError(
            f"--notify-block {block!r}: name the block as TYPE/NAME, e.g. slack-webhook/ops "
            "(`prefect block ls` lists them)"
        )


def ensure_automation(
    client: Any, *, block_id: UUID, target: str, deployment_ids: list[UUID], server_url: str
) -> str:
    """Create or update the automation; returns a line saying what it notifies."""
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    ui_base = server_url.rstrip("/").removesuffix("/api")
    automation = AutomationCore(
        name=AUTOMATION,
        description="ckptflow deploy --notify-*: a failed, crashed or timed-out run of a "
        "ckptflow deployment sends a notification",
        trigger=EventTrigger(
            type="event",
            expect=set(FAILED_EVENTS),
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={
                "prefect.resource.role": "deployment",
                "prefect.resource.id": [f"prefect.deployment.{i}" for i in deployment_ids],
            },
            for_each={"prefect.resource.id"},
            # Set explicitly: the client's update sends only fields that were set.
            posture=Posture.Reactive,
            threshold=1,
            within=timedelta(0),
        ),
        actions=[
            SendNotification(
                type="send-notification",
                block_document_id=block_id,
                subject=SUBJECT,
                body=BODY % ui_base,
            )
        ],
    )
    found = client.read_automations_by_name(AUTOMATION)
    if found:
        client.update_automation(found[0].id, automation)
        for extra in found[1:]:  # left by a concurrent deploy: one automation, one message
            client.delete_automation(extra.id)
    else:
        client.create_automation(automation)
    return f"automation {AUTOMATION}: a failed run of these deployments notifies {target}"


def notification_block(*, webhook: str | None, block: str | None) -> UUID | None:
    """The block the automation sends through: --notify-webhook's Custom Webhook block, saved
    (overwritten) under WEBHOOK_BLOCK, or the notification block --notify-block names."""
    if webhook:
        return webhook_block(webhook)
    if block:
        return named_block(block)
    return None


def webhook_block(url: str) -> UUID:
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    saved = CustomWebhookNotificationBlock(
        name="ckptflow", url=url, json_data=WEBHOOK_JSON, headers=None, cookies=None
    )
    # `save` is sync here (no running event loop); its type names both dispatches.
    return cast(UUID, saved.save(WEBHOOK_BLOCK, overwrite=True))


def named_block(block: str) -> UUID:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    slug, name = block.split("/")
    with get_client(sync_client=True) as client:
        try:
            document = client.read_block_document_by_name(name, slug, include_secrets=False)
        except ObjectNotFound as e:
            raise UsageError(
                f"--notify-block {block}: no {slug} block named {name} on the server; create "
                "it in the UI (Blocks) or pass --notify-webhook URL"
            ) from e
    if "notify" not in (document.block_schema.capabilities if document.block_schema else []):
        raise UsageError(
            f"--notify-block {block}: a {slug} block cannot send notifications; name a "
            "notification block (slack-webhook/..., custom-webhook/..., email/...)"
        )
    block_id: UUID = document.id
    return block_id
