"""Process environment pkdq needs before heavy imports: offline HF, quiet local Prefect.

Prefect reads its settings at import, so this must run before `import prefect`.
"""

from __future__ import annotations

import os

from tasks.core.common import cache_dir, set_offline_env


def configure_environment() -> None:
    set_offline_env()
    prefect_home = cache_dir() / "prefect"
    defaults = {
        "PREFECT_HOME": str(prefect_home),
        "PREFECT_LOCAL_STORAGE_PATH": str(prefect_home / "storage"),
        # The ephemeral API takes 12-22 s to start here; the 20 s default can fail.
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "INFO",
        "PREFECT_UI_ENABLED": "false",
        "DO_NOT_TRACK": "1",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
