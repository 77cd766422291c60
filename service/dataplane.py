"""The data plane: the one object the routers ask everything (KServe's `DataPlane`).

Wiring (`app.py`, `__main__.py`) builds it and hangs it on the app; a router reaches it through
`data_plane(request)`, never through `app.state`, and never imports another router. Readiness and
draining are decided here, once.
"""
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.requests import HTTPConnection

from service.admission import Admission
from service.budget import MemoryBudget
from service.engine import Engine
from service.lifecycle import Lifecycle
from service.metrics import Metrics
from service.model_control import ModelControl
from service.settings import Settings
from service.tracing import Tracing


@dataclass
class DataPlane:
    settings: Settings
    metrics: Metrics
    admission: Admission
    budget: MemoryBudget
    engine: Engine
    lifecycle: Lifecycle
    draining: bool = False  # set once on SIGTERM (or at shutdown): readiness says 503 from then
    tracing: Tracing = field(default_factory=Tracing.off)  # the OTEL_* tracer; off: every call a no-op
    control: ModelControl = field(init=False)  # the repository API's loads, unloads and index

    def __post_init__(self) -> None:
        self.control = ModelControl(self.engine, self.settings)

    def ready(self) -> bool:
        """Every model loaded (or, unless STRICT_READINESS, some), and not draining for shutdown."""
        return self.engine.is_ready(self.settings.strict_readiness) and not self.draining

    def drain(self) -> None:
        self.draining = True


def data_plane(where: HTTPConnection | Starlette) -> DataPlane:
    """The data plane of a request's app (usable as a FastAPI dependency), or of an app."""
    app = where.app if isinstance(where, HTTPConnection) else where
    plane: DataPlane = app.state.data_plane
    return plane
