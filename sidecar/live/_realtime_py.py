"""Every touch of realtime-py 2.34.1's private attributes, in one place.

realtime-py exposes no public way to tell a live client from a zombie (its listener task died,
or it gave up reconnecting) nor to drop a channel's queued pushes, so the subscription reads and
clears a few private attributes. They are named here and nowhere else, so an upgrade of the
pinned version (pyproject.toml) has one file to check against the new source.
"""

from __future__ import annotations

import asyncio
from typing import Any

from realtime import AsyncRealtimeChannel, AsyncRealtimeClient

__all__ = ["abandon", "drop_pushes", "heartbeat_task", "listen_task", "websocket"]


def listen_task(client: AsyncRealtimeClient) -> asyncio.Task[Any] | None:
    """The task reading the socket; done means nobody will ever deliver on this client."""
    task: asyncio.Task[Any] | None = client._listen_task
    return task


def heartbeat_task(client: AsyncRealtimeClient) -> asyncio.Task[Any] | None:
    """The task sending Phoenix heartbeats (it ends on a clean server close)."""
    task: asyncio.Task[Any] | None = client._heartbeat_task
    return task


def websocket(client: AsyncRealtimeClient) -> Any | None:
    """The websockets connection, or None while not connected."""
    return client._ws_connection


def drop_pushes(channel: AsyncRealtimeChannel) -> None:
    """Forget the channel's pending join and queued pushes, so closing sends nothing more."""
    channel.rejoin_timer.reset()
    channel.join_push.destroy()
    for push in list(channel.messages_waiting_for_ack.values()) + list(channel._push_buffer):
        push.destroy()
    channel.messages_waiting_for_ack.clear()
    channel._push_buffer.clear()


def abandon(client: AsyncRealtimeClient) -> None:
    """Cancel the client's own tasks (after close(), which may leave them running)."""
    for task in (client._listen_task, client._heartbeat_task):
        if task is not None:
            task.cancel()
