"""Packaging: kernels/ is installed as lopfast.kernels, from a real (non-editable) install."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not (ROOT / "pyproject.toml").exists(), reason="needs the source tree")
def test_installed_copy_has_kernels_subpackage(tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(ROOT)],
        check=True, cwd=tmp_path, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    assert (target / "lopfast" / "kernels" / "__init__.py").exists()
    code = (
        "import lopfast, lopfast.kernels, lopfast.layers;"
        "print(lopfast.kernels.__file__);"
        "print(lopfast.__file__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(target)},
    ).stdout.split()
    assert all(line.startswith(str(target)) for line in out), out


def test_works_without_triton_and_says_so_only_when_asked():
    # triton is optional: with it missing, lopfast imports quietly, runs the reference, and a
    # forced triton backend is a clear error
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, lopfast, torch.nn as nn\n"
        "m = lopfast.expand(nn.Conv2d(3, 4, 3))\n"
        "assert m(torch.randn(1, 3, 5, 5)).shape == (1, 4, 3, 3)\n"
        "assert torch.isfinite(lopfast.sp_loss(torch.randn(4, 3), torch.randn(4, 5)))\n"
        "try:\n"
        "    lopfast.sp_loss(torch.randn(4, 3), torch.randn(4, 5), backend='triton')\n"
        "except RuntimeError as e:\n"
        "    assert 'triton is not installed' in str(e)\n"
        "else:\n"
        "    raise AssertionError('forced triton without triton did not fail')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "Triton not available" not in proc.stderr, proc.stderr
