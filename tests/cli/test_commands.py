"""One command line: every sub-command registered, `python -m` shims onto it, --version, fast --help."""

import subprocess
import sys

import pytest

from imsct import __version__, cli, weights


@pytest.mark.parametrize("command", cli.COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: imsct {command}") and "example" in out


def test_version(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert capsys.readouterr().out.strip() == f"imsct {__version__}"


@pytest.mark.parametrize("module,command", [("imsct.phantoms", "phantoms"), ("imsct.dicom", "dicom"), ("imsct.export", "export")])
def test_python_m_is_the_same_command(module, command):
    proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: imsct {command}")


def test_help_loads_neither_torch_nor_monai():
    code = "import sys; from imsct import cli; cli.build_parser(); print(sorted(m for m in ('torch', 'monai') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_export_names_a_missing_model(tmp_path, capsys):
    assert cli.main(["export", "--models", str(tmp_path), "--model", "tumor"]) == 2
    assert f"{weights.spec('tumor').filename} not found" in capsys.readouterr().err
