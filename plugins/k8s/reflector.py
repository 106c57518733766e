"""List, then watch: the local copy of one kind of Kubernetes object, kept current.

The way client-go's reflector does it: list (in pages) and remember the list's
resourceVersion; watch from there, moving that version forward with every event and bookmark;
when the stream ends or the connection breaks, watch again from the last version, so nothing
is missed or seen twice; when the server says the version is too old (410 Gone), list again and
turn the difference from the local copy into changes, so objects deleted meanwhile are deleted
here too. Errors back off (capped) and show in status; a malformed event is skipped and
counted, never fatal.
"""

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable

import attrs

from meshagent.plugin import ChangeKind
from meshagent.plugins.k8s.client import TRANSIENT, KubeAPI, KubeError, Resource

log = logging.getLogger(__name__)

PAGE_SIZE = 500
MAX_BACKOFF = 30.0

ObjectKey = tuple[str, str]  # (namespace or "", name)


@attrs.frozen
class Change:
    kind: ChangeKind
    key: ObjectKey
    obj: dict  # the new object; on DELETE the last one seen


class Expired(Exception):
    """410 Gone: the version to resume from is no longer available."""


def object_key(obj: dict) -> ObjectKey:
    meta = obj["metadata"]
    return (meta.get("namespace") or "", meta["name"])


class Reflector:
    def __init__(self, api: KubeAPI | None, resource: Resource, on_change: Callable[[Change], None],
                 *, field_selector: str = "", watch_timeout: float = 300.0):
        self.api = api
        self.resource = resource
        self.on_change = on_change
        self.field_selector = field_selector
        self.watch_timeout = watch_timeout
        self.objects: dict[ObjectKey, dict] = {}
        self.resource_version = ""
        self.synced = asyncio.Event()
        self.lists = 0
        self.events = 0
        self.malformed = 0
        self.last_error = ""
        self.last_error_at = 0.0

    @property
    def name(self) -> str:
        return self.resource.plural

    async def run(self, on_listed: Callable[[], object] | None = None) -> None:
        """Forever; ``on_listed`` is awaited after every complete list (initial or re-list)."""
        backoff = 0.5
        while True:
            try:
                if not self.resource_version:
                    await self._list()
                    if on_listed is not None:
                        await on_listed()
                await self._watch()
                backoff = 0.5
            except Expired as exc:
                log.info("%s: %s; listing again", self.name, exc)
                self.resource_version = ""
            except KubeError as exc:
                if exc.code == 410 and self.resource_version:
                    # the same news as an ERROR event, answered to the watch request itself
                    log.info("%s: %s; listing again", self.name, exc)
                    self.resource_version = ""
                    continue
                await self._failed(exc, backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
            except TRANSIENT as exc:
                await self._failed(exc, backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)

    async def _failed(self, exc: Exception, backoff: float) -> None:
        self.last_error = str(exc) or type(exc).__name__
        self.last_error_at = time.time()
        log.warning("%s from %s: %s; retrying in %.1f s", self.name, self.api.server,
                    self.last_error, backoff)
        await asyncio.sleep(backoff * random.uniform(0.8, 1.2))

    # -- list ------------------------------------------------------------------------------------

    async def _list(self) -> None:
        items, version, token = [], "", ""
        while True:
            query = {"limit": str(PAGE_SIZE)}
            if self.field_selector:
                query["fieldSelector"] = self.field_selector
            if token:
                query["continue"] = token
            try:
                page = await self.api.request("GET", self.resource.path(), query=query)
            except KubeError as exc:
                if exc.code == 410 and token:  # the snapshot expired mid-list: start over
                    items, version, token = [], "", ""
                    continue
                raise
            meta = page.get("metadata") or {}
            version = version or str(meta.get("resourceVersion", ""))
            items += [item for item in page.get("items") or [] if self._well_formed(item)]
            token = meta.get("continue") or ""
            if not token:
                break
        fresh = {object_key(item): item for item in items}
        for key in self.objects.keys() - fresh.keys():
            self._apply(Change(ChangeKind.DELETE, key, self.objects[key]))
        for key, item in fresh.items():
            old = self.objects.get(key)
            if old is None or old["metadata"].get("resourceVersion") != \
                    item["metadata"].get("resourceVersion"):
                self._apply(Change(ChangeKind.UPSERT, key, item))
        self.resource_version = version
        self.lists += 1
        self.last_error = ""
        self.synced.set()

    # -- watch -----------------------------------------------------------------------------------

    async def _watch(self) -> None:
        # the server ends the watch after timeoutSeconds (spread, as client-go does); a read
        # timeout a little longer catches a connection that died silently
        timeout = int(self.watch_timeout * random.uniform(1.0, 2.0))
        query = {"resourceVersion": self.resource_version, "allowWatchBookmarks": "true",
                 "timeoutSeconds": str(timeout)}
        if self.field_selector:
            query["fieldSelector"] = self.field_selector
        async for line in self.api.watch(self.resource.path(), query, timeout + 30):
            self._event(line)

    def _event(self, line: bytes) -> None:
        try:
            event = json.loads(line)
            kind, obj = event["type"], event["object"]
            if not isinstance(obj, dict):
                raise ValueError("object is not a JSON object")
        except (ValueError, KeyError, TypeError) as exc:
            self._malformed(f"unreadable watch event ({exc}): {line[:120]!r}")
            return
        if kind == "ERROR":
            code = obj.get("code")
            if code == 410:
                raise Expired(obj.get("message") or "resource version too old")
            raise KubeError(code if isinstance(code, int) else 500, str(obj.get("reason", "")),
                            str(obj.get("message", "")))
        version = (obj.get("metadata") or {}).get("resourceVersion")
        if kind == "BOOKMARK":
            if version:
                self.resource_version = str(version)
            return
        if kind not in ("ADDED", "MODIFIED", "DELETED") or not self._well_formed(obj):
            if kind not in ("ADDED", "MODIFIED", "DELETED"):
                self._malformed(f"unknown watch event type {kind!r}")
            return
        self.events += 1
        key = object_key(obj)
        self._apply(Change(ChangeKind.DELETE if kind == "DELETED" else ChangeKind.UPSERT,
                           key, obj))
        if version:
            self.resource_version = str(version)

    # -- the local copy --------------------------------------------------------------------------

    def _well_formed(self, obj: object) -> bool:
        meta = obj.get("metadata") if isinstance(obj, dict) else None
        if not isinstance(meta, dict) or not isinstance(meta.get("name"), str) \
                or not isinstance(meta.get("namespace", ""), str):
            self._malformed(f"object without metadata.name: {str(obj)[:120]}")
            return False
        return True

    def _malformed(self, what: str) -> None:
        self.malformed += 1
        log.error("%s: skipping %s", self.name, what)

    def _apply(self, change: Change) -> None:
        if change.kind is ChangeKind.DELETE:
            self.objects.pop(change.key, None)
        else:
            self.objects[change.key] = change.obj
        try:
            self.on_change(change)
        except Exception:
            log.exception("%s: handling %s %s/%s failed", self.name, change.kind.value,
                          *change.key)
