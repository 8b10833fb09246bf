"""The one place that decides bfloat16 autocast."""

import pytest
import torch

from imsct.precision import bf16_native, use_bf16


def test_auto_follows_the_hardware(monkeypatch):
    monkeypatch.delenv("IMSCT_PRECISION", raising=False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert use_bf16("auto", "cpu") == bf16_native(torch.device("cpu"))
    assert use_bf16(True, "cpu") is True and use_bf16(False, "cpu") is False


def test_onednn_limited_below_avx512_has_no_native_bf16(monkeypatch):
    monkeypatch.delenv("IMSCT_PRECISION", raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert bf16_native("cpu") is False and use_bf16("auto", "cpu") is False


@pytest.mark.parametrize("value,expected", [("float32", False), ("bfloat16", True)])
def test_environment_overrides_every_setting(monkeypatch, value, expected):
    monkeypatch.setenv("IMSCT_PRECISION", value)
    assert all(use_bf16(amp, "cpu") is expected for amp in (True, False, "auto"))


def test_bad_values_are_named(monkeypatch):
    monkeypatch.setenv("IMSCT_PRECISION", "fp8")
    with pytest.raises(ValueError, match="IMSCT_PRECISION"):
        use_bf16("auto", "cpu")
    monkeypatch.delenv("IMSCT_PRECISION")
    with pytest.raises(ValueError, match="amp="):
        use_bf16("sometimes", "cpu")
