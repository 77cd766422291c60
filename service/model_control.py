"""Model control (Triton's modes): which versions of which models are loaded, and when.

- `none`: every model is loaded at start; the repository API's load and unload are refused.
- `explicit`: every model (or only STARTUP_MODELS) is loaded at start; then only the API loads,
  reloads and unloads.
- `poll`: the repository is scanned every REPOSITORY_POLL_SECONDS; added, changed and removed
  models and versions are loaded and unloaded as they appear.

VERSION_POLICY chooses the versions served (`latest:K`, `all`, `specific:a,b`). A version is served
only once its files pass the contract's checks and it has warmed up; one whose model file is still
shorter than its metadata says is left unavailable and tried again at the next scan. The index
answers in every mode, with the reason a version is not ready. A load names a model found in the
repository folder, never a path made from the request.
"""
import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from contract import ModelFolder, discover
from service.engine import Engine, ModelState, version_number
from service.errors import ModelControlDisabled, ModelLoadFailed, UnknownModel
from service.settings import Settings

log = logging.getLogger("service.model_control")

TRITON_STATES = {"ready": "READY", "loading": "LOADING", "failed": "UNAVAILABLE",
                 "unavailable": "UNAVAILABLE"}


@dataclass(frozen=True)
class IndexEntry:
    """One row of the repository index, as Triton's repository extension writes it."""

    name: str
    version: str
    state: str
    reason: str


def chosen_versions(folders: list[ModelFolder], policy: str) -> list[ModelFolder]:
    """The versions of one model that VERSION_POLICY serves. A folder whose name is not a version
    number is kept, so that the index shows why it is never served."""
    numbered = sorted((f for f in folders if version_number(f.version) > 0),
                      key=lambda f: version_number(f.version))
    kind, _, arguments = policy.partition(":")
    if kind == "latest":
        picked = numbered[-int(arguments):]
    elif kind == "specific":
        wanted = {str(int(v)) for v in arguments.split(",")}
        picked = [f for f in numbered if f.version in wanted]
    else:
        picked = numbered
    return [f for f in folders if version_number(f.version) <= 0] + picked


def by_model(folders: list[ModelFolder], policy: str) -> dict[str, list[ModelFolder]]:
    models: dict[str, list[ModelFolder]] = {}
    for folder in folders:
        models.setdefault(folder.name, []).append(folder)
    return {name: chosen_versions(versions, policy) for name, versions in models.items()}


class ModelControl:
    def __init__(self, engine: Engine, settings: Settings) -> None:
        self.engine, self.settings = engine, settings
        self.mode = settings.model_control_mode
        self.repository: Path = settings.model_repository

    def startup_models(self) -> set[str] | None:
        """The models to load at start: STARTUP_MODELS in explicit mode, else all."""
        names = {n.strip() for n in self.settings.startup_models.split(",") if n.strip()}
        return names if self.mode == "explicit" and names else None

    def index(self) -> list[IndexEntry]:
        return [IndexEntry(name, version, TRITON_STATES[state.status], _reason(state))
                for name, states in sorted(self.engine.versions.items())
                for version, state in sorted(states.items(), key=lambda v: version_number(v[0]))]

    async def load(self, name: str) -> None:
        """Load or reload `name` from the repository; returns once its newest chosen version
        serves, else raises ModelLoadFailed with the reason."""
        self._allowed("load")
        folders = await self._scan()
        if name not in folders:
            raise UnknownModel(name, sorted(folders))
        await self.engine.load(name, folders[name])
        states = self.engine.versions[name]
        wanted = max(folders[name], key=lambda f: version_number(f.version))
        state = states.get(wanted.version)
        if state is None or state.served is None or state.error:
            reason = state.error if state is not None and state.error else "not loaded"
            log.warning("load of model %s refused: %s", name, reason)
            raise ModelLoadFailed(name, reason)

    async def unload(self, name: str) -> None:
        self._allowed("unload")
        if name not in self.engine.versions:
            raise UnknownModel(name, sorted(self.engine.versions))
        await self.engine.unload(name, "unloaded through the repository API")

    async def scan(self) -> None:
        """Load what was added or changed since the last scan; unload what was removed."""
        folders = await self._scan()
        for name, versions in folders.items():
            if any(self.engine.needs_load(f, eager=False) for f in versions) \
                    or set(self.engine.versions.get(name, {})) - {f.version for f in versions}:
                await self.engine.load(name, versions, eager=False)
        for name in [n for n in self.engine.versions if n not in folders]:
            await self.engine.unload(name, "removed from the repository", forget=True)

    async def poll(self) -> None:
        """Scan the repository every REPOSITORY_POLL_SECONDS until cancelled."""
        while True:
            await asyncio.sleep(self.settings.repository_poll_seconds)
            try:
                await self.scan()
            except Exception:  # a scan that fails (a folder vanishing mid-read) is retried next time
                log.exception("repository scan failed; trying again in %g s",
                              self.settings.repository_poll_seconds)

    async def _scan(self) -> dict[str, list[ModelFolder]]:
        folders = await asyncio.to_thread(discover, self.repository)
        return by_model(folders, self.settings.version_policy)

    def _allowed(self, action: str) -> None:
        if self.mode == "none":
            log.warning("model %s refused: MODEL_CONTROL_MODE is none", action)
            raise ModelControlDisabled(action)


def _reason(state: ModelState) -> str:
    return state.error or ("" if state.served else state.status)
