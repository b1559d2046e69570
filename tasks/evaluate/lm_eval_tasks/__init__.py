"""pkdq's offline lm-eval tasks: YAMLs that read ../shared/data (or PKDQ_DATA_DIR), plus utils.py.

lm-eval loads this folder with `include_path=TASKS_DIR` and imports `utils.py` by file path, so
the YAMLs and their hooks travel together and work from an installed wheel too.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
