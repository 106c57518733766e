"""JSON in and out: fields read from decoded JSON with errors that say which field is wrong,
and our values (attrs classes, addresses, enums) written as plain JSON.

Remote clusters send us JSON we did not write: every decoder goes through these so a bad entry
is rejected with a reason instead of crashing a sync loop. Cilium reads the same values with
Go's ``encoding/json``, so we read them its way (:func:`go_names`): a field name matches
case-insensitively, unknown fields are ignored, an absent or null field is its zero value.
"""

import base64
import enum
import ipaddress
import json
from pathlib import Path
from typing import Any

import attrs

_DECODER = json.JSONDecoder()  # json.loads's own, as it uses it without arguments


def load_object(data: bytes, names: "GoNames | None" = None) -> dict[str, Any]:
    """The JSON object in ``data``; with ``names``, its keys matched to them as Go does."""
    try:
        if data[:1] == b"{" and data[1:2] != b"\0":
            # what json.loads finds for such bytes (UTF-8), without looking for it: a remote
            # cluster's listing is a million of these
            value = _DECODER.decode(data.decode("utf-8", "surrogatepass"))
        else:
            value = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"malformed JSON: {str(exc)[:200]}") from None
    except RecursionError:
        raise ValueError("malformed JSON: nested too deeply") from None
    if not isinstance(value, dict):
        raise ValueError("malformed JSON: expected an object")
    return value if names is None else names.match(value)


class GoNames:
    """The JSON field names of one Go struct, and how Go's ``encoding/json`` matches an object's
    keys to them: the exact name, else any name equal to it under case folding; a key that
    matches none is ignored; of several keys for one field, the last one wins (each assignment
    overwrites the one before)."""

    def __init__(self, *names: str):
        self.names = frozenset(names)
        self._folded = {name.casefold(): name for name in names}

    def match(self, obj: dict[str, Any]) -> dict[str, Any]:
        """``obj`` with its keys spelled as the struct's names (it as it is when they are)."""
        if obj.keys() <= self.names:  # the fast path: every key spelled exactly
            return obj
        out: dict[str, Any] = {}
        for key, value in obj.items():
            name = key if key in self.names else self._folded.get(key.casefold())
            if name is not None:
                out[name] = value
        return out


def field(obj: dict, name: str, kind: type | tuple[type, ...], *, required: bool = True,
          default: Any = None) -> Any:
    if name not in obj or obj[name] is None:
        if required:
            raise ValueError(f"field {name!r} is missing")
        return default
    value = obj[name]
    if isinstance(value, bool) and kind in (int, (int,)):
        raise ValueError(f"field {name!r} must be {_kind_name(kind)}, not a boolean")
    if not isinstance(value, kind):
        raise ValueError(f"field {name!r} must be {_kind_name(kind)}, not {type(value).__name__}")
    return value


def ipv4(text: Any, name: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(text)
    except (ipaddress.AddressValueError, ValueError, TypeError):
        raise ValueError(f"field {name!r}: {text!r} is not an IPv4 address") from None


def ip_address(text: Any, name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address of either family (IPv6 in any of its spellings)."""
    try:
        return ipaddress.ip_address(text)
    except (ValueError, TypeError):
        raise ValueError(f"field {name!r}: {text!r} is not an IPv4 or IPv6 address") from None


def ipv6(text: Any, name: str) -> ipaddress.IPv6Address:
    try:
        return ipaddress.IPv6Address(text)
    except (ipaddress.AddressValueError, ValueError, TypeError):
        raise ValueError(f"field {name!r}: {text!r} is not an IPv6 address") from None


def mask_to_prefixlen(mask_b64: str | None, name: str, bits: int = 32) -> int:
    """Go's net.IPMask marshals as base64 bytes (4 for IPv4, 16 for IPv6); None means a host
    address (/32, /128)."""
    if mask_b64 is None:
        return bits
    try:
        raw = base64.b64decode(mask_b64, validate=True)
    except (ValueError, TypeError):
        raise ValueError(f"field {name!r}: mask {mask_b64!r} is not base64") from None
    ones = "".join(f"{byte:08b}" for byte in raw)
    if len(raw) != bits // 8 or "01" in ones:
        family = "IPv6" if bits == 128 else "IPv4"
        raise ValueError(f"field {name!r}: {mask_b64!r} is not an {family} netmask")
    return ones.count("1")


def prefixlen_to_mask(prefixlen: int, bits: int = 32) -> str:
    mask = ((1 << bits) - 1) ^ ((1 << (bits - prefixlen)) - 1)
    return base64.b64encode(mask.to_bytes(bits // 8, "big")).decode()


def _kind_name(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {str: "a string", int: "an integer", list: "a list", dict: "an object",
             bool: "a boolean"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def to_jsonable(value: Any) -> Any:
    """attrs objects, enums, paths, addresses and sets as plain JSON values. A field held
    packed names the attribute that unpacks it in its metadata (``json``): that is shown."""
    if attrs.has(type(value)):
        shown = [f.metadata.get("json", f.name) for f in attrs.fields(type(value))]
        return {name: to_jsonable(getattr(value, name))
                for name in shown if not name.startswith("_")}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (Path, ipaddress.IPv4Address, ipaddress.IPv4Network,
                          ipaddress.IPv6Address, ipaddress.IPv6Network)):
        return str(value)
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (frozenset, set)):
        return sorted(to_jsonable(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    return value
