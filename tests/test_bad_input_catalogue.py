"""docs/bad-inputs.md is generated from the tests' bad_input marks: it must say what the tests show now."""

import subprocess
import sys
from pathlib import Path

CATALOGUE = Path(__file__).resolve().parent / "bad_input_catalogue.py"


def test_the_catalogue_of_bad_inputs_is_up_to_date():
    result = subprocess.run([sys.executable, str(CATALOGUE), "--check"], capture_output=True, text=True, timeout=600,
                            cwd=CATALOGUE.parent.parent)
    assert result.returncode == 0, result.stderr + result.stdout[-2000:]
