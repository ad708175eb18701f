"""The language server's connection to the daemon, and what it caches from it.

One `AsyncClient` connection, opened on first need (starting the daemon when none runs,
unless `autostart` is off) and opened again after the daemon dies. The module tree with its
name table (the checks resolve names locally with `mlxterp.core`'s resolver) and the token
strings of prompts are cached here; the caches are
dropped when the daemon or its model changes (`generation` goes up and `on_change` is
called, so open documents are checked again).

Nothing here imports mlx: the model lives in the daemon.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from mlxterp.core.paths import NameTable


log = logging.getLogger(__name__)

QUICK_TIMEOUT = 2.0  # seconds a hover/tokens/resolve request may wait for the daemon


class DaemonUnavailable(Exception):
    """The daemon cannot be reached (not running and not allowed to start, or failing)."""


@dataclass
class Settings:
    """What `initializationOptions` may set (camelCase keys in JSON)."""

    model: str = "demo"  # model the daemon loads when this server starts it
    runtime_dir: str | None = None  # the daemon's runtime directory (default: as `mlxterp serve`)
    socket: str | None = None
    autostart: bool = True  # start the daemon when none runs
    debounce_ms: int = 150  # quiet time after a change before diagnostics
    inline_max_length: int = 40  # characters of an inline result

    @classmethod
    def from_options(cls, options) -> "Settings":
        settings = cls()
        if not isinstance(options, dict):
            return settings
        keys = {"model": "model", "runtimeDir": "runtime_dir", "socket": "socket", "autostart": "autostart",
                "debounceMs": "debounce_ms", "inlineMaxLength": "inline_max_length"}
        for key, attr in keys.items():
            value = options.get(key, options.get(attr))
            default = getattr(settings, attr)
            if value is None:
                continue
            if isinstance(default, bool):
                if isinstance(value, bool):
                    setattr(settings, attr, value)
            elif isinstance(default, int):
                if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                    setattr(settings, attr, value)
            elif isinstance(value, str) and value:
                setattr(settings, attr, value)
        settings.inline_max_length = max(settings.inline_max_length, 8)
        return settings


class DaemonLink:
    def __init__(self, settings: Settings, on_change=None):
        self.settings = settings
        self.on_change = on_change  # called (no arguments) when the daemon or its model changed
        self.client = None  # mlxterp_repl.client.AsyncClient
        self.connecting: asyncio.Task | None = None
        self.daemon_id: str | None = None
        self.generation = 0
        self.last_error: str | None = None
        self.modules: list[dict] = []
        self.modules_by_name: dict[str, dict] = {}
        self.table: NameTable | None = None
        self.n_layers: int | None = None
        self.tokens: dict[str, list[str]] = {}  # prompt text -> token strings
        self.pending: dict[tuple, asyncio.Task] = {}

    @property
    def connected(self) -> bool:
        return self.client is not None and not self.client.closed

    # --- connecting ---------------------------------------------------------

    async def get(self):
        """The live connection, opening one (and starting the daemon) if needed."""
        if self.connected:
            return self.client
        if self.connecting is None or self.connecting.done():
            self.connecting = asyncio.get_running_loop().create_task(self._connect())
        try:
            return await asyncio.shield(self.connecting)
        except DaemonUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 -- any failure to connect means: no daemon now
            raise DaemonUnavailable(str(exc)) from None

    async def _connect(self):
        # Imported here, not at start: the client brings numpy, which initialize need not wait for.
        from mlxterp_repl import client as daemon_client

        s = self.settings
        try:
            client = await daemon_client.connect_async(model=s.model, runtime_dir=s.runtime_dir, socket_path=s.socket,
                                                       autostart=s.autostart)
        except Exception as exc:  # noqa: BLE001
            self.last_error = f"{type(exc).__name__}: {exc}"
            raise DaemonUnavailable(self.last_error) from None
        self.client = client
        self.last_error = None
        hello = client.hello or {}
        if hello.get("daemon_id") != self.daemon_id:
            self.daemon_id = hello.get("daemon_id")
            self.forget()
        return client

    def forget(self) -> None:
        """Drop everything cached about the model; open documents get checked again."""
        self.generation += 1
        self.modules, self.modules_by_name, self.n_layers = [], {}, None
        self.table = None
        self.tokens.clear()
        if self.on_change is not None:
            self.on_change()

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
            self.client = None

    async def call(self, op: str, timeout: float | None = QUICK_TIMEOUT, **fields):
        """One request's value; DaemonUnavailable when the daemon is gone or too slow."""
        client = await self.get()
        from mlxterp_repl.client import DaemonError  # loaded by get()

        try:
            return await asyncio.wait_for(client.call(op, **fields), timeout)
        except (ConnectionError, asyncio.TimeoutError) as exc:
            raise DaemonUnavailable(f"the daemon did not answer {op!r}: {exc or type(exc).__name__}") from None
        except DaemonError as exc:
            if client.closed:
                raise DaemonUnavailable(exc.message) from None
            raise

    # --- cached questions -----------------------------------------------------

    async def load_modules(self) -> list[dict]:
        """The model's module tree (cached until the model changes)."""
        if self.modules:
            return self.modules
        await self.get()
        generation = self.generation
        value = await self.call("modules", timeout=None)
        if generation == self.generation:
            self.modules = list(value.get("modules") or [])
            self.modules_by_name = {m.get("name"): m for m in self.modules}
            self.n_layers = value.get("n_layers")
            self.table = NameTable.from_data(value["table"]) if value.get("table") else None
        return self.modules

    async def load_table(self) -> NameTable | None:
        """The model's name table (`mlxterp.core.paths`), to resolve names here with the library's
        own resolver; None from a daemon that does not send one."""
        await self.load_modules()
        return self.table

    async def prompt_tokens(self, text: str) -> list[str]:
        """Token strings of `text` as the model's tokenizer cuts it (cached)."""
        if text in self.tokens:
            return self.tokens[text]
        value = await self.call("tokens", text=text)
        strings = list(value.get("strings") or [])
        self.tokens[text] = strings
        return strings

    async def hover(self, code: str, offset: int):
        return await self.call("hover", code=code, offset=offset)

    def model_changed(self) -> None:
        """After a `load` ran: the module tree and tokenizer may differ."""
        self.forget()
