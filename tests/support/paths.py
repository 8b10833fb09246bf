"""Where the repository's parts are, for tests and the scripts that reuse the test servers."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "bundle"
APP_DIR = ROOT / "apps" / "imsct_label"
