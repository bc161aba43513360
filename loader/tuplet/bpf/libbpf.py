"""The one place that calls libbpf through ctypes.

The generated module ``tuplet._libbpf`` declares libbpf's types and functions;
this module adds what every caller needs: options structs with ``sz`` filled in,
errno-checked calls that raise :class:`~tuplet.errors.TupletError`, and libbpf's
log routed to structlog (and kept, so an error can show what libbpf said).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import threading
from typing import Any, Callable, TypeVar

import structlog

from tuplet.bpf import _libbpf as C
from tuplet.core.errors import NotFoundError, TupletError

log = structlog.get_logger("tuplet.libbpf")

# Attach types libbpf 1.1.2's headers predate (include/uapi/linux/bpf.h, Linux 6.6).
BPF_TCX_INGRESS = 46
BPF_TCX_EGRESS = 47

S = TypeVar("S", bound=ctypes.Structure)


def opts(cls: type[S], **fields: Any) -> S:
    """An libbpf ``*_opts`` struct with ``sz`` set, as LIBBPF_OPTS does."""
    o = cls()
    o.sz = ctypes.sizeof(cls)
    for k, v in fields.items():
        setattr(o, k, v)
    return o


def errno_of(ret: int) -> int:
    """errno of a failed call: libbpf returns -errno and also sets errno."""
    err = ctypes.get_errno()
    if ret < 0 and -ret < 4096:
        return -ret
    return err


def check(ret: int, what: str, op: str) -> int:
    """Raise TupletError for a negative return; otherwise pass the value through."""
    if ret < 0:
        err = errno_of(ret)
        cls = NotFoundError if err == 2 else TupletError
        raise cls(what, op, err, recent_messages())
    return ret


def check_ptr(ptr: Any, what: str, op: str) -> Any:
    """Raise for a NULL (or libbpf error-encoded) pointer return."""
    if not ptr:
        err = ctypes.get_errno()
        raise (NotFoundError if err == 2 else TupletError)(what, op, err, recent_messages())
    addr = ctypes.cast(ptr, ctypes.c_void_p).value or 0
    if addr >= (1 << 64) - 4095:  # ERR_PTR from a non-strict libbpf
        raise TupletError(what, op, (1 << 64) - addr, recent_messages())
    return ptr


# --- libbpf's log ---------------------------------------------------------------------------

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p]
_libc.vsnprintf.restype = ctypes.c_int

_PRINT_BUF = 1 << 16
_messages: list[str] = []
_messages_lock = threading.Lock()
_LEVELS = {0: "warning", 1: "info", 2: "debug"}  # enum libbpf_print_level


def _on_print(level: int, fmt: bytes, args: int) -> int:
    if level == 2:  # LIBBPF_DEBUG: not formatted, not kept
        return 0
    buf = ctypes.create_string_buffer(_PRINT_BUF)
    _libc.vsnprintf(buf, _PRINT_BUF, fmt, args)
    text = buf.value.decode(errors="replace").rstrip()
    with _messages_lock:
        _messages.append(text)
        del _messages[:-50]
    getattr(log, _LEVELS.get(level, "info"))("libbpf", message=text)
    return 0


_print_cb = C.libbpf_print_fn_t(_on_print)
C.libbpf_set_print(_print_cb)


def recent_messages(clear: bool = True) -> str:
    """What libbpf logged since the last call (warnings and info), one message a line."""
    with _messages_lock:
        text = "; ".join(m for m in _messages if m)
        if clear:
            _messages.clear()
    return text


def clear_messages() -> None:
    with _messages_lock:
        _messages.clear()


def cstr(s: str | bytes | None) -> bytes | None:
    return s.encode() if isinstance(s, str) else s


def call(fn: Callable[..., int], what: str, op: str, *args: Any) -> int:
    """Call a libbpf function returning 0/-errno (or an fd) and check it."""
    ctypes.set_errno(0)
    return check(fn(*args), what, op)
