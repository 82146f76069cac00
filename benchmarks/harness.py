"""The test suite's server process and stream client (tests/support) for the benchmarks, which
run as scripts (`python benchmarks/NAME.py`), so the repository root is not on their path."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.client import StreamClient  # noqa: E402
from tests.support.process import ServerProcess  # noqa: E402

__all__ = ["ServerProcess", "StreamClient"]
