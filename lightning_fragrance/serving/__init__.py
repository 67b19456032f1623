"""Hot-reload serving: safe exports, the blue/green ``HotReloadManager`` and the FastAPI app.

The FastAPI app (``lightning_fragrance.serving.app``) and the brief stage
(``lightning_fragrance.serving.brief``) are imported on demand, so that using the manager or
the loader does not pull in the web stack.
"""

from lightning_fragrance.serving.hot_reload import (
    DrainTimeoutAction,
    DrainTimeoutExceeded,
    HotReloadManager,
    NoModelLoaded,
    NoPreviousVersion,
    ReloadInProgress,
    ReloadPhase,
    ReloadRecord,
    ReloadResult,
    WorkerInfo,
    WorkerStatus,
)
from lightning_fragrance.serving.loading import (
    ExportError,
    ExportStore,
    InvalidVersionNameError,
    LoadedModel,
    ModelLoadError,
    export,
    load_checkpoint_safely,
    register_model_class,
)

__all__ = [
    "DrainTimeoutAction",
    "DrainTimeoutExceeded",
    "ExportError",
    "ExportStore",
    "HotReloadManager",
    "InvalidVersionNameError",
    "LoadedModel",
    "ModelLoadError",
    "NoModelLoaded",
    "NoPreviousVersion",
    "ReloadInProgress",
    "ReloadPhase",
    "ReloadRecord",
    "ReloadResult",
    "WorkerInfo",
    "WorkerStatus",
    "export",
    "load_checkpoint_safely",
    "register_model_class",
]
