"""The transformers remote code that `nexus export` copies into an export directory.

`configuration_nexus.py` and `modeling_nexus.py` are standalone (torch + transformers only): they
run wherever the export is loaded with `trust_remote_code=True`, without Nexus installed."""

from pathlib import Path

REMOTE_CODE_FILES = ("configuration_nexus.py", "modeling_nexus.py")
REMOTE_CODE_DIR = Path(__file__).parent
