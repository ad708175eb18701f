"""The Python tour example runs on the demo model and shows what it promises."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_python_tour_prints_tokens_activation_lens_and_patching():
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "tour.py")], capture_output=True, text=True,
                            timeout=240, env={**os.environ, "COLUMNS": "120", "NO_COLOR": "1"})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert " France" in out and " Paris" in out
    assert "layer" in out.lower() and "%" in out  # the lens by layer and the patching table
